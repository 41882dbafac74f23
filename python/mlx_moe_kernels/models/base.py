"""Pieces shared by the model definitions: config reading, RoPE, attention,
the dense SwiGLU MLP, the routed-expert helpers and the KV cache.

Everything here is architecture-neutral; each ``qwen*.py`` file composes
these into one architecture. Parameter names follow the Hugging Face
checkpoints (``q_proj``, ``gate_proj``, ...) so ``sanitize`` only has to
reshape the experts, and they equal mlx-lm's names, so a model's weights can
be loaded into mlx-lm's class of the same architecture unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_moe_kernels import ops, reference
from mlx_moe_kernels.dense import Linear
from mlx_moe_kernels.layers import QuantizedSwitchLinear, SwitchGLU

__all__ = [
    "BaseModelArgs",
    "normalize_text_config",
    "make_rope",
    "RoPE",
    "RMSNorm",
    "KVCache",
    "make_cache",
    "Attention",
    "MLP",
    "route_topk",
    "run_experts",
    "stack_per_expert",
    "split_fused_experts",
]


@dataclass
class BaseModelArgs:
    """Base of the ``ModelArgs`` dataclasses: ``from_dict`` keeps only the
    fields the dataclass declares (a Hugging Face config has many more)."""

    @classmethod
    def from_dict(cls, params: Dict[str, Any]):
        """The arguments from a config dict; unknown keys are ignored."""
        fields = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in fields})


def normalize_text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a text-model config in the Hub's (transformers 4) naming.

    transformers 5 writes ``rope_parameters`` (``{"rope_type", "rope_theta",
    ...}``) where the Hub configs have ``rope_theta`` and ``rope_scaling``,
    and some writers use ``num_local_experts`` for ``num_experts``. Both
    spellings are accepted; the Hub names win where both are present.
    """
    out = dict(config)
    rope_parameters = out.get("rope_parameters")
    if isinstance(rope_parameters, dict):
        if "rope_theta" not in out and "rope_theta" in rope_parameters:
            out["rope_theta"] = rope_parameters["rope_theta"]
        scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if out.get("rope_scaling") is None and scaling.get("rope_type", "default") != "default":
            out["rope_scaling"] = scaling
    if "num_experts" not in out and "num_local_experts" in out:
        out["num_experts"] = out["num_local_experts"]
    return out


# RoPE variants that are ordinary RoPE for text tokens: "default", and the
# multimodal ones (MRoPE) whose position components all equal the token
# position for text (see qwen3_vl_moe.py).
_PLAIN_ROPE_TYPES = {"default", "mrope"}


def make_rope(head_dim: int, base: float, scaling: Optional[Dict[str, Any]] = None) -> "RoPE":
    """The rotary embedding (non-traditional, i.e. rotating the two halves
    of the head, as Qwen does) for a config's ``rope_scaling``: none, the
    default, MRoPE (plain RoPE for text) or ``linear`` (positions divided by
    ``factor``). Raises ValueError for other scaling types."""
    scale = 1.0
    if scaling:
        rope_type = scaling.get("type") or scaling.get("rope_type") or "default"
        if "mrope_section" in scaling or rope_type in _PLAIN_ROPE_TYPES:
            pass
        elif rope_type == "linear":
            scale = 1.0 / float(scaling["factor"])
        else:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, mrope)")
    return RoPE(head_dim, traditional=False, base=base, scale=scale)


class RoPE(nn.RoPE):
    """``nn.RoPE`` computed by :func:`mlx_moe_kernels.ops.rope` (one CPU
    kernel; ``mx.fast.rope`` elsewhere)."""

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        """``x`` ``[..., L, D]`` rotated for positions ``offset ..
        offset + L``."""
        return ops.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale,
                        offset=offset)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed by :func:`mlx_moe_kernels.ops.rms_norm` (one
    CPU kernel; ``mx.fast.rms_norm`` elsewhere)."""

    def __call__(self, x: mx.array) -> mx.array:
        """``x`` normalised over its last axis and scaled by ``weight``."""
        return ops.rms_norm(x, self["weight"], self.eps)


class KVCache:
    """A per-layer key/value cache, preallocated in steps of ``step``
    positions and grown by concatenation.

    ``keys``/``values`` are ``[B, n_kv_heads, capacity, head_dim]``; the
    first ``offset`` positions are valid. ``update_and_fetch`` appends the
    new positions and returns all valid keys and values.
    """

    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Store ``keys``/``values`` (``[B, H, L, d]``) at positions
        ``offset .. offset+L`` and return the keys and values of positions
        ``0 .. offset+L``."""
        prev = self.offset
        length = keys.shape[2]
        if self.keys is None or prev + length > self.keys.shape[2]:
            B, H, _, dk = keys.shape
            dv = values.shape[3]
            grow = ((length + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, dv), values.dtype)
            if self.keys is not None:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
            else:
                self.keys, self.values = new_k, new_v
        self.offset += length
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


