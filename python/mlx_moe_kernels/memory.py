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


# glibc's tunable that has malloc advise every large allocation
# (MADV_HUGEPAGE) before it is first written: MLX's weight buffers then
# start out in huge pages, with no collapse pass after loading.
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
# Set to 0 to keep the default 4 KiB pages (and `mlx-moe` from re-executing).
HUGE_PAGES_ENV = "MLX_MOE_HUGE_PAGES"


def _glibc_version() -> tuple:
    import os

    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()
    except (AttributeError, ValueError, OSError):
        return ()


def huge_page_malloc_environment(environ=None):
    """The environment under which a new process backs its large
    allocations with transparent huge pages from the start, or ``None`` when
    there is nothing to do: not Linux/glibc >= 2.35 (the first with the
    ``glibc.malloc.hugetlb`` tunable), already set, or opted out with
    ``MLX_MOE_HUGE_PAGES=0``. glibc reads tunables only at process start,
    so this is for launching a process (``mlx-moe`` re-executes itself with
    it); child processes inherit it."""
    import os
    import sys

    environ = dict(os.environ if environ is None else environ)
    if not sys.platform.startswith("linux") or environ.get(HUGE_PAGES_ENV, "1") == "0":
        return None
    if _glibc_version() < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE
    return environ
