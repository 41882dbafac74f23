"""Memory placement of weights: transparent huge pages on Linux.

Decoding reads each selected expert's weights from memory once per token,
so it runs at memory speed, and at that speed the 4 KiB page size shows: a
TLB miss (a page walk, nested under a hypervisor) every 4 KiB, hardware
prefetchers that stop at every page boundary. How much that costs depends on
how physically scattered the pages happen to be. Backing the weights with
2 MiB transparent huge pages removes the dependence. On the 2-core Zen 4 VM
of our benchmarks, one cache-cold float32 decode projection (8 experts of
Qwen3-30B-A3B, 50 MB) took 1.372 ms from huge pages against 1.495 ms from
the same weights in 4 KiB pages (interleaved in one process, 9 rounds).
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_moe_kernels import _ext


def _arrays(obj: Any):
    if isinstance(obj, mx.array):
        yield obj
    elif isinstance(obj, nn.Module):
        for _, value in tree_flatten(obj.parameters()):
            yield value
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _arrays(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _arrays(value)
    else:
        raise TypeError(
            f"use_huge_pages takes an mx.array, an nn.Module, or lists/tuples/dicts of them (got {type(obj).__name__})"
        )


def use_huge_pages(obj: Any) -> int:
    """Back the weights of ``obj`` with transparent huge pages (Linux).

    For every array (``obj`` is an ``mx.array``, an ``nn.Module``, whose
    parameters are taken, or lists/tuples/dicts of these), the whole 2 MiB
    pages inside its buffer are marked ``MADV_HUGEPAGE`` and moved into huge
    pages now with ``MADV_COLLAPSE`` (Linux 6.1 or later). The values do not
    change; a buffer several arrays share (views, slices of one weight) is
    handled once. It is a one-time cost of about a second per GB on our 2-core
    machine; call it once after loading (``load_model(...,
    huge_pages=True)`` does), not per step.

    Best effort: with transparent huge pages disabled, an older kernel, no
    free huge pages, or on macOS (whose Apple-silicon pages are 16 KiB
    already), nothing changes and the result says so.

    Args:
        obj: The arrays or module whose weights to place.

    Returns:
        The number of bytes now backed by huge pages, each buffer counted
        once (0 where the kernel
        refused; arrays smaller than a huge page never count).

    Raises:
        TypeError: ``obj`` holds something other than arrays and modules.
    """
    return _ext._advise_huge_pages(list(_arrays(obj)))[1]
