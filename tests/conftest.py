"""Shared helpers of the gather_mm tests.

* ``rand`` / ``randint_values``: seeded random MLX arrays in a given dtype.
* ``to_f64``: an MLX array (any dtype, any strides) as a float64 NumPy array
  (exact: float16 and bfloat16 values are float32 values).
* ``np_gather_mm``: the float64 NumPy oracle with ``mx.gather_mm``'s
  semantics (default indices, broadcasting, 1-d operands).
* ``assert_close_to_exact``: checks a result against the float64 oracle with
  an element-wise bound derived from how the op is specified to compute
  (float32 accumulation, one rounding to the output dtype at the end):

      |out - exact| <= ulp_dtype(|exact| + g) + g,
      g = 2 * K * 2**-24 * (|a| @ |b|) + tiny

  ``g`` bounds float32 accumulation error (about twice the classic
  ``K * u * sum|a_k b_k|`` bound of a naive float32 dot product), and one ulp
  of the output dtype bounds the final rounding (half an ulp, doubled for
  safety). For float32 this is ~1e-5 relative for the sizes used here, for
  float16 ~1e-3 and bfloat16 ~8e-3 relative: loose enough for any correct
  summation order, far too tight for a wrong index, a dropped K tail or a
  misplaced column (all O(1) errors).
* ``build``: a fixture that runs a test with each kernel build selected by
  ``MLX_MOE_CPU_KERNELS`` (unset: the best the CPU has; ``avx2``;
  ``portable``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
import pytest

# Every test runs on the CPU unless it names another stream: on a Mac the
# default device is the GPU, and these tests check the CPU kernels there too.
# The Metal path has its own tests (test_metal_device.py, Macs only).
mx.set_default_device(mx.cpu)

FLOAT_DTYPES = [mx.float32, mx.float16, mx.bfloat16]
DTYPE_IDS = {mx.float32: "f32", mx.float16: "f16", mx.bfloat16: "bf16"}

# (mantissa bits, minimum normal exponent) of each output dtype.
_FLOAT_FORMAT = {
    mx.float32: (23, -126),
    mx.float16: (10, -14),
    mx.bfloat16: (7, -126),
}

# "default": the best build the CPU has (AVX-512 BF16, else AVX2, else
# portable); "avx2" caps it at AVX2 (the same as default on CPUs without
# AVX-512 BF16, or in builds that know only "portable"); "portable" forces
# the plain C++ (or NEON) build.
BUILDS = ["default", "avx2", "portable"]


def dtype_id(dtype) -> str:
    return DTYPE_IDS.get(dtype, str(dtype))


@pytest.fixture(params=BUILDS)
def build(request, monkeypatch):
    """Run the test once per CPU kernel build (the variable is read at every
    evaluation, so results must be evaluated inside the test)."""
    if request.param == "default":
        monkeypatch.delenv("MLX_MOE_CPU_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MLX_MOE_CPU_KERNELS", request.param)
    return request.param


# ----------------------------------------------------------------- arrays
def rand(shape: Sequence[int], dtype=mx.float32, seed: int = 0, scale: float = 1.0) -> mx.array:
    """Seeded standard-normal values (times ``scale``) cast to ``dtype``."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(tuple(shape)) * scale).astype(np.float32)
    out = mx.array(x).astype(dtype)
    mx.eval(out)
    return out


def rand_ints(shape: Sequence[int], dtype=mx.float32, seed: int = 0, low: int = -2, high: int = 2) -> mx.array:
    """Seeded small integer values in [low, high] as floats of ``dtype``:
    products and sums of these are exact in float32."""
    rng = np.random.default_rng(seed)
    x = rng.integers(low, high + 1, size=tuple(shape)).astype(np.float32)
    out = mx.array(x).astype(dtype)
    mx.eval(out)
    return out


def indices(values, dtype=mx.uint32) -> mx.array:
    """An evaluated index array."""
    out = mx.array(np.asarray(values, dtype=np.int64)).astype(dtype)
    mx.eval(out)
    return out


def to_f64(x: mx.array) -> np.ndarray:
    """Exact float64 copy of a floating MLX array (any layout)."""
    if x.dtype in (mx.float16, mx.bfloat16):
        x = x.astype(mx.float32)
    return np.array(x, copy=True).astype(np.float64)


def to_np_indices(x: Optional[mx.array]) -> Optional[np.ndarray]:
    if x is None:
        return None
    return np.array(x.astype(mx.int64), copy=True)


