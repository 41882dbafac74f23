"""Tests of mlx_moe_kernels.gather_mm (the custom primitive and its CPU
kernels) against a float64 NumPy oracle, mlx_moe_kernels.reference.gather_mm
and, for float32, stock mx.gather_mm.

The CPU kernel has two inner paths, chosen by b's layout: "dot" when b's K
axis has stride 1 (b = w.swapaxes(-1, -2) for w [E, N, K]) and "outer"
otherwise (contiguous b [E, K, N], read in place, or any strided b, packed).
Tiles: dot 8 columns x 4 rows with K in steps of 8 (scalar K tail); outer
6 rows x 16 columns, K chunks of 256; tasks are column blocks of 48. Sizes
below are chosen not to be multiples of those. Most tests run with both
kernel builds (the ``build`` fixture of conftest.py).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_moe_kernels
from mlx_moe_kernels import reference

from conftest import (
    BUILDS,
    FLOAT_DTYPES,
    assert_close,
    assert_close_to_exact,
    dtype_id,
    expected_dtype,
    indices,
    np_gather_mm,
    rand,
    rand_ints,
    to_f64,
    to_np_indices,
)

gather_mm = mlx_moe_kernels.gather_mm

DTYPE_PARAMS = [pytest.param(d, id=dtype_id(d)) for d in FLOAT_DTYPES]


# ------------------------------------------------------------------ layouts
def make_b(E, K, N, dtype, seed, layout, gen=rand):
    """A [E, K, N] operand with the given memory layout."""
    if layout == "contiguous":  # outer kernel, weight rows read in place
        return gen((E, K, N), dtype, seed)
    if layout == "transposed":  # dot kernel (K stride 1), mlx-lm's layout
        return gen((E, N, K), dtype, seed).swapaxes(-1, -2)
    if layout == "strided_k":  # outer kernel in place with a wide K stride
        return gen((E, 2 * K, N), dtype, seed)[:, ::2, :]
    if layout == "strided_n":  # outer kernel, packed panels (N stride 2)
        return gen((E, K, 2 * N), dtype, seed)[:, :, ::2]
    if layout == "transposed_strided":  # dot kernel, weight rows 2K apart
        return gen((E, 2 * N, K), dtype, seed)[:, ::2, :].swapaxes(-1, -2)
    if layout == "reversed":  # negative strides everywhere (packed)
        return gen((E, K, N), dtype, seed)[::-1, ::-1, ::-1]
    raise ValueError(layout)


def make_a(A, M, K, dtype, seed, layout, gen=rand):
    """A [A, M, K] operand with the given memory layout."""
    if layout == "contiguous":
        return gen((A, M, K), dtype, seed)
    if layout == "transposed":  # K stride M
        return gen((A, K, M), dtype, seed).swapaxes(-1, -2)
    if layout == "strided":  # row stride 2(K + 3), offset start, batch reversed
        return gen((A, 2 * M, K + 3), dtype, seed)[::-1, ::2, 1 : K + 1]
    raise ValueError(layout)


B_LAYOUTS = ["contiguous", "transposed", "strided_k", "strided_n", "transposed_strided", "reversed"]
A_LAYOUTS = ["contiguous", "transposed", "strided"]


@dataclasses.dataclass(frozen=True)
class Case:
    """M, K, N, E (matrices in b), rhs indices, and optionally lhs indices
    into an ``a`` of batch A (else ``a``'s batch is the number of pairs)."""

    name: str
    M: int
    K: int
    N: int
    E: int
    rhs: tuple
    lhs: Optional[tuple] = None
    A: Optional[int] = None

    @property
    def a_batch(self):
        return self.A if self.lhs is not None else len(self.rhs)


_rng = np.random.default_rng(1234)
CASES = [
    # a single row through one expert
    Case("one_row", 1, 37, 97, 4, (2,)),
    # K < 8: all of K is the dot kernel's scalar tail
    Case("k7_few_rows", 1, 7, 5, 3, (0, 2, 2, 1, 0)),
    # K exactly one vector; experts 1..3 get no rows
    Case("k8_empty_experts", 2, 8, 17, 5, (4, 0, 4, 4)),
    Case("k1", 3, 1, 50, 3, (1, 1, 0)),
    Case("n1", 5, 37, 1, 4, (3, 0, 3, 1, 1, 2)),
    # two outer K chunks; one expert gets most rows; lhs with repeats
    Case("k300_ragged", 7, 300, 97, 6, (5,) * 9 + (0, 2), lhs=(0, 1, 2, 0, 0, 3, 1, 2, 3, 1, 0), A=4),
    # every pair on one expert: 36 rows, many row tiles
    Case("all_one_expert", 3, 300, 50, 8, (6,) * 12),
    Case("random_many", 2, 37, 97, 7, tuple(int(v) for v in _rng.integers(0, 7, 40))),
    # three outer K chunks (256 + 256 + 89), dot tail of 1
    Case("k601", 4, 601, 33, 3, (0, 1, 0, 2, 1), lhs=(2, 2, 0, 1, 0), A=3),
]
CASE_PARAMS = [pytest.param(c, id=c.name) for c in CASES]


def case_operands(case: Case, dtype, a_layout="contiguous", b_layout="contiguous", gen=rand, seed=0):
    a = make_a(case.a_batch, case.M, case.K, dtype, seed + 1, a_layout, gen)
    b = make_b(case.E, case.K, case.N, dtype, seed + 2, b_layout, gen)
    lhs = None if case.lhs is None else indices(case.lhs)
    rhs = indices(case.rhs)
    return a, b, lhs, rhs


# ====================================================== correctness grids
@pytest.mark.parametrize("b_layout", B_LAYOUTS)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_matches_oracle_and_reference(build, dtype, case, b_layout):
    a, b, lhs, rhs = case_operands(case, dtype, b_layout=b_layout)
    out = gather_mm(a, b, lhs, rhs)
    assert_close_to_exact(out, a, b, lhs, rhs)
    assert_close(out, reference.gather_mm(a, b, lhs, rhs), a, b, lhs, rhs)


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed", "strided_n"])
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_exact_on_integer_values(build, dtype, case, b_layout):
    """Small integers: every product and partial sum is exact in float32, so
    the result must be bit-for-bit the exact value rounded to the dtype
    (no tolerance: any wrong index, column or K element shows)."""
    a, b, lhs, rhs = case_operands(case, dtype, b_layout=b_layout, gen=rand_ints, seed=7)
    out = gather_mm(a, b, lhs, rhs)
    exact = np_gather_mm(to_f64(a), to_f64(b), to_np_indices(lhs), to_np_indices(rhs))
    assert np.all(np.abs(exact) < 2**24)
    expected = mx.array(exact.astype(np.float32)).astype(dtype)
    assert out.dtype == dtype
    np.testing.assert_array_equal(to_f64(out), to_f64(expected))


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("a_layout", A_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_strided_a(build, dtype, a_layout, b_layout):
    for case in (CASES[1], CASES[5], CASES[8]):
        a, b, lhs, rhs = case_operands(case, dtype, a_layout=a_layout, b_layout=b_layout, seed=3)
        assert_close_to_exact(gather_mm(a, b, lhs, rhs), a, b, lhs, rhs)


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed", "strided_n"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_stock_gather_mm_float32(build, case, b_layout):
    # stock mx.gather_mm on CPU supports float32 only
    a, b, lhs, rhs = case_operands(case, mx.float32, b_layout=b_layout, seed=11)
    ours = gather_mm(a, b, lhs, rhs)
    stock = mx.gather_mm(a, b, lhs, rhs)
    assert_close(ours, stock, a, b, lhs, rhs)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_builds_agree(monkeypatch, dtype):
    """Every build computes the same products (to the accuracy bound)."""
    case = CASES[5]
    a, b, lhs, rhs = case_operands(case, dtype, b_layout="transposed", seed=5)
    results = []
    for build in BUILDS:
        if build == "default":
            monkeypatch.delenv("MLX_MOE_CPU_KERNELS", raising=False)
        else:
            monkeypatch.setenv("MLX_MOE_CPU_KERNELS", build)
        out = gather_mm(a, b, lhs, rhs)
        mx.eval(out)
        results.append(out)
    for out in results[1:]:
        assert_close(results[0], out, a, b, lhs, rhs)


def test_many_experts_many_tasks(build):
    """64 experts, 300 unsorted token slots: about 60 groups, so about 60
    tasks handed out dynamically on the thread pool, each with its own
    scattered output rows."""
    rng = np.random.default_rng(8)
    a = rand((300, 1, 40), mx.float32, 81)
    b = make_b(64, 40, 145, mx.float32, 82, "transposed")
    rhs = indices(rng.integers(0, 64, 300))
    assert_close_to_exact(gather_mm(a, b, None, rhs), a, b, None, rhs)


@pytest.mark.parametrize("dtype", [pytest.param(mx.float16, id="f16"), pytest.param(mx.bfloat16, id="bf16")])
@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
def test_half_precision_rounds_to_nearest(build, dtype, b_layout):
    """One round-to-nearest-even from float32 at the end, as MLX casts do:
    nearly every element equals the reference (float32 matmul then cast)
    bit for bit; summation order may flip a rare tie-near element. A
    truncating or double-rounding kernel differs in about half of them."""
    a = rand((40, 3, 300), dtype, 21)
    b = make_b(5, 300, 97, dtype, 22, b_layout)
    rhs = indices(np.random.default_rng(3).integers(0, 5, 40))
    ours = gather_mm(a, b, None, rhs)
    ref = reference.gather_mm(a, b, None, rhs)
    equal = np.mean(to_f64(ours) == to_f64(ref))
    assert equal >= 0.99, f"only {equal:.3%} of elements equal the reference"
    assert_close_to_exact(ours, a, b, None, rhs)


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [pytest.param(mx.float32, id="f32"), pytest.param(mx.bfloat16, id="bf16")])
def test_many_rows_one_expert(build, dtype, b_layout):
    """520 rows in one group: the dot kernel's K chunk drops to 256 (two
    chunks for K=300), the outer kernel runs 87 row tiles."""
    a = rand((130, 4, 300), dtype, 31)
    b = make_b(3, 300, 50, dtype, 32, b_layout)
    rhs = indices([1] * 128 + [0, 2])
    assert_close_to_exact(gather_mm(a, b, None, rhs), a, b, None, rhs)


@pytest.fixture(scope="module")
def realistic_weights():
    # an MoE projection: E experts of [N=768, K=2048] (stored as mlx-lm does)
    return rand((4, 768, 2048), mx.float32, 41, scale=0.05)


@pytest.mark.parametrize("b_layout", ["transposed", "contiguous"])
@pytest.mark.parametrize("dtype", [pytest.param(mx.float32, id="f32"), pytest.param(mx.bfloat16, id="bf16")])
def test_realistic_size(build, realistic_weights, dtype, b_layout):
    w = realistic_weights.astype(dtype)
    b = w.swapaxes(-1, -2) if b_layout == "transposed" else mx.contiguous(w.swapaxes(-1, -2))
    x = rand((6, 1, 2048), dtype, 42)  # 3 tokens x top-2
    rhs = indices([0, 3, 3, 1, 0, 3])
    out = gather_mm(x, b, None, rhs)
    assert out.shape == (6, 1, 768)
    assert_close_to_exact(out, x, b, None, rhs)


# ============================================================ index modes
def _index_mode(mode, dtype, seed=0):
    """(a, b, lhs, rhs) for one way of passing indices and batches."""
    M, K, N = 3, 37, 50
    if mode == "rhs_only":
        return rand((5, M, K), dtype, seed), rand((4, K, N), dtype, seed + 1), None, indices([3, 0, 3, 3, 1])
    if mode == "lhs_only":
        # b's batch (5) is the number of pairs; lhs repeats rows of a
        return rand((3, M, K), dtype, seed), rand((5, K, N), dtype, seed + 1), indices([2, 2, 0, 1, 2]), None
    if mode == "both":
        return (
            rand((3, M, K), dtype, seed),
            rand((4, K, N), dtype, seed + 1),
            indices([0, 0, 2, 1, 2, 0]),
            indices([1, 3, 3, 3, 0, 1]),
        )
    if mode == "broadcast_indices":
        # lhs [P, 1] with rhs [1, Q]: every row with every expert
        return (
            rand((3, M, K), dtype, seed),
            rand((4, K, N), dtype, seed + 1),
            indices([[2], [0], [1]]),
            indices([[3, 0, 3, 1]]),
        )
    if mode == "broadcast_batches":
        # a [B, 1, M, K] (default lhs arange(B).reshape(B, 1)), b [1, E, K, N],
        # rhs [B, k]: each batch row with k experts
        return (
            rand((3, 1, M, K), dtype, seed),
            rand((1, 4, K, N), dtype, seed + 1),
            None,
            indices([[0, 3], [3, 3], [2, 1]]),
        )
    if mode == "mlx_lm_unsorted":
        # SwitchLinear without sorting: x [B, L, 1, 1, D], indices [B, L, k]
        return (
            rand((2, 3, 1, 1, K), dtype, seed),
            rand((5, N, K), dtype, seed + 1).swapaxes(-1, -2),
            None,
            indices(np.random.default_rng(seed).integers(0, 5, (2, 3, 2))),
        )
    if mode == "scalar_indices":
        return rand((3, M, K), dtype, seed), rand((4, K, N), dtype, seed + 1), indices(2), indices(1)
    if mode == "multi_dim_b_batch":
        # b [2, 3, K, N]: indices address the flattened 6 matrices
        return (
            rand((2, M, K), dtype, seed),
            rand((2, 3, K, N), dtype, seed + 1),
            indices([1, 0, 1, 1]),
            indices([5, 0, 3, 4]),
        )
    if mode == "permuted_b_batch":
        # b's batch axes permuted (non-monotonic batch strides)
        return (
            rand((2, M, K), dtype, seed),
            rand((3, 2, K, N), dtype, seed + 1).transpose(1, 0, 2, 3),
            indices([1, 0, 1, 0]),
            indices([5, 0, 3, 2]),
        )
    if mode == "broadcast_b":
        # b broadcast along a batch axis (stride 0)
        w = rand((1, 3, K, N), dtype, seed + 1)
        return rand((2, M, K), dtype, seed), mx.broadcast_to(w, (2, 3, K, N)), indices([0, 1, 1]), indices([5, 1, 3])
    if mode == "broadcast_a_rows":
        # a broadcast along M (row stride 0) and batch
        x = rand((1, 1, K), dtype, seed)
        return mx.broadcast_to(x, (3, M, K)), rand((4, K, N), dtype, seed + 1), indices([0, 2, 1]), indices([1, 1, 0])
    if mode == "b_2d":
        return rand((3, M, K), dtype, seed), rand((K, N), dtype, seed + 1), indices([2, 0, 2]), None
    if mode == "a_2d":
        return rand((M, K), dtype, seed), rand((4, K, N), dtype, seed + 1), None, indices([3, 3, 0])
    if mode == "a_1d":
        return rand((K,), dtype, seed), rand((4, K, N), dtype, seed + 1), None, indices([3, 3, 0, 2])
    if mode == "b_1d":
        return rand((3, M, K), dtype, seed), rand((K,), dtype, seed + 1), indices([2, 0, 0]), None
    if mode == "both_1d":
        return rand((K,), dtype, seed), rand((K,), dtype, seed + 1), indices([0, 0]), indices([0])
    raise ValueError(mode)


INDEX_MODES = [
    "rhs_only",
    "lhs_only",
    "both",
    "broadcast_indices",
    "broadcast_batches",
    "mlx_lm_unsorted",
    "scalar_indices",
    "multi_dim_b_batch",
    "permuted_b_batch",
    "broadcast_b",
    "broadcast_a_rows",
    "b_2d",
    "a_2d",
    "a_1d",
    "b_1d",
    "both_1d",
]

EXPECTED_SHAPES = {
    "rhs_only": (5, 3, 50),
    "lhs_only": (5, 3, 50),
    "both": (6, 3, 50),
    "broadcast_indices": (3, 4, 3, 50),
    "broadcast_batches": (3, 2, 3, 50),
    "mlx_lm_unsorted": (2, 3, 2, 1, 50),
    "scalar_indices": (3, 50),
    "multi_dim_b_batch": (4, 3, 50),
    "permuted_b_batch": (4, 3, 50),
    "broadcast_b": (3, 3, 50),
    "broadcast_a_rows": (3, 3, 50),
    "b_2d": (3, 3, 50),
    "a_2d": (3, 3, 50),
    "a_1d": (4, 50),
    "b_1d": (3, 3),
    "both_1d": (2,),
}


@pytest.mark.parametrize("mode", INDEX_MODES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_index_modes(build, dtype, mode):
    a, b, lhs, rhs = _index_mode(mode, dtype)
    out = gather_mm(a, b, lhs, rhs)
    assert out.shape == EXPECTED_SHAPES[mode]
    assert_close_to_exact(out, a, b, lhs, rhs)
    assert_close(out, reference.gather_mm(a, b, lhs, rhs), a, b, lhs, rhs)


@pytest.mark.parametrize("mode", INDEX_MODES)
def test_index_modes_match_stock_float32(mode):
    a, b, lhs, rhs = _index_mode(mode, mx.float32, seed=5)
    ours = gather_mm(a, b, lhs, rhs)
    stock = mx.gather_mm(a, b, lhs, rhs)
    assert ours.shape == stock.shape
    assert_close(ours, stock, a, b, lhs, rhs)


def test_no_indices_is_matmul():
    a = rand((2, 1, 3, 7), mx.float32, 1)
    b = rand((4, 7, 5), mx.float32, 2)
    out = gather_mm(a, b)
    assert out.shape == (2, 4, 3, 5)
    np.testing.assert_array_equal(np.array(out), np.array(mx.matmul(a, b)))
    # 1-d operands as in matmul
    v = rand((7,), mx.float32, 3)
    np.testing.assert_array_equal(np.array(gather_mm(v, b)), np.array(mx.matmul(v, b)))


def _operand(shape, dtype, seed):
    if dtype in (mx.float32, mx.float16, mx.bfloat16):
        return rand(shape, dtype, seed)
    low = 0 if dtype == mx.uint8 else -2
    return rand_ints(shape, mx.float32, seed, low=low, high=2).astype(dtype)


@pytest.mark.parametrize(
    "a_dtype,b_dtype",
    [
        (mx.float16, mx.float32),
        (mx.float32, mx.bfloat16),
        (mx.bfloat16, mx.float16),
        (mx.int32, mx.float16),
        (mx.float32, mx.int32),
        (mx.uint8, mx.bfloat16),
    ],
    ids=lambda d: dtype_id(d),
)
def test_mixed_dtypes_promote(build, a_dtype, b_dtype):
    """Mixed operands are promoted as MLX promotes them (an integer operand
    with a floating one is allowed); the product is computed in the
    promoted dtype."""
    a = _operand((3, 2, 37), a_dtype, 1)
    b = _operand((4, 37, 17), b_dtype, 2)
    rhs = indices([1, 3, 3])
    out = gather_mm(a, b, None, rhs)
    promoted = expected_dtype(a_dtype, b_dtype)
    assert out.dtype == promoted
    assert out.dtype == reference.gather_mm(a, b, None, rhs).dtype
    # the operands rounded to the promoted dtype are what gets multiplied
    assert_close_to_exact(out, a.astype(promoted), b.astype(promoted), None, rhs)


# ============================================================ index dtypes
INDEX_DTYPES = [mx.int32, mx.int64, mx.uint8, mx.int16, mx.uint32, mx.int8, mx.uint16, mx.uint64]


@pytest.mark.parametrize("lazy", [False, True], ids=["evaluated", "lazy"])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_index_dtypes(build, index_dtype, lazy):
    a = rand((4, 2, 37), mx.float32, 1)
    b = rand((5, 37, 17), mx.float32, 2)
    lhs = indices([3, 0, 3, 1, 2], index_dtype)
    rhs = indices([4, 4, 0, 2, 1], index_dtype)
    if lazy:
        lhs, rhs = lhs + 0, rhs * 1
        assert lhs.dtype == index_dtype
    out = gather_mm(a, b, lhs, rhs)
    assert_close_to_exact(out, a, b, lhs, rhs)


def test_strided_evaluated_int64_indices():
    """Evaluated index views that are not contiguous (a column of a 2-d
    array) are valid indices; only the viewed elements count."""
    a = rand((3, 2, 8), mx.float32, 1)
    b = rand((5, 8, 6), mx.float32, 2)
    table = mx.array([[0, 99], [1, 99], [2, 99]], dtype=mx.int64)
    mx.eval(table)
    rhs = table[:, 0]  # [0, 1, 2], int64, stride 2
    mx.eval(rhs)
    out = gather_mm(a, b, None, rhs)
    assert_close_to_exact(out, a, b, None, indices([0, 1, 2]))
    # the same view in int32 (converted, so copied contiguous) works too
    out32 = gather_mm(a, b, None, table.astype(mx.int32)[:, 0])
    assert_close_to_exact(out32, a, b, None, indices([0, 1, 2]))


def test_reversed_evaluated_int64_indices_subprocess():
    """A negative-stride evaluated int64 index view ([3, 2, 1] viewed
    backwards out of [99, 1, 2, 3]). Run in a subprocess: if the range check
    reads memory outside the view it may read past the buffer."""
    code = textwrap.dedent(
        """
        import mlx.core as mx, numpy as np, mlx_moe_kernels as m
        a = mx.array(np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3))
        b = mx.array(np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2))
        full = mx.array([99, 1, 2, 3], dtype=mx.int64)
        mx.eval(full)
        rhs = full[:0:-1]
        mx.eval(rhs)
        assert rhs.tolist() == [3, 2, 1]
        out = m.gather_mm(a[:3], b, None, rhs)
        ref = m.reference.gather_mm(a[:3], b, None, mx.array([3, 2, 1]))
        assert mx.array_equal(out, ref).item(), (out, ref)
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout, (
        f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr[-2000:]}"
    )


# ========================================================= sorted indices
@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_sorted_indices_flag(build, dtype, b_layout):
    a = rand((12, 2, 37), dtype, 1)
    b = make_b(5, 37, 50, dtype, 2, b_layout)
    unsorted = indices([4, 0, 4, 2, 2, 0, 4, 1, 0, 4, 2, 4])
    sorted_ = indices(sorted(unsorted.tolist()))
    # the hint with sorted indices
    assert_close_to_exact(gather_mm(a, b, None, sorted_, sorted_indices=True), a, b, None, sorted_)
    # a wrong hint must not change results ("the same either way")
    for flag in (False, True):
        assert_close_to_exact(gather_mm(a, b, None, unsorted, sorted_indices=flag), a, b, None, unsorted)
    lhs = indices([0, 3, 3, 5, 11, 11, 2, 0, 1, 1, 7, 9])
    assert_close_to_exact(gather_mm(a, b, lhs, sorted_, sorted_indices=True), a, b, lhs, sorted_)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_switch_linear_pattern(build, dtype):
    """mlx-lm's SwitchLinear/SwitchGLU on sorted tokens: x [T*k, 1, D],
    rhs = sorted experts, b = w.swapaxes(-1, -2) for w [E, N, D]; then the
    outputs are scattered back to token order."""
    T, k, D, N, E = 9, 2, 96, 40, 6
    rng = np.random.default_rng(17)
    experts = rng.integers(0, E, (T, k))
    experts[:, 0] = 2  # a popular expert; some experts get nothing
    flat = experts.reshape(-1)
    order = np.argsort(flat, kind="stable")
    inv = np.argsort(order)
    x_tok = rand((T, 1, 1, D), dtype, 18)
    x = mx.broadcast_to(x_tok, (T, k, 1, D)).reshape(T * k, 1, D)[mx.array(order)]
    mx.eval(x)
    w = rand((E, N, D), dtype, 19)
    rhs = indices(flat[order])
    out = gather_mm(x, w.swapaxes(-1, -2), rhs_indices=rhs, sorted_indices=True)
    assert out.shape == (T * k, 1, N)
    assert_close_to_exact(out, x, w.swapaxes(-1, -2), None, rhs)
    # back in token order equals the unsorted call
    back = out[mx.array(inv)].reshape(T, k, 1, N)
    unsorted = gather_mm(x_tok, w.swapaxes(-1, -2), rhs_indices=indices(experts))
    assert unsorted.shape == (T, k, 1, N)
    assert_close(back, unsorted, x_tok, w.swapaxes(-1, -2), None, indices(experts))


# ============================================================ empty arrays
@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_empty(build, dtype, b_layout):
    # zero pairs
    a = rand((3, 2, 7), dtype)
    b = make_b(4, 7, 5, dtype, 1, b_layout)
    out = gather_mm(a, b, indices(np.zeros(0, np.int64)), indices(np.zeros(0, np.int64)))
    mx.eval(out)
    assert out.shape == (0, 2, 5) and out.dtype == dtype
    out = gather_mm(a, b, indices(np.zeros((2, 0), np.int64)), indices(np.zeros((1, 0), np.int64)))
    mx.eval(out)
    assert out.shape == (2, 0, 2, 5)
    # zero matrices in b (and no pairs)
    out = gather_mm(rand((0, 2, 7), dtype), make_b(0, 7, 5, dtype, 1, b_layout), None, indices(np.zeros(0, np.int64)))
    mx.eval(out)
    assert out.shape == (0, 2, 5)
    # M = 0, N = 0
    out = gather_mm(rand((3, 0, 7), dtype), b, None, indices([1, 3, 3]))
    mx.eval(out)
    assert out.shape == (3, 0, 5)
    out = gather_mm(a, make_b(4, 7, 0, dtype, 1, b_layout), None, indices([1, 3, 3]))
    mx.eval(out)
    assert out.shape == (3, 2, 0)
    # K = 0: the empty sum, zeros (fill the allocator with garbage first so
    # unwritten memory would show)
    junk = mx.full((3, 2, 5), 7.0, dtype) * 3
    mx.eval(junk)
    del junk
    out = gather_mm(rand((3, 2, 0), dtype), make_b(4, 0, 5, dtype, 1, b_layout), indices([2, 0, 1]), indices([1, 3, 3]))
    mx.eval(out)
    assert out.shape == (3, 2, 5) and out.dtype == dtype
    np.testing.assert_array_equal(to_f64(out), np.zeros((3, 2, 5)))


# ======================================================== special values
@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_nan_and_inf_stay_in_their_rows(build, dtype, b_layout):
    """A NaN in one row of a (in the K tail) and an inf in one column of b
    (in the last, ragged column block) only reach the outputs that use
    them: no leakage across rows, columns, pairs or padding."""
    a_np = np.array(rand((4, 3, 37), mx.float32, 1))
    a_np[2, 1, 36] = np.nan
    b_np = np.array(rand((3, 37, 50), mx.float32, 2))
    b_np[1, 30, 49] = np.inf
    a = mx.array(a_np).astype(dtype)
    if b_layout == "contiguous":
        b = mx.array(b_np).astype(dtype)
    else:
        b = mx.array(np.ascontiguousarray(b_np.swapaxes(1, 2))).astype(dtype).swapaxes(1, 2)
    lhs = indices([2, 0, 1, 3, 2])
    rhs = indices([0, 1, 1, 2, 1])
    got = to_f64(gather_mm(a, b, lhs, rhs))
    with np.errstate(invalid="ignore"):
        exact = np_gather_mm(to_f64(a), to_f64(b), to_np_indices(lhs), to_np_indices(rhs))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(exact))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(exact))
    assert np.isnan(got).any() and np.isinf(got).any()
    finite = np.isfinite(exact)
    tol = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 5e-2}[dtype]
    np.testing.assert_allclose(got[finite], exact[finite], rtol=tol, atol=tol * 6)


# ================================================================ streams
def test_stream_argument():
    a, b, lhs, rhs = _index_mode("both", mx.float32)
    base = gather_mm(a, b, lhs, rhs)
    for s in (mx.cpu, mx.Device(mx.cpu), mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)):
        out = gather_mm(a, b, lhs, rhs, stream=s)
        np.testing.assert_array_equal(np.array(out), np.array(base))


# ============================================================== gradients
def _grad_case(name):
    if name == "rhs_only":
        return rand((5, 3, 37), mx.float32, 1), rand((4, 37, 17), mx.float32, 2), None, indices([3, 0, 3, 3, 1])
    if name == "lhs_and_rhs_repeats":
        return (
            rand((3, 2, 37), mx.float32, 1),
            rand((4, 37, 17), mx.float32, 2),
            indices([0, 0, 2, 1, 0, 2]),
            indices([3, 3, 3, 0, 1, 3]),
        )
    if name == "broadcast_indices":
        return (
            rand((3, 2, 9), mx.float32, 1),
            rand((4, 9, 5), mx.float32, 2),
            indices([[2], [0], [2]]),
            indices([[3, 0, 3, 1]]),
        )
    if name == "broadcast_batches":
        return rand((3, 1, 2, 9), mx.float32, 1), rand((1, 4, 9, 5), mx.float32, 2), None, indices([[0, 3], [3, 3], [2, 1]])
    if name == "a_batch_one":
        # lhs default arange(1) broadcast to 3 pairs: not the identity
        return rand((1, 2, 9), mx.float32, 1), rand((4, 9, 5), mx.float32, 2), None, indices([3, 3, 0])
    if name == "transposed_b":
        return (
            rand((4, 1, 37), mx.float32, 1),
            rand((5, 17, 37), mx.float32, 2).swapaxes(-1, -2),
            None,
            indices([4, 0, 4, 2]),
        )
    if name == "unused_experts":
        return rand((3, 2, 8), mx.float32, 1), rand((6, 8, 5), mx.float32, 2), indices([1, 1, 0]), indices([5, 5, 5])
    if name == "b_2d":
        return rand((3, 2, 9), mx.float32, 1), rand((9, 5), mx.float32, 2), indices([0, 0, 2]), None
    if name == "a_2d":
        return rand((2, 9), mx.float32, 1), rand((4, 9, 5), mx.float32, 2), None, indices([3, 3, 0])
    if name == "a_1d":
        return rand((9,), mx.float32, 1), rand((4, 9, 5), mx.float32, 2), None, indices([3, 3, 0])
    raise ValueError(name)


GRAD_CASES = [
    "rhs_only",
    "lhs_and_rhs_repeats",
    "broadcast_indices",
    "broadcast_batches",
    "a_batch_one",
    "transposed_b",
    "unused_experts",
    "b_2d",
    "a_2d",
    "a_1d",
]


def _np_grads(a, b, lhs, rhs, cot):
    """float64 gradients of sum(out * cot) wrt a and b:
    d a[lhs[p]] += cot[p] @ b[rhs[p]]^T and d b[rhs[p]] += a[lhs[p]]^T @ cot[p]
    (1-d operands expanded as in the forward)."""
    a64, b64, c64 = to_f64(a), to_f64(b), to_f64(cot)
    l64, r64 = to_np_indices(lhs), to_np_indices(rhs)
    A = a64[None, :] if a.ndim == 1 else a64
    B = b64[:, None] if b.ndim == 1 else b64
    C = c64
    if a.ndim == 1:
        C = np.expand_dims(C, -2)
    if b.ndim == 1:
        C = np.expand_dims(C, -1)
    a_batch, b_batch = A.shape[:-2], B.shape[:-2]
    L = np.arange(int(np.prod(a_batch)), dtype=np.int64).reshape(a_batch) if l64 is None else l64
    R = np.arange(int(np.prod(b_batch)), dtype=np.int64).reshape(b_batch) if r64 is None else r64
    L, R = np.broadcast_arrays(L, R)
    Af = A.reshape(int(np.prod(a_batch)), *A.shape[-2:])
    Bf = B.reshape(int(np.prod(b_batch)), *B.shape[-2:])
    Cf = C.reshape(L.size, *C.shape[-2:])
    dA = np.zeros_like(Af)
    dB = np.zeros_like(Bf)
    for p, (i, j) in enumerate(zip(L.reshape(-1), R.reshape(-1))):
        dA[i] += Cf[p] @ Bf[j].T
        dB[j] += Af[i].T @ Cf[p]
    return dA.reshape(a64.shape), dB.reshape(b64.shape)


@pytest.mark.parametrize("name", GRAD_CASES)
def test_vjp_matches_reference(name):
    a, b, lhs, rhs = _grad_case(name)
    out_shape = reference.gather_mm(a, b, lhs, rhs).shape
    cot = rand(out_shape, mx.float32, 99)
    _, (ga, gb) = mx.vjp(lambda x, y: gather_mm(x, y, lhs, rhs), [a, b], [cot])
    _, (ra, rb) = mx.vjp(lambda x, y: reference.gather_mm(x, y, lhs, rhs), [a, b], [cot])
    assert ga.shape == a.shape and gb.shape == b.shape
    assert ga.dtype == mx.float32 and gb.dtype == mx.float32
    ea, eb = _np_grads(a, b, lhs, rhs, cot)
    scale_a = max(1.0, np.abs(ea).max())
    scale_b = max(1.0, np.abs(eb).max())
    np.testing.assert_allclose(np.array(ga), np.array(ra), rtol=1e-4, atol=1e-4 * scale_a)
    np.testing.assert_allclose(np.array(gb), np.array(rb), rtol=1e-4, atol=1e-4 * scale_b)
    np.testing.assert_allclose(np.array(ga), ea, rtol=1e-4, atol=1e-4 * scale_a)
    np.testing.assert_allclose(np.array(gb), eb, rtol=1e-4, atol=1e-4 * scale_b)


@pytest.mark.parametrize("dtype", [pytest.param(mx.float16, id="f16"), pytest.param(mx.bfloat16, id="bf16")])
def test_grad_half_precision(build, dtype):
    a, b, lhs, rhs = _grad_case("lhs_and_rhs_repeats")
    a, b = a.astype(dtype), b.astype(dtype)
    loss = lambda x, y: gather_mm(x, y, lhs, rhs).astype(mx.float32).sum()
    ga, gb = mx.grad(loss, argnums=(0, 1))(a, b)
    assert ga.dtype == dtype and gb.dtype == dtype
    cot = mx.ones(reference.gather_mm(a, b, lhs, rhs).shape, mx.float32)
    ea, eb = _np_grads(a, b, lhs, rhs, cot)
    tol = 2e-2 if dtype == mx.bfloat16 else 4e-3
    np.testing.assert_allclose(to_f64(ga), ea, rtol=tol, atol=tol * np.abs(ea).max())
    np.testing.assert_allclose(to_f64(gb), eb, rtol=tol, atol=tol * np.abs(eb).max())


def test_grad_scalar_loss_both_argnums():
    a, b, lhs, rhs = _grad_case("lhs_and_rhs_repeats")

    def loss(f):
        return lambda x, y: (f(x, y, lhs, rhs) ** 2).sum()

    ours = mx.value_and_grad(loss(gather_mm), argnums=(0, 1))(a, b)
    ref = mx.value_and_grad(loss(reference.gather_mm), argnums=(0, 1))(a, b)
    np.testing.assert_allclose(ours[0].item(), ref[0].item(), rtol=1e-5)
    for g, r in zip(ours[1], ref[1]):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4, atol=1e-4 * np.abs(np.array(r)).max())
    # only a; only b
    ga = mx.grad(loss(gather_mm), argnums=0)(a, b)
    gb = mx.grad(loss(gather_mm), argnums=1)(a, b)
    np.testing.assert_allclose(np.array(ga), np.array(ours[1][0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(gb), np.array(ours[1][1]), rtol=1e-6, atol=1e-6)


def test_grad_wrt_indices_raises():
    a, b, lhs, rhs = _grad_case("lhs_and_rhs_repeats")
    with pytest.raises(ValueError, match=r"\[gather_mm\].*indices"):
        mx.grad(lambda r: gather_mm(a, b, lhs, r).sum())(rhs)
    with pytest.raises(ValueError, match=r"\[gather_mm\].*indices"):
        mx.vjp(lambda x, l: gather_mm(x, b, l, rhs), [a, lhs], [mx.ones((6, 2, 17))])
    # with stop_gradient, the gradient wrt a still works
    g = mx.grad(lambda x: gather_mm(x, b, mx.stop_gradient(lhs), mx.stop_gradient(rhs)).sum())(a)
    assert g.shape == a.shape


# ================================================================ compile
def test_compile_matches_eager(build):
    a, b, lhs, rhs = _index_mode("both", mx.float32)
    f = lambda a, b, l, r: gather_mm(a, b, l, r)
    cf = mx.compile(f)
    eager = f(a, b, lhs, rhs)
    for _ in range(2):
        np.testing.assert_array_equal(np.array(cf(a, b, lhs, rhs)), np.array(eager))
    # new index values, same shapes: no stale trace
    lhs2, rhs2 = indices([2, 1, 0, 0, 1, 2]), indices([0, 0, 1, 2, 3, 3])
    assert_close_to_exact(cf(a, b, lhs2, rhs2), a, b, lhs2, rhs2)
    # new shapes retrace
    a3, b3, l3, r3 = _index_mode("broadcast_indices", mx.float32)
    assert_close_to_exact(cf(a3, b3, l3, r3), a3, b3, l3, r3)


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
def test_compile_shapeless_varying_pairs(build, b_layout):
    b = make_b(5, 37, 50, mx.float32, 2, b_layout)
    a = rand((4, 2, 37), mx.float32, 1)

    def f(l, r):
        return gather_mm(a, b, l, r, sorted_indices=True)

    cf = mx.compile(f, shapeless=True)
    for pairs in (3, 11, 1):
        rng = np.random.default_rng(pairs)
        lhs = indices(rng.integers(0, 4, pairs))
        rhs = indices(np.sort(rng.integers(0, 5, pairs)))
        out = cf(lhs, rhs)
        assert out.shape == (pairs, 2, 50)
        assert_close_to_exact(out, a, b, lhs, rhs)


def test_compile_shapeless_switch_linear(build):
    """SwitchLinear's call compiled shapeless. (With x [P, 1, D] and a
    changing P, the default lhs arange has a fixed shape in the trace, so a
    second P fails in broadcast_shapes exactly as with mx.gather_mm; that
    shared limitation is not tested here.) A batch-1 x broadcasts against
    any number of pairs, so the shapeless trace is reused for new P."""
    w = rand((4, 24, 40), mx.float32, 3)

    def f(x, r):
        return gather_mm(x, w.swapaxes(-1, -2), rhs_indices=r, sorted_indices=True)

    cf = mx.compile(f, shapeless=True)
    x1 = rand((6, 1, 40), mx.float32, 4)
    r1 = indices([0, 0, 1, 3, 3, 3])
    assert_close_to_exact(cf(x1, r1), x1, w.swapaxes(-1, -2), None, r1)
    # a batch-1 x broadcasts against any number of pairs: shapeless-safe
    x2 = rand((1, 1, 40), mx.float32, 5)
    g = mx.compile(lambda x, r: gather_mm(x, w.swapaxes(-1, -2), rhs_indices=r), shapeless=True)
    for r in (indices([2, 0, 3]), indices([1, 1, 2, 0, 3, 3, 3])):
        out = g(x2, r)
        assert out.shape == (r.size, 1, 24)
        assert_close_to_exact(out, x2, w.swapaxes(-1, -2), None, r)


def test_compile_grad():
    a, b, lhs, rhs = _grad_case("lhs_and_rhs_repeats")
    loss = lambda x, y: (gather_mm(x, y, lhs, rhs) ** 2).sum()
    cg = mx.compile(mx.grad(loss, argnums=(0, 1)))
    ga, gb = cg(a, b)
    ea, eb = mx.grad(loss, argnums=(0, 1))(a, b)
    np.testing.assert_allclose(np.array(ga), np.array(ea), rtol=1e-5, atol=1e-5 * np.abs(np.array(ea)).max())
    np.testing.assert_allclose(np.array(gb), np.array(eb), rtol=1e-5, atol=1e-5 * np.abs(np.array(eb)).max())


def test_compiled_out_of_range_gives_nan():
    """Under compile the indices are graph inputs (not checked at the call):
    an out-of-range one gives that pair's rows NaN, never a wrong read."""
    a, b = rand((3, 2, 8), mx.float32, 1), rand((4, 8, 5), mx.float32, 2)
    cf = mx.compile(lambda l, r: gather_mm(a, b, l, r))
    mx.eval(cf(indices([0, 1]), indices([0, 3])))
    out = np.array(cf(indices([0, 1]), indices([0, 4])))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


# ============================================================= bad inputs
A3 = rand((3, 2, 8), mx.float32, 1)
B4 = rand((4, 8, 5), mx.float32, 2)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"\[gather_mm\].*\(3,2,8\).*\(4,7,5\)"):
        gather_mm(A3, rand((4, 7, 5)), None, indices([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[gather_mm\]"):
        gather_mm(rand((7,)), B4, None, indices([0]))


def test_zero_dim_input():
    for a, b in ((mx.array(1.0), B4), (A3, mx.array(1.0))):
        with pytest.raises(ValueError, match=r"\[gather_mm\].*0 dimension"):
            gather_mm(a, b, indices([0]), indices([0]))


@pytest.mark.parametrize(
    "a_dtype,b_dtype",
    [
        (mx.float64, mx.float64),
        (mx.float64, mx.float32),
        (mx.float16, mx.float64),
        (mx.int32, mx.int32),
        (mx.int8, mx.uint8),
        (mx.bool_, mx.int32),
        (mx.complex64, mx.float32),
    ],
    ids=lambda d: dtype_id(d),
)
def test_unsupported_dtypes(a_dtype, b_dtype):
    a = mx.ones((3, 2, 8), a_dtype)
    b = mx.ones((4, 8, 5), b_dtype)
    with pytest.raises(ValueError, match=r"\[gather_mm\]") as info:
        gather_mm(a, b, None, indices([0, 1, 3]))
    assert str(a_dtype).split(".")[-1] in str(info.value)


@pytest.mark.parametrize("which", ["lhs_indices", "rhs_indices"])
@pytest.mark.parametrize("index_dtype", [mx.float32, mx.float16, mx.bool_])
def test_non_integer_indices(which, index_dtype):
    bad = mx.array([0, 1, 0]).astype(index_dtype)
    kwargs = {which: bad}
    with pytest.raises(ValueError, match=rf"\[gather_mm\].*{which}.*integral"):
        gather_mm(A3, B4, **kwargs)


def test_unbroadcastable_indices():
    with pytest.raises(ValueError, match="broadcast"):
        gather_mm(A3, B4, indices([0, 1, 2]), indices([0, 1]))
    # default lhs (arange(3)) with 2 rhs indices
    with pytest.raises(ValueError, match="broadcast"):
        gather_mm(A3, B4, None, indices([0, 1]))


_EVALUATED_BAD = [
    ("rhs_indices", [0, 4, 1], 4, mx.int32),
    ("rhs_indices", [0, 4, 1], 4, mx.uint8),
    ("rhs_indices", [0, 1, -1], 4, mx.int32),
    ("rhs_indices", [0, 1, -1], 4, mx.int64),
    ("lhs_indices", [3, 0, 0], 3, mx.int64),
    ("lhs_indices", [3, 0, 0], 3, mx.uint32),
    ("lhs_indices", [-2, 0, 0], 3, mx.int8),
    ("lhs_indices", [-2, 0, 0], 3, mx.int32),
    ("rhs_indices", [0, 2**32 + 1, 1], 4, mx.int64),
    ("rhs_indices", [0, 2**32, 1], 4, mx.uint64),
]


@pytest.mark.parametrize(
    "which,values,bound,index_dtype",
    _EVALUATED_BAD,
    ids=[f"{w}-{v}-{dtype_id(d)}" for w, v, _, d in _EVALUATED_BAD],
)
def test_out_of_range_evaluated_raises_at_call(which, values, bound, index_dtype):
    idx = mx.array(np.array(values, dtype=np.uint64 if index_dtype == mx.uint64 else np.int64)).astype(index_dtype)
    mx.eval(idx)
    kwargs = {"lhs_indices": indices([0, 1, 2]), "rhs_indices": indices([0, 1, 2])}
    kwargs[which] = idx
    bad = next(v for v in values if v < 0 or v >= bound)
    with pytest.raises(IndexError, match=rf"\[gather_mm\] {which} holds {bad}\b.*\[0, {bound}\)"):
        gather_mm(A3, B4, **kwargs)  # no eval: raised at the call


_LAZY_BAD = [
    ("rhs_indices", [0, 4, 1], mx.int32),
    ("rhs_indices", [0, 4, 1], mx.uint8),
    ("rhs_indices", [0, 1, -1], mx.int64),
    ("rhs_indices", [0, 1, -1], mx.int8),
    ("lhs_indices", [3, 0, 0], mx.int64),
    ("lhs_indices", [3, 0, 0], mx.uint16),
    ("lhs_indices", [-2, 0, 0], mx.int32),
    ("lhs_indices", [-2, 0, 0], mx.int16),
]


@pytest.mark.parametrize(
    "which,values,index_dtype", _LAZY_BAD, ids=[f"{w}-{v}-{dtype_id(d)}" for w, v, d in _LAZY_BAD]
)
def test_out_of_range_lazy_gives_nan_rows(build, which, values, index_dtype):
    """Lazily computed indices are checked by the kernel: a pair with an
    index out of range gets a NaN output row (never an out-of-bounds read,
    no exception from the CPU task), the other pairs their exact products,
    and the stream keeps working afterwards."""
    kwargs = {"lhs_indices": indices([0, 1, 2]), "rhs_indices": indices([0, 1, 2])}
    kwargs[which] = mx.array(values, dtype=index_dtype) + 0
    out = gather_mm(A3, B4, **kwargs)
    mx.eval(out)
    bad = [i for i, v in enumerate(values) if v < 0 or v >= (4 if which == "rhs_indices" else 3)]
    got = np.array(out)
    assert bad and all(np.isnan(got[i]).all() for i in bad)
    good = [i for i in range(3) if i not in bad]
    for i in good:
        lhs = kwargs["lhs_indices"][i : i + 1]
        rhs = kwargs["rhs_indices"][i : i + 1]
        assert_close_to_exact(out[i : i + 1], A3, B4, lhs, rhs)
    # the stream still works
    ok = gather_mm(A3, B4, indices([2, 0, 1]), indices([3, 3, 0]))
    assert_close_to_exact(ok, A3, B4, indices([2, 0, 1]), indices([3, 3, 0]))


@pytest.mark.parametrize(
    "values,dtype",
    [
        ([0, 2**32 + 1, 1], mx.int64),  # 1 after a uint32 cast
        ([0, -(2**32) + 2, 1], mx.int64),  # 2 after a uint32 cast
        ([0, 2**32, 1], mx.uint64),  # 0 after a uint32 cast
    ],
    ids=["int64_2^32+1", "int64_-2^32+2", "uint64_2^32"],
)
def test_out_of_range_lazy_wide_indices_are_nan(values, dtype):
    """Lazily computed 64-bit indices outside [0, E) must give NaN, not wrap
    modulo 2**32 into a valid matrix (the evaluated ones raise at the
    call)."""
    rhs = mx.array(np.array(values, dtype=np.int64 if dtype == mx.int64 else np.uint64)) + 0
    assert rhs.dtype == dtype
    got = np.array(gather_mm(A3, B4, indices([0, 1, 2]), rhs))
    assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2]]).all()


# ====================================================== property-based
LAYOUT_CHOICES = ["contiguous", "transposed", "strided_k", "strided_n", "transposed_strided", "reversed"]


@st.composite
def problems(draw):
    M = draw(st.sampled_from([0, 1, 1, 2, 3, 5, 7, 13]))
    K = draw(st.one_of(st.integers(0, 40), st.sampled_from([255, 256, 257, 300])))
    N = draw(st.one_of(st.integers(0, 70), st.sampled_from([96, 97, 145])))
    E = draw(st.integers(1, 6))
    pairs = draw(st.integers(0, 12))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    b_layout = draw(st.sampled_from(LAYOUT_CHOICES))
    a_layout = draw(st.sampled_from(A_LAYOUTS))
    rhs = draw(st.lists(st.integers(0, E - 1), min_size=pairs, max_size=pairs))
    use_lhs = draw(st.booleans())
    A = draw(st.integers(1, 4))
    lhs = draw(st.lists(st.integers(0, A - 1), min_size=pairs, max_size=pairs)) if use_lhs else None
    sorted_flag = draw(st.booleans())
    if sorted_flag:
        rhs = sorted(rhs)
    build = draw(st.sampled_from(BUILDS))
    seed = draw(st.integers(0, 2**16))
    return M, K, N, E, dtype, b_layout, a_layout, rhs, lhs, A, sorted_flag, build, seed


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(problems())
def test_property_matches_oracle(problem):
    M, K, N, E, dtype, b_layout, a_layout, rhs, lhs, A, sorted_flag, build, seed = problem
    a_batch = A if lhs is not None else len(rhs)
    a = make_a(a_batch, M, K, dtype, seed, a_layout) if a_batch else rand((0, M, K), dtype, seed)
    b = make_b(E, K, N, dtype, seed + 1, b_layout)
    rhs_i = indices(rhs, mx.int32)
    lhs_i = None if lhs is None else indices(lhs, mx.uint8)
    old = os.environ.get("MLX_MOE_CPU_KERNELS")
    try:
        if build == "default":
            os.environ.pop("MLX_MOE_CPU_KERNELS", None)
        else:
            os.environ["MLX_MOE_CPU_KERNELS"] = build
        out = gather_mm(a, b, lhs_i, rhs_i, sorted_indices=sorted_flag)
        mx.eval(out)
    finally:
        if old is None:
            os.environ.pop("MLX_MOE_CPU_KERNELS", None)
        else:
            os.environ["MLX_MOE_CPU_KERNELS"] = old
    assert out.shape == (len(rhs), M, N)
    assert_close_to_exact(out, a, b, lhs_i, rhs_i)
    if a.size and b.size and len(rhs):
        assert_close(out, reference.gather_mm(a, b, lhs_i, rhs_i), a, b, lhs_i, rhs_i)
