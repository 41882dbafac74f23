"""Whole-model benchmark (``mlx-moe bench --mode model``).

It builds a whole MoE model with our model definitions, from a built-in
config (:data:`MODEL_CONFIGS`: the real config.json values, truncated to a
few layers, random weights) or a checkpoint folder, in each format of
:data:`FORMATS` (bfloat16, and 8- and 4-bit affine quantization with group
size 64 by :func:`mlx_moe_kernels.quantize_model`; Qwen3-MoE keeps its
routers at 8 bits), and measures, per format, as llama-bench's pp and tg
tests do:

* prefill: tokens/s of a ``prompt_tokens`` prompt into a fresh cache,
  computing the logits of the last position only (one untimed warm-up run,
  then ``repeats`` timed runs, median);
* decode: tokens/s of ``decode_tokens`` single-token greedy steps from a
  fresh cache, pipelined as generation runs them (the next step's graph is
  built and started before a token is read back; a few untimed warm-up
  steps, then ``repeats`` runs, median run);
* the parts of a decode step (:mod:`mlx_moe_kernels.bench.model_parts`):
  experts, router, attention projections, attention, output head, and the
  rest (the median step minus the parts), in ms and GB/s of the bytes each
  must read, timed cache-cold at the middle of the decode run's context;
* the share of the read bandwidth a decode step reaches: the bytes a step
  must touch (every attention, norm, router and output-head weight once, k/E
  of each MoE layer's expert bytes, one embedding row, the KV cache) over
  the median step time, against a read-bandwidth probe (threads streaming a
  large array, :func:`~mlx_moe_kernels.bench.timing.read_bandwidth`)
  measured right after that format's decode run.

Random weights are drawn cheaply (random bfloat16 bit patterns of magnitude
2**-6 to 2**-5, about the 0.02 standard deviation of the real
initialisation) a module at a time, quantized and evaluated before the next
is drawn, so peak memory stays about one copy of the model in its format.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_moe_kernels.bench.model_parts import (
    decode_parts,
    language_model,
    output_logits,
    param_bytes,
    rest_bytes,
    time_parts,
)
from mlx_moe_kernels.bench.model_results import FormatResult, ModelBenchReport, PartResult
from mlx_moe_kernels.bench.progress import make_progress
from mlx_moe_kernels.bench.results import machine_info
from mlx_moe_kernels.bench import timing
from mlx_moe_kernels.bench.timing import CacheEvictor, read_bandwidth
from mlx_moe_kernels.loading import build_model, load_config, load_model, quantization_config, quantize_model
from mlx_moe_kernels.models.base import make_cache

MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    # Qwen/Qwen3-30B-A3B config.json (the fields our model reads).
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "intermediate_size": 6144,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    # Qwen/Qwen1.5-MoE-A2.7B config.json (the fields our model reads).
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "intermediate_size": 5632,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
}
"""Built-in models by name: their Hugging Face config.json values."""

DEFAULT_MODEL = "qwen3-30b-a3b"
DEFAULT_LAYERS = 4
"""Decoder layers of a built-in model (of 48 / 24): enough for the layers'
weights a decode step reads (~0.45 GB in bfloat16 for Qwen3-30B-A3B, plus
0.62 GB of output head) to exceed every cache many times over, few enough
to build in seconds."""

FORMATS: Dict[str, Optional[int]] = {"bf16": None, "q8": 8, "q4": 4}
"""Weight formats by name: bits of affine quantization (``None``: bfloat16)."""

QUANT_GROUP_SIZE = 64
"""Group size of the quantized formats (mlx-lm's default)."""

STORED_FORMAT = "stored"
"""The one format of an already-quantized checkpoint: as stored."""

DEFAULT_PROMPT_TOKENS = 512
"""Prompt length of the prefill test (llama-bench's pp512)."""

DEFAULT_DECODE_TOKENS = 64
"""Steps of the decode test (llama-bench's tg64)."""

DEFAULT_REPEATS = 2
"""Timed prefill runs and decode runs per format (after a warm-up)."""

DEFAULT_PART_REPEATS = 5
"""Timed calls per part of a decode step (after one warm-up call)."""

DECODE_WARMUP_STEPS = 4
"""Untimed decode steps, from a fresh cache, before the timed runs."""

_RANDOM_BF16_MASK = 0x807F  # keep the sign and the 7 mantissa bits
_RANDOM_BF16_EXPONENT = 0x3C80  # exponent of 2**-6: |w| in [2**-6, 2**-5)


# ---------------------------------------------------------------------------
# Building a model
# ---------------------------------------------------------------------------


def model_config(model: Union[str, Dict[str, Any]], layers: Optional[int] = DEFAULT_LAYERS) -> Dict[str, Any]:
    """A copy of the config of a built-in model (by name) or of a config
    dict, with ``num_hidden_layers`` set to ``layers`` (``None``: as is).

    Raises:
        ValueError: For an unknown name or a non-positive layer count.
    """
    if isinstance(model, str):
        if model.lower() not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_CONFIGS)}")
        model = MODEL_CONFIGS[model.lower()]
    config = json.loads(json.dumps(model))  # a deep copy
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be positive, got {layers}")
        config["num_hidden_layers"] = int(layers)
    return config


