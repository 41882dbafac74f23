"""``model.shard`` and ``model.pipeline`` over ``mx.distributed``: 2 to 4 local ranks on the ring
backend, started with ``mlx.launch`` (each rank runs
``tests/distributed/shard_check.py``). Sharded logits must equal the
single-process model's within the format's tolerance (float32 greedy
tokens identical; in bfloat16 each block on the same inputs, as a router
near-tie may legitimately pick another expert end to end), each rank must hold less than the whole model, and a
bad setup must fail on every rank with the dimension named, no rank left
hanging."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "distributed" / "shard_check.py"


def launcher() -> str:
    found = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    if not Path(found).exists():
        pytest.skip("mlx.launch is not installed")
    return found


def launch(ranks: int, *args: str, script: Path = SCRIPT):
    """The RESULT dicts of every rank, by rank."""
    env = dict(os.environ, MLX_MOE_NUM_THREADS="1")
    done = subprocess.run(
        [launcher(), "--backend", "ring", "-n", str(ranks), "--python", sys.executable, str(script), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in done.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == list(range(ranks)), done.stdout[-3000:]
    return results


CASES = [
    (arch, fmt, attention)
    for arch in ("qwen2_moe", "qwen3_moe", "qwen3_vl_moe")
    for fmt in ("float32", "bfloat16", "q4")
    for attention in ("replicate", "tensor")
]


@pytest.mark.parametrize("arch, fmt, attention", CASES)
def test_two_ranks_tensor_parallel(arch, fmt, attention):
    for result in launch(2, arch, fmt, "tensor", attention):
        assert "error" not in result, result
        assert result["max_block_error"] <= result["tolerance"], result
        if fmt != "bfloat16":
            assert result["max_error"] <= result["tolerance"], result
            assert result["tokens_equal"], result
        # Every expert and MLP weight halved (attention too with "tensor");
        # embeddings, norms, routers and the head stay whole.
        assert abs(result["bytes_after"] - result["bytes_expected"]) <= 0.05 * result["bytes_expected"], result
        assert result["bytes_after"] < 0.85 * result["bytes_before"], result


EXPERT_CASES = [(arch, fmt, "replicate") for arch in ("qwen2_moe", "qwen3_moe", "qwen3_vl_moe")
                for fmt in ("float32", "bfloat16", "q4")] + [("qwen3_moe", "q4", "tensor"), ("qwen2_moe", "float32", "tensor")]


@pytest.mark.parametrize("arch, fmt, attention", EXPERT_CASES)
def test_two_ranks_expert_parallel(arch, fmt, attention):
    """Each rank keeps 4 of the 8 experts whole (and half of a shared
    expert / dense MLP): the same tolerances and memory rule as tensor
    parallelism, and routings that send every slot to one rank's experts
    leave the other rank's partial exactly zero."""
    results = launch(2, arch, fmt, "expert", attention)
    for result in results:
        assert "error" not in result, result
        assert result["max_block_error"] <= result["tolerance"], result
        if fmt != "bfloat16":
            assert result["max_error"] <= result["tolerance"], result
            assert result["tokens_equal"], result
        assert abs(result["bytes_after"] - result["bytes_expected"]) <= 0.05 * result["bytes_expected"], result
        assert result["max_routed_error"] <= result["tolerance"], result
        assert set(result["first_expert"]) == {4 * result["rank"]}, result
    # Of each pair of forced routings (all on rank 0, all on rank 1), one
    # leaves this rank idle.
    assert all(r["idle_cases"] == r["routed_cases"] // 2 for r in results), results


def test_four_ranks_expert_parallel():
    results = launch(4, "qwen2_moe", "q4", "expert", "tensor")
    for result in results:
        assert "error" not in result, result
        assert result["max_error"] <= result["tolerance"] and result["tokens_equal"], result
        assert result["max_routed_error"] <= result["tolerance"], result
    # Routings onto experts 0-1 (rank 0) and 6-7 (rank 3): ranks 1 and 2
    # are idle in both, ranks 0 and 3 in one.
    assert [r["idle_cases"] * 2 // r["routed_cases"] for r in sorted(results, key=lambda r: r["rank"])] == [1, 2, 2, 1]


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_four_ranks_tensor_parallel(arch):
    for result in launch(4, arch, "q4", "tensor", "tensor"):
        assert "error" not in result, result
        assert result["max_block_error"] <= result["tolerance"], result
        assert result["max_error"] <= result["tolerance"] and result["tokens_equal"], result


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "qwen3_vl_moe"])
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "q4"])
def test_two_ranks_pipeline(arch, fmt):
    """Each layer runs unchanged on one rank: logits and greedy tokens equal
    the unsharded model's exactly; each rank holds only its layers."""
    results = launch(2, arch, fmt, "pipeline", "-")
    for result in results:
        assert "error" not in result, result
        assert result["max_error"] == 0.0 and result["tokens_equal"], result
        assert result["layers"] == 1 and result["bytes_after"] < result["bytes_before"], result


