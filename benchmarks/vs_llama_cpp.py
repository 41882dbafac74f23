"""Whole-model benchmark: ours (mlx_moe_kernels' model definitions) against
llama.cpp on the same random-weight checkpoint, on the CPU.

What it does, each step cached in a work folder (``--work-dir``, default
``~/.cache/mlx-moe-kernels/llama.cpp``) and skipped when its output is
already there:

1. llama.cpp: downloads the llama-cpp-python 0.3.36 sdist from PyPI (the
   same llama.cpp that ``../shared/peers/ggml_moe/build.sh`` builds ggml
   from), builds ``llama-bench`` and ``llama-quantize`` (Release, native
   flags, OpenMP, static; ``--jobs`` parallel compiles, default 2), and makes
   a tools virtual environment (``WORK/venv``) for its HF-to-GGUF converter:
   ``gguf-py`` from the sdist, transformers, and a CPU-only torch (a local
   ``torch-*+cpu`` wheel from pip's find-links folders if there is one, else
   PyTorch's CPU index; never the multi-GB CUDA build).
2. A Hugging Face checkpoint with random weights (normal * 0.02, norms at 1)
   of a real model's shapes with ``--layers`` decoder layers, in bfloat16,
   per-expert tensor names as the Hub checkpoints have them, written
   tensor by tensor (sharded safetensors, low memory), plus a byte-level BPE
   tokenizer trained on llama.cpp's documentation with Qwen2's
   pre-tokenizer (the converter pads the vocabulary to ``vocab_size``).
3. ``convert_hf_to_gguf.py --outtype bf16``, then ``llama-quantize`` to
   Q8_0, Q4_0 and Q4_K_M. The converter only knows the pre-tokenizers of
   published tokenizers (by a hash of an encoded test string); ours is new,
   so the conversion runs the converter with the pre-tokenizer declared
   ``qwen2`` (what the tokenizer uses) when the hash is unknown.
4. For ``--rounds`` rounds, per format: ours and llama.cpp, the order
   alternating between rounds. llama.cpp: ``llama-bench -m GGUF -t THREADS
   -p 512 -n 64 -r REPS -o json`` (its defaults otherwise: flash attention
   auto, weight repacking on). Ours, in its own process with the project's
   Python (``--ours-python``, default the repository's ``.venv``):
   ``mlx-moe bench --mode model --checkpoint DIR --format bf16|q8|q4
   --prompt-tokens 512 --decode-tokens 64 --json OUT`` when that CLI offers
   ``--checkpoint``, else the fallback in this file (``load_model``,
   ``quantize_model(bits, group_size=64)``; prefill = one forward pass of
   the prompt from an empty KV cache, then the logits of the last position;
   decode = greedy single-token steps from an empty cache, each evaluated).
   ``MLX_MOE_NUM_THREADS`` is set to ``--threads`` for ours;
   ``--ours-fallback`` forces the fallback.

Formats: ours bf16 <-> GGUF BF16; ours q8 (MLX affine 8-bit, group 64) <->
Q8_0; ours q4 (MLX affine 4-bit, group 64) <-> Q4_0 and Q4_K_M (ours q4 is
measured once per round and compared with both). llama-quantize keeps its
usual mixes (e.g. the output matrix in Q6_K for Q4_0 / Q4_K_M); ours
quantizes every linear and the embedding at the given bits (Qwen3-MoE's
routers at 8 bits, as mlx-lm does).

The table reports, per format, the median over rounds of each side's
tok/s and the median of the per-round ratios ours / llama.cpp (above 1:
ours is faster).

Costs on a 2-core, 24 GB machine (first run; later runs reuse the work
folder): the sdist ~15 s (75 MB, 220 MB unpacked); the llama.cpp build ~12
min at -j2 (80 MB); the tools venv ~2.5 min (1.2 GB, torch included);
Qwen3-30B-A3B shapes with 4 layers (3.1 B parameters, the 151936 x 2048
embedding and lm_head included): checkpoint ~2.5 min (6.2 GB), BF16 GGUF
~1.5 min (6.2 GB), Q8_0 ~30 s (3.3 GB), Q4_0 ~20 s (1.8 GB), Q4_K_M ~3.5
min (1.9 GB), 19 GB in all; one benchmark round of all formats ~3 min.
Memory: the checkpoint writer streams (0.4 GB resident); ours holds the
model in memory (6.2 GB in bf16) in its own process.

usage: python benchmarks/vs_llama_cpp.py [--model qwen3-30b-a3b] [--layers 4]
       [--formats bf16,q8_0,q4_0,q4_k_m] [--rounds 3] [--threads N]
       [--work-dir DIR] [--json FILE] [--prepare-only]
Models: qwen3-30b-a3b, qwen1.5-moe-a2.7b, tiny-qwen3, tiny-qwen2 (small
shapes to check the pipeline in a few minutes).

Only the standard library is imported at the top: the checkpoint writer and
the converter run in the tools venv, our benchmark in the project's Python
(hidden subcommands ``_write-checkpoint``, ``_convert``, ``_ours``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORK = Path(os.path.expanduser("~/.cache/mlx-moe-kernels/llama.cpp"))

# The converter's Python requirements (requirements/requirements-convert_*.txt
# of this llama.cpp, torch aside: see install_torch).
CONVERTER_REQUIREMENTS = [
    "numpy~=2.2.6",
    "sentencepiece>=0.1.98,<0.3.0",
    "transformers==4.57.6",
    "protobuf>=4.21.0,<5.0.0",
    "safetensors",
    "tokenizers",
]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Real models' shapes (config.json fields as on the Hub).
_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 40960,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}
_QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 8192,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}
# Tiny versions: every dimension a multiple of 256 so that Q4_K applies.
_TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "moe_intermediate_size": 256,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 512,
}
MODELS = {
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    "qwen1.5-moe-a2.7b": _QWEN15_MOE_A27B,
    "tiny-qwen3": {**_QWEN3_30B_A3B, **_TINY},
    "tiny-qwen2": {**_QWEN15_MOE_A27B, **_TINY, "num_key_value_heads": 4, "head_dim": None,
                   "shared_expert_intermediate_size": 512},
}

# GGUF type -> (llama-quantize type or None for the converter's bf16, our format)
FORMATS = {
    "bf16": ("BF16", "bf16"),
    "q8_0": ("Q8_0", "q8"),
    "q4_0": ("Q4_0", "q4"),
    "q4_k_m": ("Q4_K_M", "q4"),
}
OUR_BITS = {"bf16": None, "q8": 8, "q4": 4}
GROUP_SIZE = 64
WEIGHT_STD = 0.02


def log(message: str) -> None:
    print(f"[vs_llama_cpp {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd, *, log_file: Path | None = None, env=None, cwd=None, timeout=None) -> subprocess.CompletedProcess:
    """Run ``cmd``; its output goes to ``log_file`` (or is captured). Raises
    with the log's tail on failure."""
    cmd = [str(c) for c in cmd]
    if log_file is not None:
        with open(log_file, "w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout)
        if proc.returncode:
            tail = Path(log_file).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log_file} (tail) ---\n{tail}")
        return proc
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


