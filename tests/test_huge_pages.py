"""``use_huge_pages``: weights keep their values, the counts are honest (a
claimed collapse is checked in /proc/self/smaps), bad input is refused,
and ``load_model(huge_pages=True)`` loads the same model."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import _ext

HUGE_PAGE = 2 << 20


def _address(a: mx.array) -> int:
    view = np.asarray(memoryview(a))
    return view.ctypes.data


def _anon_huge_bytes(begin: int, end: int) -> int:
    """AnonHugePages of the mappings overlapping [begin, end) (madvise
    splits the array's mapping at the huge-page boundaries)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0] if line.split() else ""
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, stop = (int(v, 16) for v in head.split("-"))
                inside = start < end and begin < stop
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


def test_values_unchanged_and_counts_bounded():
    a = mx.random.normal((5, 1024, 1024))  # 20 MiB
    mx.eval(a)
    before = np.array(a)
    advised, collapsed = _ext._advise_huge_pages([a])
    assert np.array_equal(np.array(a), before)
    assert collapsed <= advised <= a.nbytes
    assert advised % HUGE_PAGE == 0
    if sys.platform.startswith("linux") and advised:
        # Only the whole huge pages inside the buffer: at most one partial
        # page lost at each end.
        assert advised >= a.nbytes - 2 * HUGE_PAGE


def test_small_array_is_left_alone():
    a = mx.ones((100,))
    assert _ext._advise_huge_pages([a]) == (0, 0)
    assert mk.use_huge_pages(a) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_claimed_collapse_is_real():
    a = mx.random.normal((4, 1024, 1024)) + 1  # 16 MiB, freshly computed
    mx.eval(a)
    collapsed = mk.use_huge_pages(a)
    if collapsed == 0:
        pytest.skip("this kernel does not collapse pages (THP off, kernel < 6.1 or no free huge pages)")
    begin = _address(a)
    assert _anon_huge_bytes(begin, begin + a.nbytes) >= collapsed


def test_modules_and_containers():
    layer = mk.SwitchGLU(256, 2048, 4)  # three 8 MiB float32 weights
    mx.eval(layer.parameters())
    weights = {k: np.array(v) for k, v in layer.parameters().items()}
    total = mk.use_huge_pages(layer)
    assert total == sum(_ext._advise_huge_pages([w])[1] for w in (layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight))
    for k, v in layer.parameters().items():
        assert np.array_equal(np.array(v), weights[k]), k
    assert mk.use_huge_pages([layer.up_proj.weight, {"w": layer.down_proj.weight}]) >= 0


def test_bad_input_names_the_type():
    with pytest.raises(TypeError, match="use_huge_pages takes .*got str"):
        mk.use_huge_pages("weights")
    with pytest.raises(TypeError, match="got int"):
        mk.use_huge_pages([mx.ones((2,)), 3])


def test_load_model_with_huge_pages(tmp_path):
    from mlx_moe_kernels.models.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "q3", "qwen3_moe")
    plain, _ = mk.load_model(tmp_path / "q3")
    placed, _ = mk.load_model(tmp_path / "q3", huge_pages=True)
    tokens = mx.array([[2, 5, 9, 3]], dtype=mx.uint32)
    assert mx.array_equal(plain(tokens), placed(tokens))


def test_views_advise_their_whole_buffer():
    a = mx.random.normal((5, 1024, 1024))
    mx.eval(a)
    view = a[::-1]  # negative stride: its extent runs backwards from its data pointer
    before = np.array(view)
    advised, _ = _ext._advise_huge_pages([view])
    assert advised == _ext._advise_huge_pages([a])[0]
    assert np.array_equal(np.array(view), before)
    # One buffer behind several arrays is advised and counted once.
    assert _ext._advise_huge_pages([a, view, a[1:]]) == _ext._advise_huge_pages([a])


# ------------------------------------------- huge pages from the first write
def test_huge_page_malloc_environment():
    """The environment `mlx-moe` re-executes itself with: the glibc tunable
    added to any others, nothing when it is set already or opted out."""
    from mlx_moe_kernels import memory

    if not sys.platform.startswith("linux") or memory._glibc_version() < (2, 35):
        assert memory.huge_page_malloc_environment({}) is None
        return
    env = memory.huge_page_malloc_environment({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
    other = memory.huge_page_malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert other["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert memory.huge_page_malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert memory.huge_page_malloc_environment({"MLX_MOE_HUGE_PAGES": "0"}) is None


_HUGE_MALLOC_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import mlx.core as mx
from test_huge_pages import _address, _anon_huge_bytes
a = mx.random.normal((32, 1024, 1024))  # 128 MiB, allocated and written by MLX
mx.eval(a)
begin = _address(a)
print(_anon_huge_bytes(begin, begin + a.nbytes))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunable, Linux only")
def test_mlx_arrays_in_huge_pages_with_the_tunable():
    """With the tunable, an array MLX allocates and writes is (mostly) in
    transparent huge pages without any collapse pass."""
    import os
    import subprocess
    from pathlib import Path

    from mlx_moe_kernels import memory

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are disabled")
    env = memory.huge_page_malloc_environment(dict(os.environ, MLX_MOE_HUGE_PAGES="1"))
    if env is None:
        pytest.skip("glibc without the hugetlb tunable, or it is already set")
    script = _HUGE_MALLOC_SCRIPT.format(tests=str(Path(__file__).parent))
    run = lambda e: int(subprocess.run([sys.executable, "-c", script], env=e, capture_output=True,
                                       text=True, check=True).stdout.split()[-1])
    with_tunable = run(env)
    # Most of 128 MiB (the kernel may lack free huge pages for a few).
    assert with_tunable >= 64 << 20, with_tunable
