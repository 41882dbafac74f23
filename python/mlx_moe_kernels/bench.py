"""The benchmark harness behind ``mlx-moe bench``.

It times our kernels side by side with MLX's stock ops and with the plain-MLX
reference (:mod:`mlx_moe_kernels.reference`) on the expert shapes of real
Mixture-of-Experts models, called the way mlx-lm calls them, and cache-cold
(DESIGN.md, "Benchmark method"): the expert weights of a layer pass through
the cache between two uses in a real model, so every timed call here reads
weights that the previous call did not.

A *mode* is one benchmarked operation: a function
``(CellSpec, CellResources) -> Workload`` registered in :data:`MODES`. It
prepares the inputs of one (model, dtype, tokens) cell and returns the three
implementations as callables ``call_index -> mx.array`` (the call index picks
the prepared routing, which is how calls stay cache-cold), the reference
result of call 0, and the bytes and FLOPs of one call. Everything else is
shared: the agreement check, warm-up, interleaved timing, the table, JSON and
plot. Adding a mode is adding one such function.

How one cell is measured:

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

Quantized experts (``run(..., quantization=Quantization(...))``, ``mlx-moe
bench --bits/--group-size/--quant-mode``): each mode draws the same float
weights, quantizes them with ``mx.quantize`` into mlx-lm's layout
(:class:`Quantization`) and times our ``gather_qmm`` / quantized
``switch_glu`` against ``mx.gather_qmm`` (mlx-lm's SwitchGLU on it) and the
reference with the same format; bytes per call count the packed codes,
scales and biases. On a CPU, MLX's ``gather_qmm`` is very slow: stock runs
only up to :data:`QUANTIZED_CPU_STOCK_MAX_ROWS` rows and, like the
reference (which dequantizes every expert per call), makes a single timed
call.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlx_moe_kernels
from mlx_moe_kernels import reference

# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The expert shapes of one MoE model (one layer; all layers are alike).

    Attributes:
        name: The name shown in tables and accepted by ``--model``.
        hidden_size: D, the model width (input of the up projection).
        expert_hidden_size: H, each expert's intermediate size
            (``moe_intermediate_size`` in the model configs).
        num_experts: E, routed experts per layer.
        experts_per_token: k, experts each token is routed to.
    """

    name: str
    hidden_size: int
    expert_hidden_size: int
    num_experts: int
    experts_per_token: int


MODEL_SHAPES: Dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4),
        ModelShape("qwen2-57b-a14b", 3584, 2560, 64, 8),
        ModelShape("qwen3-30b-a3b", 2048, 768, 128, 8),
        ModelShape("qwen3-235b-a22b", 4096, 1536, 128, 8),
    )
}
"""Built-in models by name: (D, H, E, k) from their Hugging Face configs."""

MODEL_ALIASES: Dict[str, str] = {
    # Qwen3-VL-30B-A3B's text model has Qwen3-30B-A3B's MoE layers.
    "qwen3-vl-30b-a3b": "qwen3-30b-a3b",
}
"""Other names accepted for a built-in model's shapes."""


def resolve_model(name: str) -> ModelShape:
    """The shapes of a built-in model, by name or alias (case-insensitive).

    An alias keeps its own name, so tables show what was asked for.

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
    """
    key = name.strip().lower()
    canonical = MODEL_ALIASES.get(key, key)
    if canonical not in MODEL_SHAPES:
        known = ", ".join(sorted(MODEL_SHAPES) + sorted(MODEL_ALIASES))
        raise ValueError(f"unknown model {name!r}; known: {known}, or 'all'")
    shape = MODEL_SHAPES[canonical]
    return shape if key == canonical else ModelShape(key, *_dims(shape))


def _dims(shape: ModelShape) -> tuple:
    return (
        shape.hidden_size,
        shape.expert_hidden_size,
        shape.num_experts,
        shape.experts_per_token,
    )


# ---------------------------------------------------------------------------
# Defaults and named limits
# ---------------------------------------------------------------------------

DTYPES: Dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
}
"""Dtypes the benchmark accepts, by name."""

TOLERANCES: Dict[str, float] = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 3e-2}
"""Largest accepted error relative to the reference's max magnitude. Half
types round each output once (a few 2**-8 at worst); float32 differs from
the reference only in summation order."""

QUANT_MODES: Dict[str, dict] = {
    "affine": {"bits": (1, 2, 3, 4, 5, 6, 8), "group_sizes": (32, 64, 128), "bits_default": 4,
               "group_size_default": 64},
    "mxfp4": {"bits": (4,), "group_sizes": (32,), "bits_default": 4, "group_size_default": 32},
}
"""Quantization formats of ``--quant-mode`` (the ones our ``gather_qmm`` and
quantized ``switch_glu`` take): the bits and group sizes each accepts and
its defaults."""