# --------------------------------------------------------------------------
# Step 1: llama.cpp binaries and the converter's environment


class Llama:
    """Paths of one llama.cpp setup in a work folder."""

    def __init__(self, work: Path):
        self.work = work
        self.sdist_dir = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        self.src = self.sdist_dir / "vendor" / "llama.cpp"
        self.build = work / "build"
        self.bench = self.build / "bin" / "llama-bench"
        self.quantize = self.build / "bin" / "llama-quantize"
        self.venv = work / "venv"
        self.python = self.venv / "bin" / "python"
        self.converter = self.src / "convert_hf_to_gguf.py"


def fetch_sources(llama: Llama) -> None:
    if llama.converter.is_file():
        return
    llama.work.mkdir(parents=True, exist_ok=True)
    tarball = llama.work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not tarball.is_file():
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist")
        # --no-binary for this one package only: ':all:' would also build
        # the sdist's build requirements (cmake) from source.
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", llama.work],
            log_file=llama.work / "download.log")
    log("unpacking the sdist")
    run(["tar", "xzf", tarball, "-C", llama.work])


def build_llama(llama: Llama, jobs: int) -> None:
    if llama.bench.is_file() and llama.quantize.is_file():
        return
    # The sdist omits ggml.pc.in; ggml's CMake only templates it.
    (llama.src / "ggml" / "ggml.pc.in").touch()
    log(f"configuring llama.cpp (log: {llama.work / 'cmake.log'})")
    run(["cmake", "-S", llama.src, "-B", llama.build, "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DGGML_OPENMP=ON", "-DBUILD_SHARED_LIBS=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TOOLS=ON"],
        log_file=llama.work / "cmake.log")
    log(f"building llama-bench and llama-quantize with -j{jobs} (about 12 min at -j2 on 2 cores; "
        f"log: {llama.work / 'build.log'})")
    start = time.time()
    run(["cmake", "--build", llama.build, f"-j{jobs}", "--target", "llama-bench", "llama-quantize"],
        log_file=llama.work / "build.log")
    log(f"built in {time.time() - start:.0f} s")


