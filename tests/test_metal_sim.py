"""The Metal-on-CPU simulator (tests/metal_sim/): small .metal kernels run
through it against NumPy, and deliberately broken kernels that it must catch
(a removed barrier, an index shifted by one, a wrong SIMD reduction, barrier
divergence, races between threadgroups).

The simulator is built once per session (g++, a few seconds) into a
temporary directory; every build variant (fault toggles, with or without the
race detector) is cached there.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metal_sim import MetalSimError, build, preprocess  # noqa: E402

KERNELS = Path(__file__).resolve().parent / "metal_sim" / "kernels"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("g++") is None,
    reason="the Metal simulator needs Linux and g++",
)

SCHEDULES = ["forward", "reverse", "random"]


@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    """sim("reduce", race_check=True, FAULT_MACRO=1) -> built Library."""
    build_dir = tmp_path_factory.mktemp("metal_sim")
    cache = {}

    def get(name: str, race_check: bool = True, **defines):
        key = (name, race_check, tuple(sorted(defines.items())))
        if key not in cache:
            cache[key] = build([KERNELS / f"{name}.metal"], build_dir=build_dir, defines=defines, race_check=race_check)
        return cache[key]

    return get


def launch_kwargs(schedule: str) -> dict:
    if schedule == "random":
        return {"schedule": "random", "seed": 1, "preempt": 0.2}
    return {"schedule": schedule}


# ------------------------------------------------------------ references
def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN kept)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    out = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out[nan] = (u[nan] >> 16) | 0x40
    return out.astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, np.uint32) << 16).view(np.float32)


def small_ints(n: int, seed: int) -> np.ndarray:
    """Integer-valued floats: every sum order gives the same float32 result."""
    return np.random.default_rng(seed).integers(-8, 9, size=n).astype(np.float32)


# ------------------------------------------------- threadgroup reduction
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", ["float", "half"])
def test_threadgroup_reduction(sim, dtype, schedule):
    n, groups = 1000, 4
    x32 = small_ints(n, 0)
    x = x32 if dtype == "float" else x32.astype(np.float16)
    out = np.zeros(groups, np.float32)
    sim("reduce").launch(f"reduce_sum_{dtype}", [x, out, np.uint32(n)], threadgroups=groups,
                         threads_per_threadgroup=256, **launch_kwargs(schedule))
    expected = np.add.reduceat(x32, np.arange(0, n, 256))
    np.testing.assert_array_equal(out, expected)


def test_missing_barrier_is_caught(sim):
    """The reduction without the barrier in its loop: the race detector
    reports it, and the default schedule also gives a wrong sum."""
    n = 1000
    x = small_ints(n, 1)
    expected = np.add.reduceat(x, np.arange(0, n, 256))
    lib = sim("reduce", MSL_SIM_FAULT_NO_BARRIER=1)
    with pytest.raises(MetalSimError, match="data race"):
        lib.launch("reduce_sum_float", [x, np.zeros(4, np.float32), np.uint32(n)], threadgroups=4,
                   threads_per_threadgroup=256)
    for schedule in SCHEDULES:
        out = np.zeros(4, np.float32)
        res = lib.launch("reduce_sum_float", [x, out, np.uint32(n)], threadgroups=4, threads_per_threadgroup=256,
                         check=False, **launch_kwargs(schedule))
        assert "race" in res.kinds(), schedule
    # without the race detector, the result alone exposes it
    lib = sim("reduce", race_check=False, MSL_SIM_FAULT_NO_BARRIER=1)
    out = np.zeros(4, np.float32)
    lib.launch("reduce_sum_float", [x, out, np.uint32(n)], threadgroups=4, threads_per_threadgroup=256)
    assert not np.array_equal(out, expected)


def test_index_shifted_by_one_is_caught(sim):
    n = 1000
    x = small_ints(n, 2)
    expected = np.add.reduceat(x, np.arange(0, n, 256))
    lib = sim("reduce", MSL_SIM_FAULT_OFF_BY_ONE=1)
    with pytest.raises(MetalSimError, match="out-of-bounds read"):
        lib.launch("reduce_sum_float", [x, np.zeros(4, np.float32), np.uint32(n)], threadgroups=4,
                   threads_per_threadgroup=256)
    lib = sim("reduce", race_check=False, MSL_SIM_FAULT_OFF_BY_ONE=1)
    out = np.zeros(4, np.float32)
    lib.launch("reduce_sum_float", [x, out, np.uint32(n)], threadgroups=4, threads_per_threadgroup=256)
    assert not np.array_equal(out, expected)


# ------------------------------------------------------- SIMD reduction
@pytest.mark.parametrize("threads", [256, 80])  # 80: a partial last simdgroup of 16 lanes
@pytest.mark.parametrize("dtype", ["float", "bfloat"])
def test_simd_reduction(sim, dtype, threads):
    n, groups = 3 * threads - 7, 3
    x32 = small_ints(n, 3)
    x = x32 if dtype == "float" else f32_to_bf16_bits(x32)
    out = np.zeros(groups, np.float32)
    sim("simd_reduce").launch(f"simd_reduce_{dtype}", [x, out, np.uint32(n)], threadgroups=groups,
                              threads_per_threadgroup=threads, schedule="random", seed=3, preempt=0.2)
    np.testing.assert_array_equal(out, np.add.reduceat(x32, np.arange(0, n, threads)))


def test_wrong_simd_reduction_is_caught(sim):
    n = 256
    x = small_ints(n, 4)
    out = np.zeros(1, np.float32)
    sim("simd_reduce", MSL_SIM_FAULT_WRONG_REDUCTION=1).launch(
        "simd_reduce_float", [x, out, np.uint32(n)], threadgroups=1, threads_per_threadgroup=256)
    assert out[0] != x.sum()


def test_simd_shuffle_down_reduction(sim):
    x = small_ints(128, 5)
    out = np.zeros(4, np.float32)
    sim("simd_reduce").launch("simd_shuffle_reduce", [x, out], threadgroups=2, threads_per_threadgroup=64)
    np.testing.assert_array_equal(out, x.reshape(4, 32).sum(1))


def test_simd_ops_semantics(sim):
    """Every collective on a threadgroup of 40 threads (second simdgroup:
    8 active lanes), against a NumPy model of MSL's definitions: reading an
    inactive lane gives NaN (undefined on the GPU)."""
    threads = 40
    x = (np.arange(threads, dtype=np.float32) * 3 + 1) % 17
    out = np.zeros(threads * 8, np.float32)
    sim("semantics").launch("simd_ops", [x, out], threadgroups=1, threads_per_threadgroup=threads)
    got = out.reshape(threads, 8)
    nan = np.float32("nan")
    expected = np.zeros((threads, 8), np.float32)
    for i in range(threads):
        sg, lane = divmod(i, 32)
        active = min(32, threads - 32 * sg)
        lanes = x[32 * sg : 32 * sg + active]

        def at(src):
            return lanes[src] if src < active else nan

        expected[i, 0] = lanes.sum()
        expected[i, 1] = lanes.max()
        expected[i, 2] = x[i] if lane + 1 >= 32 else at(lane + 1)
        expected[i, 3] = x[i] if lane < 2 else at(lane - 2)
        expected[i, 4] = at(lane ^ 3)
        expected[i, 5] = at(5)
        expected[i, 6] = lanes[:lane].sum()
        expected[i, 7] = lanes[:8].sum() if lane < 8 else -1.0
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------- simdgroup_matrix
@pytest.mark.parametrize("mnk", [(16, 16, 16), (32, 48, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float", "half"])
def test_simdgroup_matrix_matmul(sim, dtype, mnk):
    M, N, K = mnk
    rng = np.random.default_rng(6)
    np_dtype = np.float32 if dtype == "float" else np.float16
    a = rng.standard_normal((M, K)).astype(np_dtype)
    b = rng.standard_normal((K, N)).astype(np_dtype)
    c = np.zeros((M, N), np.float32)
    sim("matmul").launch(f"matmul_simdgroup_{dtype}", [a, b, c, np.array([M, N, K], np.uint32)],
                         threadgroups=(N // 16, M // 16), threads_per_threadgroup=128, schedule="random", seed=7,
                         preempt=0.1)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = 2 * K * 2.0**-24 * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)) + 1e-30
    assert np.all(np.abs(c - exact) <= bound)


def test_matmul_missing_barrier_is_caught(sim):
    M = N = K = 16
    rng = np.random.default_rng(8)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    c = np.zeros((M, N), np.float32)
    lib = sim("matmul", MSL_SIM_FAULT_NO_BARRIER=1)
    res = lib.launch("matmul_simdgroup_float", [a, b, c, np.array([M, N, K], np.uint32)], threadgroups=(1, 1),
                     threads_per_threadgroup=128, check=False)
    assert "race" in res.kinds()
    assert not np.allclose(c, a @ b)


# ---------------------------------------------------------- half, bfloat
def conversion_inputs() -> np.ndarray:
    rng = np.random.default_rng(9)
    special = np.array(
        [0.0, -0.0, 1.0, -1.5, 65504.0, 65519.99, 65520.0, 1e6, -1e6, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
         1e-10, np.inf, -np.inf, np.nan, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8,
         3.0e38, -3.4e38],
        np.float32,
    )
    # ties and near-ties of both formats
    u = rng.integers(0, 2**32, size=200, dtype=np.uint64).astype(np.uint32)
    ties = ((u & ~np.uint32(0xFFFF)) | np.uint32(0x8000)).view(np.float32)
    scaled = (rng.standard_normal(200) * np.exp2(rng.integers(-30, 20, 200))).astype(np.float32)
    x = np.concatenate([special, ties, scaled]).astype(np.float32)
    return x[: len(x) // 32 * 32 + 32] if len(x) % 32 == 0 else np.pad(x, (0, 32 - len(x) % 32))


def test_half_bfloat_conversions(sim):
    x = conversion_inputs()
    n = len(x)
    h = np.zeros(n, np.float16)
    bf = np.zeros(n, np.uint16)
    h_bits = np.zeros(n, np.uint16)
    lib = sim("convert")
    with np.errstate(over="ignore"):
        ref_h = x.astype(np.float16)
    lib.launch("convert_from_float", [x, h, bf, h_bits], grid=n, threads_per_threadgroup=32)
    finite_or_inf = ~np.isnan(x)
    np.testing.assert_array_equal(h.view(np.uint16)[finite_or_inf], ref_h.view(np.uint16)[finite_or_inf])
    assert np.all(np.isnan(h[~finite_or_inf]))
    np.testing.assert_array_equal(h_bits, h.view(np.uint16))
    ref_bf = f32_to_bf16_bits(x)
    np.testing.assert_array_equal(bf[finite_or_inf], ref_bf[finite_or_inf])
    assert np.all(np.isnan(bf16_bits_to_f32(bf[~finite_or_inf])))
    try:  # MLX's own bfloat16 rounding, for finite values
        import mlx.core as mx

        mlx_bf = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
        finite = np.isfinite(x) & np.isfinite(bf16_bits_to_f32(ref_bf))
        np.testing.assert_array_equal(bf[finite], mlx_bf[finite])
    except (ImportError, AttributeError):
        pass

    hf = np.zeros(n, np.float32)
    bff = np.zeros(n, np.float32)
    lib.launch("convert_to_float", [h, bf, hf, bff], grid=n, threads_per_threadgroup=32)
    np.testing.assert_array_equal(hf, h.astype(np.float32))
    np.testing.assert_array_equal(bff.view(np.uint32), bf.astype(np.uint32) << 16)


def test_half_vector_arithmetic(sim):
    rng = np.random.default_rng(10)
    a = (rng.standard_normal(64) * 30).astype(np.float16)
    b = (rng.standard_normal(64) * 30).astype(np.float16)
    prod = np.zeros(64, np.float16)
    fsum = np.zeros(64, np.float32)
    sim("convert").launch("half_arith", [a, b, prod, fsum], grid=16, threads_per_threadgroup=16)
    np.testing.assert_array_equal(prod, (a * b) + np.float16(1))
    np.testing.assert_array_equal(fsum, a.astype(np.float32) + b.astype(np.float32))


# --------------------------------------------- execution model, checks
def test_positions_dispatch_threads_with_partial_threadgroups(sim):
    gx, gy, tx, ty = 37, 5, 16, 4
    out = np.zeros((gx * gy * 3, 4), np.uint32)
    sim("semantics").launch("positions", [out, np.array([gx, gy], np.uint32)], grid=(gx, gy),
                            threads_per_threadgroup=(tx, ty), schedule="reverse")
    got = out.reshape(gy, gx, 3, 4)
    for y in range(gy):
        for x in range(gx):
            bx, by = x // tx, y // ty
            w, hgt = min(tx, gx - bx * tx), min(ty, gy - by * ty)  # partial edge threadgroups
            lx, ly = x - bx * tx, y - by * ty
            index = ly * w + lx
            assert list(got[y, x, 0]) == [x, y, bx, by]
            assert list(got[y, x, 1]) == [lx, ly, w, hgt]
            assert list(got[y, x, 2]) == [index, index % 32, index // 32, 0]


def test_dynamic_threadgroup_memory(sim):
    x = np.arange(128, dtype=np.float32)
    sim("semantics").launch("reverse_dynamic", [x], threadgroups=2, threads_per_threadgroup=64,
                            threadgroup_memory=[64 * 4], schedule="random", preempt=0.3)
    np.testing.assert_array_equal(x, np.concatenate([np.arange(63, -1, -1), np.arange(127, 63, -1)]))


def test_divergent_barrier_is_an_error(sim):
    with pytest.raises(MetalSimError, match="different threadgroup_barrier"):
        sim("semantics").launch("divergent_barrier", [np.zeros(64, np.float32)], threadgroups=1,
                                threads_per_threadgroup=64)


def test_exit_before_barrier(sim):
    lib = sim("semantics")
    with pytest.raises(MetalSimError, match="returned while others wait"):
        lib.launch("exit_before_barrier", [np.zeros(64, np.float32), np.uint32(40)], threadgroups=1,
                   threads_per_threadgroup=64)
    out = np.zeros(64, np.float32)
    res = lib.launch("exit_before_barrier", [out, np.uint32(40)], threadgroups=1, threads_per_threadgroup=64,
                     strict=False)
    assert res.kinds() == {"barrier_exit"} and not res.errors
    np.testing.assert_array_equal(out[:40], np.arange(39, -1, -1))


def test_uninitialized_threadgroup_memory(sim):
    out = np.zeros(64, np.float32)
    res = sim("semantics").launch("uninitialized_read", [out], threadgroups=1, threads_per_threadgroup=64)
    assert "uninitialized" in res.kinds() and not res.errors
    assert np.all(out[:32] == 1) and np.all(np.isnan(out[32:]))  # garbage, as on the GPU


def test_race_between_threadgroups(sim):
    with pytest.raises(MetalSimError, match="another threadgroup"):
        sim("semantics").launch("cross_threadgroup_write", [np.zeros(1, np.uint32)], threadgroups=3,
                                threads_per_threadgroup=32)


def test_atomics_are_not_races(sim):
    counter = np.zeros(1, np.uint32)
    sim("semantics").launch("atomic_count", [counter], threadgroups=2, threads_per_threadgroup=64, schedule="random",
                            preempt=0.5)
    assert counter[0] == sum(range(128))


def test_unknown_kernel_and_missing_buffer(sim):
    lib = sim("reduce")
    with pytest.raises(MetalSimError, match="no kernel named"):
        lib.launch("nope", [], threadgroups=1, threads_per_threadgroup=32)
    with pytest.raises(MetalSimError, match="did not set"):
        lib.launch("reduce_sum_float", [np.zeros(4, np.float32)], threadgroups=1, threads_per_threadgroup=32)


# ----------------------------------------------------------------- pre-pass
def test_preprocess_forms():
    src = """
