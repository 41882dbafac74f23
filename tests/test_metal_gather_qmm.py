"""The quantized gather_mm decode kernel (csrc/metal/gather_qmm.metal) runs in
the Metal-on-CPU simulator (tests/metal_sim/) with exactly the launch the
Metal dispatch would use (``_ext._plan_gather_qmm``), against a float64
oracle over ``mx.dequantize(..., dtype=mx.float32)``; plus fault builds that
these tests must catch.

Layout (mlx-lm's QuantizedSwitchLinear): x [rows, K] grouped by expert,
offsets [E + 1] uint32, w packed by mx.quantize [E, N, K * bits / 32] uint32,
scales/biases [E, N, K / group_size] in the activation dtype (mxfp4: uint8
E8M0 scales, no biases), out [rows, N].
"""

from __future__ import annotations

import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metal_cases import device_buffer, entries_by_expert, from_device, nan_buffer, quantized_weights, routed_entries, simulator  # noqa: E402
from metal_sim import MetalSimError  # noqa: E402

mx = pytest.importorskip("mlx.core")
from mlx_moe_kernels import _ext  # noqa: E402

METAL_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "metal" / "gather_qmm.metal"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="the Metal simulator needs Linux and g++",
)

DTYPES = ["float32", "float16", "bfloat16"]
MX_DTYPE = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """sim(race_check=True, only=None, FAULT=1) -> built Library (cached).
    only: build just one variant's instantiations (GATHER_QMM_ONLY_VARIANT:
    the affine width, 1 for mxfp4), which keeps the extra builds quick."""
    get = simulator(tmp_path_factory, METAL_SOURCE)

    def get_variant(race_check: bool = True, only: int | None = None, **defines):
        if only is not None:
            defines["GATHER_QMM_ONLY_VARIANT"] = only
        return get(race_check, **defines)

    return get_variant


class Case:
    """One quantized gather_mm problem: inputs, float64 oracle, plan."""

    def __init__(self, counts, N, K, dtype, bits=4, group_size=64, mode="affine", seed=0, M=1, identity=False,
                 dispatch_bound=False):
        """counts: index entries per expert, M rows each. The entries are
        shuffled (order) and read random x matrices (lhs, with repeats)
        unless ``identity`` (x rows grouped by expert), as in
        test_metal_gather_mm.Case."""
        self.counts, self.N, self.K, self.dtype, self.M = list(counts), N, K, dtype, M
        self.E, self.entries = len(counts), int(sum(counts))
        self.rows = self.entries * M
        self.offsets, self.order, self.lhs, self.lhs_batches = routed_entries(
            counts, np.random.default_rng(seed), identity)
        key = mx.random.key(seed)
        kx, kw = mx.random.split(key)
        x = mx.random.normal((self.lhs_batches * M, K), key=kx).astype(MX_DTYPE[dtype])
        w = mx.random.normal((self.E, N, K), key=kw)
        self.w, self.scales, self.biases, wv, wabs = quantized_weights(w, MX_DTYPE[dtype], bits, group_size, mode)
        self.x = device_buffer(x)
        xv = np.array(x.astype(mx.float32), np.float64)
        self.exact = np.zeros((self.rows, N))
        self.mag = np.zeros((self.rows, N))
        for e, i, b in entries_by_expert(self.offsets, self.order, self.lhs):
            xr = xv[b * M:(b + 1) * M]
            self.exact[i * M:(i + 1) * M] = xr @ wv[e].T
            self.mag[i * M:(i + 1) * M] = np.abs(xr) @ wabs[e].T
        # dispatch_bound: plan as GatherQMM::eval_gpu does (all rows on one expert).
        plan_rows = self.rows if dispatch_bound else max(counts) * M
        self.plan = _ext._plan_gather_qmm(
            self.rows, plan_rows, N, K, self.E, group_size, bits, mode, MX_DTYPE[dtype], M, self.lhs_batches)

    def run(self, lib, **launch):
        out = nan_buffer((self.rows, self.N), self.dtype)
        p = self.plan
        order = self.order if self.order.size else np.zeros(1, np.uint32)
        lhs = self.lhs if self.lhs.size else np.zeros(1, np.uint32)
        res = lib.launch(
            p["kernel"],
            [self.x, self.w, self.scales, self.biases, self.offsets, out, p["params"], order, lhs],
            threadgroups=p["grid"],
            threads_per_threadgroup=p["threads"],
            threadgroup_memory=[p["threadgroup_memory"]],
            **launch,
        )
        return from_device(out, self.dtype), res

    def bound(self) -> np.ndarray:
        """float32 dequantization and accumulation (generously: 4 K eps times
        sum |x| (|s| q + |b|)), then one rounding to the output dtype."""
        g = 4 * self.K * 2.0**-24 * self.mag + 2.0**-40
        ulp = 2.0 ** -MANTISSA_BITS[self.dtype]
        return ulp * (np.abs(self.exact) + g) + g + (2.0**-24 if self.dtype == "float16" else 0.0)

    def close(self, got) -> bool:
        return bool(np.all(np.abs(got - self.exact) <= self.bound()))

    def assert_close(self, got):
        err = np.abs(got - self.exact)
        bad = ~(err <= self.bound())  # NaN counts as bad
        assert not bad.any(), (
            f"{bad.sum()} of {bad.size} wrong, first at {np.argwhere(bad)[0]}: "
            f"got {got[bad][0]}, exact {self.exact[bad][0]}, bound {self.bound()[bad][0]}"
        )


