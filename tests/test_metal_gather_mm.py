"""The gather_mm Metal kernels (csrc/metal/gather_mm.metal) run in the
Metal-on-CPU simulator (tests/metal_sim/) with exactly the launch that the
Metal dispatch would use (``_ext._plan_gather_mm``, the C++ plan), against a
float64 NumPy oracle; plus deliberately broken builds (fault toggles in the
.metal file) that these tests must catch.

Layout (mlx-lm's SwitchLinear): w [E, N, K]; index entries (M rows each)
reached through the routing: per-expert offsets [E + 1] over sorted entry
positions, order (the entry at each position) and lhs (each entry's x
matrix); x [lhs_batches * M, K], out [entries * M, N].
"""

from __future__ import annotations

import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metal_cases import entries_by_expert, from_device, nan_buffer, routed_entries, simulator, to_device  # noqa: E402
from metal_sim import MetalSimError  # noqa: E402

mx = pytest.importorskip("mlx.core")
from mlx_moe_kernels import _ext  # noqa: E402

METAL_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "metal" / "gather_mm.metal"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="the Metal simulator needs Linux and g++",
)

DTYPES = ["float32", "float16", "bfloat16"]
MX_DTYPE = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """sim(race_check=True, FAULT_MACRO=1) -> built Library (cached per variant)."""
    return simulator(tmp_path_factory, METAL_SOURCE)


# ------------------------------------------------------------- data, oracle
class Case:
    """One gather_mm problem: index entries per expert (counts), N, K, dtype,
    M rows per entry; the inputs in the kernels' layout, and the oracle.

    The entries are shuffled (order[p]: the entry at sorted position p, as
    the routing kernel produces it) and each reads a random x matrix
    (lhs, with repeats; some matrices unused), unless ``identity``: then
    x rows are already grouped by expert (order = lhs = arange)."""

    def __init__(self, counts, N, K, dtype, seed=0, M=1, identity=False, dispatch_bound=False):
        rng = np.random.default_rng(seed)
        self.counts, self.N, self.K, self.dtype, self.M = list(counts), N, K, dtype, M
        self.E = len(counts)
        self.entries = int(sum(counts))
        self.rows = self.entries * M
        self.offsets, self.order, self.lhs, self.lhs_batches = routed_entries(counts, rng, identity)
        self.x = to_device(rng.standard_normal((self.lhs_batches * M, K)).astype(np.float32), dtype)
        self.w = to_device(rng.standard_normal((self.E, N, K)).astype(np.float32), dtype)
        xv, wv = from_device(self.x, dtype), from_device(self.w, dtype)
        self.exact = np.zeros((self.rows, N))
        self.scale = np.zeros((self.rows, N))  # sum_k |x_k w_k|
        for e, i, b in entries_by_expert(self.offsets, self.order, self.lhs):
            xr = xv[b * M:(b + 1) * M]
            self.exact[i * M:(i + 1) * M] = xr @ wv[e].T
            self.scale[i * M:(i + 1) * M] = np.abs(xr) @ np.abs(wv[e]).T
        # dispatch_bound: plan as GatherMM::eval_gpu does, bounding an
        # expert's rows by all rows (the routing is only known on the GPU).
        plan_rows = self.rows if dispatch_bound else max(counts) * M
        self.plan = _ext._plan_gather_mm(self.rows, plan_rows, N, K, self.E, MX_DTYPE[dtype], M, self.lhs_batches)

    def buffers(self, out):
        """The kernels' buffers (placeholders for empty ones: no empty Metal buffers)."""
        def nonempty(a):
            return a if a.size else np.zeros(1, np.uint32)

        return [self.x, self.w, self.offsets, out, self.plan["params"], nonempty(self.order), nonempty(self.lhs)]

    def run(self, lib, **launch):
        out = nan_buffer((max(self.rows, 1), self.N), self.dtype)
        p = self.plan
        res = lib.launch(
            p["kernel"],
            self.buffers(out),
            threadgroups=p["grid"],
            threads_per_threadgroup=p["threads"],
            threadgroup_memory=[p["threadgroup_memory"]],
            **launch,
        )
        return from_device(out[: self.rows], self.dtype), res

    def bound(self) -> np.ndarray:
        """float32 accumulation (about twice the naive dot product bound), then
        one rounding to the output dtype (a full ulp, for safety)."""
        g = 2 * self.K * 2.0**-24 * self.scale + 2.0**-40
        ulp = 2.0 ** -MANTISSA_BITS[self.dtype]
        return ulp * (np.abs(self.exact) + g) + g + (2.0**-24 if self.dtype == "float16" else 0.0)

    def close(self, got: np.ndarray) -> bool:
        return bool(np.all(np.abs(got - self.exact) <= self.bound()))

    def assert_close(self, got: np.ndarray):
        err = np.abs(got - self.exact)
        bad = ~(err <= self.bound())  # NaN counts as bad
        assert not bad.any(), (
            f"{bad.sum()} of {bad.size} wrong, first at {np.argwhere(bad)[0]}: "
            f"got {got[bad][0]}, exact {self.exact[bad][0]}, bound {self.bound()[bad][0]}"
        )


