"""The quantized ops: ``gather_qmm`` and ``switch_glu`` on quantized experts.

Oracle: a float64 NumPy product with the float32 dequantization of
``mx.dequantize`` (the exact weights up to float32 rounding). Our kernels
dequantize into the compute dtype and accumulate in float32, so the bound
per output element is

    |out - exact| <= u_T * (|x| @ |W|) + 2 K 2^-24 (|x| @ |W|) + ulp_T(|exact|)

with u_T the unit roundoff of the compute dtype T (the rounding of each
dequantized weight), the float32 accumulation term, and the final rounding
to T. A wrong code, scale, group or index is an O(1) error and fails it.
Also checked against ``mx.gather_qmm`` itself (same semantics), and the
errors for bad input.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import reference

from conftest import DTYPE_IDS, FLOAT_DTYPES, indices, rand, to_f64, ulp

# (mode, group_size, bits): every affine width (each unpacks differently),
# every group size, and mxfp4.
FORMATS = [
    ("affine", 64, 1),
    ("affine", 64, 2),
    ("affine", 32, 3),
    ("affine", 64, 4),
    ("affine", 128, 4),
    ("affine", 32, 4),
    ("affine", 128, 5),
    ("affine", 64, 6),
    ("affine", 32, 8),
    ("mxfp4", 32, 4),
]
FORMAT_IDS = [f"{m}{b}-g{g}" for m, g, b in FORMATS]
UNIT_ROUNDOFF = {mx.float32: 2.0**-24, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}


def quantized(shape, mode, group_size, bits, dtype, seed=0):
    """mx.quantize of a random matrix; affine scales/biases in `dtype`."""
    w = rand(shape, seed=seed, scale=1.0 / np.sqrt(shape[-1]))
    if mode == "affine":
        q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
        return q, s.astype(dtype), b.astype(dtype)
    q, s = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    return q, s, None


def dequantized_f64(q, s, b, mode, group_size, bits) -> np.ndarray:
    full = mx.dequantize(q, s, b, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
    return to_f64(full)


def np_gather_qmm(x, w_full, lhs, rhs, transpose):
    """float64 gather matmul with mx.gather_qmm's index semantics."""
    xf = to_f64(x)
    x_flat = xf.reshape(-1, *xf.shape[-2:])
    w_flat = w_full.reshape(-1, *w_full.shape[-2:])
    if transpose:
        w_flat = np.swapaxes(w_flat, -1, -2)
    lhs_np = np.arange(x_flat.shape[0]).reshape(xf.shape[:-2]) if lhs is None else np.array(lhs)
    rhs_np = np.arange(w_flat.shape[0]).reshape(w_full.shape[:-2]) if rhs is None else np.array(rhs)
    lhs_np, rhs_np = np.broadcast_arrays(lhs_np, rhs_np)
    a = x_flat[lhs_np.reshape(-1)]
    b = w_flat[rhs_np.reshape(-1)]
    out = a @ b
    absprod = np.abs(a) @ np.abs(b)
    shape = lhs_np.shape + out.shape[-2:]
    return out.reshape(shape), absprod.reshape(shape)