# Shape classes: (rows per expert, N, K, row tile).
SHAPES = {
    "one_row": ([0, 1, 0], 32, 256, "_bm1"),
    "few_rows": ([3, 0, 2, 1], 40, 384, "_bm4"),  # N not a multiple of the 32-column tile
    # ragged up to 8 rows, empty experts, K staged in several chunks for float x
    # (16 KiB / (8 rows * 4 bytes) = 512 elements) and a K tail shorter than a simdgroup's step
    "ragged_empty": ([8, 0, 5, 0, 1], 36, 1152, "_bm8"),
}
# (dtype, bits, group_size) x shape: every dtype, width and group size with
# every shape would be 54 launches; each dtype meets each shape and each
# (bits, group_size) pair, rotating.
QUANT = [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)]
CASES = [
    (shape, dtype, bits, gs)
    for i, dtype in enumerate(DTYPES)
    for j, (bits, gs) in enumerate(QUANT)
    for shape in [list(SHAPES)[(i + j) % len(SHAPES)]]
]
RACE_CHECKED = {("ragged_empty", "bfloat16", 4, 32), ("few_rows", "float32", 8, 64)}
assert RACE_CHECKED <= set(CASES)


@pytest.mark.parametrize("shape,dtype,bits,gs", CASES)
def test_gather_qmm_decode(sim, shape, dtype, bits, gs):
    counts, N, K, tile = SHAPES[shape]
    case = Case(counts, N, K, dtype, bits, gs, seed=zlib.crc32(f"{shape}-{dtype}-{bits}-{gs}".encode()))
    assert case.plan["kernel"] == f"gather_qmm_decode_{ {'float32': 'float', 'float16': 'half', 'bfloat16': 'bfloat'}[dtype]}_b{bits}{tile}"
    got, res = case.run(sim(race_check=False))
    assert res.diagnostics == []
    case.assert_close(got)
    if (shape, dtype, bits, gs) in RACE_CHECKED:
        for schedule in ({"schedule": "reverse"}, {"schedule": "random", "seed": 3, "preempt": 0.2}):
            got, res = case.run(sim(race_check=True, only=bits), **schedule)
            assert res.diagnostics == [], res.diagnostics
            case.assert_close(got)


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
def test_other_widths(sim, bits):
    dtype = DTYPES[bits % 3]
    case = Case(*SHAPES["few_rows"][:3], dtype, bits, 64, seed=bits)
    got, res = case.run(sim(race_check=False))
    assert res.diagnostics == []
    case.assert_close(got)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mxfp4(sim, dtype):
    case = Case(*SHAPES["ragged_empty"][:3], dtype, 4, 32, mode="mxfp4", seed=7)
    assert case.plan["kernel"].endswith("_mxfp4_bm8")
    got, res = case.run(sim(race_check=False))
    assert res.diagnostics == []
    case.assert_close(got)


