"""The macOS Metal build, checked on Linux: CMake's Metal branch and the
Metal dispatch C++ (csrc/metal/*.cpp, every eval_gpu) compiled syntax-only.

No Mac runs here, so the host side of the Metal backend is checked against
the real macOS headers instead: the ``mlx-metal==0.32.4`` macOS wheel carries
MLX's Metal headers (``mlx/backend/metal/device.h``...), metal-cpp and MLX's
CMake package with ``mlx_build_metallib``. This file

1. configures the project's own CMakeLists.txt with that MLX package
   (``MLX_BUILD_METAL`` on), and checks that the metallib is built from every
   ``.metal`` source with ``-std=metal3.1`` and installed beside the module,
   and that the Metal dispatch sources (not the no-GPU stubs) are compiled;
2. runs every compile command CMake generated for the library through
   ``clang++ -fsyntax-only -Werror``: the macOS system headers metal-cpp
   includes (Objective-C runtime, CoreFoundation, dispatch...) are replaced by
   declaration-only stand-ins (tests/metal_host/macos_stubs);
3. shows the check can fail: a wrong encoder method or a wrong metal-cpp
   call in a copy of a dispatch source is rejected.

What this does not prove: that the Metal compiler accepts the .metal files
(the simulator compiles them as C++, tests/metal_sim), that the code links
against libmlx.dylib, or that it runs. See docs/metal.md.

Needs clang++ (``-fblocks``: metal-cpp uses blocks), cmake and network access
to PyPI for the wheel (cached under ~/.cache/mlx-moe-kernels). Missing tools
skip the tests, unless MLX_MOE_REQUIRE_METAL_HOST=1 (CI sets it), which makes
them fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "tests" / "metal_host" / "macos_stubs"
MLX_VERSION = "0.32.4"
REQUIRED = os.environ.get("MLX_MOE_REQUIRE_METAL_HOST") == "1"

# On a Mac the package build itself compiles the Metal dispatch against the
# real SDK (and the stand-ins would shadow its headers): nothing to check here.
pytestmark = pytest.mark.skipif(sys.platform == "darwin", reason="macOS builds the Metal dispatch for real")

# CPU translation units CMake adds on x86-64 only (this configure runs on
# x86-64 Linux; a Mac builds the arm64 ones, which these tests cannot
# target).
X86_ONLY = {"csrc/cpu/kernels_avx2.cpp", "csrc/cpu/kernels_avx512.cpp"}
METAL_DISPATCH = {"csrc/metal/dispatch.cpp", "csrc/metal/route.cpp", "csrc/metal/switch_glu.cpp",
                  "csrc/metal/gather_mm.cpp"}


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"MLX_MOE_REQUIRE_METAL_HOST=1 but {reason}")
    pytest.skip(reason)


def find_clang() -> str | None:
    """clang++, else the newest versioned clang++-N on PATH (.ci/run's test)."""
    path = shutil.which("clang++")
    if path:
        return path
    versioned = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        for candidate in Path(directory).glob("clang++-*") if directory else []:
            suffix = candidate.name.split("-", 1)[1]
            if suffix.isdigit() and os.access(candidate, os.X_OK):
                versioned.append((int(suffix), str(candidate)))
    return max(versioned)[1] if versioned else None


def macos_mlx_root() -> Path:
    """The unpacked macOS mlx-metal wheel (its ``mlx`` directory)."""
    cache = Path(os.environ.get("MLX_MOE_MACOS_MLX_CACHE", Path.home() / ".cache" / "mlx-moe-kernels"))
    root = cache / f"mlx-metal-{MLX_VERSION}-macosx_14_0_arm64"
    if (root / "mlx" / "share" / "cmake" / "MLX" / "MLXConfig.cmake").exists():
        return root / "mlx"
    download = cache / "download"
    download.mkdir(parents=True, exist_ok=True)
    wheels = list(download.glob(f"mlx_metal-{MLX_VERSION}-*macosx*.whl"))
    if not wheels:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--platform", "macosx_14_0_arm64", f"mlx-metal=={MLX_VERSION}", "-d", str(download)],
            capture_output=True, text=True, timeout=600,
        )
        wheels = list(download.glob(f"mlx_metal-{MLX_VERSION}-*macosx*.whl"))
        if result.returncode != 0 or not wheels:
            unavailable(f"cannot download the macOS mlx-metal wheel: {result.stderr.strip()[-400:]}")
    partial = cache / (root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(partial)
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root / "mlx"


@pytest.fixture(scope="module")
def clang() -> str:
    path = find_clang()
    if path is None:
        unavailable("no clang++ (metal-cpp needs clang's -fblocks)")
    return path


@pytest.fixture(scope="module")
def configured(clang, tmp_path_factory) -> Path:
    """The build directory of CMakeLists.txt configured against macOS MLX."""
    cmake = shutil.which("cmake")
    if cmake is None:
        unavailable("no cmake")
    try:
        import nanobind  # noqa: F401  (CMakeLists.txt asks it for its CMake dir)
    except ImportError:
        unavailable("nanobind is not installed (pip install '.[test]')")
    mlx = macos_mlx_root()
    build = tmp_path_factory.mktemp("macos-configure")
    result = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), "-G", "Unix Makefiles",
         "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
         f"-DCMAKE_CXX_COMPILER={clang}",
         f"-DPython_EXECUTABLE={sys.executable}",
         f"-DMLX_MOE_MLX_CMAKE_DIR={mlx / 'share' / 'cmake' / 'MLX'}",
         # find_library looks for libmlx.so on Linux; the wheel has the dylib.
         f"-DMLX_LIBRARY={mlx / 'lib' / 'libmlx.dylib'}"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "building the Metal kernels and their dispatch" in result.stdout
    return build