# Shape classes: (rows per expert, N, K, expected path and row tile).
SHAPES = {
    # one token, one expert: decode BM = 1, N not a multiple of the 32-column tile
    "one_row": ([0, 1, 0, 0], 40, 64, "decode_", "_bm1"),
    # a few rows per expert, one expert empty: decode BM = 4
    "few_rows": ([3, 0, 2, 1], 36, 72, "decode_", "_bm4"),
    # ragged up to 8 rows, x staged in several K chunks (K = 600 > the 8 KiB stage)
    "ragged_chunked_k": ([8, 5, 0, 1], 40, 600, "decode_", "_bm8"),
    # K not a multiple of the 16-byte vector (scalar path), N odd
    "unaligned_k": ([2, 1, 0, 2], 33, 37, "decode_", "_bm2"),
    # many rows: prefill, narrow tile, ragged experts, K and N not tile multiples
    "prefill_narrow": ([20, 0, 9, 13], 40, 40, "prefill_", "_bm16_bn32"),
    # many rows: prefill, wide tile (>= 64 rows), partial row and column tiles
    "prefill_wide": ([70, 3, 0], 72, 24, "prefill_", "_bm32_bn64"),
}
# Cases that also run the race detector with a preempting random schedule.
RACE_CHECKED = {("few_rows", "float16"), ("ragged_chunked_k", "bfloat16"), ("prefill_narrow", "float32")}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gather_mm_kernels(sim, shape, dtype):
    counts, N, K, path, tile = SHAPES[shape]
    case = Case(counts, N, K, dtype, seed=zlib.crc32(f"{shape}-{dtype}".encode()))
    assert case.plan["kernel"].startswith("gather_mm_" + path) and case.plan["kernel"].endswith(tile)
    got, res = case.run(sim(race_check=False))
    assert res.diagnostics == []
    case.assert_close(got)
    if (shape, dtype) in RACE_CHECKED:
        for schedule in ({"schedule": "reverse"}, {"schedule": "random", "seed": 3, "preempt": 0.2}):
            got, res = case.run(sim(race_check=True), **schedule)
            assert res.diagnostics == [], res.diagnostics
            case.assert_close(got)