@pytest.mark.parametrize(
    "counts, suffix",
    [([1, 1, 1, 0, 1, 1, 1, 1, 1], "_b4_bm8"),  # one token, top-8: an 8-row tile, 1 row used
     ([3, 0, 4, 2], "_b4_bm32_bn32")],  # 9 entries: prefill, at most 4 rows per expert
)
def test_the_dispatch_launches(sim, counts, suffix):
    case = Case(counts, 40, 128, "bfloat16", 4, 64, seed=24, dispatch_bound=True)
    assert case.plan["kernel"].endswith(suffix)
    got, res = case.run(sim(race_check=True, only=4))
    assert res.diagnostics == [], res.diagnostics
    case.assert_close(got)


def test_rows_per_index_and_bad_lhs(sim):
    """M = 2 rows per index entry (4 entries on 3 experts: at most 4 rows per
    expert), shuffled entries; then one entry's lhs id out of range reads NaN
    for its rows only."""
    case = Case([2, 1, 0, 1], 36, 256, "float16", 4, 64, seed=31, M=2)
    assert case.plan["kernel"].endswith("_bm4")
    got, res = case.run(sim(race_check=True), schedule="random", seed=4, preempt=0.2)
    assert res.diagnostics == [], res.diagnostics
    case.assert_close(got)
    bad_entry = int(case.order[1])
    case.lhs[bad_entry] = case.lhs_batches + 5
    got, res = case.run(sim(race_check=True))
    assert res.diagnostics == [], res.diagnostics
    bad_rows = slice(2 * bad_entry, 2 * bad_entry + 2)
    assert np.isnan(got[bad_rows]).all()
    keep = np.ones(case.rows, bool)
    keep[bad_rows] = False
    assert (np.abs(got[keep] - case.exact[keep]) <= case.bound()[keep]).all()


def test_no_rows_launches_nothing():
    assert _ext._plan_gather_qmm(0, 0, 40, 64, 4, 64, 4, "affine", mx.float16)["grid"] == (0, 0, 0)


def test_plan_covers_the_library(sim):
    names = set(sim(race_check=False).kernels)
    for dtype in MX_DTYPE.values():
        for max_rows in (1, 2, 3, 5, 8, 9, 64, 500):
            for K in (128, 2048, 8192):
                for mode, bits, gs in [("affine", b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)] + [
                    ("mxfp4", 4, 32)
                ]:
                    plan = _ext._plan_gather_qmm(max_rows * 4, max_rows, 768, K, 128, gs, bits, mode, dtype)
                    assert plan["kernel"] in names
                    assert plan["threadgroup_memory"] % 16 == 0 and 0 < plan["threadgroup_memory"] <= 32768
                    assert plan["k_chunk"] % 32 == 0
                    assert plan["prefill"] == (max_rows > 8)
    for bad in [
        (4, 1, 8, 64, 2, 64, 4, "affine", mx.int32),  # dtype
        (4, 1, 8, 64, 2, 64, 7, "affine", mx.float16),  # bits
        (4, 1, 8, 64, 2, 16, 4, "affine", mx.float16),  # group size
        (4, 1, 8, 96, 2, 64, 4, "affine", mx.float16),  # K % group_size
        (4, 1, 8, 64, 2, 64, 4, "mxfp4", mx.float16),  # mxfp4 group size
    ]:
        with pytest.raises(ValueError, match="gather_qmm"):
            _ext._plan_gather_qmm(*bad)


