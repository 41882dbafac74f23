"""Qwen3-VL-MoE, text only: the Qwen3-MoE language model inside a
Qwen3-VL-MoE checkpoint (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B), loaded from
the full multimodal checkpoint with the vision tower's weights dropped.

Source: the Qwen3-VL model cards on Hugging Face
(https://huggingface.co/Qwen/Qwen3-VL-30B-A3B-Instruct) and, for the
language model, the Qwen3 technical report (https://arxiv.org/abs/2505.09388).

**This model is text-only.** It takes token ids, never images or video: the
``visual.*`` / ``model.visual.*`` weights (the ViT encoder and its merger)
are discarded by ``sanitize``. What remains is exactly a Qwen3-MoE decoder
(:mod:`mlx_moe_kernels.models.qwen3_moe`), configured from the checkpoint's
``text_config``.

Why plain RoPE is exact here: Qwen3-VL uses multimodal RoPE (MRoPE), which
gives each token three position ids, temporal, height and width, and rotates
interleaved sections of the head dimension by each (``mrope_section``). For
text tokens all three ids equal the token's position in the sequence, so
every rotary frequency is rotated by the same position, whichever section it
belongs to: the sectioned/interleaved rotation is then identical to ordinary
RoPE with the same ``rope_theta``. (With image tokens the components differ
and this shortcut would be wrong; that is why only text is supported.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_moe_kernels.models import qwen3_moe
from mlx_moe_kernels.models.base import BaseModelArgs
from mlx_moe_kernels.sharding import Shardable


@dataclass
class ModelArgs(BaseModelArgs):
    """Qwen3-VL-MoE config: the ``text_config`` dict is what the model uses
    (the vision config is ignored). ``tie_word_embeddings`` is the top-level
    flag, as transformers' Qwen3VLMoeForConditionalGeneration reads it (a
    ``text_config`` value is ignored: transformers' own default config
    writes top ``false`` with text ``true`` and saves an untied head)."""

    model_type: str
    text_config: dict
    tie_word_embeddings: bool = False

    def text_args(self) -> qwen3_moe.ModelArgs:
        """The Qwen3-MoE arguments of the language model."""
        text = dict(self.text_config)
        text["tie_word_embeddings"] = self.tie_word_embeddings
        text.setdefault("model_type", "qwen3_moe")
        return qwen3_moe.ModelArgs.from_dict(text)


class Model(nn.Module, Shardable):
    """Text-only Qwen3-VL-MoE: the Qwen3-MoE language model of a
    Qwen3-VL-MoE checkpoint, vision tower dropped. ``__call__(tokens [B, L],
    cache)`` returns logits ``[B, L, vocab]``. Parameters live under
    ``language_model.`` (``language_model.model.layers...``,
    ``language_model.lm_head``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.language_model = qwen3_moe.Model(args.text_args())

    def __call__(self, tokens: mx.array, cache=None, *, last_only: bool = False) -> mx.array:
        """Logits ``[B, L, vocab]`` of the language model (the last
        position's only, ``[B, 1, vocab]``, with ``last_only``)."""
        return self.language_model(tokens, cache, last_only=last_only)

    def set_fused(self, fused: bool) -> None:
        """Use our fused experts (True) or the reference composition."""
        self.language_model.set_fused(fused)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Hugging Face Qwen3-VL-MoE names/layouts -> this model's.

        1. Drop the vision tower: every key starting ``visual.`` or
           ``model.visual.``.
        2. Map the language model's prefixes to ours: ``model.language_model.X``
           (current Hub layout) and ``language_model.model.X`` (older
           layout) -> ``language_model.model.X``; ``lm_head.X`` and
           ``language_model.lm_head.X`` -> ``language_model.lm_head.X``.
           Other keys are kept as they are (and then reported as unexpected
           by the loader).
        3. Convert the experts with Qwen3-MoE's ``sanitize`` on the
           un-prefixed names: fused ``experts.gate_up_proj`` ``[E, D, 2H]``
           (or transformers 5's ``[E, 2H, D]``) is split into gate and up and
           brought to ``[E, H, D]``, ``experts.down_proj`` ``[E, H, D]`` to
           ``[E, D, H]``; per-expert tensors are stacked.
        """
        text: Dict[str, mx.array] = {}
        other: Dict[str, mx.array] = {}
        for key, value in weights.items():
            # Step 1: the vision tower.
            if key.startswith(("visual.", "model.visual.")):
                continue
            # Step 2: prefixes, to the text model's own names.
            if key.startswith("model.language_model."):
                text["model." + key[len("model.language_model.") :]] = value
            elif key.startswith("language_model.model.") or key.startswith("language_model.lm_head."):
                text[key[len("language_model.") :]] = value
            elif key.startswith("lm_head."):
                text[key] = value
            else:
                other[key] = value
        # Step 3: the experts, by the text model's rules.
        text = self.language_model.sanitize(text)
        out = {f"language_model.{key}": value for key, value in text.items()}
        out.update(other)
        return out

    @property
    def quant_predicate(self) -> Callable[[str, nn.Module], Union[bool, Dict[str, int]]]:
        """The text model's ``nn.quantize`` predicate (routers at 8 bits,
        see :attr:`qwen3_moe.Model.quant_predicate`); it matches paths by
        their ending, so it holds for this model's paths too."""
        return self.language_model.quant_predicate

    @property
    def layers(self) -> List[qwen3_moe.Qwen3MoeDecoderLayer]:
        """The decoder layers (one KV cache each)."""
        return self.language_model.layers


# A plainer name for what this is.
Qwen3VLMoeTextModel = Model