@dataclass(frozen=True)
class Quantization:
    """How the experts are quantized for a run: the format of ``mx.quantize``.

    The expert weights are drawn in the activation dtype, quantized with
    ``mx.quantize(w, group_size, bits, mode)`` and kept in mlx-lm's
    ``QuantizedSwitchLinear`` layout: codes ``[E, N, K * bits / 32]``
    (uint32), scales and (``"affine"`` only) biases ``[E, N, K /
    group_size]``, the affine scales and biases cast to the activation dtype
    (``"mxfp4"`` scales stay uint8 E8M0).
    """

    bits: int
    group_size: int
    mode: str = "affine"

    @property
    def label(self) -> str:
        """Short name for tables: ``q4g64`` (affine), ``mxfp4``."""
        return "mxfp4" if self.mode == "mxfp4" else f"q{self.bits}g{self.group_size}"

    def kwargs(self) -> dict:
        """``group_size``, ``bits`` and ``mode`` as keyword arguments."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def quantize(self, weight: mx.array, dtype: mx.Dtype) -> tuple:
        """``(w, scales, biases)`` of ``weight`` (``biases`` ``None`` for
        ``"mxfp4"``), affine scales and biases cast to ``dtype``."""
        parts = mx.quantize(weight, group_size=self.group_size, bits=self.bits, mode=self.mode)
        if self.mode == "affine":
            w, scales, biases = parts
            return w, scales.astype(dtype), biases.astype(dtype)
        w, scales = parts[0], parts[1]
        return w, scales, None


def make_quantization(
    bits: Optional[int] = None, group_size: Optional[int] = None, mode: Optional[str] = None
) -> Optional[Quantization]:
    """The :class:`Quantization` of ``--bits``/``--group-size``/``--quant-mode``:
    ``None`` when all three are ``None`` (float experts), else the mode's
    defaults (:data:`QUANT_MODES`) for the ones not given.

    Raises:
        ValueError: For an unknown mode, or bits or a group size the mode
            does not take.
    """
    if bits is None and group_size is None and mode is None:
        return None
    mode = "affine" if mode is None else mode
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(QUANT_MODES)}")
    formats = QUANT_MODES[mode]
    bits = formats["bits_default"] if bits is None else int(bits)
    group_size = formats["group_size_default"] if group_size is None else int(group_size)
    if bits not in formats["bits"]:
        raise ValueError(
            f"{mode} quantization takes bits {', '.join(map(str, formats['bits']))}; got {bits}"
        )
    if group_size not in formats["group_sizes"]:
        raise ValueError(
            f"{mode} quantization takes group sizes "
            f"{', '.join(map(str, formats['group_sizes']))}; got {group_size}"
        )
    return Quantization(bits, group_size, mode)


DEFAULTS_BY_DEVICE = {
    # A 2-core CPU must finish the default run in a few minutes.
    "cpu": {
        "models": ("qwen3-30b-a3b",),
        "tokens": (1, 8, 64, 256),
        "dtypes": ("float32", "bfloat16"),
    },
    "gpu": {
        "models": tuple(MODEL_SHAPES),
        "tokens": (1, 16, 256, 4096),
        "dtypes": ("float32", "bfloat16"),
    },
}
"""Default models, token counts and dtypes for each device type."""

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

REFERENCE_MAX_GATHERED_BYTES = 4 * 2**30
"""The reference is not timed on cells where it would gather more float32
expert weights than this (one copy per row): such a call takes tens of
seconds on a 2-core CPU, and from 2**31 elements (8 GiB) MLX 0.32.4's CPU
matmul crashes (seen: Qwen3-30B-A3B at T=256, a segfault in BLAS). The
agreement check does not need it (see :func:`grouped_reference_gather_mm`)."""

COLD_WORKING_SET_BYTES = 256 * 2**20
"""Expert weights that the calls cycle through are at least this large (more
weight copies are allocated for small models): far above the 32 MB L3 of the
CPU machines and the 50 MB L2 of an H100, so no call finds its weights in a
cache."""

ROUTINGS_PER_CELL = 8
"""Routings drawn in advance for a cell with T > 1; the calls cycle through
them. (T = 1 uses every disjoint expert set of a random permutation.)"""

IMPLEMENTATIONS = ("ours", "stock", "reference")
"""The implementations of every mode, in the order they take turns."""


# ---------------------------------------------------------------------------
# What a mode builds
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CellSpec:
    """One cell of the benchmark grid: a model's shapes, a dtype, a token
    count, and how the experts are quantized (``None``: float experts in
    the dtype)."""

    model: ModelShape
    dtype_name: str
    tokens: int
    quantization: Optional[Quantization] = None

    @property
    def dtype(self) -> mx.Dtype:
        """The MLX dtype named by :attr:`dtype_name`."""
        return DTYPES[self.dtype_name]


class WeightCache:
    """Expert weights shared by the cells of one (model, dtype).

    Building a model's weights takes seconds, so the cells that differ only
    in their token count reuse them; :meth:`clear` drops them when the
    harness moves to the next model or dtype.
    """

    def __init__(self) -> None:
        self._arrays: Dict[str, List[mx.array]] = {}

    def get(self, name: str, build: Callable[[], List[mx.array]]) -> List[mx.array]:
        """The arrays stored under ``name``, built (and evaluated) on first use."""
        if name not in self._arrays:
            arrays = build()
            mx.eval(arrays)
            self._arrays[name] = arrays
        return self._arrays[name]

    def clear(self) -> None:
        """Drop every stored array and return MLX's cached buffers."""
        self._arrays.clear()
        mx.clear_cache()


@dataclass
class CellResources:
    """What the harness lends a mode to build a cell.

    Attributes:
        rng: NumPy generator for routings (seeded: runs are reproducible).
        weights: Weights shared across the token counts of one model/dtype.
        seed: The run's seed, for MLX's random keys.
        device_type: ``"cpu"`` or ``"gpu"``: where the cell runs (a mode
            may spare a stock op that is slow there).
    """

    rng: np.random.Generator
    weights: WeightCache
    seed: int
    device_type: str = "cpu"


