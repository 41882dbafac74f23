"""Run under ``mlx.launch``: ``load_model(path, shard=...)`` against the
whole model on every rank. Prints one ``RESULT {json}`` line per rank with
the largest logit difference and the peak memory of each load.

Usage: load_check.py CHECKPOINT_DIR SHARD [ATTENTION | expect-error]
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx

from mlx_moe_kernels.loading import load_model
from shard_check import relative_error, resident_bytes

TOKENS = mx.array([[3, 17, 9, 21, 5, 22, 8, 30]], dtype=mx.int32)


def main() -> None:
    path, shard = sys.argv[1:3]
    attention = sys.argv[3] if len(sys.argv) > 3 else "replicate"
    group = mx.distributed.init()
    if attention == "expect-error":
        # A broken checkpoint: every rank must raise, naming the file.
        try:
            load_model(path, group=group, shard=shard)
        except (FileNotFoundError, ValueError) as error:
            print("RESULT " + json.dumps({"rank": group.rank(), "error": str(error)}), flush=True)
            return
        print("RESULT " + json.dumps({"rank": group.rank(), "error": None}), flush=True)
        return
    mx.reset_peak_memory()
    whole, _ = load_model(path)
    peak_whole = mx.get_peak_memory()
    reference = whole(TOKENS).astype(mx.float32)
    mx.eval(reference)  # (lazy, it would keep every weight of the whole model alive)
    bytes_whole = resident_bytes(whole)
    del whole
    mx.clear_cache()
    mx.reset_peak_memory()
    model, _ = load_model(path, group=group, shard=shard, attention=attention)
    peak_sharded = mx.get_peak_memory()
    result = {
        "rank": group.rank(),
        "max_error": relative_error(model(TOKENS), reference),
        "peak_whole": peak_whole,
        "peak_sharded": peak_sharded,
        "bytes_whole": bytes_whole,
        "bytes_sharded": resident_bytes(model),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
