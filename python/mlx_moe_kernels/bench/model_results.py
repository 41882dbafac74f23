"""What a run of the model mode (:mod:`mlx_moe_kernels.bench.model`) found:
per format, the prefill and decode runs, the timed parts of a decode step
and the read-bandwidth probe, with the rates derived from them; the report
of the run, its JSON and its table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from mlx_moe_kernels.bench.report import format_model_table


@dataclass
class PartResult:
    """One part of a decode step: its timed calls and the bytes it reads."""

    name: str
    samples_s: List[float]
    bytes_read: float

    @property
    def median_s(self) -> float:
        """Median seconds per step."""
        return float(np.median(self.samples_s))

    @property
    def gb_per_s(self) -> float:
        """Bytes read over the median time, GB/s."""
        return self.bytes_read / self.median_s / 1e9


@dataclass
class FormatResult:
    """Everything measured for one weight format.

    Attributes:
        format: A key of :data:`~mlx_moe_kernels.bench.model.FORMATS`, or
            ``"stored"`` (a quantized checkpoint as it is).
        bits, group_size: The quantization of the format (``None``: float
            weights, or as stored).
        weight_bytes: Bytes of every parameter of the model.
        prefill_tokens: Prompt length.
        prefill_samples_s: Seconds of each timed prefill run.
        decode_tokens: Steps per decode run.
        decode_runs_s: Seconds of each step, per timed decode run.
        context_positions: Cached positions the parts were timed at (the
            middle of a decode run).
        parts: The timed parts of a step (:mod:`~mlx_moe_kernels.bench.model_parts`).
        rest_bytes: Bytes the rest of a step reads (one embedding row).
        read_gb_per_s: The read-bandwidth probe, measured right after the
            decode runs.
    """

    format: str
    bits: Optional[int]
    group_size: Optional[int]
    weight_bytes: int
    prefill_tokens: int
    prefill_samples_s: List[float]
    decode_tokens: int
    decode_runs_s: List[List[float]]
    context_positions: int
    parts: List[PartResult]
    rest_bytes: float
    read_gb_per_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens over the median prefill run."""
        return self.prefill_tokens / float(np.median(self.prefill_samples_s))

    @property
    def decode_tokens_per_s(self) -> float:
        """Steps over the median decode run (each run's total time)."""
        return self.decode_tokens / float(np.median([sum(run) for run in self.decode_runs_s]))

    @property
    def step_s(self) -> float:
        """The median decode step (over every step of every run): the step
        at the middle of the context, where the parts were timed."""
        return float(np.median([s for run in self.decode_runs_s for s in run]))

    @property
    def rest_s(self) -> float:
        """The median step minus the parts' medians: what the parts do not
        cover (embedding, residual adds, argmax, graph building, the
        per-evaluation overhead). Negative when the parts, each timed with
        its own evaluation, add up to more than the step."""
        return self.step_s - sum(part.median_s for part in self.parts)

    @property
    def step_bytes(self) -> float:
        """Bytes a decode step must read (the parts' and the rest's)."""
        return sum(part.bytes_read for part in self.parts) + self.rest_bytes

    @property
    def step_gb_per_s(self) -> float:
        """:attr:`step_bytes` over the median step, GB/s."""
        return self.step_bytes / self.step_s / 1e9

    @property
    def bandwidth_share(self) -> float:
        """:attr:`step_gb_per_s` over the read-bandwidth probe."""
        return self.step_gb_per_s / self.read_gb_per_s

    def to_dict(self) -> dict:
        """The result as plain JSON-ready values (times in ms)."""
        parts = [
            {"name": p.name, "median_ms": p.median_s * 1e3, "samples_ms": [s * 1e3 for s in p.samples_s],
             "bytes": p.bytes_read, "gb_per_s": p.gb_per_s}
            for p in self.parts
        ]
        parts.append({"name": "rest", "median_ms": self.rest_s * 1e3, "samples_ms": [],
                      "bytes": self.rest_bytes, "gb_per_s": None})
        return {
            "format": self.format,
            "bits": self.bits,
            "group_size": self.group_size,
            "weight_bytes": self.weight_bytes,
            "prefill": {
                "tokens": self.prefill_tokens,
                "samples_ms": [s * 1e3 for s in self.prefill_samples_s],
                "tokens_per_s": self.prefill_tokens_per_s,
            },
            "decode": {
                "tokens": self.decode_tokens,
                "runs_ms": [[s * 1e3 for s in run] for run in self.decode_runs_s],
                "tokens_per_s": self.decode_tokens_per_s,
                "median_step_ms": self.step_s * 1e3,
            },
            "step": {
                "context_positions": self.context_positions,
                "parts": parts,
                "bytes": self.step_bytes,
                "gb_per_s": self.step_gb_per_s,
                "read_gb_per_s": self.read_gb_per_s,
                "bandwidth_share": self.bandwidth_share,
            },
        }


@dataclass
class ModelBenchReport:
    """A run of the model mode: the model, the machine, one result per format."""

    model: str
    config: Dict[str, Any]
    checkpoint: Optional[str]
    prompt_tokens: int
    decode_tokens: int
    machine: dict
    formats: List[FormatResult] = field(default_factory=list)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        """The report as plain JSON-ready values."""
        return {
            "mode": "model",
            "model": self.model,
            "checkpoint": self.checkpoint,
            "config": self.config,
            "prompt_tokens": self.prompt_tokens,
            "decode_tokens": self.decode_tokens,
            "machine": self.machine,
            "wall_time_s": self.wall_time_s,
            "formats": [result.to_dict() for result in self.formats],
        }

    def write_json(self, path: str) -> None:
        """Write :meth:`to_dict` to ``path``, indented."""
        with open(path, "w") as out:
            json.dump(self.to_dict(), out, indent=2)
            out.write("\n")

    def format_table(self) -> str:
        """The parts of a step per format as a table, with a summary line per format."""
        return format_model_table(self)