def random_bfloat16(shape: Sequence[int], rng: np.random.Generator) -> mx.array:
    """A bfloat16 array of random values: a random sign and mantissa on the
    exponent of 2**-6, so ``|w|`` is uniform-ish in ``[2**-6, 2**-5)`` (RMS
    0.024). Drawn as raw bits (NumPy's Philox), several times faster than
    ``mx.random``'s float draws."""
    count = int(np.prod(shape))
    raw = rng.bit_generator.random_raw((count + 3) // 4).view(np.uint16)[:count]
    np.bitwise_and(raw, np.uint16(_RANDOM_BF16_MASK), out=raw)
    np.bitwise_or(raw, np.uint16(_RANDOM_BF16_EXPONENT), out=raw)
    return mx.array(raw).view(mx.bfloat16).reshape(tuple(shape))


def fill_random(module: nn.Module, rng: np.random.Generator) -> None:
    """Replace every parameter of ``module`` in place, in bfloat16: norm
    weights by ones, biases by zeros, every other weight by
    :func:`random_bfloat16` values."""
    owners = dict(module.named_modules())
    params = []
    for path, value in tree_flatten(module.parameters()):
        owner_path, _, leaf = path.rpartition(".")
        owner = owners.get(owner_path, module)
        if isinstance(owner, (nn.RMSNorm, nn.LayerNorm)):
            new = mx.ones(value.shape, dtype=mx.bfloat16)
        elif leaf == "bias":
            new = mx.zeros(value.shape, dtype=mx.bfloat16)
        else:
            new = random_bfloat16(value.shape, rng)
        params.append((path, new))
    module.update(tree_unflatten(params))


def _pieces(model: nn.Module) -> List[nn.Module]:
    """The modules a model is built and evaluated by, one at a time: the
    embedding, each decoder layer, the final norm, the output head."""
    lm = language_model(model)
    pieces = [lm.model.embed_tokens, *lm.layers, lm.model.norm]
    return pieces + ([lm.lm_head] if "lm_head" in lm else [])


def _quantize_piece(model: nn.Module, config: Dict[str, Any], piece_path: str, bits: int) -> None:
    """:func:`quantize_model` on the modules under ``piece_path`` only, with
    the model's own predicate (Qwen3-MoE's 8-bit routers)."""
    predicate = getattr(model, "quant_predicate", None)

    def in_piece(path: str, module: nn.Module):
        if path != piece_path and not path.startswith(piece_path + "."):
            return False
        return True if predicate is None else predicate(path, module)

    quantize_model(model, config, group_size=QUANT_GROUP_SIZE, bits=bits, quant_predicate=in_piece)


def _materialize(model: nn.Module, config: Dict[str, Any], bits: Optional[int], fill_rng=None) -> None:
    """Piece by piece (:func:`_pieces`): fill with random weights (if
    ``fill_rng``), quantize to ``bits`` (if set), evaluate; so at most one
    piece exists in two forms at a time."""
    paths = {id(module): path for path, module in model.named_modules()}
    for piece in _pieces(model):
        path = paths[id(piece)]
        if fill_rng is not None:
            fill_random(piece, fill_rng)
        if bits is not None:
            _quantize_piece(model, config, path, bits)
        mx.eval(dict(model.named_modules())[path].parameters())
    model.eval()


def build_random_model(config: Dict[str, Any], fmt: str = "bf16", seed: int = 0) -> nn.Module:
    """Our model for ``config`` (:func:`mlx_moe_kernels.loading.build_model`)
    with random bfloat16 weights (:func:`fill_random`; the same for every
    format of one seed), quantized as ``fmt`` says (:data:`FORMATS`)."""
    model = build_model(config)  # lazily initialised: replaced before evaluation
    _materialize(model, config, FORMATS[fmt], np.random.Generator(np.random.Philox(seed)))
    return model


def load_checkpoint_model(path: str, fmt: str) -> nn.Module:
    """A checkpoint folder in format ``fmt``: float weights cast to bfloat16,
    then quantized for ``q8``/``q4``; :data:`STORED_FORMAT` loads a quantized
    checkpoint as it is."""
    if fmt == STORED_FORMAT:
        return load_model(path)[0]
    model, config = load_model(path, dtype="bfloat16")
    if FORMATS[fmt] is not None:
        _materialize(model, config, FORMATS[fmt])
    return model


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def time_prefill(lm: nn.Module, prompt: mx.array, repeats: int) -> List[float]:
    """Seconds of ``repeats`` prefill runs of ``prompt`` ``[1, L]`` (after
    one untimed run), each into a fresh cache, computing the logits of the
    last position only."""
    samples = []
    for run in range(repeats + 1):
        cache = make_cache(lm)
        start = time.perf_counter()
        hidden = lm.model(prompt, cache)
        mx.eval(output_logits(lm, hidden[:, -1:, :]))
        elapsed = time.perf_counter() - start
        if run:
            samples.append(elapsed)
    return samples


def decode_steps(lm: nn.Module, first_token: int, steps: int) -> List[float]:
    """Seconds of each of ``steps`` greedy decode steps from a fresh cache
    (one token in, logits, argmax), pipelined as
    :func:`mlx_moe_kernels.generate.generate_tokens` runs them: step
    ``n + 1``'s graph is built and its evaluation started before step
    ``n``'s token is read back. A step's time is the interval between two
    tokens becoming available on the host."""
    cache = make_cache(lm)

    def next_token(token: mx.array) -> mx.array:
        return mx.argmax(lm(token, cache)[:, -1, :], axis=-1, keepdims=True)

    start = time.perf_counter()
    token = next_token(mx.array([[first_token]], dtype=mx.int32))
    mx.async_eval(token)
    times = []
    for n in range(steps):
        following = None
        if n + 1 < steps:
            following = next_token(token)
            mx.async_eval(following)
        token.item()
        now = time.perf_counter()
        times.append(now - start)
        start = now
        token = following
    return times


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def resolve_formats(formats: Optional[Sequence[str]], checkpoint: Optional[str]) -> List[str]:
    """The formats a run measures: ``formats`` checked against
    :data:`FORMATS` (``None``: all of them); for an already-quantized
    checkpoint only :data:`STORED_FORMAT`.

    Raises:
        ValueError: For an unknown format, none, or formats asked of a
            quantized checkpoint.
    """
    if checkpoint is not None and quantization_config(load_config(checkpoint)) is not None:
        if formats is not None and list(formats) != [STORED_FORMAT]:
            raise ValueError(f"{checkpoint} is quantized: it runs as stored (no --format)")
        return [STORED_FORMAT]
    names = list(FORMATS) if formats is None else [str(f).lower() for f in formats]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown format {unknown[0] if unknown else ''!r}; known: {', '.join(FORMATS)}")
    return names


@dataclass(frozen=True)
class ModelBenchPlan:
    """A validated run of the model mode (:func:`plan_model_bench`).

    Attributes:
        name: The model's name in the report (built-in name, model type of
            a config dict, or the checkpoint folder).
        config: The config the model is built from (layers already set).
        checkpoint: The checkpoint folder, or ``None`` for random weights.
        formats: The formats to measure, in order.
        prompt_tokens, decode_tokens, repeats, part_repeats, seed: As in
            :func:`run_model_bench`.
        device: Where to run.
    """

    name: str
    config: Dict[str, Any]
    checkpoint: Optional[str]
    formats: List[str]
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    part_repeats: int
    seed: int
    device: mx.Device


def plan_model_bench(
    model: Union[str, Dict[str, Any]] = DEFAULT_MODEL,
    *,
    checkpoint: Optional[str] = None,
    layers: Optional[int] = DEFAULT_LAYERS,
    formats: Optional[Sequence[str]] = None,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    repeats: int = DEFAULT_REPEATS,
    part_repeats: int = DEFAULT_PART_REPEATS,
    seed: int = 0,
    device: Union[mx.Device, mx.DeviceType, None] = None,
) -> ModelBenchPlan:
    """Check the arguments of :func:`run_model_bench` (same meanings).

    Raises:
        ValueError: For an unknown model or format, ``layers`` with a
            checkpoint, a non-positive count, or a device this MLX build
            does not have.
        FileNotFoundError: For a checkpoint folder without config.json.
    """
    _check_positive(prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, repeats=repeats,
                    part_repeats=part_repeats)
    if checkpoint is not None:
        if layers is not None:
            raise ValueError("layers cannot be set for a checkpoint (it loads every layer)")
        config, name = load_config(checkpoint), str(checkpoint)
    else:
        config = model_config(model, layers)
        name = model.lower() if isinstance(model, str) else str(config.get("model_type", "custom"))
    names = resolve_formats(formats, checkpoint)
    if device is None:
        device = mx.default_device()
    elif isinstance(device, mx.DeviceType):
        device = mx.Device(device)
    if not mx.is_available(device):
        raise ValueError(f"this MLX build has no {device} backend")
    return ModelBenchPlan(name, config, checkpoint, names, int(prompt_tokens), int(decode_tokens),
                          int(repeats), int(part_repeats), int(seed), device)


_STAGES = ("building", "prefill", "decode", "parts of a decode step")
"""What a run does per format, as the progress bar counts it."""


class _Stages:
    """Advances the progress bar (if any) through :data:`_STAGES`."""

    def __init__(self, bar, label: str) -> None:
        self.bar, self.label, self.started = bar, label, False

    def next(self, stage: str) -> None:
        """Count the previous stage as done; show ``stage``."""
        if self.bar is None:
            return
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(f"{self.label}: {stage}")

    def done(self) -> None:
        """Count the last stage as done."""
        if self.bar is not None:
            self.bar.update(1)


@dataclass
class _Probes:
    """What every format's measurement shares: the cache evictor and the
    read-bandwidth probe's array."""

    evictor: CacheEvictor
    read_buffer: np.ndarray


def _measure_format(plan: ModelBenchPlan, fmt: str, probes: _Probes, stages: _Stages) -> FormatResult:
    """Build the model in format ``fmt`` and measure it (see the module
    docstring). Every format gets the same prompt and first token."""
    stages.next(_STAGES[0])
    if plan.checkpoint:
        built = load_checkpoint_model(plan.checkpoint, fmt)
    else:
        built = build_random_model(plan.config, fmt, plan.seed)
    lm = language_model(built)
    vocab = lm.model.embed_tokens.weight.shape[0]
    rng = np.random.default_rng(plan.seed)
    prompt = mx.array(rng.integers(0, vocab, (1, plan.prompt_tokens)).astype(np.int32))
    first_token = int(rng.integers(0, vocab))

    stages.next(f"{_STAGES[1]} {plan.prompt_tokens} tokens")
    prefill = time_prefill(lm, prompt, plan.repeats)

    stages.next(f"{_STAGES[2]} {plan.decode_tokens} tokens")
    decode_steps(lm, first_token, DECODE_WARMUP_STEPS)
    runs = [decode_steps(lm, first_token, plan.decode_tokens) for _ in range(plan.repeats)]
    read = read_bandwidth(probes.read_buffer)

    stages.next(_STAGES[3])
    context = plan.decode_tokens // 2
    parts = decode_parts(lm, context, plan.seed)
    samples = time_parts(parts, plan.part_repeats, probes.evictor)
    stages.done()
    return FormatResult(
        format=fmt,
        bits=FORMATS.get(fmt),
        group_size=QUANT_GROUP_SIZE if FORMATS.get(fmt) else None,
        weight_bytes=param_bytes(built),
        prefill_tokens=plan.prompt_tokens,
        prefill_samples_s=prefill,
        decode_tokens=plan.decode_tokens,
        decode_runs_s=runs,
        context_positions=context,
        parts=[PartResult(p.name, samples[p.name], p.bytes_read) for p in parts],
        rest_bytes=rest_bytes(lm),
        read_gb_per_s=read,
    )


def run_model_bench(
    model: Union[str, Dict[str, Any]] = DEFAULT_MODEL,
    *,
    checkpoint: Optional[str] = None,
    layers: Optional[int] = DEFAULT_LAYERS,
    formats: Optional[Sequence[str]] = None,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    repeats: int = DEFAULT_REPEATS,
    part_repeats: int = DEFAULT_PART_REPEATS,
    seed: int = 0,
    device: Union[mx.Device, mx.DeviceType, None] = None,
    read_probe_bytes: Optional[int] = None,
    evict_bytes: Optional[int] = None,
    progress: bool = True,
) -> ModelBenchReport:
    """Benchmark a whole model in each format (see the module docstring).

    Args:
        model: A built-in model name (:data:`MODEL_CONFIGS`) or a config
            dict (as a checkpoint's config.json); ignored with ``checkpoint``.
        checkpoint: A checkpoint folder to load (:func:`mlx_moe_kernels.load_model`)
            instead of random weights.
        layers: Decoder layers of the built model (``None``: the config's);
            must be ``None`` with ``checkpoint``.
        formats: Keys of :data:`FORMATS` (``None``: all); a quantized
            checkpoint runs as stored.
        prompt_tokens: Prompt length of the prefill test.
        decode_tokens: Steps of the decode test; the parts are timed at
            ``decode_tokens // 2`` cached positions.
        repeats: Timed prefill runs and decode runs per format.
        part_repeats: Timed calls per part of a decode step.
        seed: Seed of the weights, the prompt and the parts' inputs.
        device: Where to run (``None``: MLX's default device).
        read_probe_bytes: Size of the read-bandwidth probe's array
            (``None``: :data:`~mlx_moe_kernels.bench.timing.READ_PROBE_BYTES`).
        evict_bytes: Bytes read between two timed part calls (``None``:
            :data:`~mlx_moe_kernels.bench.timing.EVICT_BYTES`).
        progress: Show a progress bar on stderr.

    Returns:
        The :class:`ModelBenchReport`, one :class:`FormatResult` per format.

    Raises:
        ValueError, FileNotFoundError: For arguments
            :func:`plan_model_bench` rejects.
    """
    plan = plan_model_bench(
        model, checkpoint=checkpoint, layers=layers, formats=formats, prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens, repeats=repeats, part_repeats=part_repeats, seed=seed,
        device=device,
    )
    started = time.perf_counter()
    read_probe_bytes = timing.READ_PROBE_BYTES if read_probe_bytes is None else read_probe_bytes
    evict_bytes = timing.EVICT_BYTES if evict_bytes is None else evict_bytes
    probes = _Probes(CacheEvictor(evict_bytes), np.ones(max(1, read_probe_bytes // 4), dtype=np.float32))
    report = ModelBenchReport(plan.name, plan.config, plan.checkpoint, plan.prompt_tokens,
                              plan.decode_tokens, machine_info(plan.device))
    bar = make_progress(len(plan.formats) * len(_STAGES), progress, unit="stage")
    try:
        with mx.stream(plan.device):
            for fmt in plan.formats:
                report.formats.append(_measure_format(plan, fmt, probes, _Stages(bar, f"{plan.name} {fmt}")))
                gc.collect()  # the format's model goes before the next is built
                mx.clear_cache()
    finally:
        if bar is not None:
            bar.close()
    report.wall_time_s = time.perf_counter() - started
    return report