@dataclass
class Workload:
    """One cell, ready to time: what a mode function returns.

    The three implementations take a call index and return the (lazy)
    result of that call; each index selects prepared inputs so that
    consecutive calls touch different expert weights.

    Attributes:
        rows: Rows of the benchmarked matmuls (T * k).
        ours: Our implementation.
        stock: MLX's stock implementation (may raise for unsupported dtypes;
            the harness then reports it as not available), or ``None`` when
            it is too slow to run (then ``stock_skip_reason`` says why).
        reference: The plain-MLX reference, or ``None`` when it is too large
            to run (then ``reference_skip_reason`` says why).
        expected: The reference's result for call 0, computed in a way that
            stays cheap for any size; the agreement check compares call 0
            of ours and stock against it.
        weight_bytes_per_call: Mean bytes of the distinct expert weights one
            call reads.
        flops_per_call: Floating-point operations of one call.
        reference_skip_reason: Why ``reference`` is ``None``.
        stock_skip_reason: Why ``stock`` is ``None``.
        single_call: Implementations too slow for the usual warm-up and
            repeats, with the reason: each makes one timed call and no
            warm-up call besides the agreement check (stock's).
        stock_tolerance: Stock's tolerance when it is not the dtype's
            (:data:`QUANTIZED_CPU_STOCK_HALF_TOLERANCE`).
    """

    rows: int
    ours: Callable[[int], mx.array]
    stock: Optional[Callable[[int], mx.array]]
    reference: Optional[Callable[[int], mx.array]]
    expected: Callable[[], mx.array]
    weight_bytes_per_call: float
    flops_per_call: float
    reference_skip_reason: Optional[str] = None
    stock_skip_reason: Optional[str] = None
    single_call: Dict[str, str] = field(default_factory=dict)
    stock_tolerance: Optional[float] = None


# ---------------------------------------------------------------------------
# Routing and weights (shared by modes)
# ---------------------------------------------------------------------------


def draw_sorted_routing(
    rng: np.random.Generator, tokens: int, num_experts: int, experts_per_token: int
) -> np.ndarray:
    """Top-k routing of ``tokens`` tokens, flattened and sorted, as uint32.

    Each token gets ``experts_per_token`` distinct experts drawn uniformly;
    the ``tokens * experts_per_token`` expert indices are flattened and
    sorted, as mlx-lm's SwitchGLU sorts them before ``gather_mm``.
    """
    scores = rng.random((tokens, num_experts))
    chosen = np.argpartition(scores, experts_per_token - 1, axis=1)[:, :experts_per_token]
    return np.sort(chosen.reshape(-1)).astype(np.uint32)


def cache_cold_routings(
    rng: np.random.Generator, tokens: int, num_experts: int, experts_per_token: int
) -> List[np.ndarray]:
    """Routings for consecutive calls of one cell, sorted, as uint32.

    For one token: the disjoint sets of ``experts_per_token`` experts of a
    random permutation (``num_experts // experts_per_token`` of them), so
    cycling through them reads every expert once before any is read again.
    For more tokens: :data:`ROUTINGS_PER_CELL` independent draws (large
    batches touch most experts anyway; the weights exceed the caches).
    """
    if tokens == 1:
        permutation = rng.permutation(num_experts)
        sets = num_experts // experts_per_token
        groups = permutation[: sets * experts_per_token].reshape(sets, experts_per_token)
        return [np.sort(group).astype(np.uint32) for group in groups]
    return [
        draw_sorted_routing(rng, tokens, num_experts, experts_per_token)
        for _ in range(ROUTINGS_PER_CELL)
    ]


def weight_copies_for_cold_cache(bytes_per_copy: int) -> int:
    """How many copies of a weight tensor make a working set of at least
    :data:`COLD_WORKING_SET_BYTES` (1 for every built-in model)."""
    return max(1, math.ceil(COLD_WORKING_SET_BYTES / bytes_per_copy))


def random_expert_weights(
    num_experts: int, rows: int, cols: int, dtype: mx.Dtype, copies: int, seed: int
) -> List[mx.array]:
    """``copies`` random ``[num_experts, rows, cols]`` weight tensors.

    Uniform with the variance of a ``1/sqrt(cols)``-scaled normal (uniform is
    several times faster to draw), so products with unit-variance inputs
    stay near unit magnitude.
    """
    bound = math.sqrt(3.0 / cols)
    return [
        mx.random.uniform(
            -bound, bound, (num_experts, rows, cols), dtype=dtype,
            key=mx.random.key(seed * 1000 + copy),
        )
        for copy in range(copies)
    ]


def _grouped_by_expert(
    x: mx.array,
    sorted_rhs_indices: np.ndarray,
    multiply: Callable[[mx.array, np.ndarray], mx.array],
) -> mx.array:
    """Per-expert products of the rows of ``x`` ``[rows, 1, K]``.

    The rows of each distinct expert of ``sorted_rhs_indices`` are stacked
    into one ``[rows_e, K]`` matrix (padded to the largest group) and
    ``multiply(stacked, experts)`` multiplies each stacked matrix (``stacked``
    is ``[G, widest, K]``) by its expert (``experts``, the ``G`` distinct
    experts, sorted). Returns the rows' products ``[rows, 1, N]``.
    """
    rows, _, inner = x.shape
    experts, starts, counts = np.unique(
        sorted_rhs_indices, return_index=True, return_counts=True
    )
    widest = int(counts.max())
    slots = np.arange(widest)
    # Pad a group by repeating its last row (padding rows are dropped below).
    source_rows = np.minimum(starts[:, None] + slots, (starts + counts - 1)[:, None])
    stacked = mx.take(
        x.reshape(rows, inner), mx.array(source_rows.reshape(-1).astype(np.uint32)), axis=0
    ).reshape(len(experts), widest, inner)
    products = multiply(stacked, experts)
    group_of_row = np.repeat(np.arange(len(experts)), counts)
    product_row = group_of_row * widest + (np.arange(rows) - starts[group_of_row])
    cols = products.shape[-1]
    return mx.take(
        products.reshape(-1, cols), mx.array(product_row.astype(np.uint32)), axis=0
    ).reshape(rows, 1, cols)