def _pip_find_links() -> list:
    """Folders pip is configured to find wheels in (pip config, PIP_FIND_LINKS)."""
    folders = []
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    values = [line.split("=", 1)[1].strip().strip("'\"") for line in out.splitlines()
              if "find-links" in line.split("=", 1)[0]]
    values += os.environ.get("PIP_FIND_LINKS", "").split()
    for value in values:
        for item in value.split():
            item = item[len("file://"):] if item.startswith("file://") else item
            if os.path.isdir(item):
                folders.append(item)
    return folders


def install_torch(llama: Llama) -> None:
    """A CPU-only torch in the tools venv: a local ``torch-*+cpu`` wheel for
    this Python from pip's find-links folders, else PyTorch's CPU index."""
    probe = subprocess.run([llama.python, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        return
    tag = "cp%d%d" % tuple(map(int, subprocess.run(
        [llama.python, "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True, text=True, check=True).stdout.split()))
    local = sorted(w for folder in _pip_find_links()
                   for w in glob.glob(os.path.join(folder, f"torch-*+cpu-{tag}-{tag}-*linux*x86_64.whl"))
                   + glob.glob(os.path.join(folder, f"torch-*+cpu-{tag}-{tag}-*{os.uname().machine}.whl")))
    log_file = llama.work / "pip-torch.log"
    if local:
        version = os.path.basename(local[-1]).split("-")[1]
        log(f"installing torch {version} (CPU) into the tools venv")
        run([llama.python, "-m", "pip", "install", f"torch=={version}"], log_file=log_file)
        return
    log("installing a CPU-only torch from PyTorch's CPU index into the tools venv")
    try:
        run([llama.python, "-m", "pip", "install", "--timeout", "30", "torch", "--index-url", TORCH_CPU_INDEX],
            log_file=log_file)
    except RuntimeError as error:
        raise RuntimeError(
            "could not install a CPU-only torch for llama.cpp's converter (no local torch-*+cpu wheel "
            f"in pip's find-links folders, and PyTorch's CPU index failed). Install one into {llama.venv} "
            f"by hand (e.g. {llama.python} -m pip install /path/to/torch-X+cpu-....whl).\n{error}") from error


def setup_tools_venv(llama: Llama) -> None:
    stamp = llama.venv / ".mlx-moe-ready"
    if stamp.is_file():
        return
    if not llama.python.is_file():
        log(f"creating the tools venv {llama.venv}")
        run([sys.executable, "-m", "venv", llama.venv])
    install_torch(llama)
    log("installing the converter's requirements and gguf-py into the tools venv")
    run([llama.python, "-m", "pip", "install", *CONVERTER_REQUIREMENTS, llama.src / "gguf-py"],
        log_file=llama.work / "pip-converter.log")
    stamp.write_text("ok\n")


def setup_llama(work: Path, jobs: int) -> Llama:
    llama = Llama(work)
    fetch_sources(llama)
    build_llama(llama, jobs)
    setup_tools_venv(llama)
    return llama


# --------------------------------------------------------------------------
# Step 2: the random-weight checkpoint (runs in the tools venv)


def model_config(name: str, layers: int) -> dict:
    config = dict(MODELS[name])
    config["num_hidden_layers"] = layers
    config["max_window_layers"] = layers
    if config.get("head_dim") is None:
        config.pop("head_dim", None)
    return config


def tensor_specs(config: dict) -> list:
    """(name, shape, kind) of every tensor of the HF checkpoint, in the Hub's
    order and naming; kind is "weight" (random), "norm" (ones) or "bias"."""
    D = config["hidden_size"]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or D // n_heads
    E, H = config["num_experts"], config["moe_intermediate_size"]
    qwen3 = config["model_type"] == "qwen3_moe"
    specs = [("model.embed_tokens.weight", (config["vocab_size"], D), "weight")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [(f"{p}.input_layernorm.weight", (D,), "norm"),
                  (f"{p}.post_attention_layernorm.weight", (D,), "norm")]
        for proj, rows in (("q_proj", n_heads * head_dim), ("k_proj", n_kv * head_dim), ("v_proj", n_kv * head_dim)):
            specs.append((f"{p}.self_attn.{proj}.weight", (rows, D), "weight"))
            if not qwen3:
                specs.append((f"{p}.self_attn.{proj}.bias", (rows,), "bias"))
        specs.append((f"{p}.self_attn.o_proj.weight", (D, n_heads * head_dim), "weight"))
        if qwen3:
            specs += [(f"{p}.self_attn.q_norm.weight", (head_dim,), "norm"),
                      (f"{p}.self_attn.k_norm.weight", (head_dim,), "norm")]
        specs.append((f"{p}.mlp.gate.weight", (E, D), "weight"))
        for e in range(E):
            q = f"{p}.mlp.experts.{e}"
            specs += [(f"{q}.gate_proj.weight", (H, D), "weight"), (f"{q}.up_proj.weight", (H, D), "weight"),
                      (f"{q}.down_proj.weight", (D, H), "weight")]
        if not qwen3:
            S = config["shared_expert_intermediate_size"]
            specs += [(f"{p}.mlp.shared_expert.gate_proj.weight", (S, D), "weight"),
                      (f"{p}.mlp.shared_expert.up_proj.weight", (S, D), "weight"),
                      (f"{p}.mlp.shared_expert.down_proj.weight", (D, S), "weight"),
                      (f"{p}.mlp.shared_expert_gate.weight", (1, D), "weight")]
    specs.append(("model.norm.weight", (D,), "norm"))
    if not config.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (config["vocab_size"], D), "weight"))
    return specs


def _write_bf16(out, rng, shape, kind) -> None:
    """Stream one bf16 tensor to ``out`` in chunks of ~16M elements."""
    import numpy as np

    count = 1
    for s in shape:
        count *= s
    chunk = 1 << 24
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        if kind == "norm":
            values = np.ones(n, dtype=np.float32)
        else:
            values = rng.standard_normal(n, dtype=np.float32)
            values *= WEIGHT_STD
        bits = values.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
        out.write(rounded.tobytes())


def write_safetensors(folder: Path, specs: list, shard_bytes: int, seed: int) -> None:
    """Sharded ``model-0000i-of-0000n.safetensors`` + index (or one
    ``model.safetensors``), written tensor by tensor."""
    import numpy as np

    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = 2
        for s in spec[1]:
            nbytes *= s
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            nbytes = 2
            for s in shape:
                nbytes *= s
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        tmp = folder / (fname + ".tmp")
        with open(tmp, "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            for name, shape, kind in shard:
                _write_bf16(out, rng, shape, kind)
        tmp.rename(folder / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (as in Qwen2/Qwen3 tokenizer.json files).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_tokenizer(folder: Path, vocab_size: int, corpus: list) -> dict:
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained on
    ``corpus`` (text files) to at most min(vocab_size, 4096) entries, the
    special tokens last; returns their ids by text."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 4096) - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if corpus:
        tok.train(corpus, trainer)
    else:
        tok.train_from_iterator(["Hello world. The quick brown fox jumps over the lazy dog. 0123456789"], trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json + merges.txt, as the Hub repos have them
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in ids.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }, indent=2) + "\n")
    return ids


def write_checkpoint_main(argv: list) -> None:
    """``_write-checkpoint MODEL LAYERS FOLDER SHARD_GB SEED [CORPUS...]``"""
    name, layers, folder, shard_gb, seed = argv[0], int(argv[1]), Path(argv[2]), float(argv[3]), int(argv[4])
    corpus = argv[5:]
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(name, layers)
    ids = write_tokenizer(folder, config["vocab_size"], corpus)
    config["bos_token_id"] = ids["<|endoftext|>"]
    config["eos_token_id"] = ids["<|im_end|>"]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False}, indent=2) + "\n")
    write_safetensors(folder, tensor_specs(config), int(shard_gb * (1 << 30)), seed)


# --------------------------------------------------------------------------
# Step 3: GGUF conversion (runs in the tools venv) and quantization


def convert_main(argv: list) -> None:
    """``_convert LLAMA_SRC HF_DIR OUT.gguf``: convert_hf_to_gguf.py
    --outtype bf16, declaring an unknown BPE pre-tokenizer ``qwen2``."""
    src, hf_dir, out = argv
    sys.path.insert(0, src)
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outtype", "bf16", "--outfile", out]
    import convert_hf_to_gguf
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            # Our tokenizer is freshly trained (unknown hash) but uses
            # Qwen2's pre-tokenizer regex: say so.
            print("vs_llama_cpp: unknown tokenizer hash, pre-tokenizer declared 'qwen2'", file=sys.stderr)
            return "qwen2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    convert_hf_to_gguf.main()


class Checkpoint:
    """Paths of one model's checkpoint and GGUF files in the work folder."""

    def __init__(self, work: Path, model: str, layers: int, seed: int):
        self.name = f"{model}-L{layers}-s{seed}"
        self.root = work / "models" / self.name
        self.hf = self.root / "hf"
        self.stamp = self.hf / ".complete"

    def gguf(self, gguf_type: str) -> Path:
        return self.root / f"{self.name}-{gguf_type}.gguf"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_checkpoint(llama: Llama, args) -> Checkpoint:
    ckpt = Checkpoint(args.work_dir, args.model, args.layers, args.seed)
    if not ckpt.stamp.is_file():
        if ckpt.hf.exists():
            shutil.rmtree(ckpt.hf)
        corpus = sorted(glob.glob(str(llama.src / "docs" / "**" / "*.md"), recursive=True))
        corpus.append(str(llama.src / "README.md"))
        log(f"writing the random {args.model} checkpoint with {args.layers} layers to {ckpt.hf}")
        start = time.time()
        ckpt.root.mkdir(parents=True, exist_ok=True)
        run([llama.python, __file__, "_write-checkpoint", args.model, args.layers, ckpt.hf, args.shard_gb,
             args.seed, *corpus], log_file=ckpt.root / "write.log")
        ckpt.stamp.write_text(json.dumps(model_config(args.model, args.layers)))
        log(f"checkpoint written in {time.time() - start:.0f} s ({_dir_size(ckpt.hf) / 1e9:.2f} GB)")
    bf16 = ckpt.gguf("BF16")
    if not bf16.is_file():
        log(f"converting to {bf16.name}")
        start = time.time()
        tmp = bf16.with_suffix(".tmp.gguf")
        run([llama.python, __file__, "_convert", llama.src, ckpt.hf, tmp], log_file=ckpt.root / "convert.log")
        tmp.rename(bf16)
        log(f"converted in {time.time() - start:.0f} s ({bf16.stat().st_size / 1e9:.2f} GB)")
    for fmt in args.formats:
        gguf_type = FORMATS[fmt][0]
        out = ckpt.gguf(gguf_type)
        if gguf_type == "BF16" or out.is_file():
            continue
        log(f"quantizing to {out.name}")
        start = time.time()
        tmp = out.with_suffix(".tmp.gguf")
        run([llama.quantize, bf16, tmp, gguf_type, args.threads], log_file=ckpt.root / f"quantize-{gguf_type}.log")
        tmp.rename(out)
        log(f"quantized in {time.time() - start:.0f} s ({out.stat().st_size / 1e9:.2f} GB)")
    return ckpt


# --------------------------------------------------------------------------
# Step 4: the benchmark


def llama_bench(llama: Llama, gguf: Path, args) -> dict:
    """llama-bench's pp and tg tok/s (mean over its repetitions) for ``gguf``."""
    proc = run([llama.bench, "-m", gguf, "-t", args.threads, "-p", args.prompt_tokens, "-n", args.decode_tokens,
                "-r", args.reps, "-o", "json"])
    rows = json.loads(proc.stdout)
    out = {"raw": rows}
    for row in rows:
        if row.get("n_prompt") and not row.get("n_gen"):
            out["prefill_tok_s"] = row["avg_ts"]
        elif row.get("n_gen") and not row.get("n_prompt"):
            out["decode_tok_s"] = row["avg_ts"]
    return out


def ours_cli_options(python: str):
    """The options ``mlx-moe bench`` lists when it has ``--mode model`` with
    ``--checkpoint``, else None (then the fallback in this file is used)."""
    proc = subprocess.run([python, "-m", "mlx_moe_kernels.cli", "bench", "--help"], capture_output=True, text=True)
    if proc.returncode or "--checkpoint" not in proc.stdout:
        return None
    return {word.strip("[],") for word in proc.stdout.split() if word.startswith(("--", "[--"))}


_RATE_MARKERS = ("tok_s", "tok/s", "tokens_per_s", "tps", "per_s")


def _find_rate(tree, phase: str):
    """Our tok/s of ``phase`` (prefill/decode) in the JSON ``tree`` the CLI
    wrote: ``{phase}_tok_s`` if present, else the first number under a key
    naming the phase and a rate (``..._tok_s``, ``tps``, ...), searched
    depth-first; a key under a ``{phase}`` object counts too."""
    aliases = {"prefill": ("prefill", "pp", "prompt"), "decode": ("decode", "tg", "generation")}[phase]

    def is_rate(key: str) -> bool:
        return any(m in key.lower() for m in _RATE_MARKERS)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if isinstance(tree, dict):
        if number(tree.get(f"{phase}_tok_s")):
            return float(tree[f"{phase}_tok_s"])
        for key, value in tree.items():
            if number(value) and is_rate(key) and any(a in key.lower() for a in aliases):
                return float(value)
        for key, value in tree.items():
            if isinstance(value, dict) and key.lower() in aliases:
                for k2, v2 in value.items():
                    if number(v2) and is_rate(k2):
                        return float(v2)
        for value in tree.values():
            found = _find_rate(value, phase)
            if found is not None:
                return found
    elif isinstance(tree, list):
        for value in tree:
            found = _find_rate(value, phase)
            if found is not None:
                return found
    return None


def _cli_rates(result, our_format: str):
    """prefill/decode tok/s of ``our_format`` in ``mlx-moe bench --mode
    model``'s JSON (``formats: [{format, prefill: {tokens_per_s}, decode:
    {...}}]``), or None when it is laid out otherwise."""
    for entry in result.get("formats", []) if isinstance(result, dict) else []:
        try:
            if entry.get("format") == our_format:
                return {"prefill_tok_s": float(entry["prefill"]["tokens_per_s"]),
                        "decode_tok_s": float(entry["decode"]["tokens_per_s"])}
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
    return None


def ours_bench(python: str, cli_options, ckpt: Checkpoint, our_format: str, args) -> dict:
    """Our prefill and decode tok/s, measured in a fresh process."""
    env = dict(os.environ, MLX_MOE_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours.json"
        if cli_options is not None:
            cmd = [python, "-m", "mlx_moe_kernels.cli", "bench", "--mode", "model", "--checkpoint", ckpt.hf,
                   "--format", our_format, "--prompt-tokens", args.prompt_tokens,
                   "--decode-tokens", args.decode_tokens, "--json", out]
            if "--repeats" in cli_options:
                cmd += ["--repeats", args.reps]
            if "--no-progress" in cli_options:
                cmd.append("--no-progress")
        else:
            cmd = [python, __file__, "_ours", ckpt.hf, our_format, args.prompt_tokens, args.decode_tokens,
                   args.reps, args.seed, out]
        proc = run(cmd, env=env)
        result = json.loads(out.read_text())
    rates = _cli_rates(result, our_format) or {"prefill_tok_s": _find_rate(result, "prefill"),
                                               "decode_tok_s": _find_rate(result, "decode")}
    if None in rates.values():
        raise RuntimeError(f"could not find prefill/decode tok/s in our JSON: {json.dumps(result)[:2000]}")
    raw = {k: v for k, v in result.items() if k != "config"} if isinstance(result, dict) else result
    return {**rates, "raw": raw, "stdout": proc.stdout[-4000:], "via": "cli" if cli_options is not None else "fallback"}


def ours_main(argv: list) -> None:
    """``_ours HF_DIR FORMAT PROMPT DECODE REPS SEED OUT.json``: the fallback
    benchmark of our model (for when ``mlx-moe bench --mode model`` is not
    there): load, quantize, then time prefill and decode after a warm-up."""
    import mlx.core as mx

    import mlx_moe_kernels as mk
    from mlx_moe_kernels.models.base import make_cache

    hf_dir, fmt = argv[0], argv[1]
    prompt, decode, reps, seed, out = int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]), argv[6]
    mx.set_default_device(mx.cpu)
    start = time.perf_counter()
    model, config = mk.load_model(hf_dir, dtype="bfloat16")
    if OUR_BITS[fmt] is not None:
        config = mk.quantize_model(model, config, bits=OUR_BITS[fmt], group_size=GROUP_SIZE)
        mx.eval(model.parameters())
    load_s = time.perf_counter() - start
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]
    tokens = mx.random.randint(0, vocab, (1, prompt), key=mx.random.key(seed))

    def head(h):
        if hasattr(model, "lm_head"):
            return model.lm_head(h)
        return model.model.embed_tokens.as_linear(h)

    def run_prefill() -> float:
        cache = make_cache(model)
        t0 = time.perf_counter()
        logits = head(model.model(tokens, cache)[:, -1:, :])
        mx.eval(logits)
        return time.perf_counter() - t0

    def run_decode(steps: int) -> float:
        cache = make_cache(model)
        token = tokens[:, :1]
        t0 = time.perf_counter()
        for _ in range(steps):
            token = mx.argmax(model(token, cache)[:, -1, :], axis=-1, keepdims=True)
            mx.eval(token)
        return time.perf_counter() - t0

    run_prefill()  # warm-up
    run_decode(min(decode, 4))
    prefill_s = [run_prefill() for _ in range(reps)]
    decode_s = [run_decode(decode) for _ in range(reps)]
    result = {
        "format": fmt, "prompt_tokens": prompt, "decode_tokens": decode, "load_s": load_s,
        "prefill_s": prefill_s, "decode_s": decode_s,
        "prefill_tok_s": prompt * reps / sum(prefill_s), "decode_tok_s": decode * reps / sum(decode_s),
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def benchmark(llama: Llama, ckpt: Checkpoint, args) -> dict:
    """Rounds of ours and llama.cpp per format; a failed measurement (e.g.
    a crash) is logged and recorded with its error, the rest go on."""
    cli_options = None if args.ours_fallback else ours_cli_options(args.ours_python)
    use_cli = cli_options is not None
    log(f"ours via {'mlx-moe bench --mode model' if use_cli else 'the fallback in this script'} "
        f"({args.ours_python})")
    our_formats = list(dict.fromkeys(FORMATS[f][1] for f in args.formats))
    rounds = []
    for r in range(args.rounds):
        record = {"ours": {}, "llama": {}}
        for our_format in our_formats:
            fmts = [f for f in args.formats if FORMATS[f][1] == our_format]
            steps = [("ours", our_format)] + [("llama", f) for f in fmts]
            if r % 2:
                steps = steps[1:] + steps[:1]
            for side, what in steps:
                start = time.time()
                try:
                    if side == "ours":
                        res = ours_bench(args.ours_python, cli_options, ckpt, what, args)
                    else:
                        res = llama_bench(llama, ckpt.gguf(FORMATS[what][0]), args)
                except (RuntimeError, OSError, ValueError) as error:
                    log(f"round {r + 1}/{args.rounds} {side:5s} {what:6s}: FAILED: {error}")
                    res = {"prefill_tok_s": None, "decode_tok_s": None, "error": str(error)[-4000:]}
                else:
                    log(f"round {r + 1}/{args.rounds} {side:5s} {what:6s}: pp{args.prompt_tokens} "
                        f"{res['prefill_tok_s']:9.2f} tok/s, tg{args.decode_tokens} {res['decode_tok_s']:8.2f} tok/s "
                        f"({time.time() - start:.0f} s)")
                record[side][what] = res
        rounds.append(record)
    rows = []
    for fmt in args.formats:
        gguf_type, our_format = FORMATS[fmt]
        row = {"format": fmt, "gguf_type": gguf_type, "ours_format": our_format}
        for phase in ("prefill", "decode"):
            key = f"{phase}_tok_s"
            lm = [rd["llama"][fmt][key] for rd in rounds]
            us = [rd["ours"][our_format][key] for rd in rounds]
            row[f"llama_{key}"] = median(lm)
            row[f"ours_{key}"] = median(us)
            row[f"{phase}_ratio"] = median([u / l for u, l in zip(us, lm) if u is not None and l])
        rows.append(row)
    return {"rows": rows, "rounds": rounds, "ours_via": "cli" if use_cli else "fallback"}


def markdown_table(rows: list, args) -> str:
    p, n = args.prompt_tokens, args.decode_tokens

    def cell(value, suffix=""):
        return "failed" if value is None else f"{value:.3f}{suffix}" if suffix else f"{value:.2f}"

    lines = [f"| format (llama.cpp / ours) | llama.cpp pp{p} tok/s | ours pp{p} tok/s | ours/llama.cpp "
             f"| llama.cpp tg{n} tok/s | ours tg{n} tok/s | ours/llama.cpp |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['gguf_type']} / {row['ours_format']} | {cell(row['llama_prefill_tok_s'])} "
                     f"| {cell(row['ours_prefill_tok_s'])} | {cell(row['prefill_ratio'], 'x')} "
                     f"| {cell(row['llama_decode_tok_s'])} | {cell(row['ours_decode_tok_s'])} "
                     f"| {cell(row['decode_ratio'], 'x')} |")
    return "\n".join(lines)


def machine_info() -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": sys.platform}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_total_kb"] = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                                        if l.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    return info


