"""The fused SwitchGLU's decode-path Metal kernels (csrc/metal/switch_glu.metal)
run in the Metal-on-CPU simulator (tests/metal_sim/) with exactly the
launches that the Metal dispatch would use (``_ext._plan_switch_glu``, the
C++ plan), against a float64 NumPy oracle; plus deliberately broken builds
(fault toggles in the .metal file) that these tests must catch.

Semantics (csrc/cpu/switch_glu_problem.h): slots s = t * k + j sorted by
expert (``order``, ``offsets`` [E + 1]); hidden[i] = silu(x[t_i] @ gate[e]^T)
* (x[t_i] @ up[e]^T) in sorted order; out[t] = sum_j scores[t, j] *
(hidden[i(t, j)] @ down[e]^T), or per-slot rows [T * k, D] without scores.
Each launch is checked against the oracle on its own inputs: gate_up from x,
down from the hidden rows the gate_up kernel wrote.
"""

from __future__ import annotations

import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metal_cases import check, from_device, nan_buffer, simulator, to_device  # noqa: E402
from metal_sim import MetalSimError  # noqa: E402

mx = pytest.importorskip("mlx.core")
from mlx_moe_kernels import _ext  # noqa: E402

METAL_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "metal" / "switch_glu.metal"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="the Metal simulator needs Linux and g++",
)

DTYPES = ["float32", "float16", "bfloat16"]
MX_DTYPE = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}
EPS32 = 2.0**-24


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """sim(race_check=True, FAULT_MACRO=1) -> built Library (cached per variant)."""
    return simulator(tmp_path_factory, METAL_SOURCE)


# ------------------------------------------------------------- data, oracle
def silu(g):
    return g / (1.0 + np.exp(-g))


