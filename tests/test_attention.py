"""``scaled_dot_product_attention`` (our CPU attention kernel) against a
float64 oracle: decode (one query over a cache), prefill (causal, query
blocks across key blocks), grouped-query and plain multi-head attention,
head sizes that are not multiples of the SIMD width, key lengths that are
not multiples of the key block, strided inputs (a slice of a preallocated
cache), every kernel build; errors, gradients, the fallback for array
masks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import reference

from conftest import DTYPE_IDS, FLOAT_DTYPES, rand, to_f64

# The result is a convex combination of value rows computed in float32 and
# rounded once: its error is a few units of the output dtype's rounding
# relative to the values' scale (the scores' float32 error is far below).
TOLERANCE = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def np_attention(q, k, v, scale, causal):
    q64, k64, v64 = to_f64(q), to_f64(k), to_f64(v)
    groups = q64.shape[1] // k64.shape[1]
    k64, v64 = np.repeat(k64, groups, axis=1), np.repeat(v64, groups, axis=1)
    scores = scale * q64 @ np.swapaxes(k64, -1, -2)
    if causal:
        L, S = q64.shape[2], k64.shape[2]
        visible = (np.arange(L)[:, None] + (S - L)) >= np.arange(S)[None, :]
        scores = np.where(visible, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v64


def check(q, k, v, scale=None, mask=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = mk.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    stock = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    assert out.dtype == stock.dtype and out.shape == stock.shape
    exact = np_attention(q, k, v, scale, mask == "causal")
    err = np.abs(to_f64(out) - exact).max() if exact.size else 0.0
    assert err <= TOLERANCE[q.dtype] * max(1.0, np.abs(to_f64(v)).max()), err
    return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim",
    [(8, 2, 64), (4, 4, 32), (6, 1, 20), (2, 2, 128)],
    ids=["gqa", "mha", "mqa-odd-dim", "d128"],
)
@pytest.mark.parametrize(
    "L, S, mask",
    [(1, 1, None), (1, 37, None), (1, 300, None), (5, 5, "causal"), (70, 70, "causal"),
     (9, 200, "causal"), (3, 131, None), (130, 130, "causal")],
)
def test_against_oracle(build, dtype, heads, kv_heads, head_dim, L, S, mask):
    q = rand((2, heads, L, head_dim), dtype, seed=L)
    k = rand((2, kv_heads, S, head_dim), dtype, seed=S + 1)
    v = rand((2, kv_heads, S, head_dim), dtype, seed=S + 2)
    check(q, k, v, mask=mask)


def test_value_dim_differs_and_large_scores(build):
    q = rand((1, 4, 3, 16), seed=1, scale=4.0)
    k = rand((1, 2, 50, 16), seed=2, scale=4.0)  # scores in the hundreds: softmax saturates
    v = rand((1, 2, 50, 24), seed=3)
    out = check(q, k, v, scale=1.0, mask="causal")
    assert out.shape == (1, 4, 3, 24)


def test_strided_cache_slice(build):
    """Keys and values read in place from a slice of a larger buffer (as
    the KV cache hands them over), and queries from a transposed view."""
    buffer_k = rand((1, 2, 256, 32), seed=1)
    buffer_v = rand((1, 2, 256, 32), seed=2)
    k, v = buffer_k[..., :77, :], buffer_v[..., :77, :]
    q = rand((1, 3, 4, 32), seed=3).transpose(0, 2, 1, 3)  # [1, 4, 3, 32]: 4 heads, 3 positions
    check(q, k, v, mask="causal")
    # A non-contiguous last axis is copied first.
    kt = rand((1, 2, 32, 77), seed=4).swapaxes(-1, -2)
    check(rand((1, 4, 1, 32), seed=5), kt, v)


def test_empty():
    q = mx.zeros((1, 4, 0, 16))
    k = v = rand((1, 2, 5, 16))
    assert mk.scaled_dot_product_attention(q, k, v, scale=1.0).shape == (1, 4, 0, 16)


def test_errors():
    q, k, v = rand((1, 4, 2, 16)), rand((1, 2, 5, 16)), rand((1, 2, 5, 16))
    sdpa = mk.scaled_dot_product_attention
    with pytest.raises(ValueError, match=r"\[scaled_dot_product_attention\] q must be 4-d"):
        sdpa(q[0], k, v, scale=1.0)
    with pytest.raises(ValueError, match="query heads must be a multiple"):
        sdpa(rand((1, 3, 2, 16)), k, v, scale=1.0)
    with pytest.raises(ValueError, match="same head dimension"):
        sdpa(rand((1, 4, 2, 8)), k, v, scale=1.0)
    with pytest.raises(ValueError, match="same heads and length"):
        sdpa(q, k, rand((1, 2, 6, 16)), scale=1.0)
    with pytest.raises(ValueError, match="one dtype"):
        sdpa(q, k.astype(mx.float16), v, scale=1.0)
    with pytest.raises(ValueError, match="different batch sizes"):
        sdpa(q, rand((2, 2, 5, 16)), rand((2, 2, 5, 16)), scale=1.0)
    with pytest.raises(ValueError, match="mask must be None or"):
        sdpa(q, k, v, scale=1.0, mask="sliding")


def test_array_mask_uses_mlx():
    q, k, v = rand((1, 2, 3, 16)), rand((1, 2, 5, 16)), rand((1, 2, 5, 16))
    mask = mx.array(np.random.default_rng(0).random((3, 5)) > 0.3)
    out = mk.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    np.testing.assert_array_equal(
        np.array(out), np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)))


def test_gradients():
    q, k, v = rand((1, 4, 3, 16), seed=1), rand((1, 2, 7, 16), seed=2), rand((1, 2, 7, 16), seed=3)
    cot = rand((1, 4, 3, 16), seed=4)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, scale=0.3, mask="causal") * cot).sum()

    ours = mx.grad(loss(mk.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(loss(reference.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_compiles():
    q, k, v = rand((1, 4, 3, 16), seed=1), rand((1, 2, 7, 16), seed=2), rand((1, 2, 7, 16), seed=3)
    f = mx.compile(lambda q, k, v: mk.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal"))
    np.testing.assert_allclose(
        np.array(f(q, k, v)),
        np.array(reference.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")),
        rtol=1e-5, atol=1e-5)