def assert_within_bound(out, exact, absprod, K, dtype, extra=0.0):
    got = to_f64(out)
    assert got.shape == exact.shape
    bound = (UNIT_ROUNDOFF[dtype] + 2 * K * 2.0**-24) * absprod + ulp(exact, dtype) + 1e-30 + extra
    excess = np.abs(got - exact) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else None
    assert excess.size == 0 or excess.max() <= 0, (
        f"error {np.abs(got - exact)[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    )


def int8_rounding_bound(x, w_full, lhs, rhs, group_size):
    """The documented extra error of the AVX2 build's 8-bit activation
    decode kernel (4-bit affine, group 64/128, bfloat16 activations; README
    "Numerics"): each activation off by at most max_g|x| / 254 of its
    weight group, times the group's |w|. A sound bound whichever kernel ran."""
    xf = np.abs(to_f64(x))
    x_flat = xf.reshape(-1, *xf.shape[-2:])
    w_flat = np.abs(w_full.reshape(-1, *w_full.shape[-2:]))
    lhs_np = np.arange(x_flat.shape[0]).reshape(xf.shape[:-2]) if lhs is None else np.array(lhs)
    rhs_np = np.arange(w_flat.shape[0]).reshape(w_full.shape[:-2]) if rhs is None else np.array(rhs)
    lhs_np, rhs_np = np.broadcast_arrays(lhs_np, rhs_np)
    a = x_flat[lhs_np.reshape(-1)]  # [pairs, M, K]
    b = w_flat[rhs_np.reshape(-1)]  # [pairs, N, K]
    K = a.shape[-1]
    steps = a.reshape(*a.shape[:-1], K // group_size, group_size).max(-1) / 254
    w_groups = b.reshape(*b.shape[:-1], K // group_size, group_size).sum(-1)
    out = steps @ np.swapaxes(w_groups, -1, -2)
    return out.reshape(lhs_np.shape + out.shape[-2:])


def check(x, q, s, b, mode, group_size, bits, lhs=None, rhs=None, transpose=True, sorted_indices=False):
    dtype = x.dtype
    out = mk.gather_qmm(
        x, q, s, b, lhs, rhs, transpose=transpose, group_size=group_size, bits=bits, mode=mode,
        sorted_indices=sorted_indices,
    )
    stock = mx.gather_qmm(
        x, q, s, b, lhs, rhs, transpose=transpose, group_size=group_size, bits=bits, mode=mode,
        sorted_indices=sorted_indices,
    )
    assert out.dtype == stock.dtype and out.shape == stock.shape
    full = dequantized_f64(q, s, b, mode, group_size, bits)
    exact, absprod = np_gather_qmm(x, full, lhs, rhs, transpose)
    extra = 0.0
    if dtype == mx.bfloat16 and mode == "affine" and bits == 4 and group_size in (64, 128) and transpose:
        extra = int8_rounding_bound(x, full, lhs, rhs, group_size)
    assert_within_bound(out, exact, absprod, x.shape[-1], dtype, extra)
    return out


# ---------------------------------------------------------------- gather_qmm
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("transpose", [True, False], ids=["wT", "w"])
def test_formats_dtypes(build, fmt, dtype, transpose):
    mode, group_size, bits = fmt
    # N = 99: a ragged last column tile; [E, K, N] quantizes along N.
    E, N, K = (6, 99, 128) if transpose else (6, 128, 96)
    shape = (E, N, K) if transpose else (E, K, N)
    q, s, b = quantized(shape, mode, group_size, bits, dtype)
    x = rand((10, 3, K), dtype, seed=1)
    rhs = indices([0, 5, 5, 2, 0, 1, 5, 3, 3, 0])  # ragged; expert 4 empty
    check(x, q, s, b, mode, group_size, bits, rhs=rhs, transpose=transpose)


@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
@pytest.mark.parametrize("sorted_indices", [False, True])
def test_switch_linear_shapes(build, tokens, sorted_indices):
    """mlx-lm's SwitchLinear call: x [T * k, 1, D], one expert per row; one
    token (decode), a few, many; ragged routing; the sorted-indices hint."""
    mode, group_size, bits = "affine", 64, 4
    E, N, K, k = 16, 198, 320, 4
    q, s, b = quantized((E, N, K), mode, group_size, bits, mx.bfloat16, seed=tokens)
    rng = np.random.default_rng(tokens)
    experts = np.stack([rng.permutation(E)[:k] for _ in range(tokens)]).reshape(-1)
    if sorted_indices:
        experts = np.sort(experts)
    x = rand((tokens * k, 1, K), mx.bfloat16, seed=2)
    check(x, q, s, b, mode, group_size, bits, rhs=indices(experts), sorted_indices=sorted_indices)


@pytest.mark.parametrize("rows", [16, 17, 33])
@pytest.mark.parametrize("bits", [4, 8])
def test_all_rows_one_expert(build, rows, bits):
    """One expert with many rows: up to 16 the bfloat16 direct kernel (where
    the build has one), beyond it the dequantized-block path."""
    q, s, b = quantized((8, 50, 256), "affine", 128, bits, mx.bfloat16)
    x = rand((rows, 1, 256), mx.bfloat16, seed=3)
    check(x, q, s, b, "affine", 128, bits, rhs=indices([7] * rows))


# The AVX2 build's integer GEMM (quantized_gemm_avx2.h) takes 4/8-bit affine
# codes with half-precision activations beyond 8 rows: rows around its
# 4-row tiles and 64-row blocks, columns around its 8- and 16-column panels,
# every group size it unrolls.
@pytest.mark.parametrize("rows", [9, 13, 64, 65, 131])
@pytest.mark.parametrize("N", [1, 9, 17, 40])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=DTYPE_IDS.get)
def test_many_rows_integer_formats(build, rows, N, bits, group_size, dtype):
    K = 384 if group_size != 128 else 256
    q, s, b = quantized((3, N, K), "affine", group_size, bits, dtype, seed=rows + N)
    x = rand((rows, 1, K), dtype, seed=rows)
    rhs = indices([1] * (rows - 2) + [0, 2])  # one expert with many rows, two with one
    check(x, q, s, b, "affine", group_size, bits, rhs=rhs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=DTYPE_IDS.get)
def test_many_rows_special_activations(build, bits, dtype):
    """A NaN or infinity poisons only its own row (and every column of it);
    an all-zero row gives zeros; an outlier 6e4 times its group's other
    values keeps the documented bound of the integer path (README,
    "Numerics"): each activation off by at most half a step of its group's
    int16 grid, max_g |x| / 65534, on top of the float bound."""
    K, N, rows, group_size = 128, 20, 24, 64
    q, s, b = quantized((1, N, K), "affine", group_size, bits, dtype, seed=5)
    base = np.array(rand((rows, 1, K), mx.float32, seed=6))
    base[3, 0, 70] = np.nan
    base[5, 0, 10] = np.inf
    base[7] = 0.0
    base[9, 0, :] = 1e-3
    base[9, 0, 5] = 60.0
    x = mx.array(base).astype(dtype)
    out = mk.gather_qmm(x, q, s, b, rhs_indices=indices([0] * rows), group_size=group_size, bits=bits)
    out = np.array(out.astype(mx.float32))
    assert np.isnan(out[3]).all() and not np.isfinite(out[5]).any()
    finite = [r for r in range(rows) if r not in (3, 5)]
    assert np.isfinite(out[finite]).all()
    # The weights exactly (float32 scales: MLX dequantizes bfloat16 ones in
    # bfloat16, whose rounding the integer path does not have).
    full = dequantized_f64(q, s.astype(mx.float32), b.astype(mx.float32), "affine", group_size, bits)
    xs = to_f64(x)[finite]
    exact, absprod = np_gather_qmm(x[mx.array(finite)], full, None, indices([0] * len(finite)), True)
    half_steps = np.abs(xs).reshape(len(finite), 1, K // group_size, group_size).max(-1) / 65534
    w_group_sums = np.abs(full[0]).reshape(N, K // group_size, group_size).sum(-1)
    rounding = half_steps @ w_group_sums.T  # [rows, 1, N]
    bound = (UNIT_ROUNDOFF[dtype] + 2 * K * 2.0**-24) * absprod + ulp(exact, dtype) + rounding
    excess = np.abs(out[finite] - exact) - bound
    at = np.unravel_index(np.argmax(excess), excess.shape)
    assert (excess <= 0).all(), (at, out[finite][at], exact[at], bound[at], rounding[at])
    assert (out[7] == 0.0).all()


def _decode_outlier_case():
    """One bfloat16 row with an outlier 6e4 times its group's other values,
    times a 4-bit g64 matrix: the rows, the exact product and the per-group
    error scale sum_g max_g|x| * sum_{k in g}|w_k|."""
    K, N, group_size = 256, 12, 64
    q, s, b = quantized((1, N, K), "affine", group_size, 4, mx.bfloat16, seed=8)
    row = np.full((1, 1, K), 1e-3, np.float32)
    row[0, 0, 5] = 60.0
    x = mx.array(row).astype(mx.bfloat16)
    full = dequantized_f64(q, s.astype(mx.float32), b.astype(mx.float32), "affine", group_size, 4)
    exact, absprod = np_gather_qmm(x, full, None, indices([0]), True)
    maxima = np.abs(to_f64(x)).reshape(1, 1, K // group_size, group_size).max(-1)
    scale = maxima @ np.abs(full[0]).reshape(N, K // group_size, group_size).sum(-1).T
    return x, (q, s, b), exact, absprod, scale


@pytest.mark.parametrize("build", ["default", "avx2"], indirect=True)
def test_decode_int8_activation_bound(build):
    """At one row the AVX2 build rounds bfloat16 activations to int8 per
    group for 4-bit codes: the error stays within the documented
    sum_g max_g|x| / 254 * sum |w| (plus the float bound)."""
    x, (q, s, b), exact, absprod, scale = _decode_outlier_case()
    out = mk.gather_qmm(x, q, s, b, rhs_indices=indices([0]), group_size=64, bits=4)
    assert_within_bound(out, exact, absprod, x.shape[-1], mx.bfloat16, scale / 254)


def test_activation_bits_16_opts_out(tmp_path):
    """MLX_MOE_CPU_ACTIVATION_BITS=16 keeps the 16-bit rounding at decode:
    the outlier row's error then fits the int16 bound (max / 65534 per
    group); where the 8-bit kernel exists, the switch changes the result."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "check.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import numpy as np, mlx_moe_kernels as mk\n"
        "from test_gather_qmm import _decode_outlier_case\n"
        "from conftest import indices, to_f64\n"
        "x, (q, s, b), exact, absprod, scale = _decode_outlier_case()\n"
        "out = to_f64(mk.gather_qmm(x, q, s, b, rhs_indices=indices([0]), group_size=64, bits=4))\n"
        "float_part = (2.0**-8 + 2 * 256 * 2.0**-24) * absprod + 2.0**-8 * np.abs(exact)\n"
        "print(float(np.max(np.abs(out - exact) - float_part - scale / 65534)))\n"
        "print(' '.join(repr(float(v)) for v in out.reshape(-1)))\n"
    )

    def run(bits):
        env = dict(os.environ, MLX_MOE_CPU_ACTIVATION_BITS=bits)
        env.pop("MLX_MOE_CPU_KERNELS", None)
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        excess, values = done.stdout.strip().splitlines()[-2:]
        return float(excess), values

    excess16, values16 = run("16")
    assert excess16 <= 0
    if mk_has_avx2_int8():
        assert run("8")[1] != values16


def mk_has_avx2_int8() -> bool:
    """Whether this CPU runs the AVX2 build without AVX-512 BF16 (where the
    8-bit activation kernel exists)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return " avx2" in flags and " avx512_bf16" not in flags


def test_lhs_and_rhs_indices_broadcast(build):
    """Both index arrays, broadcast against each other; a batch of x."""
    q, s, b = quantized((2, 3, 40, 64), "affine", 32, 8, mx.float16)
    x = rand((4, 2, 64), mx.float16, seed=4)
    lhs = indices([[0], [3], [1]])  # [3, 1]
    rhs = indices([[5, 0, 2, 2]])  # [1, 4]
    out = check(x, q, s, b, "affine", 32, 8, lhs=lhs, rhs=rhs)
    assert out.shape == (3, 4, 2, 40)


def test_default_indices_match_quantized_matmul(build):
    """No indices: a batched quantized matmul."""
    q, s, b = quantized((3, 24, 64), "affine", 64, 4, mx.float32)
    x = rand((3, 5, 64), seed=5)
    check(x, q, s, b, "affine", 64, 4)


def test_empty(build):
    q, s, b = quantized((4, 16, 64), "affine", 64, 4, mx.float32)
    x = rand((0, 1, 64))
    out = mk.gather_qmm(x, q, s, b, rhs_indices=indices(np.zeros(0, np.uint32)), group_size=64, bits=4)
    assert out.shape == (0, 1, 16)


def test_dtype_promotion():
    """Output dtype as mx.gather_qmm: x promoted with float32 scales."""
    q, s, b = quantized((2, 16, 64), "affine", 64, 4, mx.float32)
    x = rand((2, 1, 64), mx.bfloat16)
    rhs = indices([1, 0])
    out = mk.gather_qmm(x, q, s, b, rhs_indices=rhs, group_size=64, bits=4)
    assert out.dtype == mx.gather_qmm(x, q, s, b, rhs_indices=rhs, group_size=64, bits=4).dtype


def test_gradient_wrt_x(build):
    q, s, b = quantized((4, 24, 64), "affine", 32, 4, mx.float32)
    x = rand((6, 2, 64), seed=6)
    lhs = indices([0, 0, 1, 2, 5, 5])
    rhs = indices([3, 1, 1, 0, 2, 3])
    cot = rand((6, 2, 24), seed=7)

    def loss(fn):
        return lambda x: (fn(x, q, s, b, lhs, rhs, group_size=32, bits=4) * cot).sum()

    ours = mx.grad(loss(mk.gather_qmm))(x)
    want = mx.grad(loss(reference.gather_qmm))(x)
    np.testing.assert_allclose(np.array(ours), np.array(want), rtol=1e-4, atol=1e-5)


def test_gradient_wrt_weights_raises():
    q, s, b = quantized((2, 16, 64), "affine", 64, 4, mx.float32)
    x = rand((2, 1, 64))
    rhs = indices([1, 0])
    with pytest.raises(ValueError, match="x only"):
        mx.grad(lambda s: mk.gather_qmm(x, q, s, b, rhs_indices=rhs).sum())(s)


def test_compile_shapeless(build):
    """Compiled shapeless with both index arrays given, for a changing
    number of pairs (with a default lhs the trace holds a fixed-size arange,
    a limitation shared with mx.gather_qmm)."""
    q, s, b = quantized((4, 32, 64), "affine", 64, 4, mx.float32)
    x = rand((5, 1, 64), seed=8)
    fn = mx.compile(lambda lhs, rhs: mk.gather_qmm(x, q, s, b, lhs, rhs), shapeless=True)
    for pairs in (3, 9):
        lhs = indices(np.arange(pairs) % 5)
        rhs = indices(np.arange(pairs) % 4)
        out = fn(lhs, rhs)
        assert out.shape == (pairs, 1, 32)
        np.testing.assert_allclose(
            np.array(out), np.array(reference.gather_qmm(x, q, s, b, lhs, rhs)), rtol=1e-5, atol=1e-5,
        )


# ------------------------------------------------------------------- errors
@pytest.fixture
def affine4():
    return quantized((4, 16, 64), "affine", 64, 4, mx.float32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="nvfp4"), "mode 'nvfp4' is not supported"),
        (dict(bits=7), "bits 1, 2, 3, 4, 5, 6 and 8"),
        (dict(group_size=16), "group_size 32, 64 and 128"),
        (dict(mode="mxfp4", group_size=64), "mxfp4 quantization has group_size 32"),
    ],
)
def test_bad_format(affine4, kwargs, match):
    q, s, b = affine4
    with pytest.raises(ValueError, match=match):
        mk.gather_qmm(rand((1, 1, 64)), q, s, b, rhs_indices=indices([0]), **kwargs)


def test_bad_arrays(affine4):
    q, s, b = affine4
    x = rand((1, 1, 64))
    rhs = indices([0])
    with pytest.raises(ValueError, match="uint32 packed weight"):
        mk.gather_qmm(x, q.astype(mx.int32), s, b, rhs_indices=rhs)
    with pytest.raises(ValueError, match="scales of w must have shape"):
        mk.gather_qmm(x, q, s[:, :8], b, rhs_indices=rhs)
    with pytest.raises(ValueError, match="needs the biases"):
        mk.gather_qmm(x, q, s, None, rhs_indices=rhs)
    with pytest.raises(ValueError, match="biases of w must be"):
        mk.gather_qmm(x, q, s, b[:, :8], rhs_indices=rhs)
    with pytest.raises(ValueError, match="does not match"):
        mk.gather_qmm(rand((1, 1, 32)), q, s, b, rhs_indices=rhs)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        mk.gather_qmm(x, q, s, b, rhs_indices=rhs, group_size=128)
    with pytest.raises(ValueError, match="floating point"):
        mk.gather_qmm(x, q, s.astype(mx.int32), b, rhs_indices=rhs)
    mq, ms = mx.quantize(rand((4, 16, 64)), mode="mxfp4")
    with pytest.raises(ValueError, match="no biases"):
        mk.gather_qmm(x, mq, ms, b, rhs_indices=rhs, mode="mxfp4")
    with pytest.raises(ValueError, match="uint8"):
        mk.gather_qmm(x, mq, ms.astype(mx.float32), rhs_indices=rhs, mode="mxfp4")


def test_index_out_of_range(affine4):
    q, s, b = affine4
    x = rand((1, 1, 64))
    with pytest.raises(IndexError, match="rhs_indices"):
        mk.gather_qmm(x, q, s, b, rhs_indices=indices([4]))
    lazy = indices([2, 1]) + indices([2, 0])  # [4, 1], not evaluated at the call
    out = np.array(mk.gather_qmm(mx.concatenate([x, x]), q, s, b, rhs_indices=lazy))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    for dtype in (mx.float16, mx.bfloat16):
        half = mk.gather_qmm(x.astype(dtype), q, s.astype(dtype), b.astype(dtype), rhs_indices=indices([3]) + 1)
        assert half.dtype == dtype and np.isnan(np.array(half.astype(mx.float32))).all()


# ------------------------------------------------------ quantized switch_glu
def switch_weights(E, D, H, mode, group_size, bits, dtype, seed=0):
    return (
        quantized((E, H, D), mode, group_size, bits, dtype, seed),
        quantized((E, H, D), mode, group_size, bits, dtype, seed + 1),
        quantized((E, D, H), mode, group_size, bits, dtype, seed + 2),
    )


def topk_routing(tokens, E, k, seed=0, ragged=False):
    rng = np.random.default_rng(seed)
    if ragged:  # every token's first choice is expert 0; half the experts unused
        rest = [rng.permutation(np.arange(1, E // 2))[: k - 1] for _ in range(tokens)]
        return indices(np.stack([np.concatenate([[0], r]) for r in rest]).astype(np.uint32))
    return indices(np.stack([rng.permutation(E)[:k] for _ in range(tokens)]))


def assert_switch_close(out, want, dtype):
    """Against the reference, which rounds every intermediate to the
    compute dtype as mlx-lm does (the fused op rounds only the hidden
    activations), so the tolerance is a few ulps of the dtype, relative to
    the output's scale."""
    tol = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}[dtype]
    got, ref = np.array(out.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == ref.shape
    scale = max(np.abs(ref).max(), 1e-6)
    assert np.abs(got - ref).max() <= tol * scale, np.abs(got - ref).max() / scale


@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[3], FORMATS[8], FORMATS[9]], ids=[FORMAT_IDS[i] for i in (1, 3, 8, 9)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens, k, ragged", [(1, 2, False), (7, 4, False), (64, 8, False), (30, 4, True)])
@pytest.mark.parametrize("with_scores", [False, True], ids=["slots", "combined"])
def test_switch_glu_quantized(build, fmt, dtype, tokens, k, ragged, with_scores):
    mode, group_size, bits = fmt
    E, D, H = 16, 192, 128
    gate, up, down = switch_weights(E, D, H, mode, group_size, bits, dtype)
    x = rand((tokens, D), dtype, seed=tokens)
    idx = topk_routing(tokens, E, k, seed=tokens, ragged=ragged)
    scores = mx.softmax(rand((tokens, k), seed=9), axis=-1).astype(dtype) if with_scores else None
    fmt_kw = dict(group_size=group_size, bits=bits, mode=mode)
    out = mk.switch_glu(x, gate, up, down, idx, scores, **fmt_kw)
    want = reference.switch_glu(
        x.astype(mx.float32), gate, up, down, idx,
        None if scores is None else scores.astype(mx.float32), **fmt_kw,
    )
    assert out.dtype == dtype
    assert_switch_close(out, want, dtype)


def test_switch_glu_quantized_leading_dims(build):
    gate, up, down = switch_weights(8, 64, 64, "affine", 32, 4, mx.float32)
    x = rand((2, 3, 64), seed=1)
    idx = topk_routing(6, 8, 2, seed=1).reshape(2, 3, 2)
    out = mk.switch_glu(x, gate, up, down, idx, group_size=32, bits=4)
    assert out.shape == (2, 3, 2, 64)
    assert_switch_close(out, reference.switch_glu(x, gate, up, down, idx, group_size=32, bits=4), mx.float32)


def test_switch_glu_quantized_gradients(build):
    """Gradients to x and scores against the reference's."""
    gate, up, down = switch_weights(8, 64, 64, "affine", 64, 4, mx.float32)
    x = rand((5, 64), seed=2)
    idx = topk_routing(5, 8, 2, seed=2)
    scores = mx.softmax(rand((5, 2), seed=3), axis=-1)
    cot = rand((5, 64), seed=4)

    def loss(fn):
        return lambda x, sc: (fn(x, gate, up, down, idx, sc, group_size=64, bits=4) * cot).sum()

    ours = mx.grad(loss(mk.switch_glu), argnums=(0, 1))(x, scores)
    want = mx.grad(loss(reference.switch_glu), argnums=(0, 1))(x, scores)
    for o, w in zip(ours, want):
        np.testing.assert_allclose(np.array(o), np.array(w), rtol=2e-4, atol=2e-5)


def test_switch_glu_quantized_bad_input():
    gate, up, down = switch_weights(4, 64, 64, "affine", 64, 4, mx.float32)
    x = rand((2, 64))
    idx = topk_routing(2, 4, 2)
    with pytest.raises(ValueError, match="all given as"):
        mk.switch_glu(x, gate, up, rand((4, 64, 64)), idx)
    with pytest.raises(ValueError, match="triple"):
        mk.switch_glu(x, gate, up, down[:2], idx)
    with pytest.raises(ValueError, match="gate_weight must have shape"):
        mk.switch_glu(x, tuple(a[:, :32] for a in gate), up, down, idx)
    with pytest.raises(ValueError, match="x's last dimension"):
        mk.switch_glu(rand((2, 32)), gate, up, down, idx)
    with pytest.raises(ValueError, match="between 1 and E"):
        mk.switch_glu(x, gate, up, down, mx.zeros((2, 5), mx.uint32))
    with pytest.raises(IndexError, match="indices"):
        mk.switch_glu(x, gate, up, down, indices([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="bits"):
        mk.switch_glu(x, gate, up, down, idx, bits=7)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_strided_x(build, dtype):
    """x as a transposed view (K not contiguous): the kernels read it with
    its strides (direct and dequantized-block paths)."""
    q, s, b = quantized((4, 40, 128), "affine", 64, 4, dtype)
    x = rand((6, 128, 3), dtype, seed=11).swapaxes(-1, -2)  # [6, 3, 128], K stride 3
    check(x, q, s, b, "affine", 64, 4, rhs=indices([0, 0, 3, 1, 1, 1]))
    many = rand((1, 128, 24), dtype, seed=12).swapaxes(-1, -2)  # 24 rows of one expert
    check(many, q, s, b, "affine", 64, 4, rhs=indices([2]))


def test_zero_columns():
    w = mx.zeros((2, 0, 8), mx.uint32)
    scales = mx.zeros((2, 0, 1))
    out = mk.gather_qmm(rand((3, 1, 64)), w, scales, scales, rhs_indices=indices([0, 1, 1]))
    assert out.shape == (3, 1, 0)