class Case:
    """One decode SwitchGLU problem: routing indices [T, k], D, H, E, dtype."""

    def __init__(self, indices, D, H, E, dtype, seed=0, dispatch_bound=False):
        """dispatch_bound: plan as the Metal dispatch does, with the
        shape-only row bound (``_ext._switch_glu_row_bound``: T * k) instead
        of this routing's actual largest expert."""
        rng = np.random.default_rng(seed)
        self.indices = np.asarray(indices, np.int64)
        self.T, self.k = self.indices.shape
        self.D, self.H, self.E, self.dtype = D, H, E, dtype
        flat = self.indices.reshape(-1)
        self.order = np.argsort(flat, kind="stable").astype(np.uint32)  # the counting sort's order
        counts = np.bincount(flat, minlength=E)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
        self.expert_of_row = flat[self.order]
        self.x = to_device(rng.standard_normal((self.T, D)).astype(np.float32), dtype)
        # gate/up scaled so that silu sees both signs and moderate values
        self.gate = to_device((rng.standard_normal((E, H, D)) / np.sqrt(D)).astype(np.float32) * 2, dtype)
        self.up = to_device(rng.standard_normal((E, H, D)).astype(np.float32), dtype)
        self.down = to_device(rng.standard_normal((E, D, H)).astype(np.float32), dtype)
        self.scores = rng.random((self.T, self.k)).astype(np.float32).reshape(-1)
        self.max_rows = int(counts.max())
        plan_rows = _ext._switch_glu_row_bound(self.T, self.k) if dispatch_bound else self.max_rows
        self.plans = {
            s: _ext._plan_switch_glu(self.T, self.k, plan_rows, D, H, E, MX_DTYPE[dtype], s)
            for s in (True, False)
        }

    # -------------------------------------------------------------- launches
    def run_gate_up(self, lib, **launch):
        p, g = self.plans[True], self.plans[True]["gate_up"]
        hidden = nan_buffer((self.T * self.k, self.H), self.dtype)
        res = lib.launch(
            g["kernel"],
            [self.x, self.gate, self.up, self.order, self.offsets, hidden, p["params"]],
            threadgroups=g["grid"],
            threads_per_threadgroup=g["threads"],
            threadgroup_memory=g["threadgroup_memory"],
            **launch,
        )
        return hidden, res

    def run_down(self, lib, hidden, scores: bool, **launch):
        """The down launch (and, prefill with scores, the combine launch:
        down writes a float32 scratch [T * k, D] by slot, combine sums it)."""
        p = self.plans[scores]
        d = p["down"]
        rows = self.T if scores else self.T * self.k
        out = nan_buffer((rows, self.D), self.dtype)
        two_step = scores and p["prefill"]
        if two_step:
            assert p["scratch_bytes"] == self.T * self.k * self.D * 4
            scratch = np.full((self.T * self.k, self.D), np.nan, np.float32)
        buffers = [hidden, self.down, self.order, self.offsets, scratch if two_step else out, p["params"]]
        if scores:
            buffers.append(self.scores)
        res = lib.launch(
            d["kernel"],
            buffers,
            threadgroups=d["grid"],
            threads_per_threadgroup=d["threads"],
            threadgroup_memory=d["threadgroup_memory"],
            **launch,
        )
        if two_step:
            c = p["combine"]
            res2 = lib.launch(
                c["kernel"],
                [scratch, out, p["params"]],
                threadgroups=c["grid"],
                threads_per_threadgroup=c["threads"],
                threadgroup_memory=c["threadgroup_memory"],
                **launch,
            )
            res.diagnostics.extend(res2.diagnostics)
        return from_device(out, self.dtype), res

    # ---------------------------------------------------------------- oracle
    def hidden_oracle(self):
        """exact hidden rows (sorted order) and an error bound: float32
        accumulation of g and u, float silu, one rounding to the dtype."""
        xv = from_device(self.x, self.dtype)
        gw, uw = from_device(self.gate, self.dtype), from_device(self.up, self.dtype)
        tok = self.order // self.k
        e = self.expert_of_row
        xr = xv[tok]  # [rows, D]
        g = np.einsum("rd,rhd->rh", xr, gw[e])
        u = np.einsum("rd,rhd->rh", xr, uw[e])
        eg = 2 * self.D * EPS32 * np.einsum("rd,rhd->rh", np.abs(xr), np.abs(gw[e])) + 2.0**-40
        eu = 2 * self.D * EPS32 * np.einsum("rd,rhd->rh", np.abs(xr), np.abs(uw[e])) + 2.0**-40
        h = silu(g) * u
        g_h = 1.1 * eg * (np.abs(u) + eu) + np.abs(silu(g)) * eu + 8 * EPS32 * np.abs(h)
        ulp = 2.0 ** -MANTISSA_BITS[self.dtype]
        bound = ulp * (np.abs(h) + g_h) + g_h + (2.0**-24 if self.dtype == "float16" else 0.0)
        return h, bound

    def down_oracle(self, hidden_vals, scores: bool):
        """exact out from the given hidden rows and its error bound."""
        dw = from_device(self.down, self.dtype)
        e = self.expert_of_row
        per_row = np.einsum("rh,rdh->rd", hidden_vals, dw[e])  # sorted rows
        scale_row = np.einsum("rh,rdh->rd", np.abs(hidden_vals), np.abs(dw[e]))
        per_slot = np.zeros_like(per_row)
        scale_slot = np.zeros_like(per_row)
        per_slot[self.order] = per_row
        scale_slot[self.order] = scale_row
        if scores:
            s = self.scores.astype(np.float64)[:, None]
            exact = (s * per_slot).reshape(self.T, self.k, self.D).sum(1)
            g = ((2 * self.H + 2 * self.k + 4) * EPS32 * s * scale_slot).reshape(self.T, self.k, self.D).sum(1)
        else:
            exact, g = per_slot, (2 * self.H + 2) * EPS32 * scale_slot
        g = g + 2.0**-40
        ulp = 2.0 ** -MANTISSA_BITS[self.dtype]
        return exact, ulp * (np.abs(exact) + g) + g + (2.0**-24 if self.dtype == "float16" else 0.0)

    def check_all(self, lib, **launch):
        hidden, res = self.run_gate_up(lib, **launch)
        assert res.diagnostics == [], res.diagnostics
        h_exact, h_bound = self.hidden_oracle()
        h_got = from_device(hidden, self.dtype)
        check(h_got, h_exact, h_bound, "hidden")
        for scores in (True, False):
            got, res = self.run_down(lib, hidden, scores, **launch)
            assert res.diagnostics == [], res.diagnostics
            exact, bound = self.down_oracle(h_got, scores)
            check(got, exact, bound, f"out (scores={scores})")

    def hidden_close(self, hidden) -> bool:
        h_exact, h_bound = self.hidden_oracle()
        return bool(np.all(np.abs(from_device(hidden, self.dtype) - h_exact) <= h_bound))


