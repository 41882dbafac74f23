"""Timing: how one cell is checked and measured, and the machine probes.

How one cell is measured (:func:`measure_cell`):

1. Agreement: call 0 of ours and of stock are compared with the reference
   result of the same inputs (max abs error over the reference's max
   magnitude). A stock op that raises is reported as not available ("n/a").
2. Warm-up: up to :data:`WARMUP_CALLS` calls per implementation (the check
   call counts), fewer when they are slow.
3. Timing: the implementations take turns (ours, stock, reference, ours,
   ...), each call on the next prepared routing; each call is timed with
   ``time.perf_counter`` around building the op and ``mx.eval`` of its result
   (plus a stream synchronize). Repeats adapt to a time budget per cell
   unless a fixed count is asked for; medians are reported. A workload may
   mark an implementation single-call (:attr:`Workload.single_call`: no
   warm-up besides the check, one timed call) or leave stock out.

The machine probes, used by the model mode: :func:`read_bandwidth` (threads
streaming a large array: the reference a fraction of bandwidth is quoted
against, DESIGN.md "Benchmark method") and :class:`CacheEvictor` (reads a
buffer larger than the last-level cache, so the next timed call starts
cold).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import mlx.core as mx
import numpy as np

from mlx_moe_kernels.bench.results import CellResult, ImplementationTiming
from mlx_moe_kernels.bench.shapes import TOLERANCES
from mlx_moe_kernels.bench.workloads import CellSpec, Workload

CELL_TIME_BUDGET_S = 1.5
"""Seconds of timed calls per cell, split evenly between the implementations
being timed; an implementation stops once its share is spent. A single call
longer than its share is still run once."""

MAX_REPEATS = 100
"""Most timed calls per implementation and cell (fast cells stop here)."""

REFERENCE_MAX_REPEATS = 3
"""Most timed calls of the reference per cell, also under ``repeats``: it is
the slow oracle (it copies one expert's weights per row), its time is for
scale only."""

WARMUP_CALLS = 3
"""Untimed calls per implementation before timing (the agreement check's
call counts as the first)..."""

WARMUP_BUDGET_S = 0.3
"""...stopping early once an implementation has spent this long warming up:
one slow call is warm-up enough."""

IMPLEMENTATIONS = ("ours", "stock", "reference")
"""The implementations of every mode, in the order they take turns."""


def time_call(implementation: Callable[[int], mx.array], call_index: int) -> float:
    """Seconds to build and evaluate one call (``mx.eval`` + synchronize)."""
    start = time.perf_counter()
    out = implementation(call_index)
    mx.eval(out)
    mx.synchronize()
    return time.perf_counter() - start


def max_relative_error(actual: mx.array, expected: mx.array) -> float:
    """``max|actual - expected| / max|expected|``, computed in float32."""
    expected32 = expected.astype(mx.float32)
    difference = mx.abs(actual.astype(mx.float32) - expected32).max()
    scale = mx.maximum(mx.abs(expected32).max(), mx.array(1e-30))
    return float((difference / scale).item())


@dataclass(frozen=True)
class TimingPolicy:
    """How many calls to make.

    Attributes:
        repeats: Timed calls per implementation; ``None`` adapts them to
            ``cell_budget_s`` (between 1 and :data:`MAX_REPEATS`). The
            reference never makes more than :data:`REFERENCE_MAX_REPEATS`.
        cell_budget_s: Seconds of timed calls per cell, split evenly.
    """

    repeats: Optional[int] = None
    cell_budget_s: float = CELL_TIME_BUDGET_S

    def wants_more(
        self, name: str, samples: Sequence[float], share_s: float, cap: Optional[int] = None
    ) -> bool:
        """Whether ``name`` should make another timed call (at most ``cap``
        if given: a workload's single-call implementations)."""
        if cap is None:
            cap = REFERENCE_MAX_REPEATS if name == "reference" else MAX_REPEATS
        if self.repeats is not None:
            return len(samples) < min(self.repeats, cap)
        return not samples or (len(samples) < cap and sum(samples) < share_s)


def measure_cell(
    mode: str,
    spec: CellSpec,
    workload: Workload,
    include_reference: bool,
    policy: TimingPolicy,
) -> CellResult:
    """Check one cell's implementations against the reference, then time them."""
    timings: Dict[str, ImplementationTiming] = {}
    callables: Dict[str, Callable[[int], mx.array]] = {}
    warmup_spent: Dict[str, float] = {}

    expected = workload.expected()
    mx.eval(expected)
    for name, implementation in (("ours", workload.ours), ("stock", workload.stock)):
        if implementation is None:
            timings[name] = ImplementationTiming("skipped", note=workload.stock_skip_reason)
            continue
        try:
            start = time.perf_counter()
            out = implementation(0)
            mx.eval(out)
            mx.synchronize()
            warmup_spent[name] = time.perf_counter() - start
        except Exception as exc:  # stock ops raise for unsupported dtypes
            status = "unsupported" if name == "stock" else "failed"
            timings[name] = ImplementationTiming(status, note=_one_line(exc))
            continue
        timings[name] = ImplementationTiming(
            "ok", warmup_calls=1, error=max_relative_error(out, expected),
            note=workload.single_call.get(name),
        )
        callables[name] = implementation
        del out
    del expected

    if not include_reference:
        timings["reference"] = ImplementationTiming("disabled", note="--no-reference")
    elif workload.reference is None:
        timings["reference"] = ImplementationTiming(
            "skipped", note=workload.reference_skip_reason
        )
    else:
        timings["reference"] = ImplementationTiming(
            "ok", note=workload.single_call.get("reference")
        )
        callables["reference"] = workload.reference
        warmup_spent["reference"] = 0.0

    next_call = 1  # call 0 was the agreement check
    for _ in range(WARMUP_CALLS):
        for name in IMPLEMENTATIONS:
            if name not in callables or name in workload.single_call:
                continue
            timing = timings[name]
            if timing.warmup_calls >= WARMUP_CALLS or warmup_spent[name] >= WARMUP_BUDGET_S:
                continue
            warmup_spent[name] += time_call(callables[name], next_call)
            timing.warmup_calls += 1
            next_call += 1

    share_s = policy.cell_budget_s / max(1, len(callables))
    active = [name for name in IMPLEMENTATIONS if name in callables]
    while active:
        for name in list(active):
            samples = timings[name].samples_s
            samples.append(time_call(callables[name], next_call))
            next_call += 1
            cap = 1 if name in workload.single_call else None
            if not policy.wants_more(name, samples, share_s, cap):
                active.remove(name)

    return CellResult(
        mode=mode,
        model=spec.model.name,
        dtype=spec.dtype_name,
        tokens=spec.tokens,
        rows=workload.rows,
        timings=timings,
        tolerance=TOLERANCES[spec.dtype_name],
        weight_bytes_per_call=workload.weight_bytes_per_call,
        flops_per_call=workload.flops_per_call,
        quantization=spec.quantization,
        stock_tolerance=workload.stock_tolerance,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------
# Machine probes
# ---------------------------------------------------------------------------

READ_PROBE_BYTES = 512 * 2**20
"""Size of the array :func:`read_bandwidth` streams: far above any cache."""

READ_PROBE_PASSES = 3
"""Passes of :func:`read_bandwidth`; the best one counts (other tenants of
the machine only ever slow a pass down)."""

EVICT_BYTES = 64 * 2**20
"""Bytes :class:`CacheEvictor` reads between two timed calls: twice the
32 MB L3 of the CPU machines here (DESIGN.md), so no weight a timed call
reads is still cached from the call before."""


def kernel_threads() -> int:
    """The threads our CPU kernels use: ``MLX_MOE_NUM_THREADS`` if set, else
    every core this process may run on (what the kernels' pool starts)."""
    configured = os.environ.get("MLX_MOE_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def read_bandwidth(
    buffer: np.ndarray, threads: Optional[int] = None, passes: int = READ_PROBE_PASSES
) -> float:
    """Read bandwidth in GB/s: the best of ``passes`` passes in which
    ``threads`` threads (default :func:`kernel_threads`: two on the 2-core
    machines here) each sum one slice of ``buffer`` (NumPy releases the GIL
    in the sum). ``buffer`` should be far larger than the caches
    (:data:`READ_PROBE_BYTES`) and already written (its pages mapped).
    ``benchmarks/vs_ggml.py`` uses it too."""
    parts = np.array_split(buffer.reshape(-1), threads or kernel_threads())
    best = 0.0
    for _ in range(passes):
        workers = [
            threading.Thread(target=np.sum, args=(part,), kwargs={"dtype": part.dtype})
            for part in parts
        ]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, buffer.nbytes / (time.perf_counter() - start) / 1e9)
    return best


class CacheEvictor:
    """Reads a buffer of ``nbytes`` (default :data:`EVICT_BYTES`) on each
    :meth:`evict`, pushing whatever a timed call read before out of the
    caches; call it outside the timed region."""

    def __init__(self, nbytes: int = EVICT_BYTES) -> None:
        self.buffer = np.ones(max(1, nbytes // 4), dtype=np.float32)

    def evict(self) -> None:
        """Read the whole buffer once."""
        float(np.sum(self.buffer))

