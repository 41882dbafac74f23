"""The routing Metal kernel (csrc/metal/route.metal) in the Metal-on-CPU
simulator (tests/metal_sim/) with exactly the launch of ``_ext._plan_route``
(the C++ plan), against NumPy's stable argsort: a stable counting sort of the
slots s = t * k + j by expert (``order``, ``offsets`` [E + 1],
``sorted_experts``), an error flag and an empty routing (all offsets 0) for
an out-of-range id; plus a fault build that these tests must catch.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metal_cases import simulator  # noqa: E402
from metal_sim import MetalSimError  # noqa: E402

pytest.importorskip("mlx.core")
from mlx_moe_kernels import _ext  # noqa: E402

METAL_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "metal" / "route.metal"
POISON = np.uint32(0xDEADBEEF)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="the Metal simulator needs Linux and g++",
)


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """sim(race_check=True, FAULT_MACRO=1) -> built Library (cached per variant)."""
    return simulator(tmp_path_factory, METAL_SOURCE)


def run_route(lib, indices, E, threads=None, **launch):
    flat = np.ascontiguousarray(np.asarray(indices, np.uint32).reshape(-1))
    n = flat.size
    plan = _ext._plan_route(n, E)
    if threads is not None:  # the kernel takes any multiple of 32 up to 1024
        plan["threads"] = (threads, 1, 1)
    order = np.full(max(n, 1), POISON, np.uint32)
    offsets = np.full(E + 1, POISON, np.uint32)
    sorted_experts = np.full(max(n, 1), POISON, np.uint32)
    error = np.full(1, POISON, np.uint32)
    res = lib.launch(
        plan["kernel"],
        [flat if n else np.zeros(1, np.uint32), order, offsets, sorted_experts, error, plan["params"]],
        threadgroups=plan["grid"],
        threads_per_threadgroup=plan["threads"],
        **launch,
    )
    return order[:n], offsets, sorted_experts[:n], int(error[0]), res


def check_routing(lib, indices, E, **launch):
    flat = np.asarray(indices, np.int64).reshape(-1)
    order, offsets, sorted_experts, error, res = run_route(lib, indices, E, **launch)
    assert res.diagnostics == [], res.diagnostics
    assert error == 0
    want_order = np.argsort(flat, kind="stable")
    want_offsets = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=E))])
    np.testing.assert_array_equal(offsets, want_offsets)
    np.testing.assert_array_equal(order, want_order)
    np.testing.assert_array_equal(sorted_experts, flat[want_order])


def random_indices(T, k, E, seed):
    """top-k style: k distinct experts per token (repeats only if k > E),
    skewed popularity."""
    rng = np.random.default_rng(seed)
    p = rng.random(E) ** 3 + 1e-3
    p /= p.sum()
    return np.stack([rng.choice(E, size=k, replace=k > E, p=p) for _ in range(T)]).astype(np.uint32)


@pytest.mark.parametrize("E", [4, 60, 128])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("T", [1, 3, 70, 600])
def test_random_routing(sim, T, k, E):
    check_routing(sim(race_check=False), random_indices(T, k, E, seed=T * 1000 + k * 10 + E), E)


def test_repeated_ids_and_max_experts(sim):
    """Ids repeated inside a token (not top-k, but the sort must not care) and
    E = 512, the kernel's maximum, over several chunks."""
    rng = np.random.default_rng(7)
    check_routing(sim(race_check=False), rng.integers(0, 512, size=(700, 3)), 512)
    check_routing(sim(race_check=False), rng.integers(0, 3, size=(50, 4)), 3)


def test_65536_slots(sim):
    """T * k = 65536 (64 chunks of 1024), E = 512."""
    check_routing(sim(race_check=False), random_indices(8192, 8, 512, seed=5), 512)


def test_fewer_threads_than_experts(sim):
    """The prefix sum in several blocks with a carry (the plan never does
    this, the kernel allows it): 64 threads, 300 experts, 5 chunks."""
    idx = np.random.default_rng(4).integers(0, 300, size=(100, 3))
    check_routing(sim(race_check=True), idx, 300, threads=64, schedule="random", seed=3, preempt=0.2)


def test_all_slots_one_expert(sim):
    check_routing(sim(race_check=False), np.full((1500, 1), 5, np.uint32), 8)  # two chunks of 1024
    check_routing(sim(race_check=False), np.full((3, 2), 0, np.uint32), 1)


def test_empty_experts(sim):
    # only experts 2 and 97 of 128 have slots; first and last experts empty
    idx = np.where(np.random.default_rng(3).random((40, 2)) < 0.5, 2, 97).astype(np.uint32)
    check_routing(sim(race_check=False), idx, 128)


def test_no_slots(sim):
    order, offsets, _, error, res = run_route(sim(race_check=False), np.zeros((0, 2), np.uint32), 6)
    assert res.diagnostics == [] and error == 0
    np.testing.assert_array_equal(offsets, np.zeros(7, np.uint32))


@pytest.mark.parametrize("bad_id", [60, 2**32 - 1])
def test_out_of_range_id_sets_the_flag(sim, bad_id):
    idx = random_indices(70, 2, 60, seed=11)
    idx[33, 1] = bad_id
    _, offsets, _, error, res = run_route(sim(race_check=True), idx, 60, schedule="random", seed=2, preempt=0.2)
    assert res.diagnostics == [], res.diagnostics
    assert error == 1
    np.testing.assert_array_equal(offsets, np.zeros(61, np.uint32))


@pytest.mark.parametrize(
    "T,k,E,seed", [(70, 2, 60, 1), (300, 8, 128, 2)]  # (300, 8): 2400 slots, three chunks
)
def test_race_checked(sim, T, k, E, seed):
    idx = random_indices(T, k, E, seed=seed)
    check_routing(sim(race_check=True), idx, E, schedule="random", seed=seed, preempt=0.2)
    check_routing(sim(race_check=True), idx, E, schedule="reverse")


def test_plan():
    assert _ext._plan_route(1, 4)["threads"] == (32, 1, 1)
    assert _ext._plan_route(1, 512)["threads"] == (512, 1, 1)
    assert _ext._plan_route(4800, 60)["threads"] == (1024, 1, 1)
    # The Mac dispatch passes the pipeline's maxTotalThreadsPerThreadgroup.
    assert _ext._plan_route(4800, 60, 256)["threads"] == (256, 1, 1)
    assert _ext._plan_route(4800, 60, 100)["threads"] == (96, 1, 1)
    with pytest.raises(ValueError):
        _ext._plan_route(10, 60, 16)
    assert _ext._plan_route(0, 60)["grid"] == (1, 1, 1)  # still writes offsets and the flag
    assert _ext._plan_route(10, 60)["key_bits"] == 6  # ids 0..60
    assert _ext._plan_route(10, 64)["key_bits"] == 7  # ids 0..64
    with pytest.raises(ValueError, match="route"):
        _ext._plan_route(10, 513)
    with pytest.raises(ValueError, match="route"):
        _ext._plan_route(10, 0)


# ----------------------------------------------------------- the tests bite
def test_missing_turn_barrier_is_caught(sim):
    idx = random_indices(70, 2, 60, seed=9)
    with pytest.raises(MetalSimError, match="data race"):
        run_route(sim(race_check=True, ROUTE_FAULT_NO_TURN_BARRIER=1), idx, 60)
    order, offsets, _, _, _ = run_route(
        sim(race_check=False, ROUTE_FAULT_NO_TURN_BARRIER=1), idx, 60, schedule="reverse", check=False
    )
    assert not np.array_equal(order, np.argsort(idx.reshape(-1), kind="stable"))
