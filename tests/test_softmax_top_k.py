"""``softmax_top_k``, a softmax router's expert choice, against a float64
oracle and the stock composition (``reference.softmax_top_k``, mlx-lm's).

The chosen experts must be a top-k set of the logits, most probable first;
the scores the float64 softmax at those experts within the rounding the
dtype allows (one rounding of the probability; with ``normalize``, a sum
and a quotient rounded too). Indices are compared with the composition as
sets of values, since rounded probabilities can tie and ``argpartition``
then picks either.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import reference

from conftest import DTYPE_IDS, FLOAT_DTYPES, rand, to_f64

# Relative rounding of one operation in each dtype.
UNIT = {mx.float32: 2.0**-24, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}


def check(logits, k, normalize):
    indices, scores = mk.softmax_top_k(logits, k, normalize)
    assert indices.dtype == mx.uint32 and scores.dtype == logits.dtype
    assert indices.shape == scores.shape == (*logits.shape[:-1], k)
    E = logits.shape[-1]
    l64 = to_f64(logits).reshape(-1, E)
    ids = np.array(indices).reshape(-1, k).astype(np.int64)
    got = to_f64(scores).reshape(-1, k)
    probs = np.exp(l64 - l64.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    for row in range(l64.shape[0]):
        chosen = l64[row, ids[row]]
        assert len(set(ids[row])) == k, "an expert chosen twice"
        assert np.all(np.diff(chosen) <= 0), "not most probable first"
        others = np.delete(l64[row], ids[row])
        assert others.size == 0 or chosen.min() >= others.max(), "not a top-k set"
        want = probs[row, ids[row]]
        if normalize:
            want = want / want.sum()
        # Softmax in float32, then up to three roundings in the dtype.
        tolerance = (3 if normalize else 1) * UNIT[logits.dtype] + 64 * 2.0**-24
        np.testing.assert_array_less(np.abs(got[row] - want), tolerance * want + 1e-30)
    # The composition mlx-lm runs: the same chosen probabilities.
    stock_ids, stock_scores = reference.softmax_top_k(logits, k, normalize)
    np.testing.assert_allclose(
        np.sort(to_f64(scores).reshape(-1, k), axis=-1),
        np.sort(to_f64(stock_scores).reshape(-1, k), axis=-1),
        rtol=2 * UNIT[logits.dtype] + 64 * 2.0**-24, atol=1e-30,
    )
    return indices, scores


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "shape,k", [((1, 128), 8), ((37, 60), 4), ((2, 3, 7), 7), ((5, 64), 1), ((130, 128), 8), ((128,), 2)],
    ids=str,
)
def test_matches_oracle(dtype, normalize, shape, k):
    check(rand(shape, dtype, seed=k + len(shape), scale=3.0), k, normalize)


def test_float32_indices_equal_the_composition():
    logits = rand((50, 128), seed=3)
    indices, _ = mk.softmax_top_k(logits, 8, True)
    stock, _ = reference.softmax_top_k(logits, 8, True)
    assert np.array_equal(np.sort(np.array(indices), -1), np.sort(np.array(stock), -1))


def test_strided_logits_and_ties():
    # A transposed view: rows are not contiguous.
    logits = rand((16, 6), mx.bfloat16, seed=9).T
    check(logits, 3, True)
    # Equal logits: the lower experts, each 1/E (1/k normalized).
    indices, scores = mk.softmax_top_k(mx.zeros((2, 10)), 4)
    assert np.array_equal(np.array(indices), np.tile(np.arange(4), (2, 1)))
    np.testing.assert_allclose(np.array(scores), 0.1, rtol=1e-6)


def test_empty_rows():
    indices, scores = mk.softmax_top_k(mx.zeros((0, 16)), 2, True)
    assert indices.shape == scores.shape == (0, 2)


def test_gradient_is_the_compositions():
    logits = rand((4, 32), seed=1)
    weights = rand((4, 5), seed=2)

    def ours(l):
        return (mk.softmax_top_k(l, 5, True)[1] * weights).sum()

    indices, _ = mk.softmax_top_k(logits, 5, True)

    def composition(l):
        probs = mx.softmax(l, axis=-1, precise=True)
        picked = mx.take_along_axis(probs, indices, axis=-1)
        return (picked / picked.sum(axis=-1, keepdims=True) * weights).sum()

    np.testing.assert_allclose(
        np.array(mx.grad(ours)(logits)), np.array(mx.grad(composition)(logits)), rtol=1e-5, atol=1e-7
    )


def test_errors():
    with pytest.raises(ValueError, match=r"\[softmax_top_k\] k must be in \[1, 8\].*got 9"):
        mk.softmax_top_k(mx.zeros((2, 8)), 9)
    with pytest.raises(ValueError, match=r"\[softmax_top_k\] k must be in \[1, 8\].*got 0"):
        mk.softmax_top_k(mx.zeros((2, 8)), 0)
    with pytest.raises(ValueError, match=r"\[softmax_top_k\] logits must be float32"):
        mk.softmax_top_k(mx.zeros((2, 8), mx.int32), 2)
    with pytest.raises(ValueError, match=r"\[softmax_top_k\] logits must have at least one dimension"):
        mk.softmax_top_k(mx.array(1.0), 1)
