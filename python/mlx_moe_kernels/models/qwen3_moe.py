"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, and the text model inside
Qwen3-VL-MoE): a decoder-only transformer with sparse Mixture-of-Experts
MLPs and no shared expert.

Source: the Qwen3 technical report (https://arxiv.org/abs/2505.09388).

Architecture, per decoder layer (pre-norm, residual around each part)::

    h = x + Attention(RMSNorm(x))
    y = h + MoE(RMSNorm(h))        # or a dense SwiGLU MLP, see below

Attention is grouped-query attention without q/k/v biases and with an
explicit ``head_dim``; queries and keys get a per-head RMSNorm (``q_norm``,
``k_norm``, over head_dim) before RoPE, which keeps attention logits in
range (Qwen3's replacement for Qwen2's QKV bias). The MoE block: a softmax
router (``gate``, Linear D -> E without bias) picks the top-k of E experts
per token (SwiGLU MLPs of width ``moe_intermediate_size``); their outputs are
summed weighted by the router probabilities, renormalized over the k when
``norm_topk_prob``. Layer ``l`` is sparse unless it is in
``mlp_only_layers`` or ``(l + 1) % decoder_sparse_step != 0``, in which case
it is a dense SwiGLU MLP of width ``intermediate_size``. With
``tie_word_embeddings`` the output head is the embedding matrix.

The routed experts run through :class:`mlx_moe_kernels.SwitchGLU` with the
score-weighted combine fused into its down-projection kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_moe_kernels.dense import Embedding, Linear
from mlx_moe_kernels.layers import SwitchGLU
from mlx_moe_kernels.models.base import (
    MLP,
    RMSNorm,
    Attention,
    BaseModelArgs,
    causal_mask,
    make_rope,
    normalize_text_config,
    route_topk,
    run_experts,
    stack_per_expert,
    split_fused_experts,
)
from mlx_moe_kernels.sharding import Shardable, run_layers


@dataclass
class ModelArgs(BaseModelArgs):
    """The Qwen3-MoE config fields the model uses (Hub names)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    rms_norm_eps: float
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 1000000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    tie_word_embeddings: bool = False
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers or [])

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "ModelArgs":
        """From a config.json dict in Hub or transformers-5 naming."""
        return super().from_dict(normalize_text_config(params))

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a MoE block (else dense)."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Softmax router and top-k routed SwiGLU experts (no shared expert)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.fused = True
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        """``[..., D] -> [..., D]``."""
        inds, scores = route_topk(self.gate(x), self.top_k, self.norm_topk_prob)
        return run_experts(self.switch_mlp, x, inds, scores, self.fused)


class Qwen3MoeDecoderLayer(nn.Module):
    """Pre-norm attention (with q/k norm) then a sparse or dense MLP."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
            make_rope(args.head_dim, args.rope_theta, args.rope_scaling),
            qkv_bias=False,
            qk_norm=True,
            rms_norm_eps=args.rms_norm_eps,
        )
        if args.is_sparse(layer):
            self.mlp = Qwen3MoeSparseMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        """``[B, L, D] -> [B, L, D]``."""
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3MoeModel(nn.Module):
    """Token embedding, the decoder layers and the final RMSNorm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Qwen3MoeDecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        """Hidden states ``[B, L, D]`` of ``tokens`` ``[B, L]``."""
        h = self.embed_tokens(tokens)
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = causal_mask(h.shape[1], cache)
        h = run_layers(self, h, mask, cache)
        return self.norm(h)


class Model(nn.Module, Shardable):
    """Qwen3-MoE causal language model: ``__call__(tokens [B, L], cache)``
    returns logits ``[B, L, vocab]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3MoeModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache=None, *, last_only: bool = False) -> mx.array:
        """Logits ``[B, L, vocab]`` (``[B, 1, vocab]``, the last position's,
        with ``last_only``); ``cache`` (a list of per-layer
        :class:`~mlx_moe_kernels.models.base.KVCache`) is extended in place."""
        h = self.model(tokens, cache)
        if last_only:
            # Generation needs the next token's logits only: the lm_head is
            # the largest matrix, and [B, L, vocab] logits of a prompt cost
            # more than the rest of the prefill.
            h = h[:, -1:, :]
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def set_fused(self, fused: bool) -> None:
        """Use our fused experts (True, the default) or the plain-MLX
        reference composition (False) in every MoE block."""
        for layer in self.layers:
            if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock):
                layer.mlp.fused = fused

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Hugging Face checkpoint names/layouts -> this model's.

        1. ``lm_head.weight`` is dropped when the embeddings are tied (some
           checkpoints store the copy).
        2. Per-expert ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``
           (``[out, in]`` each) are stacked over ``e`` into
           ``model.layers.{l}.mlp.switch_mlp.{...}.weight`` ``[E, out, in]``.
        3. Fused ``mlp.experts.gate_up_proj``/``down_proj`` (Qwen3-VL-MoE and
           newer transformers) are split and transposed to the same target
           (see :func:`~mlx_moe_kernels.models.base.split_fused_experts`).
        """
        weights = dict(weights)
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        for l in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{l}.mlp"
            stack_per_expert(weights, prefix, self.args.num_experts)
            split_fused_experts(weights, prefix, self.args.hidden_size, self.args.moe_intermediate_size)
        return weights

    @property
    def quant_predicate(self) -> Callable[[str, nn.Module], Union[bool, Dict[str, int]]]:
        """The ``nn.quantize`` class predicate for this model, as mlx-lm's:
        the routers (``...mlp.gate``, small D -> E linears whose rounding
        errors would change which experts run) at 8 bits, group size 64;
        every other layer with the settings of the call."""

        def predicate(path: str, _module: nn.Module):
            if path.endswith("mlp.gate"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate

    @property
    def layers(self) -> List[Qwen3MoeDecoderLayer]:
        """The decoder layers (one KV cache each)."""
        return self.model.layers
