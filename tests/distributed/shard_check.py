"""Run under ``mlx.launch`` (every rank runs this file): builds the same
small random model on every rank, computes its logits unsharded, shards it
with ``model.shard(...)``, and compares. Prints one ``RESULT {json}`` line
per rank; ``tests/test_sharding.py`` launches it and checks the lines.

Usage: shard_check.py ARCH FORMAT EXPERTS ATTENTION
  ARCH: qwen2_moe | qwen3_moe | qwen3_vl_moe; FORMAT: float32 | bfloat16 | q4
  (group size 32) | q4g64;
  EXPERTS: a ``shard`` mode, or "pipeline" for ``model.pipeline`` (then
  ATTENTION is ignored)
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_moe_kernels.loading import build_model, quantize_model
from mlx_moe_kernels.models.base import make_cache

# Dimensions every sharding of 2 and 4 ranks divides: expert / MLP hidden
# sizes and heads split evenly, and each rank's share of a down / o_proj
# input is a multiple of the quantization group (32).
COMMON = dict(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    intermediate_size=256,
    rms_norm_eps=1e-6,
    vocab_size=64,
    max_position_embeddings=256,
    rope_theta=10000.0,
    decoder_sparse_step=1,
    tie_word_embeddings=False,
)
CONFIGS = {
    "qwen2_moe": dict(COMMON, model_type="qwen2_moe", hidden_size=128, shared_expert_intermediate_size=256,
                      norm_topk_prob=False, mlp_only_layers=[]),
    "qwen3_moe": dict(COMMON, model_type="qwen3_moe", hidden_size=64, head_dim=32, norm_topk_prob=True,
                      mlp_only_layers=[1]),
}
CONFIGS["qwen3_vl_moe"] = dict(
    model_type="qwen3_vl_moe",
    tie_word_embeddings=False,
    text_config=dict(CONFIGS["qwen3_moe"], model_type="qwen3_vl_moe_text", mlp_only_layers=[],
                     rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True}),
    vision_config=dict(model_type="qwen3_vl_moe", depth=1, hidden_size=16, out_hidden_size=32),
)
TOKENS = mx.array([[3, 17, 9, 41, 5, 22, 8, 60]], dtype=mx.int32)
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "q4": 1e-4, "q4g64": 1e-4}


def make_model(arch: str, fmt: str):
    mx.random.seed(7)  # the same weights on every rank
    config = CONFIGS[arch]
    model = build_model(config)
    if fmt == "bfloat16":
        model.set_dtype(mx.bfloat16)
    if fmt in ("q4", "q4g64"):
        quantize_model(model, config, group_size=32 if fmt == "q4" else 64, bits=4)
    mx.eval(model.parameters())
    return model


def greedy(model, steps: int = 6):
    cache = make_cache(model)
    logits = model(TOKENS, cache)
    out = []
    for _ in range(steps):
        token = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
        out.append(int(token.item()))
        logits = model(token, cache)
    return out


def resident_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


SHARDED_EXPERT_PARTS = (".switch_mlp.", ".shared_expert.", ".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")
SHARDED_ATTENTION_PARTS = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.")


def expected_tensor_bytes(model, size: int, attention: str) -> float:
    """The replicated parameters' bytes plus 1/size of the sharded ones'
    (the expert / MLP projections; the attention ones with "tensor")."""
    parts = SHARDED_EXPERT_PARTS + (SHARDED_ATTENTION_PARTS if attention == "tensor" else ())
    total = 0.0
    for path, value in tree_flatten(model.parameters()):
        sharded = any(part in "." + path for part in parts) and ".gate.weight" not in path
        total += value.nbytes / size if sharded else value.nbytes
    return total


def layers_of(model):
    return (model.language_model if "language_model" in model else model).layers


def block_inputs(model):
    """Per layer, the inputs of its attention and MLP blocks in a forward
    pass of TOKENS, and the blocks' outputs."""
    language = model.language_model if "language_model" in model else model
    x = language.model.embed_tokens(TOKENS)
    records = []
    for layer in language.layers:
        attention_in = layer.input_layernorm(x)
        attention_out = layer.self_attn(attention_in, mask="causal")
        h = x + attention_out
        mlp_in = layer.post_attention_layernorm(h)
        mlp_out = layer.mlp(mlp_in)
        x = h + mlp_out
        records.append((attention_in, attention_out, mlp_in, mlp_out))
    mx.eval(records)
    return records