# M rows per index entry (mx.gather_mm's a [..., M, K]): (counts, N, K, M, path, tile).
MULTI_ROW = {
    "decode_m2": ([2, 0, 1, 1], 36, 40, 2, "decode_", "_bm4"),
    "prefill_m3": ([5, 3, 0, 6], 40, 24, 3, "prefill_", "_bm16_bn32"),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", list(MULTI_ROW))
def test_rows_per_index(sim, shape, dtype):
    counts, N, K, M, path, tile = MULTI_ROW[shape]
    case = Case(counts, N, K, dtype, seed=zlib.crc32(f"{shape}-{dtype}".encode()), M=M)
    assert case.plan["kernel"].startswith("gather_mm_" + path) and case.plan["kernel"].endswith(tile)
    got, res = case.run(sim(race_check=True), schedule="random", seed=5, preempt=0.2)
    assert res.diagnostics == [], res.diagnostics
    case.assert_close(got)


@pytest.mark.parametrize(
    "counts, tile",
    [([1, 1, 0, 1, 1, 1, 1, 1, 1], "decode_float_bm8"),  # one token, top-8: an 8-row tile, 1 row used
     ([6, 0, 3, 2], "prefill_float_bm16_bn32")],  # 11 entries: prefill, 2 row tiles planned, 1 used
)
def test_the_dispatch_launches(sim, counts, tile):
    case = Case(counts, 40, 72, "float32", seed=23, dispatch_bound=True)
    assert case.plan["kernel"] == "gather_mm_" + tile
    got, res = case.run(sim(race_check=True))
    assert res.diagnostics == [], res.diagnostics
    case.assert_close(got)


@pytest.mark.parametrize("shape", ["few_rows", "prefill_narrow"])
def test_rows_already_grouped(sim, shape):
    """order = lhs = arange: x rows grouped by expert, as the CPU path sorts them."""
    case = Case(*SHAPES[shape][:3], "float16", seed=21, identity=True)
    got, res = case.run(sim(race_check=False))
    assert res.diagnostics == []
    case.assert_close(got)


@pytest.mark.parametrize("shape", ["few_rows", "prefill_narrow"])
def test_out_of_range_lhs_reads_nan(sim, shape):
    """An lhs id past x's matrices gives NaN rows, not an out-of-bounds read;
    the other rows are unaffected."""
    case = Case(*SHAPES[shape][:3], "float32", seed=22, M=2)
    bad_entry = int(case.order[0])
    case.lhs[bad_entry] = case.lhs_batches + 3
    got, res = case.run(sim(race_check=True))
    assert res.diagnostics == [], res.diagnostics
    bad_rows = slice(bad_entry * 2, bad_entry * 2 + 2)
    assert np.isnan(got[bad_rows]).all()
    keep = np.ones(case.rows, bool)
    keep[bad_rows] = False
    err = np.abs(got[keep] - case.exact[keep])
    assert (err <= case.bound()[keep]).all()


def test_no_rows_launches_nothing():
    plan = _ext._plan_gather_mm(0, 0, 40, 64, 4, mx.float16)
    assert plan["grid"] == (0, 0, 0)


def test_plan_covers_the_library(sim):
    """Every kernel the plan can name exists in the .metal file, and its
    threadgroup memory fits Metal's 32 KiB and is a multiple of 16 bytes."""
    names = set(sim(race_check=False).kernels)
    for dtype in MX_DTYPE.values():
        for max_rows in (1, 2, 3, 5, 8, 9, 63, 64, 500):
            for K in (1, 37, 2048, 8192):
                plan = _ext._plan_gather_mm(max_rows * 4, max_rows, 768, K, 128, dtype)
                assert plan["kernel"] in names
                assert plan["threadgroup_memory"] % 16 == 0 and 0 < plan["threadgroup_memory"] <= 32768
                assert plan["prefill"] == (max_rows > 8)
    with pytest.raises(ValueError, match="gather_mm"):
        _ext._plan_gather_mm(4, 1, 8, 8, 2, mx.int32)


# ----------------------------------------------------------- the tests bite
def test_missing_x_barrier_is_caught(sim):
    case = Case(*SHAPES["few_rows"][:3], "float32", seed=11)
    with pytest.raises(MetalSimError, match="data race"):
        case.run(sim(race_check=True, GATHER_MM_FAULT_NO_X_BARRIER=1))
    # without the race detector, the default schedule gives a wrong result
    got, _ = case.run(sim(race_check=False, GATHER_MM_FAULT_NO_X_BARRIER=1))
    assert not case.close(got)


@pytest.mark.parametrize("shape", ["few_rows", "unaligned_k"])
def test_shifted_k_index_is_caught(sim, shape):
    case = Case(*SHAPES[shape][:3], "float16", seed=12, identity=True)
    got, res = case.run(sim(race_check=True, GATHER_MM_FAULT_K_SHIFT=1), check=False)
    assert "out_of_bounds" in res.kinds()  # the last row reads one past x
    got, _ = case.run(sim(race_check=False, GATHER_MM_FAULT_K_SHIFT=1), check=False)
    assert not case.close(got)


def test_wrong_simd_reduction_is_caught(sim):
    case = Case(*SHAPES["one_row"][:3], "bfloat16", seed=13)
    got, _ = case.run(sim(race_check=False, GATHER_MM_FAULT_WRONG_REDUCTION=1))
    assert not case.close(got)


def test_prefill_missing_barrier_is_caught(sim):
    case = Case(*SHAPES["prefill_narrow"][:3], "float16", seed=14)
    with pytest.raises(MetalSimError, match="data race"):
        case.run(sim(race_check=True, GATHER_MM_FAULT_PREFILL_NO_BARRIER=1))
    got, _ = case.run(sim(race_check=False, GATHER_MM_FAULT_PREFILL_NO_BARRIER=1))
    assert not case.close(got)


def test_prefill_tile_bound_off_by_one_is_caught(sim):
    """Storing one row past an expert's partial row tile writes into the next
    expert's rows: another threadgroup's output."""
    # The partial tile (13 of 16 rows) is not the last expert's: its extra
    # row is the next expert's first (the last expert's tile is full).
    case = Case([13, 9, 0, 16], 40, 40, "float32", seed=15, identity=True)
    assert case.plan["kernel"].endswith("_bm16_bn32")
    with pytest.raises(MetalSimError, match="another threadgroup|out-of-bounds"):
        case.run(sim(race_check=True, GATHER_MM_FAULT_TILE_BOUND=1))