def default_ours_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Whole-model CPU benchmark: ours vs llama.cpp (llama-bench) on one random-weight "
                    "checkpoint, with every step (build, checkpoint, GGUF) cached in --work-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3-30b-a3b",
                        help="model shapes (tiny-*: a quick check of the pipeline)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--formats", default="bf16,q8_0,q4_0,q4_k_m",
                        help=f"comma list from {','.join(FORMATS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (ours, llama.cpp), order alternating")
    parser.add_argument("--reps", type=int, default=1,
                        help="timed runs per side, format and round (llama-bench -r, ours' --repeats)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="llama-bench -t and MLX_MOE_NUM_THREADS for ours")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="safetensors shard size")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                        help="cache folder: llama.cpp sources and build, tools venv, checkpoints, GGUFs")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for llama.cpp")
    parser.add_argument("--ours-python", default=default_ours_python(),
                        help="Python with mlx_moe_kernels installed")
    parser.add_argument("--ours-fallback", action="store_true",
                        help="time ours with this script's own loop even when mlx-moe bench --mode model exists")
    parser.add_argument("--json", type=Path, help="write the table, every round and the setup to this file")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build, write the checkpoint and the GGUF files, then stop")
    args = parser.parse_args(argv)
    args.formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    args.work_dir = args.work_dir.expanduser().resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    timings = {}
    start = time.time()
    llama = setup_llama(args.work_dir, args.jobs)
    timings["setup_s"] = time.time() - start
    start = time.time()
    ckpt = prepare_checkpoint(llama, args)
    timings["checkpoint_s"] = time.time() - start
    sizes = {"hf_bytes": _dir_size(ckpt.hf)}
    sizes.update({FORMATS[f][0]: ckpt.gguf(FORMATS[f][0]).stat().st_size for f in ["bf16", *args.formats]})
    if args.prepare_only:
        print(json.dumps({"checkpoint": str(ckpt.hf), "sizes": sizes}, indent=2))
        return 0
    start = time.time()
    result = benchmark(llama, ckpt, args)
    timings["benchmark_s"] = time.time() - start
    table = markdown_table(result["rows"], args)
    print(f"\n{args.model}, {args.layers} layers, random bf16 weights; {args.threads} threads; "
          f"median of {args.rounds} round(s); ours via {result['ours_via']}\n")
    print(table)
    if args.json:
        payload = {"model": args.model, "layers": args.layers, "config": model_config(args.model, args.layers),
                   "threads": args.threads, "n_rounds": args.rounds, "reps": args.reps,
                   "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                   "llama_cpp": f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist", "machine": machine_info(),
                   "sizes": sizes, "timings": timings, "table": table, **result}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


HIDDEN = {"_write-checkpoint": write_checkpoint_main, "_convert": convert_main, "_ours": ours_main}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in HIDDEN:
        HIDDEN[sys.argv[1]](sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