# ------------------------------------------------------------- prefill
# More than 8 rows per expert: the simdgroup_matrix kernel (32 x 32 tiles).
PREFILL_SHAPES = {
    # partial row tiles, an empty expert, N not a multiple of 32
    "ragged": ([40, 0, 9, 13], 40, 256),
    # one expert over several row tiles and a single partial column tile
    "one_expert": ([70], 24, 128),
}
# Every width once, dtypes and group sizes rotating, shapes alternating.
PREFILL_CASES = [
    (list(PREFILL_SHAPES)[i % 2], DTYPES[i % 3], bits, (32, 64, 128)[i % 3])
    for i, bits in enumerate([2, 3, 4, 5, 6, 8])
]


@pytest.mark.parametrize("shape,dtype,bits,gs", PREFILL_CASES)
def test_gather_qmm_prefill(sim, shape, dtype, bits, gs):
    counts, N, K = PREFILL_SHAPES[shape]
    case = Case(counts, N, K, dtype, bits, gs, seed=zlib.crc32(f"p-{shape}-{dtype}-{bits}".encode()))
    assert case.plan["prefill"] and case.plan["kernel"].endswith(f"_b{bits}_bm32_bn32")
    got, res = case.run(sim(race_check=False, only=bits))
    assert res.diagnostics == []
    case.assert_close(got)


def test_gather_qmm_prefill_mxfp4_rows_per_index_races(sim):
    """mxfp4, M = 3 rows per shuffled entry, under the race detector with a
    preempting random schedule."""
    case = Case([5, 0, 4], 36, 128, "bfloat16", 4, 32, mode="mxfp4", seed=41, M=3)
    assert case.plan["prefill"] and case.plan["kernel"].endswith("_mxfp4_bm32_bn32")
    got, res = case.run(sim(race_check=True, only=1), schedule="random", seed=6, preempt=0.2)
    assert res.diagnostics == [], res.diagnostics
    case.assert_close(got)


def test_prefill_faults_are_caught(sim):
    case = Case(*PREFILL_SHAPES["ragged"], "float16", 4, 64, seed=42)
    with pytest.raises(MetalSimError, match="data race"):
        case.run(sim(race_check=True, only=4, GATHER_QMM_FAULT_PREFILL_NO_BARRIER=1))
    got, _ = case.run(sim(race_check=False, only=4, GATHER_QMM_FAULT_PREFILL_NO_BARRIER=1))
    assert not case.close(got)
    for fault in ("GATHER_QMM_FAULT_GROUP_INDEX", "GATHER_QMM_FAULT_NO_BIAS_SUM"):
        got, _ = case.run(sim(race_check=False, only=4, **{fault: 1}))
        assert not case.close(got), fault


# ----------------------------------------------------------- the tests bite
def test_missing_x_barrier_is_caught(sim):
    case = Case(*SHAPES["few_rows"][:3], "float32", 4, 64, seed=11)
    with pytest.raises(MetalSimError, match="data race"):
        case.run(sim(race_check=True, only=4, GATHER_QMM_FAULT_NO_X_BARRIER=1))
    got, _ = case.run(sim(race_check=False, only=4, GATHER_QMM_FAULT_NO_X_BARRIER=1))
    assert not case.close(got)


def test_wrong_group_index_is_caught(sim):
    case = Case(*SHAPES["few_rows"][:3], "float16", 4, 32, seed=12)
    got, res = case.run(sim(race_check=False, only=4, GATHER_QMM_FAULT_GROUP_INDEX=1))
    assert not case.close(got)


def test_missing_bias_term_is_caught(sim):
    case = Case(*SHAPES["one_row"][:3], "bfloat16", 4, 128, seed=13)
    got, res = case.run(sim(race_check=False, only=4, GATHER_QMM_FAULT_NO_BIAS_SUM=1))
    assert not case.close(got)