def relative_error(got, want) -> float:
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    return float(mx.abs(got - want).max()) / max(1.0, float(mx.abs(want).max()))


def forced_routings(model):
    """Per MoE layer, the experts' output (unsharded) for routings that
    send every slot to the first two experts (all on rank 0 when sharded
    by expert) or to the last two (all on the last rank)."""
    x = mx.random.normal((4, _hidden(model)), key=mx.random.key(1))
    cases = []
    for layer in layers_of(model):
        if "switch_mlp" not in layer.mlp:
            continue
        experts = layer.mlp.switch_mlp.down_proj["weight"].shape[0]
        for ids in ([0, 1], [experts - 2, experts - 1]):
            indices = mx.array([ids] * 4, dtype=mx.uint32)
            scores = mx.array([[0.25, 0.75]] * 4, dtype=mx.float32)
            cases.append((layer, x, indices, scores, layer.mlp.switch_mlp(x, indices, scores)))
    mx.eval([case[-1] for case in cases])
    return cases


def _hidden(model) -> int:
    language = model.language_model if "language_model" in model else model
    return language.model.norm.weight.shape[0]


def main() -> None:
    arch, fmt, experts, attention = sys.argv[1:5]
    group = mx.distributed.init()
    result = {"rank": group.rank(), "size": group.size(), "tolerance": TOLERANCE[fmt]}
    model = make_model(arch, fmt)
    reference = model(TOKENS)
    records = block_inputs(model)
    tokens_reference = greedy(model) if fmt != "bfloat16" else None
    greedy_reference = greedy(model) if tokens_reference is None and experts == "pipeline" else None
    routed = forced_routings(model) if experts == "expert" else []
    result["bytes_before"] = resident_bytes(model)
    if experts != "pipeline":
        result["bytes_expected"] = expected_tensor_bytes(model, group.size(), attention)
    try:
        if experts == "pipeline":
            model.pipeline(group)
        elif experts == "tensor-twice":  # a second shard must be refused
            model.shard(group, experts="tensor", attention=attention)
            model.shard(group, experts="tensor", attention=attention)
        else:
            model.shard(group, experts=experts, attention=attention)
    except ValueError as error:
        result["error"] = str(error)
        print("RESULT " + json.dumps(result), flush=True)
        return
    result["bytes_after"] = resident_bytes(model)
    # Each block on the unsharded run's inputs: the sharded block must give
    # the same output within the format's tolerance.
    if experts == "pipeline":
        # Every layer runs unchanged on one rank: the logits must be the
        # unsharded ones exactly, in every format.
        result["layers"] = len(layers_of(model))
        result["max_error"] = relative_error(model(TOKENS), reference)
        result["tokens_equal"] = greedy(model) == (tokens_reference or greedy_reference)
        print("RESULT " + json.dumps(result), flush=True)
        return
    errors = []
    for layer, (attention_in, attention_out, mlp_in, mlp_out) in zip(layers_of(model), records):
        errors.append(relative_error(layer.self_attn(attention_in, mask="causal"), attention_out))
        errors.append(relative_error(layer.mlp(mlp_in), mlp_out))
    result["max_block_error"] = max(errors)
    if routed:
        # Every slot on one rank's experts: that rank computes all of it,
        # the others nothing (their partial is zero), and the sum is whole.
        routed_errors, idle_ranks = [], 0
        for layer, x, indices, scores, want in routed:
            partial = layer.mlp.switch_mlp(x, indices, scores)
            idle_ranks += int(float(mx.abs(partial).max()) == 0.0)
            routed_errors.append(relative_error(mx.distributed.all_sum(partial, group=group), want))
        result["max_routed_error"] = max(routed_errors)
        result["idle_cases"] = idle_ranks
        result["routed_cases"] = len(routed)
        result["first_expert"] = [layer.mlp.switch_mlp.first_expert for layer, *_ in routed]
    # End to end: in bfloat16 a near-tie of two router logits may pick
    # another expert after partial sums are added in another order (correct
    # but not comparable), so the logits and tokens are compared for the
    # float32-activation formats only.
    if fmt != "bfloat16":
        result["max_error"] = relative_error(model(TOKENS), reference)
        result["tokens_equal"] = greedy(model) == tokens_reference
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
