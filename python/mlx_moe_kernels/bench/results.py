"""What a run of the cell benchmark found: per-implementation timings, cells,
the report, and the machine it ran on.

:class:`BenchReport` is what :func:`mlx_moe_kernels.bench.run` returns; its
``to_dict``/``write_json`` give the JSON of ``--json`` and
``format_table`` the table (:mod:`mlx_moe_kernels.bench.report`).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

import mlx_moe_kernels
from mlx_moe_kernels.bench.report import format_table
from mlx_moe_kernels.bench.shapes import Quantization



@dataclass
class ImplementationTiming:
    """How one implementation fared in one cell.

    Attributes:
        status: ``"ok"`` (timed), ``"unsupported"`` (the op raised, shown as
            n/a), ``"skipped"`` (too large to run), ``"disabled"`` (turned
            off, e.g. ``--no-reference``) or ``"failed"`` (our op raised).
        samples_s: Wall time of each timed call, in seconds.
        warmup_calls: Untimed calls made before timing.
        error: Max abs error of call 0 relative to the reference's max
            magnitude (ours and stock only).
        note: Why it was not timed, when it was not; for a timed one, why
            it made a single timed call, when it did.
    """

    status: str
    samples_s: List[float] = field(default_factory=list)
    warmup_calls: int = 0
    error: Optional[float] = None
    note: Optional[str] = None

    @property
    def median_s(self) -> Optional[float]:
        """Median call time in seconds, or ``None`` when not timed."""
        return float(np.median(self.samples_s)) if self.samples_s else None


@dataclass
class CellResult:
    """The measurements of one (mode, model, dtype, tokens) cell.

    ``weight_bytes_per_call`` counts the distinct experts' weights one call
    reads: for quantized experts (``quantization`` set) their packed codes,
    scales and biases.
    """

    mode: str
    model: str
    dtype: str
    tokens: int
    rows: int
    timings: Dict[str, ImplementationTiming]
    tolerance: float
    weight_bytes_per_call: float
    flops_per_call: float
    quantization: Optional[Quantization] = None
    stock_tolerance: Optional[float] = None

    def tolerance_of(self, implementation: str) -> float:
        """The largest accepted error of an implementation: the dtype's
        :attr:`tolerance`, or :attr:`stock_tolerance` for stock when set."""
        if implementation == "stock" and self.stock_tolerance is not None:
            return self.stock_tolerance
        return self.tolerance

    @property
    def dtype_label(self) -> str:
        """The dtype, with the experts' quantization if any
        (``bfloat16 q4g64``)."""
        if self.quantization is None:
            return self.dtype
        return f"{self.dtype} {self.quantization.label}"

    def median_s(self, implementation: str) -> Optional[float]:
        """Median call time of an implementation, or ``None``."""
        return self.timings[implementation].median_s

    def speedup_over(self, implementation: str) -> Optional[float]:
        """Median time of ``implementation`` over ours (> 1: ours is faster)."""
        ours, other = self.median_s("ours"), self.median_s(implementation)
        if ours is None or other is None:
            return None
        return other / ours

    @property
    def weight_gb_per_s(self) -> Optional[float]:
        """Distinct expert weight bytes per call over our median time, GB/s."""
        ours = self.median_s("ours")
        return None if ours is None else self.weight_bytes_per_call / ours / 1e9

    @property
    def gflop_per_s(self) -> Optional[float]:
        """FLOPs per call over our median time, GFLOP/s."""
        ours = self.median_s("ours")
        return None if ours is None else self.flops_per_call / ours / 1e9

    @property
    def failures(self) -> List[str]:
        """Why this cell fails: an error above tolerance, or our op raising."""
        problems = []
        for name, timing in self.timings.items():
            if timing.status == "failed":
                problems.append(f"{name} raised: {timing.note}")
            elif timing.error is not None and not timing.error <= self.tolerance_of(name):
                problems.append(
                    f"{name} differs from the reference by {timing.error:.2e} "
                    f"(tolerance {self.tolerance_of(name):.0e})"
                )
        return problems

    def label(self) -> str:
        """A short name of the cell, e.g. ``qwen3-30b-a3b bfloat16 T=64``
        (``qwen3-30b-a3b bfloat16 q4g64 T=64`` with quantized experts)."""
        return f"{self.model} {self.dtype_label} T={self.tokens}"

    def to_dict(self) -> dict:
        """The cell as plain JSON-ready values (times in milliseconds)."""
        implementations = {}
        for name, timing in self.timings.items():
            median = timing.median_s
            implementations[name] = {
                "status": timing.status,
                "median_ms": None if median is None else median * 1e3,
                "samples_ms": [s * 1e3 for s in timing.samples_s],
                "warmup_calls": timing.warmup_calls,
                "max_rel_error": timing.error,
                "note": timing.note,
            }
        return {
            "mode": self.mode,
            "model": self.model,
            "dtype": self.dtype,
            "quantization": (
                None if self.quantization is None else self.quantization.kwargs()
            ),
            "tokens": self.tokens,
            "rows": self.rows,
            "implementations": implementations,
            "speedup_vs_stock": self.speedup_over("stock"),
            "speedup_vs_reference": self.speedup_over("reference"),
            "weight_bytes_per_call": self.weight_bytes_per_call,
            "weight_gb_per_s": self.weight_gb_per_s,
            "flops_per_call": self.flops_per_call,
            "gflop_per_s": self.gflop_per_s,
            "tolerance": self.tolerance,
            "stock_tolerance": self.tolerance_of("stock"),
            "passed": not self.failures,
        }


@dataclass
class BenchReport:
    """All cells of one run, with the machine they ran on."""

    mode: str
    machine: dict
    cells: List[CellResult]
    wall_time_s: float = 0.0
    quantization: Optional[Quantization] = None

    @property
    def failures(self) -> List[str]:
        """Every failing cell's problems, prefixed with the cell's label."""
        return [f"{cell.label()}: {p}" for cell in self.cells for p in cell.failures]

    def to_dict(self) -> dict:
        """The report as plain JSON-ready values."""
        return {
            "mode": self.mode,
            "quantization": (
                None if self.quantization is None else self.quantization.kwargs()
            ),
            "machine": self.machine,
            "wall_time_s": self.wall_time_s,
            "cells": [cell.to_dict() for cell in self.cells],
            "passed": not self.failures,
        }

    def write_json(self, path: str) -> None:
        """Write :meth:`to_dict` to ``path``, indented."""
        with open(path, "w") as out:
            json.dump(self.to_dict(), out, indent=2)
            out.write("\n")

    def format_table(self) -> str:
        """The cells as an aligned plain-text table, with footnotes."""
        return format_table(self.cells)


def machine_info(device: mx.Device) -> dict:
    """Where the benchmark ran: platform, versions, device and threads."""
    try:
        device_info = {k: _jsonable(v) for k, v in mx.device_info().items()}
    except Exception as exc:  # not every backend describes itself
        device_info = {"error": str(exc)}
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        affinity = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "mlx_moe_kernels_version": mlx_moe_kernels.__version__,
        "device": str(device),
        "device_info": device_info,
        "threads": {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": affinity,
            "MLX_MOE_NUM_THREADS": os.environ.get("MLX_MOE_NUM_THREADS"),
            "MLX_MOE_CPU_KERNELS": os.environ.get("MLX_MOE_CPU_KERNELS"),
        },
    }


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