def make_cache(model: nn.Module) -> List[KVCache]:
    """A fresh list of caches, one per layer of ``model`` (its ``layers``)."""
    return [KVCache() for _ in model.layers]


def causal_mask(length: int, cache: Optional[Sequence[Optional[KVCache]]]) -> Optional[str]:
    """The attention mask for ``length`` new positions: ``None`` for one
    position (it may attend to everything cached), else ``"causal"`` (MLX
    aligns it to the last key, so cached positions are all visible)."""
    return None if length == 1 else "causal"


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional q/k biases and
    optional per-head RMSNorm of queries and keys (Qwen3's q_norm/k_norm).

    Parameters: ``q_proj`` (D -> heads*head_dim), ``k_proj``, ``v_proj``
    (D -> kv_heads*head_dim), ``o_proj`` (heads*head_dim -> D), and with
    ``qk_norm`` ``q_norm``/``k_norm`` (RMSNorm over head_dim).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope: nn.Module,
        *,
        qkv_bias: bool,
        qk_norm: bool,
        rms_norm_eps: float,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim**-0.5
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=rms_norm_eps)
        self.rope = rope

    def __call__(self, x: mx.array, mask=None, cache: Optional[KVCache] = None) -> mx.array:
        """Attend over ``x`` (``[B, L, D]``) and the cached positions;
        returns ``[B, L, D]``."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, -1)
        if "q_norm" in self:
            # Qwen3: RMSNorm of every head's query and key, before RoPE.
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, heads, L, d]
        offset = 0 if cache is None else cache.offset
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # Our CPU attention kernel (MLX's on other devices).
        out = ops.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """A dense SwiGLU MLP, ``down(silu(gate(x)) * up(x))``, no biases: the
    dense layers of Qwen3-MoE and the shared expert of Qwen2-MoE."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """``[..., D] -> [..., D]``."""
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def route_topk(router_logits: mx.array, k: int, normalize: bool) -> Tuple[mx.array, mx.array]:
    """Softmax routing: the ``k`` experts of highest probability per token
    and their probabilities (``[..., k]`` each), renormalized to sum to one
    when ``normalize`` (a config's ``norm_topk_prob``); the softmax runs in
    float32. One kernel on the CPU (:func:`mlx_moe_kernels.ops.softmax_top_k`),
    mlx-lm's composition elsewhere."""
    return ops.softmax_top_k(router_logits, k, normalize)


def run_experts(switch_mlp: SwitchGLU, x: mx.array, inds: mx.array, scores: mx.array, fused: bool) -> mx.array:
    """The score-weighted sum of the selected experts' outputs, ``[..., D]``.

    ``fused`` (the default of the blocks): our ``SwitchGLU`` with the
    combine fused into its down kernel. Otherwise the plain-MLX reference
    composition (``mlx_moe_kernels.reference.switch_glu``, on the quantized
    weights if ``nn.quantize`` made the projections quantized), the "stock"
    path ``mlx-moe generate --compare`` falls back to without mlx-lm.
    """
    projections = (switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj)
    quantized = [p for p in projections if isinstance(p, QuantizedSwitchLinear)]
    if fused or (quantized and (len(quantized) < 3 or len({p.quantization for p in quantized}) > 1)):
        # (The reference takes one quantization for all three projections;
        # mixed ones are composed per projection by our layer.)
        out = switch_mlp(x, inds, scores)
    elif quantized:
        group_size, bits, mode = quantized[0].quantization
        weights = [p.quantized_weights() for p in projections]
        out = reference.switch_glu(x, *weights, inds, scores, group_size=group_size, bits=bits, mode=mode)
    else:
        out = reference.switch_glu(x, *(p.weight for p in projections), inds, scores)
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------
# Checkpoint layout helpers used by the models' ``sanitize``.
# ---------------------------------------------------------------------------

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def stack_per_expert(weights: Dict[str, mx.array], prefix: str, num_experts: int) -> None:
    """In place: ``{prefix}.experts.{e}.{proj}.weight`` for e in
    ``0..num_experts-1`` (each ``[out, in]``) become one
    ``{prefix}.switch_mlp.{proj}.weight`` ``[E, out, in]``.

    Raises ValueError naming the first missing expert key if a layer has
    some experts but not all.
    """
    for proj in _PROJECTIONS:
        first = f"{prefix}.experts.0.{proj}.weight"
        if first not in weights:
            continue
        keys = [f"{prefix}.experts.{e}.{proj}.weight" for e in range(num_experts)]
        missing = [key for key in keys if key not in weights]
        if missing:
            raise ValueError(f"missing expert weight {missing[0]!r} (config has num_experts={num_experts})")
        weights[f"{prefix}.switch_mlp.{proj}.weight"] = mx.stack([weights.pop(key) for key in keys])


def split_fused_experts(
    weights: Dict[str, mx.array], prefix: str, hidden_size: int, intermediate_size: int
) -> None:
    """In place: the fused expert tensors of ``{prefix}.experts`` become our
    ``{prefix}.switch_mlp.{gate,up,down}_proj.weight``.

    Source layouts (E experts, D = hidden_size, H = intermediate_size):

    * the Hub's (Qwen3-VL-MoE checkpoints, transformers 4):
      ``gate_up_proj`` ``[E, D, 2H]`` (x @ W; gate columns first) and
      ``down_proj`` ``[E, H, D]``;
    * transformers 5's (nn.Linear-like): ``gate_up_proj`` ``[E, 2H, D]``
      (gate rows first) and ``down_proj`` ``[E, D, H]``.

    Target layout (``SwitchLinear``, ``[E, out, in]``): gate and up
    ``[E, H, D]``, down ``[E, D, H]``. The layout is read off the shapes;
    ValueError names the key when they fit neither or both (D == 2H).
    """
    gate_up_key = f"{prefix}.experts.gate_up_proj"
    down_key = f"{prefix}.experts.down_proj"
    if gate_up_key not in weights and down_key not in weights:
        return
    for key in (gate_up_key, down_key):
        if key not in weights:
            raise ValueError(f"missing fused expert weight {key!r}")
    D, H = hidden_size, intermediate_size

    # 1. gate_up: decide the layout from its two trailing sizes.
    gate_up = weights.pop(gate_up_key)
    trailing = tuple(gate_up.shape[1:])
    if gate_up.ndim != 3 or trailing not in ((D, 2 * H), (2 * H, D)):
        raise ValueError(
            f"{gate_up_key!r} has shape {tuple(gate_up.shape)}; expected [E, {D}, {2 * H}] (Hub) "
            f"or [E, {2 * H}, {D}] (transformers 5) for hidden_size={D}, moe_intermediate_size={H}"
        )
    if D == 2 * H:
        raise ValueError(
            f"cannot tell the layout of {gate_up_key!r} (shape {tuple(gate_up.shape)}): "
            f"hidden_size ({D}) == 2 * moe_intermediate_size ({2 * H}), so [E, hidden, 2*inter] "
            "and [E, 2*inter, hidden] look the same"
        )
    hub_layout = trailing == (D, 2 * H)
    if hub_layout:
        # [E, D, 2H]: columns 0..H are the gate, H..2H the up projection;
        # transpose each to [E, H, D].
        weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate_up[..., :H].swapaxes(1, 2)
        weights[f"{prefix}.switch_mlp.up_proj.weight"] = gate_up[..., H:].swapaxes(1, 2)
    else:
        # [E, 2H, D]: rows 0..H are the gate, H..2H the up projection; already
        # [E, out, in].
        weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate_up[:, :H, :]
        weights[f"{prefix}.switch_mlp.up_proj.weight"] = gate_up[:, H:, :]

    # 2. down: Hub [E, H, D] -> transpose to [E, D, H]; transformers 5's
    # [E, D, H] is kept. It must match the layout gate_up had.
    down = weights.pop(down_key)
    expected = (H, D) if hub_layout else (D, H)
    if down.ndim != 3 or tuple(down.shape[1:]) != expected or down.shape[0] != gate_up.shape[0]:
        raise ValueError(
            f"{down_key!r} has shape {tuple(down.shape)}; expected [{gate_up.shape[0]}, {expected[0]}, "
            f"{expected[1]}] to match {gate_up_key!r} {tuple(gate_up.shape)}"
        )
    weights[f"{prefix}.switch_mlp.down_proj.weight"] = down.swapaxes(1, 2) if hub_layout else down
