"""``rms_norm`` (our CPU RMS-normalisation kernel) against a float64 oracle
and ``mx.fast.rms_norm``: dtypes, decode and prompt sizes, strided input,
no weight, MLX's output dtype rule; gradients; errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels as mk

from conftest import DTYPE_IDS, FLOAT_DTYPES, rand, to_f64, ulp


def check(x, weight, eps=1e-6):
    out = mk.rms_norm(x, weight, eps)
    stock = mx.fast.rms_norm(x, weight, eps)
    assert out.dtype == stock.dtype and out.shape == x.shape
    x64 = to_f64(x)
    exact = x64 / np.sqrt((x64**2).mean(axis=-1, keepdims=True) + eps)
    if weight is not None:
        exact = exact * to_f64(weight)
    # float32 arithmetic (a few roundings, sums of D squares), one final
    # rounding to the output dtype.
    bound = ulp(exact, out.dtype) + (x.shape[-1] + 8) * 2.0**-24 * np.abs(exact) + 1e-30
    err = np.abs(to_f64(out) - exact)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"
    return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 1, 32, 128), (3, 300, 64), (5, 1)], ids=str)
def test_against_oracle(dtype, shape):
    check(rand(shape, dtype, seed=shape[-1]), rand((shape[-1],), dtype, seed=1))


def test_no_weight_strided_and_promotion():
    check(rand((4, 64), seed=2), None)
    check(rand((6, 4, 32), seed=3).transpose(1, 0, 2), rand((32,), seed=4))  # strided rows
    check(rand((4, 64), seed=5)[:, ::2], rand((32,), seed=6))  # strided last axis
    out = check(rand((2, 16), mx.bfloat16, seed=7), rand((16,), mx.float32, seed=8))
    assert out.dtype == mx.float32


def test_gradients():
    x, w, cot = rand((3, 16), seed=1), rand((16,), seed=2), rand((3, 16), seed=3)
    ours = mx.grad(lambda x, w: (mk.rms_norm(x, w, 1e-5) * cot).sum(), argnums=(0, 1))(x, w)
    want = mx.grad(lambda x, w: (mx.fast.rms_norm(x, w, 1e-5) * cot).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match=r"\[rms_norm\] weight must be 1-d"):
        mk.rms_norm(rand((2, 8)), rand((4,)), 1e-6)
    with pytest.raises(ValueError, match=r"\[rms_norm\] Supports float32"):
        mk.rms_norm(mx.ones((2, 8), mx.int32), None, 1e-6)