# (indices [T, k], D, H, E, expected row tile BM)
SHAPES = {
    # one token, top-1: a single row of one expert, H not a multiple of 32
    "t1_k1": ([[2]], 64, 40, 4, 1),
    # one token, top-2, D = 96 (3 vectors per lane for f32), two experts of one row
    "t1_k2": ([[3, 0]], 96, 48, 4, 1),
    # three tokens, top-2, ragged (3, 2, 1 rows) and three empty experts
    "t3_k2_ragged": ([[0, 3], [3, 5], [3, 0]], 72, 36, 6, 4),
    # D and H not multiples of the 16-byte vector: scalar paths
    "t3_k2_unaligned": ([[1, 4], [4, 1], [2, 4]], 70, 37, 5, 4),
    # three tokens, top-1 on the same expert; stages of several chunks for f32
    "t3_k1_chunked": ([[1], [1], [1]], 680, 520, 8, 4),
}
RACE_CHECKED = {("t3_k2_ragged", "float16"), ("t3_k2_unaligned", "bfloat16")}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_switch_glu_decode_kernels(sim, shape, dtype):
    indices, D, H, E, bm = SHAPES[shape]
    case = Case(indices, D, H, E, dtype, seed=zlib.crc32(f"{shape}-{dtype}".encode()))
    plan = case.plans[True]
    assert plan["block_rows"] == bm
    tname = {"float32": "float", "float16": "half", "bfloat16": "bfloat"}[dtype]
    assert plan["gate_up"]["kernel"] == f"moe_gate_up_swiglu_decode_{tname}_bm{bm}"
    assert plan["down"]["kernel"] == f"moe_down_combine_decode_{tname}_bm{bm}"
    assert case.plans[False]["down"]["kernel"] == f"moe_down_slots_decode_{tname}_bm{bm}"
    if shape == "t3_k1_chunked" and dtype == "float32":
        assert plan["d_chunk"] < D and plan["h_chunk"] < H  # the stages really take several passes
    case.check_all(sim(race_check=False))
    if (shape, dtype) in RACE_CHECKED:
        case.check_all(sim(race_check=True), schedule="random", seed=5, preempt=0.2)


