"""Run under ``mlx.launch``: ``run_distributed_bench`` on a small model
(shard_check's Qwen3-MoE config), every mode; prints one ``RESULT {json}``
line per rank (the report every rank got). ``tests/test_sharding.py``
checks the lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from shard_check import CONFIGS  # noqa: E402

from mlx_moe_kernels.bench.distributed import run_distributed_bench  # noqa: E402

import mlx.core as mx  # noqa: E402


def main() -> None:
    group = mx.distributed.init()
    report = run_distributed_bench(CONFIGS["qwen3_moe"], 2, sys.argv[1], decode_tokens=4, repeats=1, group=group)
    result = report.to_dict()
    result["rank"] = group.rank()
    result["table"] = report.format_table()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
