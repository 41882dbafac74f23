"""Build .metal sources into a simulator library and launch their kernels.

    lib = build(["kernels/reduce.metal"], build_dir=tmp, defines={"N": 4})
    out = np.zeros(4, np.float32)
    lib.launch("reduce_sum", [x, out, np.uint32(n)],
               threadgroups=(4, 1, 1), threads_per_threadgroup=(256, 1, 1))

Pipeline (see README.md): ``g++ -E`` expands the .metal file (its own
includes and macros; <metal_stdlib> is an empty stub), a text pre-pass
rewrites what C++ cannot express (threadgroup variables, kernel
registration with each parameter's [[...]] attribute), then g++ compiles
the result with ``-include msl_shim.h`` (and, for race detection,
``-fsanitize=thread``, whose hooks msl_runtime.cpp implements) and links it
with the runtime into a shared library loaded with ctypes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence


import numpy as np

HERE = Path(__file__).resolve().parent
SHIM = HERE / "msl_shim.h"
ABI = HERE / "msl_abi.h"
RUNTIME = HERE / "msl_runtime.cpp"
STUB_INCLUDE = HERE / "include"
CXX = os.environ.get("CXX", "g++")


# host_name("a" "b" ...): adjacent string literals (what MLX-style
# instantiation macros make of "prefix_" #type) are one name, as in C++.
_HOST_NAME = re.compile(r'host_name\(\s*((?:"[^"]*"\s*)+)\)')


def _host_name(text: str) -> Optional[str]:
    """The kernel name in the first host_name(...) attribute of `text`."""
    m = _HOST_NAME.search(text)
    return "".join(re.findall(r'"([^"]*)"', m.group(1))) if m else None

# What the Apple compiler predefines that kernels test (MSL 3.1: bfloat).
METAL_DEFINES = {"__METAL_VERSION__": "310", "__HAVE_BFLOAT__": "1", "__METAL_SIM__": "1"}
CXXFLAGS = ["-std=c++20", "-fPIC", "-fvisibility=hidden", "-Wno-attributes", "-ffp-contract=off"]
# -fsanitize=thread only at compile time: the hooks are ours (msl_runtime.cpp).
RACE_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}

# [[attribute]] of a kernel parameter -> binding code of msl::detail::binding_kind.
POSITION_ATTRIBUTES = {
    "thread_position_in_grid": 2,
    "threadgroup_position_in_grid": 3,
    "thread_position_in_threadgroup": 4,
    "threads_per_threadgroup": 5,
    "threadgroups_per_grid": 6,
    "threads_per_grid": 7,
    "thread_index_in_threadgroup": 8,
    "thread_index_in_simdgroup": 9,
    "simdgroup_index_in_threadgroup": 10,
    "simdgroups_per_threadgroup": 11,
    "threads_per_simdgroup": 12,
    "thread_execution_width": 12,
}


class BuildError(RuntimeError):
    """The .metal source could not be pre-processed or compiled."""


class MetalSimError(AssertionError):
    """A launch reported errors (race, out-of-bounds access, divergence...)."""

    def __init__(self, message: str, diagnostics: list):
        super().__init__(message)
        self.diagnostics = diagnostics


# ------------------------------------------------------------------ pre-pass
_CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _match(text: str, i: int) -> int:
    """Index of the bracket closing text[i] (string literals skipped)."""
    open_ch = text[i]
    close_ch = _CLOSE[open_ch]
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c in "\"'":
            j += 1
            while j < len(text) and text[j] != c:
                j += 2 if text[j] == "\\" else 1
        elif c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise BuildError(f"unbalanced {open_ch!r} at offset {i}")


def _split_params(text: str) -> list:
    parts, depth, start = [], 0, 0
    for j, c in enumerate(text):
        if c in "([<{":
            depth += 1
        elif c in ")]>}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:j])
            start = j + 1
    if text[start:].strip():
        parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _binding(param: str, kernel: str) -> str:
    m = re.search(r"\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?[^\]]*\]\]", param)
    if not m:
        raise BuildError(f"[{kernel}] parameter without an attribute: {param!r}")
    attr, index = m.group(1), int(m.group(2) or 0)
    if attr == "buffer":
        return f"0:{index}"
    if attr == "msl_threadgroup":
        return f"1:{index}"
    if attr in POSITION_ATTRIBUTES:
        return f"{POSITION_ATTRIBUTES[attr]}:0"
    raise BuildError(f"[{kernel}] unsupported parameter attribute [[{attr}]] in {param!r}")


@dataclass
class _Kernel:
    name: str
    spec: str
    is_template: bool
    host_name: Optional[str]
    body_end: int  # index of the closing brace


def _attributes_before(text: str, j: int):
    """[[...]] blocks and `kernel` keywords right before offset j."""
    attrs, is_kernel = [], False
    while True:
        k = j
        while k > 0 and text[k - 1].isspace():
            k -= 1
        if text[:k].endswith("]]"):
            start = text.rfind("[[", 0, k)
            if start < 0:
                break
            attrs.append(text[start + 2 : k - 2])
            j = start
        elif re.search(r"\bkernel$", text[max(0, k - 7) : k]):
            is_kernel = True
            j = k - len("kernel")
        else:
            return attrs, is_kernel, k


def _find_kernels(text: str) -> dict:
    kernels = {}
    for m in re.finditer(r"\bvoid\s+([A-Za-z_]\w*)\s*\(", text):
        attrs, is_kernel, k = _attributes_before(text, m.start())
        is_kernel |= any(re.search(r"\bkernel\b", a) for a in attrs)
        if not is_kernel:
            continue
        name = m.group(1)
        open_paren = m.end() - 1
        close = _match(text, open_paren)
        rest = text[close + 1 :].lstrip()
        if not rest.startswith("{"):
            continue  # a declaration
        body = close + 1 + (len(text[close + 1 :]) - len(rest))
        body_end = _match(text, body)
        params = _split_params(text[open_paren + 1 : close])
        spec = ",".join(_binding(p, name) for p in params)
        is_template = False
        if k > 0 and text[k - 1] == ">":
            depth, i = 0, k - 1
            while i >= 0:
                if text[i] == ">":
                    depth += 1
                elif text[i] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                i -= 1
            is_template = bool(re.search(r"\btemplate\s*$", text[max(0, i - 20) : i]))
        host = None
        for a in attrs:
            h = _host_name(a)
            if h:
                host = h
        kernels[name] = _Kernel(name, spec, is_template, host, body_end)
    return kernels


_TG_DECL = re.compile(r"(?<![\w.])threadgroup\s+([^;{}()=*&\[\]]+?)\s+([A-Za-z_]\w*)\s*((?:\[[^;\]]*\]\s*)*);")


def preprocess(text: str) -> tuple:
    """The pre-pass over ``g++ -E`` output. Returns (C++ text, kernel names)."""
    # `const constant T&` is legal MSL; `constant` becomes `const` (shim macro).
    text = re.sub(r"\bconst\s+constant\b|\bconstant\s+const\b", "const", text)
    # [[threadgroup(n)]] would lose its name to the `threadgroup` macro.
    text = re.sub(r"\[\[\s*threadgroup\s*\(", "[[msl_threadgroup(", text)

    def tg_var(m):
        typ, name, dims = m.group(1).strip(), m.group(2), re.sub(r"\s+", "", m.group(3))
        newlines = m.group(0).count("\n")
        return f'auto& {name} = ::msl::detail::tg_var<{typ}{dims}>("{name}", []{{}});' + "\n" * newlines

    text = _TG_DECL.sub(tg_var, text)

    kernels = _find_kernels(text)
    names = []
    edits = []  # (start, end, replacement)
    counter = 0
    # Explicit instantiations with attributes:
    #   template [[host_name("n")]] [[kernel]] decltype(f<T>) f<T>;
    #   template [[host_name("n")]] [[kernel]] void f<T>(params);
    for m in re.finditer(r"\btemplate\s*(?=\[\[)", text):
        j = m.end()
        host = None
        while True:
            while text[j].isspace():
                j += 1
            if text.startswith("[[", j):
                end = text.index("]]", j)
                h = _host_name(text[j:end])
                host = h if h else host
                j = end + 2
            elif re.match(r"kernel\b", text[j:]):
                j += len("kernel")
            else:
                break
        semi = text.index(";", j)
        decl = text[j:semi]
        if decl.startswith("decltype"):
            p = text.index("(", j)
            expr = text[p + 1 : _match(text, p)].strip()
        else:
            v = re.match(r"void\s+([\w:]+)\s*<", decl)
            if not v:
                raise BuildError(f"unrecognised kernel instantiation: {text[m.start():semi + 1]!r}")
            lt = j + v.end() - 1
            expr = v.group(1) + text[lt : _match(text, lt) + 1]
        base = re.match(r"\s*(?:::)?(?:\w+::)*(\w+)\s*<", expr)
        if not base or base.group(1) not in kernels:
            raise BuildError(f"instantiation of an unknown kernel template: {expr!r}")
        kern = kernels[base.group(1)]
        host = host or expr
        counter += 1
        names.append(host)
        reg = (
            f" static ::msl::detail::registrar msl_sim_reg_{counter}(\"{host}\", "
            f"std::integral_constant<decltype(&{expr}), &{expr}>{{}}, \"{kern.spec}\");"
        )
        edits.append((m.start(), semi + 1, "template " + decl + ";" + reg))
    # Non-template kernels: register right after the body (same scope).
    for kern in kernels.values():
        if kern.is_template:
            continue
        counter += 1
        host = kern.host_name or kern.name
        names.append(host)
        reg = (
            f" static ::msl::detail::registrar msl_sim_reg_{counter}(\"{host}\", "
            f"std::integral_constant<decltype(&{kern.name}), &{kern.name}>{{}}, \"{kern.spec}\");"
        )
        edits.append((kern.body_end + 1, kern.body_end + 1, reg))
    for start, end, rep in sorted(edits, reverse=True):
        text = text[:start] + rep + text[end:]
    return text, names


# ------------------------------------------------------------------- build
def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"command failed: {' '.join(cmd)}\n{proc.stderr}")
    return proc.stdout


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _runtime_object(build_dir: Path) -> Path:
    flags = CXXFLAGS + ["-O2"]
    key = _digest(RUNTIME.read_bytes(), ABI.read_bytes(), CXX, flags)
    obj = build_dir / f"msl_runtime-{key}.o"
    if not obj.exists():
        tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
        _run([CXX, *flags, "-I", str(HERE), "-c", str(RUNTIME), "-o", str(tmp)])
        tmp.replace(obj)
    return obj


def build(
    sources: Iterable,
    *,
    build_dir,
    defines: Optional[Mapping[str, object]] = None,
    include_dirs: Sequence = (),
    race_check: bool = True,
    opt: str = "-O1",
) -> "Library":
    """Compile .metal ``sources`` into a simulator library (cached by content
    in ``build_dir``). ``defines`` are -D macros (e.g. a fault toggle);
    ``race_check`` instruments memory accesses (race, bounds and uninitialised
    threadgroup memory checks; off: faster, results only)."""
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    defs = dict(METAL_DEFINES)
    defs.update({k: ("1" if v is True else str(v)) for k, v in (defines or {}).items()})
    dflags = [f"-D{k}={v}" for k, v in sorted(defs.items())]
    flags = CXXFLAGS + [opt, "-g1"] + (RACE_FLAGS if race_check else [])
    objects, names = [], []
    for src in sources:
        src = Path(src).resolve()
        incs = ["-I", str(STUB_INCLUDE), "-I", str(src.parent)]
        for d in include_dirs:
            incs += ["-I", str(Path(d).resolve())]
        expanded = _run([CXX, "-E", "-x", "c++", "-std=c++20", *dflags, *incs, str(src)])
        text, kernel_names = preprocess(expanded)
        names += kernel_names
        key = _digest(text, SHIM.read_bytes(), ABI.read_bytes(), CXX, flags)
        obj = build_dir / f"{src.stem}-{key}.o"
        if not obj.exists():
            cpp = build_dir / f"{src.stem}-{key}.cpp"
            cpp.write_text(text)
            tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
            _run([CXX, *flags, "-I", str(HERE), "-include", str(SHIM), "-x", "c++", "-c", str(cpp), "-o", str(tmp)])
            tmp.replace(obj)
        objects.append(obj)
    runtime = _runtime_object(build_dir)
    key = _digest(*[o.name for o in objects], runtime.name)
    lib = build_dir / f"metal_sim-{key}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp.so")
        _run([CXX, "-shared", "-o", str(tmp), *map(str, objects), str(runtime), "-Wl,-z,defs", "-ldl"])
        tmp.replace(lib)
    return Library(lib, race_check=race_check)


# ------------------------------------------------------------------ launch
class _LaunchDesc(ctypes.Structure):
    _fields_ = [
        ("kernel", ctypes.c_char_p),
        ("threadgroups", ctypes.c_uint32 * 3),
        ("threads", ctypes.c_uint32 * 3),
        ("grid_threads", ctypes.c_uint32 * 3),
        ("nbuffers", ctypes.c_int32),
        ("buffers", ctypes.POINTER(ctypes.c_void_p)),
        ("buffer_sizes", ctypes.POINTER(ctypes.c_uint64)),
        ("ntg", ctypes.c_int32),
        ("tg_sizes", ctypes.POINTER(ctypes.c_uint64)),
        ("schedule", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("preempt", ctypes.c_double),
        ("race_check", ctypes.c_int32),
        ("strict", ctypes.c_int32),
        ("stack_size", ctypes.c_uint64),
    ]


def _dims(v) -> tuple:
    v = (v,) if isinstance(v, int) else tuple(v)
    return tuple(v) + (1,) * (3 - len(v))


@dataclass
class LaunchResult:
    diagnostics: list = field(default_factory=list)

    @property
    def errors(self) -> list:
        return [d for d in self.diagnostics if d["severity"] == "error"]

    @property
    def warnings(self) -> list:
        return [d for d in self.diagnostics if d["severity"] == "warning"]

    def kinds(self) -> set:
        return {d["kind"] for d in self.diagnostics}


class Library:
    """A built simulator library: its kernels and ``launch``."""

    def __init__(self, path: Path, race_check: bool):
        self.path = Path(path)
        self.race_check = race_check
        self._lib = ctypes.CDLL(str(self.path))
        self._lib.msl_sim_launch.argtypes = [ctypes.POINTER(_LaunchDesc), ctypes.c_char_p, ctypes.c_size_t]
        self._lib.msl_sim_launch.restype = ctypes.c_int
        self._lib.msl_sim_kernel_name.restype = ctypes.c_char_p
        n = self._lib.msl_sim_kernel_count()
        self.kernels = [self._lib.msl_sim_kernel_name(i).decode() for i in range(n)]

    def launch(
        self,
        kernel: str,
        buffers: Sequence,
        *,
        threads_per_threadgroup,
        threadgroups=None,
        grid=None,
        threadgroup_memory: Sequence[int] = (),
        schedule: str = "forward",
        seed: int = 0,
        preempt: float = 0.0,
        strict: bool = True,
        stack_size: int = 0,
        check: bool = True,
    ) -> LaunchResult:
        """Run ``kernel`` like Metal's dispatchThreadgroups (``threadgroups``)
        or dispatchThreads (``grid``, in threads: edge threadgroups partial).

        ``buffers[i]`` binds [[buffer(i)]]: a C-contiguous NumPy array (the
        kernel works on a copy between poisoned redzones, copied back into the
        array afterwards), or bytes / a NumPy scalar / a ctypes structure
        (setBytes: copied in only). ``threadgroup_memory[i]`` is the byte
        length of [[threadgroup(i)]]. ``schedule``: "forward" (lowest thread
        index runs first), "reverse" or "random" (``seed``; ``preempt``: the
        chance of switching threads at each shared-memory access, needs the
        race-checked build). With ``check`` a launch that reports an error
        raises MetalSimError; warnings are only returned."""
        if (threadgroups is None) == (grid is None):
            raise ValueError("give exactly one of threadgroups= or grid=")
        keep = []
        ptrs = (ctypes.c_void_p * max(1, len(buffers)))()
        sizes = (ctypes.c_uint64 * max(1, len(buffers)))()
        for i, b in enumerate(buffers):
            if isinstance(b, np.ndarray):
                if not b.flags.c_contiguous or not b.flags.writeable:
                    raise ValueError(f"buffer({i}) must be a writeable C-contiguous array")
                ptrs[i], sizes[i] = b.ctypes.data if b.nbytes else None, b.nbytes
                keep.append(b)
            else:
                raw = bytes(b) if isinstance(b, (bytes, bytearray, ctypes.Structure)) else np.asarray(b).tobytes()
                cbuf = ctypes.create_string_buffer(raw, len(raw))
                keep.append(cbuf)
                ptrs[i], sizes[i] = ctypes.addressof(cbuf), len(raw)
        tgs = (ctypes.c_uint64 * max(1, len(threadgroup_memory)))(*threadgroup_memory)
        desc = _LaunchDesc()
        desc.kernel = kernel.encode()
        desc.threads = (ctypes.c_uint32 * 3)(*_dims(threads_per_threadgroup))
        if grid is not None:
            desc.grid_threads = (ctypes.c_uint32 * 3)(*_dims(grid))
        else:
            desc.threadgroups = (ctypes.c_uint32 * 3)(*_dims(threadgroups))
        desc.nbuffers = len(buffers)
        desc.buffers = ptrs
        desc.buffer_sizes = sizes
        desc.ntg = len(threadgroup_memory)
        desc.tg_sizes = tgs
        desc.schedule = SCHEDULES[schedule]
        desc.seed = seed
        desc.preempt = preempt
        desc.race_check = int(self.race_check)
        desc.strict = int(strict)
        desc.stack_size = stack_size
        out = ctypes.create_string_buffer(1 << 20)
        rc = self._lib.msl_sim_launch(ctypes.byref(desc), out, len(out))
        diags = self._symbolize(json.loads(out.value.decode()))
        result = LaunchResult(diags)
        if check and (rc != 0 or result.errors):
            text = "\n".join(f"  {d['severity']} [{d['kind']}] x{d['count']}: {d['message']}" for d in diags)
            raise MetalSimError(f"{kernel}: the simulator reported\n{text}", diags)
        return result

    def _symbolize(self, diags: list) -> list:
        """[pc:0x...] -> file:line of the kernel source (addr2line)."""
        pcs = sorted({p for d in diags for p in re.findall(r"\[pc:(0x[0-9a-f]+)\]", d["message"])})
        if not pcs:
            return diags
        try:
            # a return address points after the call: look up pc - 1
            args = [hex(int(p, 16) - 1) for p in pcs]
            out = subprocess.run(["addr2line", "-e", str(self.path), *args], capture_output=True, text=True).stdout
            lines = out.splitlines()
        except OSError:
            return diags
        names = {p: f"at {Path(l.split(' ')[0]).name}" if l and not l.startswith("??") else f"[pc:{p}]"
                 for p, l in zip(pcs, lines)}
        for d in diags:
            d["message"] = re.sub(r"\[pc:(0x[0-9a-f]+)\]", lambda m: names.get(m.group(1), m.group(0)), d["message"])
        return diags
