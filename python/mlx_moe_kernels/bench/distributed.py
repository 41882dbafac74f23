"""The distributed benchmark (``mlx-moe bench --mode model --distributed``,
run on every rank under ``mlx.launch``).

On one random-weight model (a built-in config truncated to ``layers``, in
one format of :data:`~mlx_moe_kernels.bench.model.FORMATS`) it measures:

* single: decode tokens/s of the whole model on rank 0 alone (the other
  ranks wait; on one machine their backend threads may share its cores);
* per sharding (``tensor``, ``expert``: :meth:`model.shard`; ``pipeline``:
  :meth:`model.pipeline`): decode tokens/s with every rank taking part, and
  each rank's resident weight bytes;
* the backend's ``all_sum``: latency and bandwidth for a few sizes, from
  the ``[1, D]`` hidden state of one decode step up to megabytes.

Decode is timed as :func:`mlx_moe_kernels.bench.model.decode_steps` times
it (greedy steps from a fresh cache, pipelined as generation runs them);
the median step of each run, then the median run. Rank 0 gathers and
prints every rank's figures.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from mlx_moe_kernels.bench.model import (
    DECODE_WARMUP_STEPS,
    build_random_model,
    decode_steps,
    model_config,
)
from mlx_moe_kernels.bench.model_parts import language_model, param_bytes

SHARD_MODES = ("tensor", "expert", "pipeline")
# all_sum sizes in bytes (float32 elements): one decode step's hidden state
# of a 2048-wide model in bfloat16 is 4 KB.
ALL_SUM_BYTES = (4 << 10, 64 << 10, 1 << 20, 16 << 20)


@dataclass
class ShardResult:
    """One sharding's figures on every rank (lists indexed by rank)."""

    mode: str
    step_ms: List[float]
    weight_bytes: List[int]

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: every rank finishes a step before the next, so the
        slowest rank's median step sets it."""
        return 1e3 / max(self.step_ms)


@dataclass
class DistributedReport:
    """Everything ``--distributed`` measured; rank 0 holds the gathered one."""

    model: str
    layers: int
    format: str
    ranks: int
    backend_note: str
    single_step_ms: float
    single_weight_bytes: int
    shards: List[ShardResult] = field(default_factory=list)
    all_sum: List[Dict[str, float]] = field(default_factory=list)

    def format_table(self) -> str:
        """The report as text tables."""
        single = 1e3 / self.single_step_ms
        lines = [
            f"{'layout':<9} {'tok/s':>7} {'vs single':>9} {'step ms (per rank)':<24} {'MB held (per rank)'}",
            f"{'single':<9} {single:>7.1f} {'1.00x':>9} {self.single_step_ms:<24.2f} "
            f"{self.single_weight_bytes / 1e6:.0f}",
        ]
        for shard in self.shards:
            steps = " ".join(f"{ms:.2f}" for ms in shard.step_ms)
            held = " ".join(f"{b / 1e6:.0f}" for b in shard.weight_bytes)
            lines.append(
                f"{shard.mode:<9} {shard.tokens_per_s:>7.1f} {shard.tokens_per_s / single:>8.2f}x "
                f"{steps:<24} {held}"
            )
        lines.append("")
        lines.append(f"{'all_sum':<9} {'latency ms':>10} {'GB/s':>8}")
        for row in self.all_sum:
            lines.append(f"{_size_text(int(row['bytes'])):<9} {row['ms']:>10.3f} {row['gb_per_s']:>8.3f}")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _size_text(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def _barrier(group) -> None:
    mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))


def _median_step_ms(lm, first_token: int, steps: int, repeats: int) -> float:
    decode_steps(lm, first_token, DECODE_WARMUP_STEPS)
    runs = [statistics.median(decode_steps(lm, first_token, steps)) for _ in range(repeats)]
    return statistics.median(runs) * 1e3


