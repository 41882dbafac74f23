"""The portable CPU kernel build, checked natively and on arm64.

``tests/native/portable_kernels_check.cpp`` drives ``kernels_portable.cpp``
(gather_mm with both weight layouts, the fused gate_up and down/combine
tasks, gather_qmm on packed affine and mxfp4 codes; float32, float16,
bfloat16; sizes off every tile multiple) against a
double-precision loop, without libmlx. Here it is compiled and run:

* with the host compiler and baseline flags: the plain-C++ branch of
  ``csrc/cpu/simd.h`` (what x86-64 CPUs without AVX2 run);
* cross-compiled for arm64 and run under qemu: the NEON branch (what Apple
  silicon runs), when ``aarch64-linux-gnu-g++`` and ``qemu-aarch64`` are
  installed (``.ci/run`` installs them; skipped otherwise).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    ROOT / "tests" / "native" / "portable_kernels_check.cpp",
    ROOT / "csrc" / "cpu" / "kernels_portable.cpp",
]


def mlx_include_dir() -> str:
    """MLX's C++ headers, from the installed mlx package."""
    spec = importlib.util.find_spec("mlx")
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


def build_and_run(compiler: str, output: Path, runner: list[str]) -> str:
    """Compile the check with `compiler` and run it (through `runner`)."""
    build = subprocess.run(
        [compiler, "-std=c++20", "-O2", "-I", str(ROOT / "csrc"), "-I", mlx_include_dir(),
         *map(str, SOURCES), "-o", str(output), "-lpthread"],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([*runner, str(output)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_portable_build_native(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    out = build_and_run(compiler, tmp_path / "check", [])
    assert "19 passed, 0 failed" in out


def test_portable_build_arm64_neon(tmp_path):
    compiler = shutil.which("aarch64-linux-gnu-g++")
    emulator = shutil.which("qemu-aarch64")
    if compiler is None or emulator is None:
        pytest.skip("no arm64 cross compiler or qemu-aarch64")
    out = build_and_run(compiler, tmp_path / "check", [emulator, "-L", "/usr/aarch64-linux-gnu"])
    assert "19 passed, 0 failed" in out
