"""The fused quantized SwitchGLU Metal kernels (csrc/metal/
switch_glu_quantized.metal, decode path) run in the Metal-on-CPU simulator
(tests/metal_sim/) with the launches of ``_ext._plan_switch_glu_quantized``,
planned as the Metal dispatch plans them (an expert's rows bounded by
T * k), against a float64 oracle built from the exact quantized weights
(tests/metal_cases.py); plus fault builds that must fail.

Layout: x [T, D]; gate/up packed [E, H, D * bits / 32], down [E, D, H * bits
/ 32] (mx.quantize); the routing of indices [T, k] as route.metal gives it
(order: slots sorted by expert, stable; offsets [E + 1]); hidden [T * k, H]
in sorted order; out [T, D] with scores, else [T * k, D] by slot.
"""

from __future__ import annotations

import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metal_cases import check, device_buffer, from_device, nan_buffer, quantized_weights, simulator  # noqa: E402
from metal_sim import MetalSimError  # noqa: E402

mx = pytest.importorskip("mlx.core")
from mlx_moe_kernels import _ext  # noqa: E402

METAL_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "metal" / "switch_glu_quantized.metal"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="the Metal simulator needs Linux and g++",
)

MX_DTYPE = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MANTISSA_BITS = {"float32": 23, "float16": 10, "bfloat16": 7}
UNIT = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """sim(variant, race_check=True, FAULT=1) -> the build with one quantized
    variant's instantiations (SWITCH_GLU_Q_ONLY_VARIANT: the affine width, 1
    for mxfp4), cached."""
    get = simulator(tmp_path_factory, METAL_SOURCE)

    def get_variant(variant: int, race_check: bool = True, **defines):
        return get(race_check, SWITCH_GLU_Q_ONLY_VARIANT=variant, **defines)

    return get_variant


def silu(g):
    return g / (1.0 + np.exp(-g))


