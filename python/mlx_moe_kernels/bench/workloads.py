"""What a benchmark mode builds: the cell types, routings, weights, inputs.

A *mode* is one benchmarked operation: a function
``(CellSpec, CellResources) -> Workload`` registered in
:data:`mlx_moe_kernels.bench.modes.MODES`. It prepares the inputs of one
(model, dtype, tokens) cell and returns the three implementations as
callables ``call_index -> mx.array`` (the call index picks the prepared
routing, which is how calls stay cache-cold), the reference result of call
0, and the bytes and FLOPs of one call. This module holds those types and
the pieces every mode shares: cache-cold routings (DESIGN.md, "Benchmark
method"), random expert weights and the per-call inputs of a SwitchGLU cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from mlx_moe_kernels.bench.shapes import DTYPES, ModelShape, Quantization

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



def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def gathered_reference_skip_reason(gathered_bytes: float) -> Optional[str]:
    """Why a float cell does not time the reference, or ``None``: the
    reference gathers one float32 copy of an expert's weights per row, and
    cells gathering more than :data:`REFERENCE_MAX_GATHERED_BYTES` skip it."""
    if gathered_bytes <= REFERENCE_MAX_GATHERED_BYTES:
        return None
    return (
        f"the reference gathers one float32 copy of an expert's weights per "
        f"row; cells needing more than {_gib(REFERENCE_MAX_GATHERED_BYTES)} "
        f"are not timed"
    )


def dequantized_reference_skip_reason(gathered_bytes: float) -> Optional[str]:
    """As :func:`gathered_reference_skip_reason`, for quantized experts
    (which the reference dequantizes in float32 before gathering)."""
    if gathered_bytes <= REFERENCE_MAX_GATHERED_BYTES:
        return None
    return (
        f"the reference dequantizes every expert in float32 and gathers one copy "
        f"per row; cells needing more than {_gib(REFERENCE_MAX_GATHERED_BYTES)} "
        f"are not timed"
    )
