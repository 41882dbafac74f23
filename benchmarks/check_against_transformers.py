"""Check mlx_moe_kernels' model definitions against Hugging Face transformers.

For each architecture (Qwen2-MoE, Qwen3-MoE, Qwen3-VL-MoE text-only) this
builds a tiny random float32 model with transformers, writes it with
transformers' own ``save_pretrained`` (single file, and sharded with an
index), loads the folder with ``mlx_moe_kernels.load_model`` and compares the
logits of the same token ids.

A case passes if max|diff| <= 1e-4 * max(1, max|logit|). On a numerical
failure it prints a layer-by-layer comparison of the hidden states. Exit
code 1 if any case fails.

Needs torch (CPU) and transformers in the same environment as mlx.
Usage: python benchmarks/check_against_transformers.py [-v]
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

# The package is imported as installed (it needs its compiled ``_ext``); below
# we warn if the installed Python sources differ from this checkout's.
SOURCE = Path(__file__).resolve().parents[1] / "python" / "mlx_moe_kernels"

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

import mlx_moe_kernels  # noqa: E402

VERBOSE = "-v" in sys.argv
transformers.utils.logging.disable_progress_bar()
SEED = 0
VOCAB = 256

TEXT_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=48,
    rms_norm_eps=1e-6,
    max_position_embeddings=128,
    initializer_range=0.2,
)


def qwen2_moe(**over):
    kw = dict(TEXT_COMMON, shared_expert_intermediate_size=80, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(over)
    return Qwen2MoeConfig(**kw), Qwen2MoeForCausalLM


def qwen3_moe(**over):
    kw = dict(TEXT_COMMON, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kw.update(over)
    return Qwen3MoeConfig(**kw), Qwen3MoeForCausalLM


def qwen3_vl_moe(top_tie=None, text_tie=None, **over):
    text = dict(TEXT_COMMON, head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    text.pop("num_experts")
    text["num_experts"] = 8
    text.update(over)
    if text_tie is not None:
        text["tie_word_embeddings"] = text_tie
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0], initializer_range=0.2)
    kw = dict(text_config=text, vision_config=vision)
    if top_tie is not None:
        kw["tie_word_embeddings"] = top_tie
    return Qwen3VLMoeConfig(**kw), Qwen3VLMoeForConditionalGeneration


CASES = [
    ("qwen2_moe", "norm_topk=False, sparse_step=1", lambda: qwen2_moe(norm_topk_prob=False)),
    ("qwen2_moe", "norm_topk=True, mlp_only_layers=[1]", lambda: qwen2_moe(norm_topk_prob=True, mlp_only_layers=[1])),
    # Extra: transformers 5's Qwen2MoeConfig has a `qkv_bias` field (default True).
    ("qwen2_moe", "extra: qkv_bias=False", lambda: qwen2_moe(qkv_bias=False)),
    ("qwen3_moe", "norm_topk=True, sparse_step=2", lambda: qwen3_moe(norm_topk_prob=True, decoder_sparse_step=2)),
    ("qwen3_moe", "norm_topk=False, mlp_only_layers=[0]", lambda: qwen3_moe(norm_topk_prob=False, mlp_only_layers=[0])),
    ("qwen3_moe", "tie_word_embeddings=True", lambda: qwen3_moe(norm_topk_prob=True, tie_word_embeddings=True, mlp_only_layers=[2])),
    ("qwen3_vl_moe", "defaults (text tie default)", lambda: qwen3_vl_moe()),
    ("qwen3_vl_moe", "text tie=False, top tie=False, mlp_only=[1]", lambda: qwen3_vl_moe(top_tie=False, text_tie=False, mlp_only_layers=[1])),
    ("qwen3_vl_moe", "text tie=True, top tie=True", lambda: qwen3_vl_moe(top_tie=True, text_tie=True)),
    ("qwen3_vl_moe", "text tie=True, top tie=False (explicit)", lambda: qwen3_vl_moe(top_tie=False, text_tie=True)),
    ("qwen3_vl_moe", "text tie=False, top tie=True", lambda: qwen3_vl_moe(top_tie=True, text_tie=False)),
]


def build_hf(make):
    torch.manual_seed(SEED)
    config, cls = make()
    model = cls(config).float().eval()
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), output_hidden_states=True)
    hs = out.hidden_states
    return out.logits.float().numpy(), [h.float().numpy() for h in hs]


def ours_hidden_states(model, ids):
    """Per-layer hidden states of our model (embeddings, after each layer,
    the last one after the final norm, like transformers)."""
    from mlx_moe_kernels.models.base import causal_mask

    lm = model.language_model if hasattr(model, "language_model") else model
    inner = lm.model
    h = inner.embed_tokens(mx.array(ids))
    mask = causal_mask(h.shape[1], None)
    states = [np.array(h)]
    for i, layer in enumerate(inner.layers):
        h = layer(h, mask, None)
        states.append(np.array(inner.norm(h) if i == len(inner.layers) - 1 else h))
    return states


def describe_folder(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    files = sorted(p.name for p in folder.iterdir())
    return f"files={files}, config keys={sorted(cfg)}"


def weight_summary(folder: Path):
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            for k in fh.keys():
                out[k] = tuple(fh.get_slice(k).get_shape())
    return out


def run_case(arch, variant, make, sharded, ids):
    model = build_hf(make)
    ref, ref_hs = hf_logits(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if sharded:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100KB")
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        index = (folder / "model.safetensors.index.json").is_file()
        if sharded and not index:
            raise RuntimeError("sharded save did not produce an index")
        if VERBOSE:
            print("   ", describe_folder(folder))
            for k, s in weight_summary(folder).items():
                if "layers.0." in k or "layers." not in k:
                    print("     ", k, s)
        try:
            ours_model, _ = mlx_moe_kernels.load_model(tmp, dtype="float32")
        except Exception as error:
            shapes = weight_summary(folder)
            experts = sorted((k, v) for k, v in shapes.items() if "experts" in k and "layers.1." in k)
            head = [k for k in shapes if "layers." not in k and "visual" not in k]
            return None, float(np.abs(ref).max()), (
                f"load_model raised {type(error).__name__}: {error} | folder: {len(experts)} layer-1 expert "
                f"tensors, e.g. {experts[:2]}; non-layer text keys {sorted(head)}")
        ours = np.array(ours_model(mx.array(ids)).astype(mx.float32))
        diff = float(np.abs(ours - ref).max())
        mx_logit = float(np.abs(ref).max())
        detail = ""
        if not diff <= 1e-4 * max(1.0, mx_logit):
            ours_hs = ours_hidden_states(ours_model, ids)
            parts = []
            for i, (a, b) in enumerate(zip(ref_hs, ours_hs)):
                parts.append(f"hs[{i}] diff={float(np.abs(a - b).max()):.3e} (max|h|={float(np.abs(a).max()):.3g})")
            detail = "; ".join(parts)
        return diff, mx_logit, detail


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, mlx {mx.__version__}")
    installed = Path(mlx_moe_kernels.__file__).parent
    stale = [str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*.py")
             if not (installed / p.relative_to(SOURCE)).is_file()
             or (installed / p.relative_to(SOURCE)).read_bytes() != p.read_bytes()]
    print(f"mlx_moe_kernels from {installed}" + (f" (WARNING: differs from checkout in {stale})" if stale else
                                                 " (Python sources identical to this checkout)"))
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, VOCAB, size=(2, 12)).astype(np.int64)
    # Ids 0..VOCAB-1 only; the VL special token ids (151655, ...) are outside the vocab, so input is text-only.
    failures = 0
    for arch, variant, make in CASES:
        for sharded in (False, True):
            tag = "sharded" if sharded else "single"
            try:
                diff, mx_logit, detail = run_case(arch, variant, make, sharded, ids)
            except Exception as error:  # a failure of the harness itself
                traceback.print_exc()
                diff, mx_logit, detail = None, float("nan"), f"harness error {type(error).__name__}: {error}"
            ok = diff is not None and diff <= 1e-4 * max(1.0, mx_logit)
            failures += not ok
            dstr = "n/a" if diff is None else f"{diff:.3e}"
            print(f"{arch:13s} | {variant:45s} | {tag:7s} | max_abs_diff={dstr:>10s} | max|logit|={mx_logit:8.4f} | {'PASS' if ok else 'FAIL'}")
            if detail:
                print(f"    -> {detail}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