class Case:
    """One decode problem: routing indices [T, k], D, H, E, dtype, format."""

    def __init__(self, indices, D, H, E, dtype, bits=4, group_size=64, mode="affine", seed=0):
        self.indices = np.asarray(indices, np.int64)
        self.T, self.k = self.indices.shape
        self.D, self.H, self.E, self.dtype = D, H, E, dtype
        self.variant = 1 if mode == "mxfp4" else bits
        flat = self.indices.reshape(-1)
        self.order = np.argsort(flat, kind="stable").astype(np.uint32)  # route.metal's order
        counts = np.bincount(flat, minlength=E)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
        self.expert_of_row = flat[self.order]
        keys = mx.random.split(mx.random.key(seed), 5)
        x = mx.random.normal((self.T, D), key=keys[0]).astype(MX_DTYPE[dtype])
        self.x, self.xv = device_buffer(x), np.array(x.astype(mx.float32), np.float64)
        fmt = (MX_DTYPE[dtype], bits, group_size, mode)
        # gate scaled so that silu sees both signs and moderate values
        self.gate = quantized_weights(mx.random.normal((E, H, D), key=keys[1]) * 2 / np.sqrt(D), *fmt)
        self.up = quantized_weights(mx.random.normal((E, H, D), key=keys[2]) / np.sqrt(D), *fmt)
        self.down = quantized_weights(mx.random.normal((E, D, H), key=keys[3]) / np.sqrt(H), *fmt)
        self.scores = np.random.default_rng(seed).random((self.T, self.k)).astype(np.float32).reshape(-1)
        # As the Metal dispatch plans: rows per expert bounded by T * k.
        bound = _ext._switch_glu_row_bound(self.T, self.k)
        self.plans = {
            s: _ext._plan_switch_glu_quantized(
                self.T, self.k, bound, D, H, E, group_size, bits, mode, MX_DTYPE[dtype], s)
            for s in (True, False)
        }

    def run_gate_up(self, lib, **launch):
        p, g = self.plans[True], self.plans[True]["gate_up"]
        hidden = nan_buffer((self.T * self.k, self.H), self.dtype)
        buffers = [self.x, *self.gate[:3], *self.up[:3], self.order, self.offsets, hidden, p["params"]]
        res = lib.launch(g["kernel"], buffers, threadgroups=g["grid"], threads_per_threadgroup=g["threads"],
                         threadgroup_memory=g["threadgroup_memory"], **launch)
        return hidden, res

    def run_down(self, lib, hidden, scores: bool, **launch):
        p = self.plans[scores]
        d = p["down"]
        out = nan_buffer((self.T, self.D) if scores else (self.T * self.k, self.D), self.dtype)
        buffers = [hidden, *self.down[:3], self.order, self.offsets, out, p["params"]]
        if scores:
            buffers.append(self.scores)
        res = lib.launch(d["kernel"], buffers, threadgroups=d["grid"], threads_per_threadgroup=d["threads"],
                         threadgroup_memory=d["threadgroup_memory"], **launch)
        return from_device(out, self.dtype), res

    # ---------------------------------------------------------------- oracle
    def hidden_oracle(self):
        """hidden in sorted order, float64, and a bound: float32 sums of the
        dequantized products (4 D eps of sum |x| (|s| q + |b|)), silu, one
        rounding to the dtype."""
        tokens = self.order // self.k
        e = self.expert_of_row
        xs = self.xv[tokens]
        g = np.einsum("rd,rhd->rh", xs, self.gate[3][e])
        u = np.einsum("rd,rhd->rh", xs, self.up[3][e])
        g_err = 4 * self.D * UNIT * np.einsum("rd,rhd->rh", np.abs(xs), self.gate[4][e]) + 2.0**-40
        u_err = 4 * self.D * UNIT * np.einsum("rd,rhd->rh", np.abs(xs), self.up[4][e]) + 2.0**-40
        h = silu(g) * u
        ulp = 2.0 ** -MANTISSA_BITS[self.dtype]
        err = 1.1 * np.abs(u) * g_err + (np.abs(silu(g)) + 1.1 * g_err) * u_err + 4 * UNIT * np.abs(h)
        return h, ulp * (np.abs(h) + err) + err + 2.0**-24

    def down_oracle(self, hidden, scores: bool):
        """out from the kernel's own hidden (float64) and a bound."""
        e = self.expert_of_row
        y = np.einsum("rh,rdh->rd", hidden, self.down[3][e])  # sorted rows
        y_err = 4 * self.H * UNIT * np.einsum("rh,rdh->rd", np.abs(hidden), self.down[4][e]) + 2.0**-40
        by_slot = np.empty_like(y)
        err_slot = np.empty_like(y_err)
        by_slot[self.order] = y
        err_slot[self.order] = y_err
        ulp = 2.0 ** -MANTISSA_BITS[self.dtype]
        if scores:
            s = self.scores.reshape(self.T, self.k, 1).astype(np.float64)
            out = (s * by_slot.reshape(self.T, self.k, -1)).sum(axis=1)
            err = (np.abs(s) * err_slot.reshape(self.T, self.k, -1)).sum(axis=1)
            err += self.k * UNIT * (np.abs(s * by_slot.reshape(self.T, self.k, -1))).sum(axis=1)
        else:
            out, err = by_slot, err_slot
        return out, ulp * (np.abs(out) + err) + err + 2.0**-24

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


# (indices [T, k], D, H, E): one token top-8 (the 8-row tile, one row per
# expert), one token top-1 (the 1-row tile), three tokens with an expert
# taking 3 rows and empty experts, D/H staged in several chunks. D and H are
# multiples of every group size (so of the 32-column tiles too: quantized
# rows never leave a partial column tile).
SHAPES = {
    "t1_k8": ([[9, 2, 14, 0, 5, 11, 7, 3]], 128, 256, 16),
    "t1_k1": ([[3]], 256, 128, 4),
    "t3_k2_ragged": ([[0, 3], [3, 5], [3, 0]], 128, 128, 6),
    "t2_k2_chunked": ([[1, 2], [2, 1]], 1280, 1152, 3),
    # 20 slots on 3 experts (one takes 10 rows: two 8-row tiles, a weight
    # pass each) with D staged in two chunks for float32
    "t10_k2_two_tiles": ([[0, 1]] * 6 + [[0, 2]] * 4, 384, 128, 3),
}
# Every width once (dtypes, group sizes and shapes rotating), and mxfp4.
CASES = [
    (list(SHAPES)[i % len(SHAPES)], ("float32", "float16", "bfloat16")[i % 3], bits, (32, 64, 128)[i % 3], "affine")
    for i, bits in enumerate([4, 8, 2, 3, 5, 6])
] + [("t3_k2_ragged", "bfloat16", 4, 32, "mxfp4"), ("t1_k8", "float16", 4, 32, "mxfp4")]


