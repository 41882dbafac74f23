"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): a decoder-only transformer
whose MLPs are sparse Mixture-of-Experts blocks with a shared expert.

Sources: the Qwen1.5-MoE blog post (https://qwenlm.github.io/blog/qwen-moe/)
and the Qwen2 technical report (https://arxiv.org/abs/2407.10671).

Architecture, per decoder layer (pre-norm, residual around each part)::

    h = x + Attention(RMSNorm(x))          # GQA, q/k/v with bias, RoPE
    y = h + SparseMoE(RMSNorm(h))

The sparse block: a router (``gate``, Linear D -> E without bias) scores the
E experts with a softmax; each token goes through its top-k experts (SwiGLU
MLPs of width ``moe_intermediate_size``), whose outputs are summed weighted
by their router probabilities (renormalized over the k when
``norm_topk_prob``). A *shared expert*, a SwiGLU MLP of width
``shared_expert_intermediate_size``, runs on every token; its output is
scaled by ``sigmoid(shared_expert_gate(x))`` (Linear D -> 1) and added.
The routed experts specialise while the shared one holds what every token
needs; the sigmoid gate lets the model learn, per token, how much to rely on
the always-on expert versus the routed ones. Layers listed in
``mlp_only_layers`` or off the ``decoder_sparse_step`` grid are dense
SwiGLU MLPs of width ``intermediate_size`` instead.

The routed experts run through :class:`mlx_moe_kernels.SwitchGLU` with the
score-weighted combine fused into its down-projection kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
    """The Qwen2-MoE config fields the model uses (Hub names)."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_experts_per_tok: int
    num_experts: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    rms_norm_eps: float
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    rope_theta: float = 1000000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = True  # transformers' Qwen2MoeConfig field; Qwen2 checkpoints have biases
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
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


class Qwen2MoeSparseMoeBlock(nn.Module):
    """Routed top-k experts plus the sigmoid-gated shared expert (see the
    module docstring for why the shared expert is gated)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.fused = True
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)
        self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """``[..., D] -> [..., D]``."""
        inds, scores = route_topk(self.gate(x), self.top_k, self.norm_topk_prob)
        routed = run_experts(self.switch_mlp, x, inds, scores, self.fused)
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared


class Qwen2MoeDecoderLayer(nn.Module):
    """Pre-norm attention then a sparse (or dense) MLP, each residual."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        head_dim = args.hidden_size // args.num_attention_heads
        self.self_attn = Attention(
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            head_dim,
            make_rope(head_dim, args.rope_theta, args.rope_scaling),
            qkv_bias=args.qkv_bias,
            qk_norm=False,
            rms_norm_eps=args.rms_norm_eps,
        )
        if args.is_sparse(layer):
            self.mlp = Qwen2MoeSparseMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        """``[B, L, D] -> [B, L, D]``."""
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2MoeModel(nn.Module):
    """Token embedding, the decoder layers and the final RMSNorm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Qwen2MoeDecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        """Hidden states ``[B, L, D]`` of ``tokens`` ``[B, L]``."""
        h = self.embed_tokens(tokens)
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = causal_mask(h.shape[1], cache)
        h = run_layers(self, h, mask, cache)
        return self.norm(h)


class Model(nn.Module, Shardable):
    """Qwen2-MoE causal language model: ``__call__(tokens [B, L], cache)``
    returns logits ``[B, L, vocab]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen2MoeModel(args)
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
            if isinstance(layer.mlp, Qwen2MoeSparseMoeBlock):
                layer.mlp.fused = fused

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Hugging Face checkpoint names/layouts -> this model's.

        1. ``lm_head.weight`` is dropped when the embeddings are tied.
        2. Per-expert ``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``
           (``[out, in]`` each) are stacked over ``e`` into
           ``model.layers.{l}.mlp.switch_mlp.{...}.weight`` ``[E, out, in]``.
        3. Fused ``mlp.experts.gate_up_proj``/``down_proj`` (written by newer
           transformers) are split and transposed the same way (see
           :func:`~mlx_moe_kernels.models.base.split_fused_experts`).
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
    def layers(self) -> List[Qwen2MoeDecoderLayer]:
        """The decoder layers (one KV cache each)."""
        return self.model.layers