def _gather(values: Sequence[float], group) -> List[float]:
    """Every rank's ``values`` (one per rank, in rank order)."""
    mine = mx.array(np.asarray(values, dtype=np.float64).astype(np.float32))
    return np.array(mx.distributed.all_gather(mine[None], group=group)).reshape(group.size(), -1).tolist()


def time_all_sum(group, sizes: Sequence[int] = ALL_SUM_BYTES, repeats: int = 20) -> List[Dict[str, float]]:
    """Median latency of ``all_sum`` over ``group`` for float32 arrays of
    each size in bytes, and the bandwidth it implies (bytes / latency)."""
    rows = []
    for nbytes in sizes:
        x = mx.ones((nbytes // 4,), mx.float32)
        mx.eval(x)
        for _ in range(3):
            mx.eval(mx.distributed.all_sum(x, group=group))
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=group))
            samples.append(time.perf_counter() - start)
        latency = statistics.median(samples)
        rows.append({"bytes": float(nbytes), "ms": latency * 1e3, "gb_per_s": nbytes / latency / 1e9})
    return rows


def run_distributed_bench(
    model: Union[str, Dict[str, Any]],
    layers: int,
    fmt: str,
    modes: Sequence[str] = SHARD_MODES,
    decode_tokens: int = 32,
    repeats: int = 2,
    seed: int = 0,
    group: Optional[mx.distributed.Group] = None,
) -> DistributedReport:
    """Measure (see the module docstring) on every rank of ``group``
    (default ``mx.distributed.init()``); every rank returns the same report.
    ``model``: a built-in model name or a config dict (as
    :func:`~mlx_moe_kernels.bench.model.model_config` takes).

    Raises:
        ValueError: an unknown mode or format, or a model the group cannot
            shard (raised on every rank alike, before any collective that
            would leave one waiting).
    """
    unknown = [mode for mode in modes if mode not in SHARD_MODES]
    if unknown:
        raise ValueError(f"unknown sharding {unknown[0]!r}: choose from {', '.join(SHARD_MODES)}")
    group = group if group is not None else mx.distributed.init()
    if "pipeline" in modes and layers < group.size():
        raise ValueError(f"cannot split {layers} decoder layers into {group.size()} pipeline stages")
    config = model_config(model, layers)
    rng = np.random.default_rng(seed)

    def fresh():
        built = build_random_model(config, fmt, seed)
        return built, language_model(built)

    built, lm = fresh()
    first_token = int(rng.integers(0, lm.model.embed_tokens.weight.shape[0]))
    single_bytes = param_bytes(built)
    _barrier(group)
    single_ms = _median_step_ms(lm, first_token, decode_tokens, repeats) if group.rank() == 0 else 0.0
    single_ms = max(v[0] for v in _gather([single_ms], group))
    del built, lm

    report = DistributedReport(
        model=model if isinstance(model, str) else str(config.get("model_type")), layers=layers, format=fmt, ranks=group.size(),
        backend_note="ranks on one machine share its cores and memory" if _one_host() else "",
        single_step_ms=single_ms, single_weight_bytes=single_bytes,
    )
    for mode in modes:
        built, lm = fresh()
        if mode == "pipeline":
            built.pipeline(group)
        else:
            built.shard(group, experts=mode, attention="replicate")
        _barrier(group)
        step = _median_step_ms(lm, first_token, decode_tokens, repeats)
        rows = _gather([step, float(param_bytes(built))], group)
        report.shards.append(ShardResult(mode, [r[0] for r in rows], [int(r[1]) for r in rows]))
        del built, lm
    report.all_sum = time_all_sum(group)
    return report


def _one_host() -> bool:
    """Whether mlx.launch started every rank on this host (its ring
    hostfile lists only loopback addresses)."""
    import json
    import os

    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return False
    try:
        with open(path) as f:
            hosts = json.load(f)
    except (OSError, ValueError):
        return False
    addresses = [address for host in hosts for address in (host if isinstance(host, list) else [host])]
    return bool(addresses) and all(str(a).startswith("127.") for a in addresses)