kernel void plain(const constant float& a [[buffer(0)]], device float* b [[buffer(1)]],
                  threadgroup float* t [[threadgroup(0)]], uint i [[thread_position_in_grid]]) {
  threadgroup float tile[4][8];
  threadgroup uint counter;
  threadgroup float* p = tile[0];
  b[i] = a;
}
template <typename T, int N>
[[kernel, max_total_threads_per_threadgroup(256)]] void tmpl(device T* x [[buffer(0)]],
                                                             ushort2 l [[thread_position_in_threadgroup]]) {}
template [[host_name("tmpl_f4")]] [[kernel]] decltype(tmpl<float, 4>) tmpl<float, 4>;
template [[host_name("tmpl_h2")]] [[kernel]] void tmpl<half, 2>(device half*, ushort2);
"""
    text, names = preprocess(src)
    assert names == ["tmpl_f4", "tmpl_h2", "plain"]
    assert "const float& a" in text
    assert 'auto& tile = ::msl::detail::tg_var<float[4][8]>("tile", []{});' in text
    assert 'auto& counter = ::msl::detail::tg_var<uint>("counter", []{});' in text
    assert "threadgroup float* p = tile[0];" in text  # pointers are left alone
    assert '"0:0,0:1,1:0,2:0"' in text  # buffer 0, buffer 1, threadgroup 0, thread_position_in_grid
    assert '"0:0,4:0"' in text
    assert "host_name" not in text


def test_host_name_from_adjacent_literals():
    """MLX-style instantiation macros build names as "prefix_" #type: the
    adjacent literals are one kernel name."""
    from metal_sim.harness import _host_name

    assert _host_name('template [[host_name("gather_" "float" "_bm4")]] [[kernel]]') == "gather_float_bm4"
    assert _host_name('[[host_name("plain")]]') == "plain"
    assert _host_name("[[kernel]] void f()") is None
