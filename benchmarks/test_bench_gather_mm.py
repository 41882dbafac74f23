"""pytest-benchmark suite: the Qwen3-30B-A3B expert up projection.

Run with ``pytest benchmarks/ --benchmark-only`` (CI's unit tests run
``tests/`` only). Each case is one ``gather_mm`` call exactly as mlx-lm's
SwitchLinear makes it (see :func:`mlx_moe_kernels.bench.gather_mm_workload`),
timed cache-cold: a counter advances every round, and each round uses the
next prepared routing, whose experts the previous round did not read (T=1)
or which is a fresh draw (T=64). Every case first checks its result against
the reference.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_kernels import bench

MODEL = bench.MODEL_SHAPES["qwen3-30b-a3b"]

ROUNDS = {1: 40, 64: 8}
"""Timed rounds per token count: decode calls take milliseconds, T=64 calls
tens of milliseconds (stock float32: ~1 s)."""

WARMUP_ROUNDS = 2

CASES = [
    pytest.param("ours", "float32", 1, id="ours-float32-T1"),
    pytest.param("stock", "float32", 1, id="stock-float32-T1"),
    pytest.param("ours", "bfloat16", 1, id="ours-bfloat16-T1"),
    pytest.param("ours", "float32", 64, id="ours-float32-T64"),
    pytest.param("stock", "float32", 64, id="stock-float32-T64"),
    pytest.param("ours", "bfloat16", 64, id="ours-bfloat16-T64"),
]


@pytest.fixture(scope="module")
def weight_caches():
    """One :class:`bench.WeightCache` per dtype, shared by the module's cases."""
    caches = {}
    yield caches
    for cache in caches.values():
        cache.clear()


def _workload(weight_caches, dtype_name: str, tokens: int) -> bench.Workload:
    cache = weight_caches.setdefault(dtype_name, bench.WeightCache())
    resources = bench.CellResources(np.random.default_rng(tokens), cache, seed=0)
    return bench.gather_mm_workload(bench.CellSpec(MODEL, dtype_name, tokens), resources)


@pytest.mark.parametrize("implementation, dtype_name, tokens", CASES)
def test_gather_mm_up_projection(benchmark, weight_caches, implementation, dtype_name, tokens):
    """Time one implementation on one (dtype, T) cell, cache-cold."""
    workload = _workload(weight_caches, dtype_name, tokens)
    call = getattr(workload, implementation)

    expected = workload.expected()
    try:
        out = call(0)
        mx.eval(out)
    except Exception as exc:  # stock supports float32 only on the CPU
        pytest.skip(f"{implementation} does not run {dtype_name} here: {exc}")
    error = bench.max_relative_error(out, expected)
    assert error <= bench.TOLERANCES[dtype_name], f"error {error:.2e} vs reference"
    del out, expected

    call_numbers = itertools.count(1)

    def next_call():
        return (next(call_numbers),), {}

    def timed(call_index: int) -> None:
        mx.eval(call(call_index))
        mx.synchronize()

    benchmark.group = f"gather_mm {MODEL.name} T={tokens}"
    benchmark.extra_info.update(
        rows=workload.rows,
        weight_bytes_per_call=workload.weight_bytes_per_call,
        flops_per_call=workload.flops_per_call,
        max_rel_error=error,
    )
    benchmark.pedantic(
        timed,
        setup=next_call,
        rounds=ROUNDS[tokens],
        iterations=1,
        warmup_rounds=WARMUP_ROUNDS,
    )
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["weight_gb_per_s"] = workload.weight_bytes_per_call / median_s / 1e9
    benchmark.extra_info["gflop_per_s"] = workload.flops_per_call / median_s / 1e9