@pytest.mark.parametrize("shape,dtype,bits,gs,mode", CASES)
def test_switch_glu_quantized_decode(sim, shape, dtype, bits, gs, mode):
    indices, D, H, E = SHAPES[shape]
    case = Case(indices, D, H, E, dtype, bits, gs, mode, seed=zlib.crc32(f"{shape}-{dtype}-{bits}".encode()))
    tname = {"float32": "float", "float16": "half", "bfloat16": "bfloat"}[dtype]
    variant = "mxfp4" if mode == "mxfp4" else f"b{bits}"
    bm = 1 if case.T * case.k == 1 else 8
    plan = case.plans[True]
    assert plan["gate_up"]["kernel"] == f"moe_gate_up_swiglu_quantized_decode_{tname}_{variant}_bm{bm}"
    assert plan["down"]["kernel"] == f"moe_down_combine_quantized_decode_{tname}_{variant}_bm{bm}"
    if shape == "t2_k2_chunked" and dtype == "float32":
        assert plan["d_chunk"] < D and plan["h_chunk"] < H  # several staging passes
    case.check_all(sim(case.variant, race_check=False))


def test_race_detector_on_the_decode_kernels(sim):
    case = Case(*SHAPES["t3_k2_ragged"], "float16", 4, 64, seed=3)
    case.check_all(sim(4, race_check=True), schedule="random", seed=5, preempt=0.2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_several_row_tiles(sim, dtype):
    """More than 8 rows on an expert (what a shapeless-compiled decode graph
    meets on a larger call): several tiles, under the race detector."""
    case = Case(*SHAPES["t10_k2_two_tiles"], dtype, 4, 64, seed=4)
    assert case.plans[True]["block_rows"] == 8 and int(np.diff(case.offsets).max()) == 10
    if dtype == "float32":
        assert case.plans[True]["d_chunk"] < case.D  # x staged in two chunks per tile
    case.check_all(sim(4, race_check=True), schedule="random", seed=8, preempt=0.2)


def test_plan_rejects_what_the_kernels_do_not_take():
    for bad in [
        (200, 1, 1, 64, 64, 400, 64, 4, "affine", mx.float16, True),  # > 128 tokens with scores
        (1, 1, 1, 96, 64, 4, 64, 4, "affine", mx.float16, True),  # D % group_size
        (1, 1, 1, 64, 64, 4, 64, 7, "affine", mx.float16, True),  # bits
        (1, 1, 1, 64, 64, 4, 64, 4, "mxfp4", mx.float16, True),  # mxfp4 group size
        (1, 1, 1, 64, 64, 4, 64, 4, "affine", mx.int32, True),  # dtype
    ]:
        with pytest.raises(ValueError, match="quantized Metal kernels"):
            _ext._plan_switch_glu_quantized(*bad)


# ----------------------------------------------------------- the tests bite
def test_missing_x_barrier_is_caught(sim):
    case = Case(*SHAPES["t3_k2_ragged"], "float32", 4, 64, seed=11)
    with pytest.raises(MetalSimError, match="data race"):
        case.run_gate_up(sim(4, race_check=True, SWITCH_GLU_Q_FAULT_NO_X_BARRIER=1))
    hidden, _ = case.run_gate_up(sim(4, race_check=False, SWITCH_GLU_Q_FAULT_NO_X_BARRIER=1))
    assert not case.hidden_close(hidden)


def test_wrong_scales_are_caught(sim):
    case = Case(*SHAPES["t1_k8"], "bfloat16", 8, 64, seed=12)
    hidden, _ = case.run_gate_up(sim(8, race_check=False, SWITCH_GLU_Q_FAULT_UP_SCALES=1))
    assert not case.hidden_close(hidden)


def test_missing_tile_barrier_is_caught(sim):
    case = Case(*SHAPES["t10_k2_two_tiles"], "float32", 4, 64, seed=14)
    with pytest.raises(MetalSimError, match="data race"):
        case.run_gate_up(sim(4, race_check=True, SWITCH_GLU_Q_FAULT_NO_TILE_BARRIER=1))


def test_missing_hidden_barrier_is_caught(sim):
    case = Case(*SHAPES["t2_k2_chunked"], "float32", 4, 128, seed=13)
    hidden, _ = case.run_gate_up(sim(4, race_check=False))
    with pytest.raises(MetalSimError, match="data race"):
        case.run_down(sim(4, race_check=True, SWITCH_GLU_Q_FAULT_NO_H_BARRIER=1), hidden, True)


# ------------------------------------------------------ expert parallelism
class LocalExpertsCase(Case):
    """Expert parallelism (``switch_glu(first_expert=)``): the weights hold
    this rank's E experts only, and the routing sends other ranks' slots to
    an extra bucket E (offsets [E + 2]) that no kernel may visit (the
    bounds checker catches a read past the E experts' weights; a hidden row
    written for such a slot would not stay NaN)."""

    def __init__(self, global_indices, first, D, H, E, dtype, seed):
        local = np.asarray(global_indices, np.int64) - first
        local = np.where((local >= 0) & (local < E), local, E)
        super().__init__(local, D, H, E + 1, dtype, 4, 64, "affine", seed)
        self.E = E
        self.gate, self.up, self.down = (tuple(np.ascontiguousarray(part[:E]) for part in w)
                                         for w in (self.gate, self.up, self.down))
        self.kept = int(self.offsets[E])
        bound = _ext._switch_glu_row_bound(self.T, self.k)
        self.plans = {
            s: _ext._plan_switch_glu_quantized(self.T, self.k, bound, D, H, E, 64, 4, "affine", MX_DTYPE[dtype], s)
            for s in (True, False)
        }

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
        e = self.expert_of_row[:kept]
        y = np.einsum("rh,rdh->rd", h_got[:kept], self.down[3][e])
        y_err = 4 * self.H * UNIT * np.einsum("rh,rdh->rd", np.abs(h_got[:kept]), self.down[4][e]) + 2.0**-40
        by_slot = np.zeros((self.T * self.k, self.D))
        err_slot = np.zeros_like(by_slot)
        by_slot[self.order[:kept]] = y
        err_slot[self.order[:kept]] = y_err
        here = np.zeros(self.T * self.k, bool)
        here[self.order[:kept]] = True
        ulp = 2.0 ** -MANTISSA_BITS[self.dtype]
        for scores in (True, False):
            got, res = self.run_down(lib, hidden, scores, **launch)
            assert res.diagnostics == [], res.diagnostics
            if scores:
                s = self.scores.reshape(self.T, self.k, 1).astype(np.float64)
                out = (s * by_slot.reshape(self.T, self.k, -1)).sum(axis=1)
                err = (np.abs(s) * err_slot.reshape(self.T, self.k, -1)).sum(axis=1)
                err += self.k * UNIT * np.abs(s * by_slot.reshape(self.T, self.k, -1)).sum(axis=1)
                # Every token's row written: zero where none of its slots is here.
                check(got, out, ulp * (np.abs(out) + err) + err + 2.0**-24, "out (scores=True)")
            else:
                bound = ulp * (np.abs(by_slot) + err_slot) + err_slot + 2.0**-24
                check(got[here], by_slot[here], bound[here], "out (scores=False, this rank's slots)")


# (global indices [T, k], first expert, D, H, local E)
LOCAL_SHAPES = {
    # one token top-8 of 16, this rank holds 8..15 (the 8-row tile)
    "t1_k8_half": ([[9, 2, 14, 0, 5, 11, 7, 3]], 8, 128, 128, 8),
    # 3 tokens over 8 experts, this rank holds 4..7; token 2 has none of them
    "t3_k2_half": ([[1, 5], [6, 4], [0, 3]], 4, 128, 128, 4),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", list(LOCAL_SHAPES))
def test_expert_parallel_routing_skips_other_ranks(sim, shape, dtype):
    indices, first, D, H, E = LOCAL_SHAPES[shape]
    case = LocalExpertsCase(indices, first, D, H, E, dtype, seed=zlib.crc32(f"local-{shape}-{dtype}".encode()))
    case.check_all(sim(4, race_check=True), schedule="random", seed=3, preempt=0.2)