# ----------------------------------------------------------------- oracle
def np_gather_mm(
    a: np.ndarray,
    b: np.ndarray,
    lhs: Optional[np.ndarray] = None,
    rhs: Optional[np.ndarray] = None,
) -> np.ndarray:
    """float64 gather matmul with the semantics of mx.gather_mm."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if lhs is None and rhs is None:
        return a @ b
    squeeze_rows = a.ndim == 1
    squeeze_cols = b.ndim == 1
    if squeeze_rows:
        a = a[None, :]
    if squeeze_cols:
        b = b[:, None]
    assert a.shape[-1] == b.shape[-2]
    a_batch = a.shape[:-2]
    b_batch = b.shape[:-2]
    if lhs is None:
        lhs = np.arange(math.prod(a_batch), dtype=np.int64).reshape(a_batch)
    if rhs is None:
        rhs = np.arange(math.prod(b_batch), dtype=np.int64).reshape(b_batch)
    lhs, rhs = np.broadcast_arrays(np.asarray(lhs, np.int64), np.asarray(rhs, np.int64))
    a_flat = a.reshape(math.prod(a_batch), *a.shape[-2:])
    b_flat = b.reshape(math.prod(b_batch), *b.shape[-2:])
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    flat_l = lhs.reshape(-1)
    flat_r = rhs.reshape(-1)
    assert flat_l.size == 0 or (flat_l.min() >= 0 and flat_l.max() < a_flat.shape[0])
    assert flat_r.size == 0 or (flat_r.min() >= 0 and flat_r.max() < b_flat.shape[0])
    out = np.zeros((flat_l.size, M, N), dtype=np.float64)
    for p in range(flat_l.size):
        out[p] = a_flat[flat_l[p]] @ b_flat[flat_r[p]]
    out = out.reshape(*lhs.shape, M, N)
    if squeeze_rows:
        out = out.squeeze(-2)
    if squeeze_cols:
        out = out.squeeze(-1)
    return out


def ulp(x: np.ndarray, dtype) -> np.ndarray:
    """One unit in the last place of |x| in ``dtype`` (subnormals included)."""
    mant, emin = _FLOAT_FORMAT[dtype]
    mag = np.abs(np.asarray(x, dtype=np.float64))
    with np.errstate(divide="ignore"):
        exp = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    exp = np.maximum(np.where(mag > 0, exp, emin), emin)
    return np.exp2(exp - mant)


def error_bound(exact: np.ndarray, absprod: np.ndarray, K: int, dtype) -> np.ndarray:
    accumulation = 2.0 * max(K, 1) * 2.0**-24 * absprod + 1e-30
    return ulp(np.abs(exact) + accumulation, dtype) + accumulation


def expected_dtype(a_dtype, b_dtype):
    return (mx.zeros((), a_dtype) + mx.zeros((), b_dtype)).dtype


def assert_close_to_exact(
    out: mx.array,
    a: mx.array,
    b: mx.array,
    lhs: Optional[mx.array] = None,
    rhs: Optional[mx.array] = None,
    *,
    factor: float = 1.0,
) -> np.ndarray:
    """``out`` (our result) against the float64 oracle: dtype, shape and the
    element-wise bound of the module docstring. Returns the oracle."""
    mx.eval(out)
    dtype = expected_dtype(a.dtype, b.dtype)
    assert out.dtype == dtype, (out.dtype, dtype)
    a64, b64 = to_f64(a), to_f64(b)
    l64, r64 = to_np_indices(lhs), to_np_indices(rhs)
    exact = np_gather_mm(a64, b64, l64, r64)
    assert tuple(out.shape) == exact.shape, (out.shape, exact.shape)
    absprod = np_gather_mm(np.abs(a64), np.abs(b64), l64, r64)
    K = a.shape[-1]
    got = to_f64(out)
    assert np.all(np.isfinite(got)), "non-finite values in the result"
    bound = factor * error_bound(exact, absprod, K, dtype)
    err = np.abs(got - exact)
    if err.size:
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert np.all(err <= bound), (
            f"max error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} "
            f"(got {got[worst]!r}, exact {exact[worst]!r}, dtype {dtype})"
        )
    return exact


def assert_close(x: mx.array, y: mx.array, a: mx.array, b: mx.array, lhs=None, rhs=None):
    """Two results of the same product (ours and another implementation),
    each allowed the bound of ``assert_close_to_exact``: so their difference
    is within twice that bound."""
    mx.eval(x, y)
    assert x.dtype == y.dtype, (x.dtype, y.dtype)
    assert x.shape == y.shape, (x.shape, y.shape)
    a64, b64 = to_f64(a), to_f64(b)
    l64, r64 = to_np_indices(lhs), to_np_indices(rhs)
    exact = np_gather_mm(a64, b64, l64, r64)
    absprod = np_gather_mm(np.abs(a64), np.abs(b64), l64, r64)
    bound = 2.0 * error_bound(exact, absprod, a.shape[-1], x.dtype)
    diff = np.abs(to_f64(x) - to_f64(y))
    assert np.all(diff <= bound), f"max difference {diff.max():.3g}, bound there {bound.flat[np.argmax(diff - bound)]:.3g}"

