"""The benchmark harness behind ``mlx-moe bench``.

It times our kernels side by side with MLX's stock ops and with the plain-MLX
reference (:mod:`mlx_moe_kernels.reference`) on the expert shapes of real
Mixture-of-Experts models, called the way mlx-lm calls them, and cache-cold
(DESIGN.md, "Benchmark method"): the expert weights of a layer pass through
the cache between two uses in a real model, so every timed call here reads
weights that the previous call did not.

The package, by concern:

* :mod:`~mlx_moe_kernels.bench.shapes`: model shapes, dtypes, tolerances,
  quantization formats, per-device defaults;
* :mod:`~mlx_moe_kernels.bench.workloads`: what a mode builds (cells,
  workloads, cache-cold routings, random weights);
* :mod:`~mlx_moe_kernels.bench.baselines`: the stock path and the cheap
  per-expert reference the agreement check uses;
* :mod:`~mlx_moe_kernels.bench.modes` and
  :mod:`~mlx_moe_kernels.bench.quantized_workloads`: the modes
  (``switch_glu``, ``gather_mm``) on float and quantized experts;
* :mod:`~mlx_moe_kernels.bench.timing`: agreement check, warm-up,
  interleaved timing, the read-bandwidth probe;
* :mod:`~mlx_moe_kernels.bench.results`, :mod:`~mlx_moe_kernels.bench.report`,
  :mod:`~mlx_moe_kernels.bench.plot`, :mod:`~mlx_moe_kernels.bench.progress`:
  results and JSON, the table, the plot, the progress bar;
* :mod:`~mlx_moe_kernels.bench.runner`: :func:`plan_grid` and :func:`run`;
* :mod:`~mlx_moe_kernels.bench.model`: the whole-model benchmark of
  ``mlx-moe bench --mode model`` (prefill and decode tokens/s of a model
  with random weights, the parts of a decode step, the share of the read
  bandwidth it reaches);
* :mod:`~mlx_moe_kernels.bench.distributed`: ``--mode model
  --distributed`` under ``mlx.launch`` (decode on one rank vs sharded over
  all, weight bytes per rank, the backend's all_sum latency).

This module re-exports what the command line, the tests and
``benchmarks/`` use; everything else is in the submodules.
"""

from mlx_moe_kernels.bench import model
from mlx_moe_kernels.bench.baselines import (
    grouped_reference_gather_mm,
    grouped_reference_gather_qmm,
    grouped_reference_switch_glu,
    stock_switch_glu,
)
from mlx_moe_kernels.bench.model import ModelBenchPlan, plan_model_bench, run_model_bench
from mlx_moe_kernels.bench.model_results import FormatResult, ModelBenchReport, PartResult
from mlx_moe_kernels.bench.modes import (
    DEFAULT_MODE,
    MODES,
    ModeFunction,
    gather_mm_workload,
    mode_summary,
    switch_glu_workload,
)
from mlx_moe_kernels.bench.plot import plot_speedups
from mlx_moe_kernels.bench.quantized_workloads import (
    QUANTIZED_CPU_STOCK_HALF_TOLERANCE,
    QUANTIZED_CPU_STOCK_MAX_ROWS,
)
from mlx_moe_kernels.bench.report import format_table
from mlx_moe_kernels.bench.results import BenchReport, CellResult, ImplementationTiming, machine_info
from mlx_moe_kernels.bench.runner import BenchGrid, plan_grid, run
from mlx_moe_kernels.bench.shapes import (
    DEFAULTS_BY_DEVICE,
    DTYPES,
    MODEL_ALIASES,
    MODEL_SHAPES,
    QUANT_MODES,
    TOLERANCES,
    ModelShape,
    Quantization,
    make_quantization,
    resolve_model,
)
from mlx_moe_kernels.bench.timing import (
    CELL_TIME_BUDGET_S,
    MAX_REPEATS,
    REFERENCE_MAX_REPEATS,
    TimingPolicy,
    max_relative_error,
    measure_cell,
)
from mlx_moe_kernels.bench.workloads import CellResources, CellSpec, WeightCache, Workload

__all__ = [
    # shapes
    "ModelShape", "MODEL_SHAPES", "MODEL_ALIASES", "resolve_model", "DTYPES", "TOLERANCES",
    "QUANT_MODES", "Quantization", "make_quantization", "DEFAULTS_BY_DEVICE",
    # workloads and modes
    "CellSpec", "CellResources", "WeightCache", "Workload", "ModeFunction", "MODES",
    "DEFAULT_MODE", "mode_summary", "gather_mm_workload", "switch_glu_workload",
    "QUANTIZED_CPU_STOCK_MAX_ROWS", "QUANTIZED_CPU_STOCK_HALF_TOLERANCE",
    # baselines
    "stock_switch_glu", "grouped_reference_gather_mm", "grouped_reference_gather_qmm",
    "grouped_reference_switch_glu",
    # timing and results
    "CELL_TIME_BUDGET_S", "MAX_REPEATS", "REFERENCE_MAX_REPEATS", "TimingPolicy",
    "max_relative_error", "measure_cell", "ImplementationTiming", "CellResult", "BenchReport",
    "machine_info", "format_table", "plot_speedups",
    # running
    "BenchGrid", "plan_grid", "run",
    # the model mode
    "model", "ModelBenchPlan", "plan_model_bench", "run_model_bench", "ModelBenchReport",
    "FormatResult", "PartResult",
]
