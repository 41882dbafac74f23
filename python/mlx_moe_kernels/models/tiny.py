"""Tiny random checkpoints on disk, in the Hugging Face layouts, for tests
and for trying ``mlx-moe generate`` without downloading a model.

``write_tiny_checkpoint(folder, "qwen3_moe")`` writes ``config.json`` (Hub
or transformers-5 style), the weights (one ``model.safetensors`` or two
shards with ``model.safetensors.index.json``) and a word-level
``tokenizer.json``. The weights are laid out as the Hub stores them:
per-expert tensors for Qwen2-MoE / Qwen3-MoE, fused ``gate_up_proj`` for
Qwen3-VL-MoE plus a few ``visual.*`` tensors that loading must drop.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

__all__ = ["WORDS", "tiny_config", "hf_weights", "write_tiny_tokenizer", "write_tiny_checkpoint"]

# The tokenizer's words: id 0 is the unknown token, id 1 the end of sequence.
WORDS: List[str] = ["[UNK]", "<eos>"] + (
    "the a quick brown fox jumps over lazy dog cat sat on mat and ran far "
    "away from big red house in town with green tree under sky blue sun"
).split()

_TEXT_COMMON = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
    vocab_size=len(WORDS),
    max_position_embeddings=512,
)

_HUB_CONFIGS: Dict[str, Dict[str, Any]] = {
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_hidden_layers=2,
        intermediate_size=48,
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        rope_theta=10000.0,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        eos_token_id=1,
        **_TEXT_COMMON,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        num_hidden_layers=3,
        intermediate_size=40,
        num_experts=4,
        moe_intermediate_size=12,
        head_dim=16,
        rope_theta=10000.0,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        tie_word_embeddings=True,
        eos_token_id=[1, 0],
        **_TEXT_COMMON,
    ),
}
_HUB_CONFIGS["qwen3_vl_moe"] = dict(
    model_type="qwen3_vl_moe",
    tie_word_embeddings=False,
    eos_token_id=1,
    text_config=dict(
        _HUB_CONFIGS["qwen3_moe"],
        model_type="qwen3_vl_moe_text",
        num_hidden_layers=2,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    ),
    vision_config=dict(model_type="qwen3_vl_moe", depth=1, hidden_size=16, out_hidden_size=32),
)


def _to_transformers5(config: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(config)
    for cfg in [out] + ([out["text_config"]] if "text_config" in out else []):
        if "rope_theta" in cfg:
            params = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
            params.update(cfg.pop("rope_scaling", None) or {})
            cfg["rope_parameters"] = params
        if "num_experts" in cfg:
            cfg["num_local_experts"] = cfg.pop("num_experts")
    return out


def tiny_config(model_type: str, style: str = "hub") -> Dict[str, Any]:
    """The tiny config of ``model_type`` in ``style`` "hub" (``rope_theta``,
    ``num_experts``) or "transformers5" (``rope_parameters``,
    ``num_local_experts``)."""
    config = copy.deepcopy(_HUB_CONFIGS[model_type])
    if style == "transformers5":
        return _to_transformers5(config)
    if style != "hub":
        raise ValueError(f"style must be 'hub' or 'transformers5' (got {style!r})")
    return config


def hf_weights(model, model_type: str, style: str = "hub") -> Dict[str, mx.array]:
    """``model``'s parameters renamed and reshaped to the checkpoint layout
    of ``model_type`` (the inverse of ``sanitize``)."""
    params = dict(tree_flatten(model.parameters()))
    out: Dict[str, mx.array] = {}
    fused = model_type == "qwen3_vl_moe"
    for key, value in params.items():
        if ".switch_mlp." not in key:
            out[key] = value
    for key, value in params.items():
        if not key.endswith(".switch_mlp.gate_proj.weight"):
            continue
        prefix = key[: -len(".switch_mlp.gate_proj.weight")]
        gate = value  # [E, H, D]
        up = params[f"{prefix}.switch_mlp.up_proj.weight"]
        down = params[f"{prefix}.switch_mlp.down_proj.weight"]  # [E, D, H]
        if fused:
            if style == "hub":
                out[f"{prefix}.experts.gate_up_proj"] = mx.concatenate([gate, up], axis=1).swapaxes(1, 2)
                out[f"{prefix}.experts.down_proj"] = down.swapaxes(1, 2)
            else:
                out[f"{prefix}.experts.gate_up_proj"] = mx.concatenate([gate, up], axis=1)
                out[f"{prefix}.experts.down_proj"] = down
        else:
            for e in range(gate.shape[0]):
                for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                    out[f"{prefix}.experts.{e}.{name}.weight"] = w[e]
    if model_type == "qwen3_vl_moe":
        # Our names language_model.model.X / language_model.lm_head.X -> the
        # Hub's model.language_model.X / lm_head.X, plus a vision tower.
        renamed = {}
        for key, value in out.items():
            key = key[len("language_model.") :]
            renamed["model.language_model." + key[len("model.") :] if key.startswith("model.") else key] = value
        renamed["model.visual.patch_embed.proj.weight"] = mx.random.normal((16, 3, 2, 2, 2))
        renamed["model.visual.blocks.0.norm1.weight"] = mx.ones((16,))
        out = renamed
    elif model.args.tie_word_embeddings:
        # Some tied checkpoints still store the head; sanitize drops it.
        out["lm_head.weight"] = params["model.embed_tokens.weight"]
    return out


def write_tiny_tokenizer(folder: Union[str, Path]) -> None:
    """A word-level ``tokenizer.json`` over :data:`WORDS` (split on
    whitespace, decoded joined by spaces)."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.save(str(Path(folder) / "tokenizer.json"))


def write_tiny_checkpoint(
    folder: Union[str, Path],
    model_type: str,
    *,
    style: str = "hub",
    sharded: bool = False,
    seed: int = 0,
    overrides: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write a tiny random checkpoint of ``model_type`` to ``folder``
    (created); returns its config. The weights are drawn from a model of our
    own (norm weights randomised too) with ``seed``. ``overrides`` updates
    the text model's config (``text_config`` for Qwen3-VL-MoE) before
    anything is written."""
    from mlx_moe_kernels.loading import build_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(model_type, style)
    if overrides:
        (config["text_config"] if "text_config" in config else config).update(overrides)
    mx.random.seed(seed)
    model = build_model(config)
    # Norm weights start at one; make them random so a dropped norm shows.
    norms = [
        (k, 1.0 + 0.2 * mx.random.normal(v.shape))
        for k, v in tree_flatten(model.parameters())
        if "norm" in k.rsplit(".", 2)[-2]
    ]
    model.load_weights(norms, strict=False)
    weights = hf_weights(model, model_type, style)
    mx.eval(weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if sharded:
        keys = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        weight_map = {}
        for name, names in shards.items():
            mx.save_safetensors(str(folder / name), {k: weights[k] for k in names})
            weight_map.update({k: name for k in names})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_tiny_tokenizer(folder)
    return config
