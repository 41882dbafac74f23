"""``mlx-moe selftest``: what this machine is, whether every kernel family
computes the right numbers on it, and how fast ours is against MLX's own
ops, as a Markdown summary a user can paste into an issue (and JSON).

For every device MLX has here (the CPU; the GPU when Metal or CUDA is
available) and every dtype, each kernel family runs on small inputs whose
sizes are not multiples of any tile, and its result is compared with a
float64 NumPy oracle, as is MLX's own op (or mlx-lm's composition) on the
same inputs: a family passes when ours is within the dtype's tolerance.
Then the MoE layer (``switch_glu``, bfloat16 and 4-bit, on Qwen3-30B-A3B's
expert shapes) is timed, ours against the stock composition, for three
shape classes: decode (1 token), a short prompt (16) and a long one (128).
Timings here are warm (weights in cache after the first call) and few: a
coarse check that ours is not slower on this machine, not a benchmark
(``mlx-moe bench`` is one).

The runtime dispatch table that issue 19 asks for (choosing ours or stock
per shape class from such timings) is not built yet: the ``faster`` column
says what it would choose.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

import mlx_moe_kernels as mk
from mlx_moe_kernels import _ext, reference
from mlx_moe_kernels.dispatch import median_call_ms

# Largest |ours - oracle| relative to max(1, max |oracle|) that passes.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Qwen3-30B-A3B's experts: D, H, E, k.
TIMED_SHAPE = (2048, 768, 128, 8)
SHAPE_CLASSES = {"decode": 1, "short prompt": 16, "long prompt": 128}


@dataclass
class Check:
    """One kernel family on one device and dtype."""

    family: str
    device: str
    dtype: str
    ours_error: float
    stock_error: Optional[float]  # None: MLX's op does not run this case here
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.ours_error)) and self.ours_error <= self.tolerance


@dataclass
class Timing:
    """Ours against stock for one op, device and shape class (median ms)."""

    op: str
    device: str
    shape_class: str
    tokens: int
    ours_ms: float
    stock_ms: Optional[float]
    note: str = ""

    @property
    def faster(self) -> str:
        if self.stock_ms is None:
            return "ours"
        return "ours" if self.ours_ms <= self.stock_ms else "stock"


@dataclass
class SelfTestReport:
    """Everything the self-test found."""

    machine: Dict[str, Any]
    checks: List[Check] = field(default_factory=list)
    timings: List[Timing] = field(default_factory=list)

    @property
    def failures(self) -> List[str]:
        return [f"{c.family} on {c.device} in {c.dtype}: error {c.ours_error:.3g} > {c.tolerance:g}"
                for c in self.checks if not c.passed]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: the machine, every check and timing (with its
        verdict), and a summary."""
        return {
            "machine": self.machine,
            "checks": [dict(asdict(c), passed=c.passed) for c in self.checks],
            "timings": [dict(asdict(t), faster=t.faster) for t in self.timings],
            "summary": {"passed": not self.failures, "failures": self.failures},
        }

    def markdown(self) -> str:
        """The report as Markdown (for an issue)."""
        m = self.machine
        lines = [
            "## mlx-moe selftest", "",
            f"- mlx-moe-kernels {m['mlx_moe_kernels_version']}, MLX {m['mlx_version']}, Python {m['python']}",
            f"- {m['platform']} ({m['machine']}); CPU: {m['cpu']}; CPU kernel build: {m['cpu_kernel_build']}; "
            f"threads: {m['threads']}",
            f"- GPU: {m['gpu']}",
            "", "### Correctness (max error relative to a float64 oracle)", "",
            "| family | device | dtype | ours | MLX's | tolerance | |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in self.checks:
            stock = "n/a" if c.stock_error is None else f"{c.stock_error:.2e}"
            lines.append(f"| {c.family} | {c.device} | {c.dtype} | {c.ours_error:.2e} | {stock} | "
                         f"{c.tolerance:g} | {'ok' if c.passed else '**FAIL**'} |")
        lines += ["", "### Speed (switch_glu, Qwen3-30B-A3B experts, warm, median ms)", "",
                  "| op | device | class | tokens | ours | stock | faster |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for t in self.timings:
            stock = "-" if t.stock_ms is None else f"{t.stock_ms:.2f}"
            note = f" ({t.note})" if t.note else ""
            lines.append(f"| {t.op} | {t.device} | {t.shape_class} | {t.tokens} | {t.ours_ms:.2f} | "
                         f"{stock}{note} | {t.faster} |")
        lines += ["", "All checks passed." if not self.failures else "FAILED: " + "; ".join(self.failures)]
        return "\n".join(lines)


# --------------------------------------------------------------- machine
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_description() -> str:
    if mx.metal.is_available():
        info = mx.device_info()
        keys = ("device_name", "architecture", "memory_size", "max_buffer_length", "max_recommended_working_set_size")
        return "Metal: " + ", ".join(f"{k}={info[k]}" for k in keys if k in info)
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "CUDA: " + str(mx.device_info())
    return "none (MLX has no GPU here)"


def machine_facts() -> Dict[str, Any]:
    """Platform, versions, CPU and its kernel build, threads, GPU."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "mlx_moe_kernels_version": mk.__version__,
        "cpu": _cpu_name(),
        "cpu_kernel_build": _ext._cpu_kernel_build(),
        "threads": os.environ.get("MLX_MOE_NUM_THREADS") or os.cpu_count(),
        "gpu": _gpu_description(),
    }


def devices() -> List[Tuple[str, mx.Device]]:
    """The devices to check: the CPU, and the GPU when MLX has one."""
    found = [("cpu", mx.cpu)]
    cuda = getattr(mx, "cuda", None)
    if mx.metal.is_available() or (cuda is not None and cuda.is_available()):
        found.append(("gpu", mx.gpu))
    return found


# --------------------------------------------------------------- checks
def _f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def _error(got: mx.array, want: np.ndarray) -> float:
    got64 = _f64(got)
    if got64.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got64 - want), initial=0.0) / max(1.0, np.max(np.abs(want), initial=0.0)))


def _silu(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


def _swiglu_oracle(x, gate, up, down, ids, scores):
    """float64 SwitchGLU with the score-weighted combine."""
    out = np.zeros((x.shape[0], down.shape[1]))
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            h = _silu(gate[e] @ x[t]) * (up[e] @ x[t])
            out[t] += scores[t, j] * (down[e] @ h)
    return out


def _rand(rng, shape, dtype, scale=1.0):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _families(dtype: mx.Dtype, rng: np.random.Generator) -> Dict[str, Callable]:
    """family -> a function of a stream returning (ours, stock, oracle)."""
    def gather_mm(s):
        a, b = _rand(rng, (6, 1, 40), dtype), _rand(rng, (4, 40, 24), dtype)
        rhs = mx.array([0, 3, 1, 1, 2, 0], dtype=mx.uint32)
        want = np.stack([_f64(a)[i] @ _f64(b)[e] for i, e in enumerate(np.array(rhs))])
        return mk.gather_mm(a, b, rhs_indices=rhs, stream=s), mx.gather_mm(a, b, rhs_indices=rhs, stream=s), want

    def gather_qmm(s):
        x, w = _rand(rng, (6, 1, 64), dtype), _rand(rng, (4, 24, 64), dtype)
        q, sc, bi = mx.quantize(w, 32, 4)
        rhs = mx.array([0, 3, 1, 1, 2, 0], dtype=mx.uint32)
        full = _f64(mx.dequantize(q, sc, bi, 32, 4))
        want = np.stack([_f64(x)[i] @ full[e].T for i, e in enumerate(np.array(rhs))])
        args = dict(rhs_indices=rhs, transpose=True, group_size=32, bits=4, stream=s)
        return mk.gather_qmm(x, q, sc, bi, **args), mx.gather_qmm(x, q, sc, bi, **args), want

    def switch_glu(s, quantized=False):
        D, H, E = (64, 64, 4) if quantized else (40, 24, 4)
        x = _rand(rng, (5, D), dtype)
        weights = [_rand(rng, shape, dtype, 0.3) for shape in ((E, H, D), (E, H, D), (E, D, H))]
        ids = mx.array(np.stack([rng.permutation(E)[:2] for _ in range(5)]).astype(np.uint32))
        scores = mx.softmax(_rand(rng, (5, 2), mx.float32), axis=-1).astype(dtype)
        if quantized:
            triples = [mx.quantize(w, 32, 4) for w in weights]
            full = [_f64(mx.dequantize(*t, 32, 4)) for t in triples]
            want = _swiglu_oracle(_f64(x), *full, np.array(ids), _f64(scores))
            fmt = dict(group_size=32, bits=4)
            return (mk.switch_glu(x, *triples, ids, scores, stream=s, **fmt),
                    reference.switch_glu(x, *triples, ids, scores, stream=s, **fmt), want)
        want = _swiglu_oracle(_f64(x), *(_f64(w) for w in weights), np.array(ids), _f64(scores))
        return mk.switch_glu(x, *weights, ids, scores, stream=s), reference.switch_glu(x, *weights, ids, scores, stream=s), want

    def linear(s):
        x, w = _rand(rng, (3, 40), dtype), _rand(rng, (24, 40), dtype)
        return mk.linear(x, w, stream=s), mx.matmul(x, w.T, stream=s), _f64(x) @ _f64(w).T

    def quantized_linear(s):
        x, w = _rand(rng, (3, 64), dtype), _rand(rng, (24, 64), dtype)
        q, sc, bi = mx.quantize(w, 32, 4)
        want = _f64(x) @ _f64(mx.dequantize(q, sc, bi, 32, 4)).T
        return (mk.quantized_linear(x, q, sc, bi, 32, 4, stream=s),
                mx.quantized_matmul(x, q, sc, bi, True, 32, 4, stream=s), want)

    def attention(s):
        q, k, v = _rand(rng, (1, 4, 3, 16), dtype), _rand(rng, (1, 2, 7, 16), dtype), _rand(rng, (1, 2, 7, 16), dtype)
        # Each of the 2 KV heads serves 2 consecutive query heads.
        q64, k64, v64 = _f64(q), np.repeat(_f64(k), 2, axis=1), np.repeat(_f64(v), 2, axis=1)
        scores = q64 @ np.swapaxes(k64, -1, -2) * 0.25
        visible = (np.arange(3)[:, None] + 4) >= np.arange(7)[None, :]
        scores = np.where(visible, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        want = (weights / weights.sum(-1, keepdims=True)) @ v64
        return (mk.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal", stream=s),
                mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal", stream=s), want)

    def rope(s):
        x = _rand(rng, (1, 2, 5, 16), dtype)
        x64 = _f64(x)
        freqs = 10000.0 ** (-np.arange(8) / 8)
        angles = (np.arange(5)[:, None] + 3) * freqs[None, :]
        first, second = x64[..., :8], x64[..., 8:]
        want = np.concatenate([first * np.cos(angles) - second * np.sin(angles),
                               first * np.sin(angles) + second * np.cos(angles)], axis=-1)
        args = dict(traditional=False, base=10000.0, scale=1.0, offset=3, stream=s)
        return mk.rope(x, 16, **args), mx.fast.rope(x, 16, **args), want

    def rms_norm(s):
        x, w = _rand(rng, (3, 40), dtype), _rand(rng, (40,), dtype)
        x64 = _f64(x)
        want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * _f64(w)
        return mk.rms_norm(x, w, 1e-6, stream=s), mx.fast.rms_norm(x, w, 1e-6, stream=s), want

    def softmax_top_k(s):
        logits = _rand(rng, (5, 20), dtype, 3.0)
        ids, scores = mk.softmax_top_k(logits, 4, True, stream=s)
        stock_ids, stock_scores = reference.softmax_top_k(logits, 4, True, stream=s)
        l64 = _f64(logits)
        probs = np.exp(l64 - l64.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)

        def at(chosen):  # the oracle's normalized probabilities of the chosen experts
            picked = np.take_along_axis(probs, np.array(chosen).astype(np.int64), -1)
            return picked / picked.sum(-1, keepdims=True)

        # Compared as the oracle at each one's own choice (ties may differ).
        return scores, (stock_scores, at(stock_ids)), at(ids)

    return {
        "gather_mm": gather_mm, "gather_qmm (4-bit)": gather_qmm, "switch_glu": switch_glu,
        "switch_glu (4-bit)": lambda s: switch_glu(s, quantized=True), "linear": linear,
        "quantized_linear (4-bit)": quantized_linear, "scaled_dot_product_attention": attention,
        "rope": rope, "rms_norm": rms_norm, "softmax_top_k": softmax_top_k,
    }


def run_checks(seed: int = 0) -> List[Check]:
    """Every family on every device and dtype against the oracle."""
    checks = []
    for device_name, device in devices():
        for dtype_name, dtype in DTYPES.items():
            rng = np.random.default_rng(seed)
            for family, make in _families(dtype, rng).items():
                ours, stock, want = make(device)
                try:
                    if isinstance(stock, tuple):  # (stock result, oracle at stock's choice)
                        stock_error = _error(stock[0], stock[1])
                    else:
                        stock_error = _error(stock, want)
                except RuntimeError:  # MLX's op lacks this dtype on this device
                    stock_error = None
                checks.append(Check(family, device_name, dtype_name, _error(ours, want), stock_error,
                                    TOLERANCE[dtype_name]))
    return checks


# --------------------------------------------------------------- timings
def run_timings(classes: Dict[str, int] = SHAPE_CLASSES, repeats: int = 3, seed: int = 0) -> List[Timing]:
    """switch_glu, ours vs the stock composition, bfloat16 and 4-bit, per
    device and shape class. MLX's CPU gather ops take seconds per call: on
    the CPU the stock path is timed at decode only, once."""
    D, H, E, k = TIMED_SHAPE
    rng = np.random.default_rng(seed)
    weights = [_rand(rng, shape, mx.bfloat16, 0.02) for shape in ((E, H, D), (E, H, D), (E, D, H))]
    triples = [mx.quantize(w, 64, 4) for w in weights]
    mx.eval(weights, triples)
    timings = []
    for device_name, device in devices():
        for shape_class, tokens in classes.items():
            x = _rand(rng, (tokens, D), mx.bfloat16)
            ids = mx.array(np.stack([rng.permutation(E)[:k] for _ in range(tokens)]).astype(np.uint32))
            scores = mx.softmax(_rand(rng, (tokens, k), mx.float32), axis=-1).astype(mx.bfloat16)
            fmt = dict(group_size=64, bits=4, stream=device)
            ours = median_call_ms(lambda: mk.switch_glu(x, *weights, ids, scores, stream=device), repeats)
            ours_q = median_call_ms(lambda: mk.switch_glu(x, *triples, ids, scores, **fmt), repeats)
            if device_name == "cpu" and tokens > 1:
                # MLX's CPU gather_mm / gather_qmm take 0.6 s / 5 s per call
                # at one token already (measured here): not worth minutes.
                note = "stock not timed: MLX's CPU gather ops take seconds here"
                timings.append(Timing("switch_glu bf16", device_name, shape_class, tokens, ours, None, note))
                timings.append(Timing("switch_glu 4-bit", device_name, shape_class, tokens, ours_q, None, note))
                continue
            stock = median_call_ms(lambda: reference.switch_glu(x, *weights, ids, scores, stream=device), 1)
            stock_q = median_call_ms(lambda: reference.switch_glu(x, *triples, ids, scores, **fmt), 1)
            timings.append(Timing("switch_glu bf16", device_name, shape_class, tokens, ours, stock))
            timings.append(Timing("switch_glu 4-bit", device_name, shape_class, tokens, ours_q, stock_q))
    return timings


def run_selftest(quick: bool = False, seed: int = 0) -> SelfTestReport:
    """The whole self-test; ``quick`` times the decode class only, once."""
    report = SelfTestReport(machine=machine_facts())
    report.checks = run_checks(seed)
    classes = {"decode": 1} if quick else SHAPE_CLASSES
    report.timings = run_timings(classes, repeats=1 if quick else 3, seed=seed)
    return report


def write_json(report: SelfTestReport, path: str) -> None:
    """``report.to_dict()`` as JSON at ``path``."""
    with open(path, "w") as f:
        json.dump(report.to_dict(), f, indent=2)