def test_bad_setup_fails_on_every_rank():
    """3 ranks cannot split a hidden size of 128 (nor 8 experts), 4 ranks
    cannot cut 64-wide quantization groups into 32 columns: every rank
    raises the same error naming the dimension, before anything changed,
    and the launch ends (no rank left in a collective); an unknown mode
    likewise."""
    results = launch(3, "qwen3_moe", "float32", "tensor", "tensor")
    assert all("hidden size 128" in r["error"] and "group size 3" in r["error"] for r in results), results
    results = launch(3, "qwen3_moe", "q4", "expert", "replicate")
    assert all("num_experts 8" in r["error"] and "group size 3" in r["error"] for r in results), results
    results = launch(2, "qwen3_moe", "q4", "bogus", "replicate")
    assert all("experts must be one of" in r["error"] for r in results), results
    results = launch(3, "qwen3_moe", "float32", "pipeline", "-")
    assert all("cannot split 2 decoder layers into 3" in r["error"] for r in results), results
    results = launch(2, "qwen2_moe", "float32", "tensor-twice", "replicate")
    assert all("already sharded" in r["error"] for r in results), results
    # 4 ranks of a 128-wide expert hidden size quantized in groups of 64:
    # 32 columns per rank is not a whole group.
    results = launch(4, "qwen3_moe", "q4g64", "tensor", "replicate")
    assert all("quantization group size 64" in r["error"] for r in results), results


@pytest.mark.parametrize(
    "shard, attention", [("pipeline", "replicate"), ("tensor", "replicate"), ("tensor", "tensor"), ("expert", "replicate")]
)
@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_load_model_sharded(tmp_path, arch, shard, attention):
    """``load_model(path, shard=...)`` on 2 ranks gives the whole model's
    logits (float32 checkpoint) and holds less than the whole model. (The
    peak memory of loading is reported, not asserted: at this size other
    allocations dominate it; see the README for a real checkpoint.)"""
    from mlx_moe_kernels.models.tiny import write_tiny_checkpoint

    folder = tmp_path / arch
    write_tiny_checkpoint(folder, arch, seed=3)
    results = launch(2, str(folder), shard, attention, script=SCRIPT.parent / "load_check.py")
    for result in results:
        assert result["max_error"] <= 1e-4, result
        assert result["bytes_sharded"] < result["bytes_whole"], result


@pytest.mark.parametrize("shard", ["pipeline", "tensor"])
def test_load_model_sharded_missing_file(tmp_path, shard):
    """A sharded checkpoint missing one of its safetensors files: every rank
    raises, naming the file (none is left waiting in a collective)."""
    from mlx_moe_kernels.models.tiny import write_tiny_checkpoint

    folder = tmp_path / "broken"
    write_tiny_checkpoint(folder, "qwen2_moe", sharded=True, seed=3)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) > 1
    files[-1].unlink()
    results = launch(2, str(folder), shard, "expect-error", script=SCRIPT.parent / "load_check.py")
    assert all(r["error"] and files[-1].name in r["error"] for r in results), results


def test_distributed_bench_reports_every_mode():
    """``mlx-moe bench --distributed``'s measurement on 2 ranks: every rank
    gets the same report, with a decode time per rank and mode, each
    sharded rank holding fewer weight bytes than the whole model, and the
    all_sum sizes. (Speeds are not asserted: shared, noisy machines.)"""
    results = launch(2, "q4", script=SCRIPT.parent / "bench_check.py")
    for result in results:
        assert [s["mode"] for s in result["shards"]] == ["tensor", "expert", "pipeline"], result
        assert result["single_step_ms"] > 0 and result["ranks"] == 2
        for shard in result["shards"]:
            assert len(shard["step_ms"]) == 2 and min(shard["step_ms"]) > 0, shard
            assert max(shard["weight_bytes"]) < result["single_weight_bytes"], shard
        assert [int(row["bytes"]) for row in result["all_sum"]] == [4 << 10, 64 << 10, 1 << 20, 16 << 20]
        assert all(row["ms"] > 0 for row in result["all_sum"])
        assert result["backend_note"], result  # both ranks on this host
    assert results[0]["shards"] == results[1]["shards"]
