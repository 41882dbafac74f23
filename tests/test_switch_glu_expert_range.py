"""``switch_glu(..., first_expert=...)``: the expert-parallel form, where
the weights are a contiguous range of a larger set of experts and slots
routed outside it contribute nothing.

Checked against the unsharded op: the partial outputs of ranges that
cover all experts sum to the whole output (the all_sum of expert
parallelism), each partial equals the plain-MLX reference with the other
ranges' slots weighted by zero, rows of other ranges' slots are zero
without scores, and the corner cases (every slot here, none here, k larger
than the range, an empty range) give what the definition says.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import reference

from conftest import DTYPE_IDS, FLOAT_DTYPES, rand

E, D, H, T, K = 8, 64, 96, 7, 6
# Relative tolerance of a partial sum against the whole, by activation dtype.
TOLERANCE = {mx.float32: 2e-5, mx.float16: 2e-2, mx.bfloat16: 4e-2}
RANGES = [(0, 3), (3, 8)]  # uneven ranges: the op does not need E / n


def problem(dtype, seed=0, k=K):
    rng = np.random.default_rng(seed)
    x = rand((T, D), dtype, seed=seed)
    weights = [rand(shape, dtype, seed=seed + i + 1, scale=0.1) for i, shape in enumerate([(E, H, D), (E, H, D), (E, D, H)])]
    ids = mx.array(np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32))
    scores = mx.softmax(rand((T, k), seed=seed + 9), axis=-1).astype(dtype)
    return x, weights, ids, scores


def quantize(weights):
    return [mx.quantize(w, 32, 4) for w in weights]


def local(weights, start, stop, quantized):
    if quantized:
        return [tuple(part[start:stop] for part in triple) for triple in weights]
    return [w[start:stop] for w in weights]


def call(x, weights, ids, scores, quantized, first_expert=None):
    extra = dict(group_size=32, bits=4) if quantized else {}
    return mk.switch_glu(x, *weights, ids, scores, first_expert=first_expert, **extra)


def relative(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return np.abs(a - b).max() / max(1.0, np.abs(b).max())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("with_scores", [True, False], ids=["combine", "per-slot"])
def test_partials_add_up_to_the_whole(dtype, quantized, with_scores):
    x, weights, ids, scores = problem(dtype)
    weights = quantize(weights) if quantized else weights
    scores = scores if with_scores else None
    whole = call(x, weights, ids, scores, quantized)
    partials = [call(x, local(weights, a, b, quantized), ids, scores, quantized, first_expert=a) for a, b in RANGES]
    assert all(p.shape == whole.shape and p.dtype == whole.dtype for p in partials)
    assert relative(partials[0] + partials[1], whole) <= TOLERANCE[dtype]
    if not with_scores:
        # Each slot's row comes from exactly one range; the other is zero.
        for (a, b), partial in zip(RANGES, partials):
            here = np.array((ids >= a) & (ids < b))
            rows = np.array(partial.astype(mx.float32))
            assert np.all(rows[~here] == 0)
            np.testing.assert_array_equal(rows[here], np.array(whole.astype(mx.float32))[here])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_partial_equals_reference_with_other_slots_weighted_zero(dtype):
    x, weights, ids, scores = problem(dtype, seed=3)
    a, b = RANGES[1]
    here = ((ids >= a) & (ids < b)).astype(scores.dtype)
    want = reference.switch_glu(x, *weights, ids.astype(mx.uint32), scores * here)
    got = call(x, local(weights, a, b, False), ids, scores, False, first_expert=a)
    assert relative(got, want) <= 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q4"])
def test_every_slot_here_none_here_and_empty_range(quantized):
    x, weights, ids, scores = problem(mx.float32, seed=5, k=2)
    weights = quantize(weights) if quantized else weights
    whole = call(x, weights, ids, scores, quantized)
    # The whole set as one range: the plain op's result.
    everything = call(x, weights, ids, scores, quantized, first_expert=0)
    np.testing.assert_allclose(np.array(everything), np.array(whole), rtol=1e-6, atol=1e-6)
    # Every slot routed into experts 0..1, none into 2..7.
    ids_low = ids % 2
    low = call(x, local(weights, 0, 2, quantized), ids_low, scores, quantized, first_expert=0)
    np.testing.assert_allclose(np.array(low), np.array(call(x, weights, ids_low, scores, quantized)), rtol=1e-6, atol=1e-6)
    high = call(x, local(weights, 2, 8, quantized), ids_low, scores, quantized, first_expert=2)
    assert np.all(np.array(high) == 0)
    # A range past every id, and an empty range.
    assert np.all(np.array(call(x, weights, ids, scores, quantized, first_expert=8)) == 0)
    empty = call(x, local(weights, 4, 4, quantized), ids, None, quantized, first_expert=4)
    assert empty.shape == (T, 2, D) and np.all(np.array(empty) == 0)


def test_k_larger_than_the_range_and_foreign_ids():
    # k = 6 slots per token on a range of 2 experts; negative and huge ids
    # belong to no range here and are skipped, never read.
    x, weights, ids, scores = problem(mx.float32, seed=7)
    ids = mx.where(mx.arange(K)[None, :] == 0, mx.array(-5), ids)
    ids = mx.where(mx.arange(K)[None, :] == 1, mx.array(1 << 20), ids)
    got = call(x, local(weights, 2, 4, False), ids, scores, False, first_expert=2)
    here = ((ids >= 2) & (ids < 4)).astype(mx.float32)
    want = reference.switch_glu(x, *weights, mx.clip(ids, 0, E - 1).astype(mx.uint32), scores * here)
    assert relative(got, want) <= 1e-5


def test_errors():
    x, weights, ids, scores = problem(mx.float32)
    with pytest.raises(ValueError, match=r"\[switch_glu\] gradients are not defined with first_expert"):
        mx.grad(lambda x: call(x, local(weights, 0, 4, False), ids, scores, False, first_expert=0).sum())(x)
    with pytest.raises(ValueError, match=r"\[switch_glu\] first_expert must be >= 0"):
        call(x, weights, ids, scores, False, first_expert=-1)
    with pytest.raises(ValueError, match=r"\[switch_glu\] indices must be integers"):
        call(x, weights, ids.astype(mx.float32), scores, False, first_expert=0)


def test_layer_composed_path_skips_other_ranges():
    # A SwitchGLU with biases runs the composition, not the fused op: the
    # expert range must be honoured there too.
    layer = mk.SwitchGLU(D, H, E, bias=True)
    mx.eval(layer.parameters())
    x, _, ids, scores = problem(mx.float32, seed=11)
    whole = layer(x, ids.astype(mx.uint32), scores)
    partials = []
    for a, b in RANGES:
        part = mk.SwitchGLU(D, H, b - a, bias=True)
        part.update({name: {key: value[a:b] for key, value in projection.items()}
                     for name, projection in layer.parameters().items()})
        part.first_expert = a
        partials.append(part(x, ids, scores))
    assert relative(partials[0] + partials[1], whole) <= 1e-5