def compile_commands(build: Path) -> dict[str, list[str]]:
    """Repository-relative source -> its compiler arguments."""
    commands = {}
    for entry in json.loads((build / "compile_commands.json").read_text()):
        path = Path(entry["file"]).resolve()
        if path.is_relative_to(ROOT):  # not nanobind's own sources
            commands[path.relative_to(ROOT).as_posix()] = shlex.split(entry["command"])
    return commands


def syntax_only(arguments: list[str], source: Path | None = None) -> subprocess.CompletedProcess:
    """A CMake compile command turned into clang -fsyntax-only -Werror, with
    the macOS system-header stand-ins; `source` replaces the compiled file."""
    args = list(arguments)
    out = args.index("-o")
    del args[out:out + 2]
    file_at = args.index("-c") + 1
    if source is not None:
        args[file_at] = str(source)
    args.remove("-c")
    args[1:1] = ["-fsyntax-only", "-fblocks", "-Wall", "-Wextra", "-Werror", "-isystem", str(STUBS)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_cmake_builds_the_metallib_from_every_metal_source(configured):
    rules = (configured / "CMakeFiles" / "mlx_moe_metallib.dir" / "build.make").read_text()
    sources = sorted((ROOT / "csrc" / "metal").glob("*.metal"))
    assert len(sources) == 5
    for source in sources:
        compile_lines = [line for line in rules.splitlines()
                         if "xcrun -sdk macosx metal" in line and f"-c {source}" in line]
        assert len(compile_lines) == 1, source.name
        assert "-std=metal3.1" in compile_lines[0]
        assert f"-I{ROOT / 'csrc' / 'metal'}" in compile_lines[0]  # the *_params.h headers
    link = [line for line in rules.splitlines() if re.search(r"-o \S*/mlx_moe_kernels\.metallib$", line)]
    assert len(link) == 1
    assert link[0].count(".air") == len(sources)
    install = (configured / "cmake_install.cmake").read_text()
    assert re.search(r'DESTINATION "\$\{CMAKE_INSTALL_PREFIX\}/mlx_moe_kernels".*mlx_moe_kernels\.metallib', install)


def test_metal_builds_compile_the_dispatch_not_the_stubs(configured):
    commands = compile_commands(configured)
    assert METAL_DISPATCH <= set(commands)
    assert "csrc/no_gpu/eval_gpu.cpp" not in commands
    for source in METAL_DISPATCH:
        assert "-DMLX_MOE_METAL=1" in commands[source]


def library_sources():
    """Every source of the library a Mac compiles (known without configuring)."""
    names = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "csrc").rglob("*.cpp"))]
    return [n for n in names if n not in X86_ONLY and n != "csrc/bindings.cpp" and not n.startswith("csrc/no_gpu/")]


@pytest.mark.parametrize("source", library_sources())
def test_compiles_syntax_only_against_the_macos_headers(configured, source):
    commands = compile_commands(configured)
    assert source in commands, f"{source} is not compiled by the Metal build"
    result = syntax_only(commands[source])
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize(
    "source, good, bad, message",
    [
        # A method MLX's CommandEncoder does not have.
        ("csrc/metal/gather_mm.cpp", "encoder.set_input_array(lhs, 6);",
         "encoder.set_input_arrays(lhs, 6);", "set_input_arrays"),
        # A metal-cpp call with the wrong name.
        ("csrc/metal/dispatch.cpp", "kernel->maxTotalThreadsPerThreadgroup()",
         "kernel->maxThreadsPerThreadgroup()", "maxThreadsPerThreadgroup"),
        # The plan's grid passed where MTL::Size is wanted.
        ("csrc/metal/dispatch.cpp", "MTL::Size(grid[0], grid[1], grid[2])", "grid", "dispatch_threadgroups"),
    ],
)
def test_the_syntax_check_rejects_broken_dispatch_code(configured, tmp_path, source, good, bad, message):
    text = (ROOT / source).read_text()
    assert good in text
    broken = tmp_path / Path(source).name
    broken.write_text(text.replace(good, bad, 1))
    result = syntax_only(compile_commands(configured)[source], broken)
    assert result.returncode != 0
    assert message in result.stderr
