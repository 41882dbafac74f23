"""Model shapes, dtypes and quantization formats of ``mlx-moe bench``.

:data:`MODEL_SHAPES` holds the expert shapes (D, H, E, k) of real MoE
models, :data:`DTYPES` and :data:`TOLERANCES` the activation dtypes and
their agreement bounds, :class:`Quantization` / :func:`make_quantization`
the expert formats of ``--bits``/``--group-size``/``--quant-mode``, and
:data:`DEFAULTS_BY_DEVICE` what a run covers when nothing is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import mlx.core as mx

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

    @property
    def dims(self) -> tuple:
        """``(D, H, E, k)``: the sizes without the name."""
        return (self.hidden_size, self.expert_hidden_size, self.num_experts, self.experts_per_token)


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
    return shape if key == canonical else ModelShape(key, *shape.dims)


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