def grouped_reference_gather_mm(
    x: mx.array, b: mx.array, sorted_rhs_indices: np.ndarray
) -> mx.array:
    """The reference ``gather_mm(x, b, rhs_indices=...)``, one matrix per expert.

    ``x`` is ``[rows, 1, K]`` and ``sorted_rhs_indices`` the sorted expert of
    each row. Rather than gathering one copy of ``b``'s matrix per row, the
    rows of each distinct expert are stacked into one ``[rows_e, K]`` matrix
    (padded to the largest group) and :func:`reference.gather_mm` multiplies
    each once by its expert: the same float32 products, with memory bounded
    by the distinct experts. Returns ``[rows, 1, N]``.
    """
    return _grouped_by_expert(
        x,
        sorted_rhs_indices,
        lambda stacked, experts: reference.gather_mm(
            stacked, b, rhs_indices=mx.array(experts.astype(np.uint32))
        ),
    )


DEQUANTIZED_CHUNK_BYTES = 512 * 2**20
"""Float32 bytes of dequantized experts that
:func:`grouped_reference_gather_qmm` holds at a time."""


def quantized_output_dtype(x_dtype: mx.Dtype, weight: tuple, mode: str) -> mx.Dtype:
    """The dtype ``gather_qmm`` returns (as :func:`reference.gather_qmm`):
    ``x`` promoted with the scales and biases for ``"affine"``, ``x``'s
    dtype otherwise."""
    if mode != "affine":
        return x_dtype
    promoted = mx.zeros((), x_dtype)
    for part in weight[1:]:
        if part is not None:
            promoted = promoted + mx.zeros((), part.dtype)
    return promoted.dtype


