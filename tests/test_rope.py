"""``rope`` (our CPU rotary-embedding kernel) against a float64 oracle and
against ``mx.fast.rope``: both pairings, partial rotation (dims < D),
offsets, strided inputs (the transposed [B, L, H, d] -> [B, H, L, d] view
the attention passes), every float dtype; gradients; errors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels as mk

from conftest import DTYPE_IDS, FLOAT_DTYPES, rand, to_f64, ulp


def np_rope(x, dims, traditional, base, scale, offset):
    x64 = to_f64(x)
    out = x64.copy()
    L = x64.shape[-2]
    half = dims // 2
    positions = (offset + np.arange(L, dtype=np.float64)) * scale
    theta = positions[:, None] * base ** (-np.arange(half, dtype=np.float64) / half)[None, :]
    c, s = np.cos(theta), np.sin(theta)
    i1 = np.arange(half) * 2 if traditional else np.arange(half)
    i2 = i1 + 1 if traditional else i1 + half
    x1, x2 = x64[..., i1], x64[..., i2]
    out[..., i1] = x1 * c - x2 * s
    out[..., i2] = x1 * s + x2 * c
    return out, np.abs(positions).max(initial=0.0)


def check(x, dims, traditional=False, base=10000.0, scale=1.0, offset=0):
    out = mk.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)
    stock = mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)
    assert out.dtype == x.dtype and out.shape == x.shape == stock.shape
    exact, largest_position = np_rope(x, dims, traditional, base, scale, offset)
    # float32 angles: an error of a few ulps of the largest angle, times |x|;
    # then one rounding to the dtype.
    angle_error = 4 * largest_position * 2.0**-23 + 2.0**-22
    bound = angle_error * 2 * np.abs(to_f64(x)).max() + ulp(exact, x.dtype) + 1e-30
    err = np.abs(to_f64(out) - exact)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"
    return out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("traditional", [False, True], ids=["halves", "pairs"])
@pytest.mark.parametrize(
    "shape, dims, offset",
    [((1, 32, 1, 128), 128, 16), ((2, 4, 37, 64), 64, 0), ((1, 2, 5, 48), 32, 3000), ((3, 600, 16), 16, 7)],
    ids=["decode", "prefill", "partial-far", "3d-many-rows"],
)
def test_against_oracle(dtype, traditional, shape, dims, offset):
    check(rand(shape, dtype, seed=len(shape) + dims), dims, traditional, base=1e6, offset=offset)


def test_scale_and_strided_input():
    x = rand((1, 9, 4, 32), seed=3).transpose(0, 2, 1, 3)  # [B, H, L, d] view of [B, L, H, d]
    check(x, 32, scale=0.25, offset=5)
    check(rand((2, 3, 32), seed=4)[:, :, ::2], 16, offset=1)  # strided last axis


def test_gradient_is_the_inverse_rotation():
    x, cot = rand((1, 2, 6, 16), seed=1), rand((1, 2, 6, 16), seed=2)
    kw = dict(traditional=False, base=10000.0, scale=1.0, offset=4)
    g = mx.grad(lambda x: (mk.rope(x, 16, **kw) * cot).sum())(x)
    want = mx.grad(lambda x: (mx.fast.rope(x, 16, **kw) * cot).sum())(x)
    np.testing.assert_allclose(np.array(g), np.array(want), rtol=1e-4, atol=1e-5)


def test_errors_and_fallbacks():
    x = rand((1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"\[rope\] dims must be even"):
        mk.rope(x, 7, traditional=False, base=10000.0, scale=1.0, offset=0)
    with pytest.raises(ValueError, match=r"\[rope\] dims must be even"):
        mk.rope(x, 10, traditional=False, base=10000.0, scale=1.0, offset=0)
    with pytest.raises(ValueError, match=r"\[rope\] x must have at least 2"):
        mk.rope(rand((8,)), 8, traditional=False, base=10000.0, scale=1.0, offset=0)
    # Custom frequencies and array offsets are MLX's.
    freqs = mx.array([1.0, 2.0, 4.0, 8.0])
    np.testing.assert_array_equal(
        np.array(mk.rope(x, 8, traditional=False, base=None, scale=1.0, offset=2, freqs=freqs)),
        np.array(mx.fast.rope(x, 8, traditional=False, base=None, scale=1.0, offset=2, freqs=freqs)))
