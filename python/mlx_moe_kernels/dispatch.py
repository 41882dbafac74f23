"""Which implementation runs an op: ours or MLX's stock path, per machine
and shape class, chosen by timing both on this machine and cached on disk.

A decision is keyed by (device name, MLX version, package version, op,
dtype/bits, shape class), the shape class being ``decode`` (at most 8 rows),
``small`` (at most 64) or ``large``. ``MLX_MOE_KERNELS_DISPATCH`` forces a
choice: ``ours``, ``stock`` or ``auto`` (the default). In ``auto`` mode a
missing decision is made on first use by timing both implementations on
the call's own inputs (a few calls each) and written to
``dispatch.json`` in the cache folder: ``MLX_MOE_KERNELS_CACHE`` if set,
else the platform's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache`` on
Linux, ``~/Library/Caches`` on macOS) under ``mlx-moe-kernels``.

On the CPU our kernels are measured faster at every size (README,
"Benchmarks"), and MLX's CPU ``gather_qmm`` takes seconds at prompt sizes,
so ``auto`` decides ``ours`` there without timing; the machinery times
GPUs, where nothing was measured (no Mac here).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx

ENV_MODE = "MLX_MOE_KERNELS_DISPATCH"
ENV_CACHE = "MLX_MOE_KERNELS_CACHE"
MODES = ("ours", "stock", "auto")
CHOICES = ("ours", "stock")
TIMED_CALLS = 3


def cache_folder() -> Path:
    """Where decisions are kept (see the module docstring)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlx-moe-kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-moe-kernels"


def mode() -> str:
    """The dispatch mode from ``MLX_MOE_KERNELS_DISPATCH`` (default auto);
    ValueError naming the variable for anything else."""
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def shape_class(rows: int) -> str:
    """``decode`` (<= 8 rows), ``small`` (<= 64) or ``large``."""
    return "decode" if rows <= 8 else "small" if rows <= 64 else "large"


def is_cpu(device) -> bool:
    """Whether ``device`` (an ``mx.Device`` or ``mx.cpu`` / ``mx.gpu``) is
    the CPU."""
    kind = device if isinstance(device, mx.DeviceType) else device.type
    return kind == mx.cpu


def device_name(device: mx.Device) -> str:
    """A stable name of the device an op runs on (the GPU's model on a
    Mac; the CPU's architecture elsewhere)."""
    if is_cpu(device):
        import platform

        return f"cpu-{platform.machine()}"
    try:
        info = mx.device_info()
        return str(info.get("device_name") or info.get("architecture") or "gpu")
    except Exception:  # a backend that does not describe itself
        return "gpu"


def _key(device: mx.Device, op: str, kind: str, rows: int) -> str:
    import mlx_moe_kernels

    return "|".join([device_name(device), mx.__version__, mlx_moe_kernels.__version__, op, kind, shape_class(rows)])


class DispatchTable:
    """Decisions by key, loaded from and saved to ``dispatch.json``."""

    def __init__(self, folder: Optional[Path] = None):
        self.folder = Path(folder) if folder is not None else cache_folder()
        self.path = self.folder / "dispatch.json"
        self.decisions: Dict[str, Dict[str, object]] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            warnings.warn(f"mlx-moe-kernels: ignoring unreadable dispatch cache {self.path}: {error}")
            return
        if isinstance(data, dict):
            self.decisions = {k: v for k, v in data.items() if isinstance(v, dict) and v.get("choice") in CHOICES}

    def save(self) -> None:
        """Write the decisions (a failure to write only warns: the choice
        is still used in this process)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.decisions, indent=1, sort_keys=True))
            temporary.replace(self.path)
        except OSError as error:
            warnings.warn(f"mlx-moe-kernels: cannot write the dispatch cache {self.path}: {error}")

    def choose(
        self,
        op: str,
        kind: str,
        rows: int,
        device: mx.Device,
        ours: Callable[[], mx.array],
        stock: Callable[[], mx.array],
    ) -> str:
        """``"ours"`` or ``"stock"`` for this call (see the module
        docstring); ``ours``/``stock`` compute the call's result each way
        and are timed only for a new GPU decision in ``auto`` mode."""
        forced = mode()
        if forced != "auto":
            return forced
        if is_cpu(device):
            return "ours"
        key = _key(device, op, kind, rows)
        if key not in self.decisions:
            ours_ms, stock_ms = median_call_ms(ours), median_call_ms(stock)
            self.decisions[key] = {
                "choice": "ours" if ours_ms <= stock_ms else "stock", "ours_ms": ours_ms, "stock_ms": stock_ms,
            }
            self.save()
        return str(self.decisions[key]["choice"])


def median_call_ms(fn: Callable[[], mx.array], repeats: int = TIMED_CALLS) -> float:
    """Median milliseconds of ``repeats`` evaluated calls of ``fn`` after
    one untimed call."""
    mx.eval(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


_TABLE: Optional[DispatchTable] = None


def table() -> DispatchTable:
    """The process's table (loaded on first use)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = DispatchTable()
    return _TABLE


def choose(op: str, kind: str, rows: int, device, ours: Callable[[], mx.array], stock: Callable[[], mx.array]) -> str:
    """:meth:`DispatchTable.choose` on the process's table, which is only
    loaded when a decision needs it (a forced mode or the CPU never reads
    the cache folder)."""
    forced = mode()
    if forced != "auto":
        return forced
    if is_cpu(device):
        return "ours"
    return table().choose(op, kind, rows, device, ours, stock)