def grouped_reference_gather_qmm(
    x: mx.array,
    weight: tuple,
    sorted_rhs_indices: np.ndarray,
    quantization: "Quantization",
) -> mx.array:
    """The reference ``gather_qmm(x, *weight, rhs_indices=..., transpose=True)``,
    one matrix per expert.

    ``weight`` is an ``mx.quantize`` triple ``(w, scales, biases)`` of
    ``[E, N, K]`` experts (``biases`` ``None`` for ``"mxfp4"``). As
    :func:`reference.gather_qmm`: the experts dequantized in float32
    (:func:`reference.dequantize`), float32 products of the float32 rows,
    cast to :func:`quantized_output_dtype`; but only the distinct experts
    are dequantized, a chunk of them at a time (evaluated, so memory stays
    bounded by :data:`DEQUANTIZED_CHUNK_BYTES`), and each is multiplied once
    by its stacked rows (as :func:`grouped_reference_gather_mm`).
    Returns ``[rows, 1, N]``.
    """
    w, scales, biases = weight
    out_dtype = quantized_output_dtype(x.dtype, weight, quantization.mode)
    cols, inner = w.shape[1], x.shape[-1]
    chunk = max(1, DEQUANTIZED_CHUNK_BYTES // (cols * inner * mx.float32.size))

    def multiply(stacked: mx.array, experts: np.ndarray) -> mx.array:
        parts = []
        for start in range(0, len(experts), chunk):
            ids = mx.array(experts[start : start + chunk].astype(np.uint32))
            full = reference.dequantize(
                w[ids], scales[ids], None if biases is None else biases[ids],
                group_size=quantization.group_size, bits=quantization.bits,
                mode=quantization.mode, dtype=mx.float32,
            )
            product = reference.gather_mm(
                stacked[start : start + chunk].astype(mx.float32), full.swapaxes(-1, -2)
            )
            mx.eval(product)
            parts.append(product)
            del full
        return mx.concatenate(parts, axis=0).astype(out_dtype)

    return _grouped_by_expert(x, sorted_rhs_indices, multiply)


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


def gather_mm_workload(spec: CellSpec, resources: CellResources) -> Workload:
    """One expert up projection, as mlx-lm's SwitchLinear calls it.

    Mode ``gather_mm``. ``x`` is ``[T*k, 1, D]``, the weight ``w`` is
    ``[E, H, D]`` and the call is ``gather_mm(x, w.swapaxes(-1, -2),
    rhs_indices=idx, sorted_indices=True)`` with ``idx`` the sorted top-k
    experts of T tokens. Calls cycle through cache-cold routings
    (:func:`cache_cold_routings`) and, for small models, weight copies.

    With quantized experts (``spec.quantization``) the call is
    ``gather_qmm(x, w, scales, biases, rhs_indices=idx, transpose=True,
    group_size=..., bits=..., mode=..., sorted_indices=True)``, as mlx-lm's
    QuantizedSwitchLinear calls it (see :func:`quantized_gather_mm_workload`).
    """
    if spec.quantization is not None:
        return quantized_gather_mm_workload(spec, resources)
    D, H, E, k = _dims(spec.model)  # the names of ModelShape's docstring
    dtype = spec.dtype
    rows = spec.tokens * k
    itemsize = dtype.size
    copies = weight_copies_for_cold_cache(E * H * D * itemsize)
    weights = resources.weights.get(
        "up", lambda: random_expert_weights(E, H, D, dtype, copies, resources.seed)
    )
    routings = cache_cold_routings(resources.rng, spec.tokens, E, k)
    indices = [mx.array(routing) for routing in routings]
    x = mx.random.normal((rows, 1, D), dtype=dtype, key=mx.random.key(resources.seed + 1))
    mx.eval(indices, x)

    def inputs(call: int):
        weight = weights[(call // len(indices)) % len(weights)]
        return weight.swapaxes(-1, -2), indices[call % len(indices)]

    def call_with(op):
        def call(call_index: int) -> mx.array:
            b, rhs = inputs(call_index)
            return op(x, b, rhs_indices=rhs, sorted_indices=True)

        return call

    gathered_bytes = rows * D * H * mx.float32.size
    too_large = gathered_bytes > REFERENCE_MAX_GATHERED_BYTES
    distinct = float(np.mean([len(np.unique(routing)) for routing in routings]))
    return Workload(
        rows=rows,
        ours=call_with(mlx_moe_kernels.gather_mm),
        stock=call_with(mx.gather_mm),
        reference=None if too_large else call_with(reference.gather_mm),
        expected=lambda: grouped_reference_gather_mm(
            x, weights[0].swapaxes(-1, -2), routings[0]
        ),
        weight_bytes_per_call=distinct * H * D * itemsize,
        flops_per_call=2.0 * rows * D * H,
        reference_skip_reason=(
            f"the reference gathers one float32 copy of an expert's weights per "
            f"row; cells needing more than {_gib(REFERENCE_MAX_GATHERED_BYTES)} "
            f"are not timed"
            if too_large
            else None
        ),
    )


def stock_switch_glu(x, gate, up, down, indices, scores, *, group_size=None, bits=None, mode="affine"):
    """The stock MoE layer: mlx-lm's SwitchGLU on ``mx.gather_mm`` (sorting
    the rows by expert when there are at least 64, as mlx-lm does), then the
    score-weighted sum over the k experts as mlx-lm's MoE blocks compute it.
    ``x`` [T, D], ``indices`` and ``scores`` [T, k]; returns [T, D].
    Quantized weights (``(weight, scales, biases)`` triples, the format in
    ``group_size``/``bits``/``mode``) go through ``mx.gather_qmm``, as
    mlx-lm's ``QuantizedSwitchLinear`` does."""
    x = mx.expand_dims(x, (-2, -3))
    sort_rows = indices.size >= 64
    idx, inverse = indices, None
    if sort_rows:
        flat = indices.flatten()
        order = mx.argsort(flat)
        inverse = mx.argsort(order)
        x = x.flatten(0, -3)[order // indices.shape[-1]]
        idx = flat[order]

    def project(rows, weight):
        if isinstance(weight, (tuple, list)):
            w, s, b = weight
            return mx.gather_qmm(
                rows, w, s, b, rhs_indices=idx, transpose=True, group_size=group_size,
                bits=bits, mode=mode, sorted_indices=sort_rows,
            )
        return mx.gather_mm(rows, weight.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sort_rows)

    g = project(x, gate)
    u = project(x, up)
    y = project(nn.silu(g) * u, down)
    if sort_rows:
        y = mx.unflatten(y[inverse], 0, indices.shape)
    return (y.squeeze(-2) * scores[..., None]).sum(-2)


def grouped_reference_switch_glu(
    x, gate, up, down, indices: np.ndarray, scores, quantization: Optional["Quantization"] = None
):
    """The reference MoE layer (:func:`reference.switch_glu`'s formula) with
    each projection done per expert by :func:`grouped_reference_gather_mm`
    (quantized experts, ``(w, scales, biases)`` triples in the format of
    ``quantization``: :func:`grouped_reference_gather_qmm`), so memory stays
    bounded for any token count. Returns [T, D]."""
    tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_experts = flat[order]
    rows = mx.take(x, mx.array((order // top_k).astype(np.uint32)), axis=0)[:, None, :]

    def project(a, weight):
        if quantization is not None:
            return grouped_reference_gather_qmm(a, weight, sorted_experts, quantization)
        return grouped_reference_gather_mm(a, weight.swapaxes(-1, -2), sorted_experts)

    g = project(rows, gate)
    u = project(rows, up)
    y = project(nn.silu(g) * u, down)
    inverse = mx.array(np.argsort(order).astype(np.uint32))
    y = mx.take(y[:, 0, :], inverse, axis=0).reshape(tokens, top_k, -1)
    return (y * scores[..., None]).sum(-2)


def switch_glu_call_inputs(resources: CellResources, tokens: int, E: int, k: int, D: int, dtype: mx.Dtype):
    """The per-call inputs of a SwitchGLU cell, float or quantized: routings
    (one token: cache-cold, each call on experts the previous ones did not
    touch; more tokens: random top-k rows) as NumPy arrays and as evaluated
    MLX indices, x and the routing scores."""
    if tokens == 1:
        routings = [r.reshape(1, k) for r in cache_cold_routings(resources.rng, 1, E, k)]
    else:
        routings = [
            np.argsort(resources.rng.random((tokens, E)), axis=1)[:, :k].astype(np.uint32)
            for _ in range(ROUTINGS_PER_CELL)
        ]
    indices = [mx.array(routing) for routing in routings]
    x = mx.random.normal((tokens, D), dtype=dtype, key=mx.random.key(resources.seed + 3))
    scores = mx.softmax(
        mx.random.normal((tokens, k), key=mx.random.key(resources.seed + 4)), axis=-1
    ).astype(dtype)
    mx.eval(indices, x, scores)
    return routings, indices, x, scores


def switch_glu_workload(spec: CellSpec, resources: CellResources) -> Workload:
    """The whole MoE layer: gate, up, SwiGLU, down and the score-weighted sum.

    Mode ``switch_glu``. ``x`` is ``[T, D]``, gate/up ``[E, H, D]``, down
    ``[E, D, H]``, indices the top-k experts of each token and scores their
    softmax weights. Ours is the fused ``switch_glu(..., scores)``; stock is
    mlx-lm's SwitchGLU on ``mx.gather_mm`` plus the weighted sum
    (:func:`stock_switch_glu`); the reference is ``reference.switch_glu``.
    Calls cycle through cache-cold routings (:func:`cache_cold_routings`).

    With quantized experts (``spec.quantization``) gate, up and down are
    ``mx.quantize`` triples and the three take them with the format's
    ``group_size``/``bits``/``mode`` (stock on ``mx.gather_qmm``; see
    :func:`quantized_switch_glu_workload`).
    """
    if spec.quantization is not None:
        return quantized_switch_glu_workload(spec, resources)
    D, H, E, k = _dims(spec.model)
    dtype = spec.dtype
    tokens = spec.tokens
    itemsize = dtype.size
    gate, up, down = resources.weights.get(
        "gate_up_down",
        lambda: [
            random_expert_weights(E, H, D, dtype, 1, resources.seed)[0],
            random_expert_weights(E, H, D, dtype, 1, resources.seed + 1)[0],
            random_expert_weights(E, D, H, dtype, 1, resources.seed + 2)[0],
        ],
    )
    routings, indices, x, scores = switch_glu_call_inputs(resources, tokens, E, k, D, dtype)

    def call_with(op):
        def call(call_index: int) -> mx.array:
            return op(x, gate, up, down, indices[call_index % len(indices)], scores)

        return call

    gathered_bytes = 3 * tokens * k * D * H * mx.float32.size
    too_large = gathered_bytes > REFERENCE_MAX_GATHERED_BYTES
    distinct = float(np.mean([len(np.unique(routing)) for routing in routings]))
    return Workload(
        rows=tokens * k,
        ours=call_with(mlx_moe_kernels.switch_glu),
        stock=call_with(stock_switch_glu),
        reference=None if too_large else call_with(reference.switch_glu),
        expected=lambda: grouped_reference_switch_glu(
            x, gate, up, down, routings[0], scores
        ),
        weight_bytes_per_call=3 * distinct * H * D * itemsize,
        flops_per_call=6.0 * tokens * k * D * H,
        reference_skip_reason=(
            f"the reference gathers one float32 copy of an expert's weights per "
            f"row; cells needing more than {_gib(REFERENCE_MAX_GATHERED_BYTES)} "
            f"are not timed"
            if too_large
            else None
        ),
    )


# --- Quantized experts ------------------------------------------------------

QUANTIZED_CPU_STOCK_HALF_TOLERANCE = 0.25
"""The tolerance of stock on quantized experts with float16 or bfloat16
activations on a CPU: MLX 0.32.4's CPU ``gather_qmm`` computes in the half
type (seen: 8.8e-2 for bfloat16 on Qwen3-30B-A3B's layer, growing with K,
against 1e-2 for ours), so the dtype's tolerance would fail it on MLX's own
rounding. A wrong format, scale or index still shows as an error near 1."""

QUANTIZED_CPU_STOCK_MAX_ROWS = 64
"""On a CPU, the stock path of quantized experts (MLX's ``gather_qmm``) runs
only on cells of at most this many rows (T * k), and there makes a single
timed call: MLX 0.32.4's CPU ``gather_qmm`` takes ~0.1 s (float32) to
~0.7 s (bfloat16) for one Qwen3-30B-A3B up projection of 64 rows on 2
cores, growing with the rows (seconds per layer call at T = 64). Larger
cells show ``skip`` in the stock column."""


def quantized_expert_bytes(rows: int, cols: int, dtype: mx.Dtype, quantization: Quantization) -> int:
    """Bytes of one ``[rows, cols]`` expert as :meth:`Quantization.quantize`
    stores it: the packed codes, the scales and (``"affine"``) the biases."""
    groups = rows * (cols // quantization.group_size)
    codes = rows * cols * quantization.bits // 8
    if quantization.mode == "affine":
        return codes + 2 * groups * dtype.size
    return codes + groups  # uint8 scales, no biases


def random_quantized_experts(
    num_experts: int, rows: int, cols: int, dtype: mx.Dtype, quantization: Quantization,
    copies: int, seed: int,
) -> List[tuple]:
    """``copies`` quantized ``[num_experts, rows, cols]`` expert tensors:
    the weights of :func:`random_expert_weights` (same seeds), each
    quantized and evaluated before the next is drawn."""
    out = []
    for copy in range(copies):
        weight = random_expert_weights(num_experts, rows, cols, dtype, copy + 1, seed)[copy]
        quantized = quantization.quantize(weight, dtype)
        mx.eval(quantized)
        del weight
        out.append(quantized)
    return out


def _triple_bytes(weight: tuple) -> int:
    return sum(part.nbytes for part in weight if part is not None)


def _quantized_cpu_limits(resources: CellResources, rows: int) -> tuple:
    """``(stock_skip_reason, single_call)`` of a quantized cell: on a CPU,
    stock runs only up to :data:`QUANTIZED_CPU_STOCK_MAX_ROWS` rows, and
    stock and the reference make a single timed call."""
    if resources.device_type != "cpu":
        return None, {}
    single_call = {
        "reference": "quantized: it dequantizes every expert in float32 on each call; "
        "one timed call, no warm-up",
    }
    if rows > QUANTIZED_CPU_STOCK_MAX_ROWS:
        return (
            f"MLX's CPU gather_qmm takes seconds per call; for quantized experts "
            f"stock runs only up to {QUANTIZED_CPU_STOCK_MAX_ROWS} rows (T*k)",
            single_call,
        )
    single_call["stock"] = (
        "quantized: MLX's CPU gather_qmm is slow; one timed call, no warm-up "
        "besides the agreement check"
    )
    return None, single_call


def _quantized_stock_tolerance(spec: CellSpec, resources: CellResources) -> Optional[float]:
    if resources.device_type == "cpu" and spec.dtype_name in ("float16", "bfloat16"):
        return QUANTIZED_CPU_STOCK_HALF_TOLERANCE
    return None


def _quantized_reference_skip(gathered_bytes: float) -> Optional[str]:
    if gathered_bytes <= REFERENCE_MAX_GATHERED_BYTES:
        return None
    return (
        f"the reference dequantizes every expert in float32 and gathers one copy "
        f"per row; cells needing more than {_gib(REFERENCE_MAX_GATHERED_BYTES)} "
        f"are not timed"
    )


def quantized_gather_mm_workload(spec: CellSpec, resources: CellResources) -> Workload:
    """Mode ``gather_mm`` on quantized experts: one up projection, as
    mlx-lm's QuantizedSwitchLinear calls ``mx.gather_qmm``.

    ``x`` is ``[T*k, 1, D]`` and the ``[E, H, D]`` weight an ``mx.quantize``
    triple (:class:`Quantization`); ours is :func:`mlx_moe_kernels.gather_qmm`,
    stock ``mx.gather_qmm`` (on a CPU limited by
    :data:`QUANTIZED_CPU_STOCK_MAX_ROWS`), the reference
    ``reference.gather_qmm``. Bytes per call count the packed codes, scales
    and biases of the distinct experts read.
    """
    D, H, E, k = _dims(spec.model)
    dtype = spec.dtype
    quantization = spec.quantization
    rows = spec.tokens * k
    copies = weight_copies_for_cold_cache(E * quantized_expert_bytes(H, D, dtype, quantization))
    weights = resources.weights.get(
        "up",
        lambda: random_quantized_experts(E, H, D, dtype, quantization, copies, resources.seed),
    )
    routings = cache_cold_routings(resources.rng, spec.tokens, E, k)
    indices = [mx.array(routing) for routing in routings]
    x = mx.random.normal((rows, 1, D), dtype=dtype, key=mx.random.key(resources.seed + 1))
    mx.eval(indices, x)
    formats = quantization.kwargs()

    def call_with(op):
        def call(call_index: int) -> mx.array:
            weight = weights[(call_index // len(indices)) % len(weights)]
            return op(
                x, *weight, rhs_indices=indices[call_index % len(indices)], transpose=True,
                sorted_indices=True, **formats,
            )

        return call

    stock_skip_reason, single_call = _quantized_cpu_limits(resources, rows)
    reference_skip_reason = _quantized_reference_skip(
        (rows + E) * D * H * mx.float32.size
    )
    distinct = float(np.mean([len(np.unique(routing)) for routing in routings]))
    return Workload(
        rows=rows,
        ours=call_with(mlx_moe_kernels.gather_qmm),
        stock=None if stock_skip_reason else call_with(mx.gather_qmm),
        reference=None if reference_skip_reason else call_with(reference.gather_qmm),
        expected=lambda: grouped_reference_gather_qmm(x, weights[0], routings[0], quantization),
        weight_bytes_per_call=distinct * _triple_bytes(weights[0]) / E,
        flops_per_call=2.0 * rows * D * H,
        reference_skip_reason=reference_skip_reason,
        stock_skip_reason=stock_skip_reason,
        single_call=single_call,
        stock_tolerance=_quantized_stock_tolerance(spec, resources),
    )


def quantized_switch_glu_workload(spec: CellSpec, resources: CellResources) -> Workload:
    """Mode ``switch_glu`` on quantized experts: the whole MoE layer with
    gate, up and down as ``mx.quantize`` triples (:class:`Quantization`).

    Ours is the quantized :func:`mlx_moe_kernels.switch_glu`, stock
    :func:`stock_switch_glu` on ``mx.gather_qmm`` (on a CPU limited by
    :data:`QUANTIZED_CPU_STOCK_MAX_ROWS`), the reference
    ``reference.switch_glu``; all with the format's ``group_size``, ``bits``
    and ``mode``. Bytes per call count the packed codes, scales and biases
    of the distinct experts' three projections.
    """
    D, H, E, k = _dims(spec.model)
    dtype = spec.dtype
    quantization = spec.quantization
    tokens = spec.tokens

    def build():
        return [
            random_quantized_experts(E, rows, cols, dtype, quantization, 1, resources.seed + offset)[0]
            for offset, (rows, cols) in enumerate(((H, D), (H, D), (D, H)))
        ]

    gate, up, down = resources.weights.get("gate_up_down", build)
    routings, indices, x, scores = switch_glu_call_inputs(resources, tokens, E, k, D, dtype)
    formats = quantization.kwargs()

    def call_with(op):
        def call(call_index: int) -> mx.array:
            return op(x, gate, up, down, indices[call_index % len(indices)], scores, **formats)

        return call

    stock_skip_reason, single_call = _quantized_cpu_limits(resources, tokens * k)
    reference_skip_reason = _quantized_reference_skip(
        3 * (tokens * k + E) * D * H * mx.float32.size
    )
    distinct = float(np.mean([len(np.unique(routing)) for routing in routings]))
    expert_bytes = sum(_triple_bytes(weight) for weight in (gate, up, down)) / E
    return Workload(
        rows=tokens * k,
        ours=call_with(mlx_moe_kernels.switch_glu),
        stock=None if stock_skip_reason else call_with(stock_switch_glu),
        reference=None if reference_skip_reason else call_with(reference.switch_glu),
        expected=lambda: grouped_reference_switch_glu(
            x, gate, up, down, routings[0], scores, quantization
        ),
        weight_bytes_per_call=distinct * expert_bytes,
        flops_per_call=6.0 * tokens * k * D * H,
        reference_skip_reason=reference_skip_reason,
        stock_skip_reason=stock_skip_reason,
        single_call=single_call,
        stock_tolerance=_quantized_stock_tolerance(spec, resources),
    )


ModeFunction = Callable[[CellSpec, CellResources], Workload]

MODES: Dict[str, ModeFunction] = {
    "switch_glu": switch_glu_workload,
    "gather_mm": gather_mm_workload,
}
"""Benchmark modes by name: each builds the :class:`Workload` of a cell. The
first line of a mode function's docstring is its summary in ``--help``."""


def mode_summary(mode: str) -> str:
    """The first line of a mode function's docstring."""
    doc = MODES[mode].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


DEFAULT_MODE = "switch_glu"
"""The mode ``mlx-moe bench`` runs when none is named."""


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


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
# Progress
# ---------------------------------------------------------------------------


class TextProgress:
    """A minimal stand-in for ``tqdm`` when it is not installed.

    On a terminal it rewrites one status line; otherwise it prints a line
    per step. Supports the subset of tqdm's API the harness uses.
    """

    def __init__(self, total: int, stream=None) -> None:
        self.total = total
        self.done = 0
        self.description = ""
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self._on_terminal = getattr(self.stream, "isatty", lambda: False)()

    def set_description(self, description: str) -> None:
        """Show what is being worked on now."""
        self.description = description
        if self._on_terminal:
            self._draw()

    def update(self, steps: int = 1) -> None:
        """Count ``steps`` more steps as done."""
        self.done += steps
        self._draw()

    def close(self) -> None:
        """End the status line."""
        if self._on_terminal:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self.started
        line = f"[{self.done}/{self.total}] {elapsed:5.0f}s {self.description}"
        if self._on_terminal:
            self.stream.write("\r" + line.ljust(78)[:120])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def make_progress(total: int, enabled: bool = True):
    """A progress bar over ``total`` steps: tqdm's if installed, else
    :class:`TextProgress`; ``None`` when disabled."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return TextProgress(total)
    return tqdm(total=total, unit="cell", leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Presenting
# ---------------------------------------------------------------------------

_STATUS_MARKS = {
    "unsupported": "n/a",
    "skipped": "skip",
    "disabled": "off",
    "failed": "FAIL",
}


def _format_ms(seconds: Optional[float]) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 1000 else f"{ms:.0f}"


def _format_speedup(ratio: Optional[float]) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x" if ratio < 100 else f"{ratio:.0f}x"


def _format_rate(rate: Optional[float]) -> str:
    if rate is None:
        return "-"
    return f"{rate:.2f}" if rate < 10 else f"{rate:.1f}" if rate < 1000 else f"{rate:.0f}"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def format_table(cells: Sequence[CellResult]) -> str:
    """Cells as an aligned plain-text table followed by footnotes.

    Times are medians in ms; ``x stock`` and ``x ref`` are the speedups of
    ours; GB/s counts the distinct expert weights a call reads (quantized
    experts: their packed codes, scales and biases); errors are max abs
    errors relative to the reference's max magnitude; a value not measured
    shows its reason's mark (n/a, skip, off, FAIL), and a time from a single
    call a ``*``, explained below the table. Quantized cells show their
    format after the dtype (``bfloat16 q4g64``, ``float32 mxfp4``).
    """
    header = [
        "model", "dtype", "T", "rows", "ours ms", "stock ms", "ref ms",
        "x stock", "x ref", "GB/s", "GFLOP/s", "err ours", "err stock",
    ]
    notes: Dict[tuple, None] = {}
    rows = []
    for cell in cells:
        def time_column(name: str) -> str:
            timing = cell.timings[name]
            if timing.status == "ok":
                if timing.note:
                    notes[("*", name, timing.note)] = None
                    return _format_ms(timing.median_s) + "*"
                return _format_ms(timing.median_s)
            mark = _STATUS_MARKS[timing.status]
            notes[(mark, name, timing.note)] = None
            return mark

        def error_column(name: str) -> str:
            error = cell.timings[name].error
            if error is None:
                return "-"
            flag = "" if error <= cell.tolerance_of(name) else " !"
            return f"{error:.1e}{flag}"

        rows.append([
            cell.model, cell.dtype_label, str(cell.tokens), str(cell.rows),
            time_column("ours"), time_column("stock"), time_column("reference"),
            _format_speedup(cell.speedup_over("stock")),
            _format_speedup(cell.speedup_over("reference")),
            _format_rate(cell.weight_gb_per_s), _format_rate(cell.gflop_per_s),
            error_column("ours"), error_column("stock"),
        ])
    left_aligned = {0, 1}
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(values):
        return "  ".join(
            v.ljust(w) if i in left_aligned else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    tolerances = sorted({(c.dtype, c.tolerance) for c in cells})
    out.append("")
    if any(c.quantization is not None for c in cells):
        read = "packed weights + scales + biases of the distinct experts"
    else:
        read = "distinct expert weights"
    out.append(
        "times: median ms per call (cache-cold, interleaved); x stock / x ref: "
        f"speedup of ours; GB/s: {read} read per call / ours"
    )
    out.append(
        "err: max |out - reference| / max |reference| on one call; tolerance "
        + ", ".join(f"{d} {t:.0e}" for d, t in tolerances)
        + " ('!' = above)"
    )
    stock_tolerances = sorted({(c.dtype, c.stock_tolerance) for c in cells if c.stock_tolerance})
    if stock_tolerances:
        out.append(
            "  stock on quantized experts: "
            + ", ".join(f"{d} {t:g}" for d, t in stock_tolerances)
            + " (MLX's CPU gather_qmm computes in the half type)"
        )
    for mark, name, note in notes:
        out.append(f"{mark} ({name}): {note}")
    return "\n".join(out)


def plot_speedups(report: BenchReport, path: str) -> None:
    """Save a plot of our speedup against the token count to ``path``.

    One line per model and dtype, over stock (left) and over the reference
    (right); log-scaled token axis.

    Raises:
        ImportError: When matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import ScalarFormatter

    series: Dict[str, Dict[str, List[tuple]]] = {"stock": {}, "reference": {}}
    for cell in report.cells:
        for versus, lines in series.items():
            speedup = cell.speedup_over(versus)
            if speedup is not None:
                lines.setdefault(f"{cell.model} {cell.dtype_label}", []).append(
                    (cell.tokens, speedup)
                )
    labels = sorted({label for lines in series.values() for label in lines})
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    titles = {"stock": "ours vs stock MLX", "reference": "ours vs plain-MLX reference"}
    for axis, (versus, lines) in zip(axes, series.items()):
        for label, points in lines.items():
            points.sort()
            axis.plot(
                [p[0] for p in points], [p[1] for p in points],
                marker="o", label=label, color=colors[label],
            )
        axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.set_xlabel("tokens T")
        axis.set_ylabel("speedup of ours (x, log)")
        axis.set_title(titles[versus])
        if lines:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "not measured", ha="center", transform=axis.transAxes)
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"mlx-moe bench --mode {report.mode} ({report.machine.get('device')})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