# The launches the Metal dispatch makes (rows bounded by T * k, not by the
# routing): (indices, D, H, E, expected kernels' suffix).
DISPATCH_SHAPES = {
    # one token, top-8 over 16 experts: decode with an 8-row tile, 1 row used
    "t1_k8": ([[9, 2, 14, 0, 5, 11, 7, 3]], 64, 40, 16, "decode_{}_bm8"),
    # one token, top-1: the 1-row tile
    "t1_k1": ([[3]], 48, 40, 4, "decode_{}_bm1"),
    # two tokens, top-8: T * k = 16 > 8 takes the prefill kernels with at most 2 rows per expert
    "t2_k8": ([[0, 1, 2, 3, 4, 5, 6, 7], [7, 9, 1, 11, 12, 13, 14, 15]], 40, 72, 16, "prefill_{}_bm32_bn32"),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", list(DISPATCH_SHAPES))
def test_the_dispatch_launches(sim, shape, dtype):
    indices, D, H, E, suffix = DISPATCH_SHAPES[shape]
    case = Case(indices, D, H, E, dtype, seed=zlib.crc32(f"dispatch-{shape}-{dtype}".encode()), dispatch_bound=True)
    tname = {"float32": "float", "float16": "half", "bfloat16": "bfloat"}[dtype]
    assert case.plans[False]["gate_up"]["kernel"].endswith(suffix.format(tname))
    case.check_all(sim(race_check=False))
    if shape == "t1_k8":
        case.check_all(sim(race_check=True), schedule="random", seed=9, preempt=0.2)


def test_plan_covers_the_library(sim):
    """Every kernel the plan can name exists; threadgroup memory fits 32 KiB
    in multiples of 16; no launch without tokens; limits are enforced."""
    names = set(sim(race_check=False).kernels)
    for dtype in MX_DTYPE.values():
        for tokens, k, max_rows in ((1, 1, 1), (1, 8, 1), (3, 2, 3), (4, 2, 5), (8, 4, 8), (128, 8, 8)):
            for D, H in ((1, 1), (37, 70), (2048, 768), (7168, 2048)):
                for scores in (True, False):
                    plan = _ext._plan_switch_glu(tokens, k, max_rows, D, H, 64, dtype, scores)
                    for launch in (plan["gate_up"], plan["down"]):
                        assert launch["kernel"] in names
                        mem = launch["threadgroup_memory"]
                        assert all(m % 16 == 0 and m > 0 for m in mem) and sum(mem) <= 32768
                    assert len(plan["down"]["threadgroup_memory"]) == (2 if scores else 1)
    assert _ext._plan_switch_glu(0, 2, 0, 64, 32, 4, mx.float16, True)["gate_up"]["grid"] == (0, 0, 0)
    # beyond the decode path: the prefill kernels (and the combine launch with scores)
    for tokens, k, max_rows, scores in ((16, 2, 9, True), (16, 2, 9, False), (200, 1, 3, True), (4096, 8, 3000, True)):
        for dtype in MX_DTYPE.values():
            plan = _ext._plan_switch_glu(tokens, k, max_rows, 7168, 2048, 64, dtype, scores)
            assert plan["prefill"] and plan["block_rows"] == 32
            launches = [plan["gate_up"], plan["down"]] + ([plan["combine"]] if scores else [])
            for launch in launches:
                assert launch["kernel"] in names and all(g > 0 for g in launch["grid"])
                assert all(m % 16 == 0 and m > 0 for m in launch["threadgroup_memory"])
                assert sum(launch["threadgroup_memory"]) <= 32768
            assert plan["gate_up"]["grid"][2] == -(-min(max_rows, tokens * k) // 32)
            assert plan["scratch_bytes"] == (tokens * k * 7168 * 4 if scores else 0)
            assert plan["combine"]["grid"] == ((0, 0, 0) if not scores else plan["combine"]["grid"])
    assert not _ext._plan_switch_glu(200, 1, 3, 64, 32, 4, mx.float16, False)["prefill"]
    with pytest.raises(ValueError, match="switch_glu"):
        _ext._plan_switch_glu(1, 1, 1, 8, 8, 2, mx.int32, True)


# ------------------------------------------------------------------ prefill
def prefill_indices(T, k, E, hot, seed):
    """[T, k] distinct experts per token, expert 0 favoured with probability
    `hot` (ragged, > 8 rows per expert); the last expert left empty when E > 4."""
    rng = np.random.default_rng(seed)
    usable = E - 1 if E > 4 else E
    rows = []
    for _ in range(T):
        first = 0 if rng.random() < hot else int(rng.integers(1, usable))
        rest = [e for e in rng.permutation(usable) if e != first][: k - 1]
        rows.append([first] + [int(e) for e in rest])
    return rows


# (T, k, E, D, H, hot): partial row tiles, column tiles and K tiles.
PREFILL_SHAPES = {
    # 48 slots over 4 experts (9..20 rows each); H = 48: a partial column tile
    "t24_k2": (24, 2, 4, 64, 48, 0.4),
    # expert 0 with > 32 rows (two row tiles), an empty expert, D = 80 and
    # H = 56: partial column and K tiles in both launches
    "t40_k2_two_row_tiles": (40, 2, 5, 80, 56, 0.9),
}


def prefill_case(shape, dtype, seed_extra=""):
    T, k, E, D, H, hot = PREFILL_SHAPES[shape]
    seed = zlib.crc32(f"{shape}-{dtype}{seed_extra}".encode())
    case = Case(prefill_indices(T, k, E, hot, seed), D, H, E, dtype, seed=seed)
    assert case.max_rows > 8
    return case


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(PREFILL_SHAPES))
def test_switch_glu_prefill_kernels(sim, shape, dtype):
    case = prefill_case(shape, dtype)
    tname = {"float32": "float", "float16": "half", "bfloat16": "bfloat"}[dtype]
    plan = case.plans[True]
    assert plan["prefill"] and case.plans[False]["prefill"]
    assert plan["gate_up"]["kernel"] == f"moe_gate_up_swiglu_prefill_{tname}_bm32_bn32"
    assert plan["down"]["kernel"] == f"moe_down_scaled_prefill_{tname}_bm32_bn32"
    assert plan["combine"]["kernel"] == f"moe_combine_slots_{tname}"
    assert case.plans[False]["down"]["kernel"] == f"moe_down_slots_prefill_{tname}_bm32_bn32"
    if shape == "t40_k2_two_row_tiles":
        assert case.max_rows > 32 and plan["gate_up"]["grid"][2] == 2
        assert (np.diff(case.offsets.astype(np.int64)) == 0).any()  # an empty expert
    case.check_all(sim(race_check=False))
    if (shape, dtype) == ("t40_k2_two_row_tiles", "float16"):
        case.check_all(sim(race_check=True), schedule="random", seed=7, preempt=0.2)


def test_missing_prefill_stage_barrier_is_caught(sim):
    case = prefill_case("t24_k2", "float32", seed_extra="fault")
    with pytest.raises(MetalSimError, match="data race"):
        case.run_gate_up(sim(race_check=True, SWITCH_GLU_FAULT_PREFILL_NO_STAGE_BARRIER=1))
    hidden, _ = case.run_gate_up(sim(race_check=False, SWITCH_GLU_FAULT_PREFILL_NO_STAGE_BARRIER=1), check=False)
    assert not case.hidden_close(hidden)


# ----------------------------------------------------------- the tests bite
def test_missing_x_barrier_is_caught(sim):
    case = Case(*SHAPES["t3_k2_ragged"][:4], "float32", seed=21)
    with pytest.raises(MetalSimError, match="data race"):
        case.run_gate_up(sim(race_check=True, SWITCH_GLU_FAULT_NO_X_BARRIER=1))
    hidden, _ = case.run_gate_up(sim(race_check=False, SWITCH_GLU_FAULT_NO_X_BARRIER=1))
    assert not case.hidden_close(hidden)


def test_shifted_token_index_is_caught(sim):
    case = Case(*SHAPES["t3_k2_ragged"][:4], "float16", seed=22)
    _, res = case.run_gate_up(sim(race_check=True, SWITCH_GLU_FAULT_TOKEN_SHIFT=1), check=False)
    assert "out_of_bounds" in res.kinds()  # the last token's row + 1 is past x
    hidden, _ = case.run_gate_up(sim(race_check=False, SWITCH_GLU_FAULT_TOKEN_SHIFT=1), check=False)
    assert not case.hidden_close(hidden)


def test_missing_hidden_stage_barrier_is_caught(sim):
    """Without the barrier after the dot loop, the next expert's hidden rows
    overwrite the stage while other simdgroups still read it."""
    case = Case(*SHAPES["t3_k2_ragged"][:4], "bfloat16", seed=23)
    hidden, _ = case.run_gate_up(sim(race_check=False))
    with pytest.raises(MetalSimError, match="data race"):
        case.run_down(sim(race_check=True, SWITCH_GLU_FAULT_NO_H_BARRIER=1), hidden, True)


# ------------------------------------------------------ expert parallelism
class LocalExpertsCase(Case):
    """Expert parallelism (``switch_glu(first_expert=)``): the weights hold
    this rank's E experts only, and the routing sends other ranks' slots to
    an extra bucket E (offsets [E + 2]) that no kernel may visit: the
    simulator's bounds checker catches a read of a weight past the E
    experts, and a hidden row written for such a slot stays NaN."""

    def __init__(self, global_indices, first, D, H, E, dtype, seed):
        local = np.asarray(global_indices, np.int64) - first
        local = np.where((local >= 0) & (local < E), local, E)
        super().__init__(local, D, H, E + 1, dtype, seed, dispatch_bound=True)
        self.E = E
        self.gate, self.up, self.down = (np.ascontiguousarray(w[:E]) for w in (self.gate, self.up, self.down))
        self.kept = int(self.offsets[E])
        rows = _ext._switch_glu_row_bound(self.T, self.k)
        self.plans = {s: _ext._plan_switch_glu(self.T, self.k, rows, D, H, E, MX_DTYPE[dtype], s) for s in (True, False)}

    def check_all(self, lib, **launch):
        hidden, res = self.run_gate_up(lib, **launch)
        assert res.diagnostics == [], res.diagnostics
        kept = self.kept
        view = Case.__new__(Case)
        view.__dict__.update(self.__dict__)
        view.order, view.expert_of_row = self.order[:kept], self.expert_of_row[:kept]
        h_exact, h_bound = Case.hidden_oracle(view)
        h_got = from_device(hidden, self.dtype)
        check(h_got[:kept], h_exact, h_bound, "hidden (this rank's slots)")
        assert np.all(np.isnan(h_got[kept:])), "a hidden row was computed for another rank's slot"
        dw = from_device(self.down, self.dtype)
        per_slot = np.zeros((self.T * self.k, self.D))
        scale = np.zeros_like(per_slot)
        for r in range(kept):
            e, slot = self.expert_of_row[r], self.order[r]
            per_slot[slot] = dw[e] @ h_got[r]
            scale[slot] = np.abs(dw[e]) @ np.abs(h_got[r])
        ulp = 2.0 ** -MANTISSA_BITS[self.dtype]
        here = np.zeros(self.T * self.k, bool)
        here[self.order[:kept]] = True
        # Prompt sizes combine outside the kernels in this mode (ops.cpp):
        # their two-step combine would sum scratch rows other ranks' slots
        # never get.
        for scores in (True, False) if not self.plans[True]["prefill"] else (False,):
            got, res = self.run_down(lib, hidden, scores, **launch)
            assert res.diagnostics == [], res.diagnostics
            if scores:
                s = self.scores.astype(np.float64)[:, None]
                exact = (s * per_slot).reshape(self.T, self.k, self.D).sum(1)
                g = ((2 * self.H + 2 * self.k + 4) * EPS32 * s * scale).reshape(self.T, self.k, self.D).sum(1)
                # Every token's row is written: zero where none of its slots is here.
                check(got, exact, ulp * (np.abs(exact) + g) + g + 2.0**-24, "out (scores=True)")
            else:
                g = (2 * self.H + 2) * EPS32 * scale
                check(got[here], per_slot[here], (ulp * (np.abs(per_slot) + g) + g + 2.0**-24)[here],
                      "out (scores=False, this rank's slots)")


# (global indices [T, k], first expert, D, H, local E)
LOCAL_SHAPES = {
    # 3 tokens over 8 experts, this rank holds 4..7; token 2 has none of them
    "t3_k2_half": ([[1, 5], [6, 4], [0, 3]], 4, 64, 40, 4),
    # one token, top-8 of 16, this rank holds 8..15 (decode, 8-row tile)
    "t1_k8_half": ([[9, 2, 14, 0, 5, 11, 7, 3]], 8, 64, 40, 8),
    # 2 tokens top-8 of 16 (prefill kernels), this rank holds 0..3
    "t2_k8_quarter": ([[0, 1, 2, 3, 4, 5, 6, 7], [7, 9, 1, 11, 12, 13, 14, 15]], 0, 40, 72, 4),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", list(LOCAL_SHAPES))
def test_expert_parallel_routing_skips_other_ranks(sim, shape, dtype):
    indices, first, D, H, E = LOCAL_SHAPES[shape]
    case = LocalExpertsCase(indices, first, D, H, E, dtype, seed=zlib.crc32(f"local-{shape}-{dtype}".encode()))
    case.check_all(sim(race_check=True), schedule="random", seed=3, preempt=0.2)
