"""Running the cell benchmark: :func:`plan_grid` checks a run's arguments,
:func:`run` builds and measures every (model, dtype, tokens) cell of a mode.

Cells that differ only in their token count share their weights
(:class:`~mlx_moe_kernels.bench.workloads.WeightCache`), which are dropped
when the run moves to the next model or dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from mlx_moe_kernels.bench.modes import DEFAULT_MODE, MODES
from mlx_moe_kernels.bench.progress import make_progress
from mlx_moe_kernels.bench.results import BenchReport, CellResult, machine_info
from mlx_moe_kernels.bench.shapes import (
    DEFAULTS_BY_DEVICE,
    DTYPES,
    ModelShape,
    Quantization,
    resolve_model,
)
from mlx_moe_kernels.bench.timing import TimingPolicy, measure_cell
from mlx_moe_kernels.bench.workloads import CellResources, CellSpec, WeightCache


def _names(values: Optional[Iterable], default: Sequence) -> List:
    return list(default) if values is None else list(values)


@dataclass(frozen=True)
class BenchGrid:
    """A validated benchmark plan: every (model, dtype, tokens) cell of a
    mode, with the experts' quantization (``None``: float experts)."""

    mode: str
    device: mx.Device
    models: List[ModelShape]
    dtypes: List[str]
    tokens: List[int]
    quantization: Optional[Quantization] = None

    def cells(self) -> List[CellSpec]:
        """The cells in run order (model, then dtype, then tokens)."""
        return [
            CellSpec(model, dtype, count, self.quantization)
            for model in self.models
            for dtype in self.dtypes
            for count in self.tokens
        ]


def plan_grid(
    mode: str = DEFAULT_MODE,
    *,
    models: Optional[Iterable[str]] = None,
    tokens: Optional[Iterable[int]] = None,
    dtypes: Optional[Iterable[str]] = None,
    device: Union[mx.Device, mx.DeviceType, None] = None,
    quantization: Optional[Quantization] = None,
) -> BenchGrid:
    """Check a run's arguments and fill in the device's defaults.

    Arguments as in :func:`run`.

    Raises:
        ValueError: For an unknown mode, model or dtype, a non-positive
            token count, a device this MLX build does not have, or a model
            whose expert sizes the quantization's group size does not divide.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if device is None:
        device = mx.default_device()
    elif isinstance(device, mx.DeviceType):  # mx.cpu, mx.gpu
        device = mx.Device(device)
    device_type = "gpu" if device.type == mx.DeviceType.gpu else "cpu"
    if not mx.is_available(device):
        raise ValueError(f"this MLX build has no {device_type} backend ({device})")
    defaults = DEFAULTS_BY_DEVICE[device_type]
    shapes = [resolve_model(name) for name in _names(models, defaults["models"])]
    dtype_names = [str(d).lower() for d in _names(dtypes, defaults["dtypes"])]
    for name in dtype_names:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    token_counts = [int(t) for t in _names(tokens, defaults["tokens"])]
    if any(t < 1 for t in token_counts):
        raise ValueError(f"token counts must be positive, got {token_counts}")
    if not (shapes and dtype_names and token_counts):
        raise ValueError("nothing to run: no model, dtype or token count")
    if quantization is not None:
        for shape in shapes:
            if shape.hidden_size % quantization.group_size or (
                shape.expert_hidden_size % quantization.group_size
            ):
                raise ValueError(
                    f"group size {quantization.group_size} does not divide the expert "
                    f"sizes of {shape.name} (D={shape.hidden_size}, H={shape.expert_hidden_size})"
                )
    return BenchGrid(mode, device, shapes, dtype_names, token_counts, quantization)


def run(
    mode: str = DEFAULT_MODE,
    *,
    models: Optional[Iterable[str]] = None,
    tokens: Optional[Iterable[int]] = None,
    dtypes: Optional[Iterable[str]] = None,
    device: Union[mx.Device, mx.DeviceType, None] = None,
    include_reference: bool = True,
    repeats: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    quantization: Optional[Quantization] = None,
) -> BenchReport:
    """Run one benchmark mode over a grid of models, dtypes and token counts.

    Args:
        mode: A key of :data:`MODES`.
        models: Model names or aliases (see :data:`MODEL_SHAPES`); ``None``
            for the device's defaults (:data:`DEFAULTS_BY_DEVICE`).
        tokens: Token counts T; ``None`` for the device's defaults.
        dtypes: Dtype names (keys of :data:`DTYPES`); ``None`` for the
            device's defaults.
        device: Where to run (``mx.cpu``, ``mx.gpu`` or a ``mx.Device``);
            ``None`` for MLX's default device.
        include_reference: Time the plain-MLX reference too. The agreement
            check uses the reference either way.
        repeats: Timed calls per implementation; ``None`` adapts them to
            :data:`CELL_TIME_BUDGET_S` per cell.
        seed: Seed of the weights, inputs and routings.
        progress: Show a progress bar on stderr.
        quantization: Quantize the experts on the fly in this format
            (:func:`make_quantization`) and benchmark the quantized ops
            (``gather_qmm``; ``switch_glu`` on ``mx.quantize`` triples);
            ``None`` for float experts. On a CPU the stock path
            (``mx.gather_qmm``) is then limited
            (:data:`QUANTIZED_CPU_STOCK_MAX_ROWS`) and, like the reference,
            makes a single timed call.

    Returns:
        The :class:`BenchReport`; its ``failures`` list the cells whose
        implementations disagree with the reference.

    Raises:
        ValueError: For arguments :func:`plan_grid` rejects, or a
            non-positive repeat count.
    """
    grid = plan_grid(
        mode, models=models, tokens=tokens, dtypes=dtypes, device=device,
        quantization=quantization,
    )
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    build = MODES[mode]
    policy = TimingPolicy(repeats=repeats)
    device_type = "gpu" if grid.device.type == mx.DeviceType.gpu else "cpu"
    resources = CellResources(np.random.default_rng(seed), WeightCache(), seed, device_type)
    specs = grid.cells()
    bar = make_progress(len(specs), progress)
    cells: List[CellResult] = []
    started = time.perf_counter()
    try:
        with mx.stream(grid.device):
            for index, spec in enumerate(specs):
                if bar is not None:
                    quantized = "" if quantization is None else f" {quantization.label}"
                    bar.set_description(
                        f"{spec.model.name} {spec.dtype_name}{quantized} T={spec.tokens}"
                    )
                workload = build(spec, resources)
                cells.append(measure_cell(mode, spec, workload, include_reference, policy))
                del workload
                mx.clear_cache()
                if bar is not None:
                    bar.update(1)
                following = specs[index + 1] if index + 1 < len(specs) else None
                if following is None or (following.model, following.dtype_name) != (
                    spec.model,
                    spec.dtype_name,
                ):
                    resources.weights.clear()
    finally:
        if bar is not None:
            bar.close()
    return BenchReport(
        mode=mode,
        machine=machine_info(grid.device),
        cells=cells,
        wall_time_s=time.perf_counter() - started,
        quantization=quantization,
    )
