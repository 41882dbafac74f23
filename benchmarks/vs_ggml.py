"""Side-by-side benchmark of a MoE layer or one of its projections: ours vs
llama.cpp's ggml vs stock MLX, cache-cold, interleaved in one run.

--what up: Qwen3-30B-A3B's up projection as mlx-lm's SwitchLinear calls
it: x [T*k, 1, D], b = w.swapaxes(-1, -2) with w [E, H, D], sorted expert
indices of top-k routing of T tokens; ours is mlx_moe_kernels.gather_mm,
stock is mx.gather_mm. The peer is ``../shared/peers/ggml_moe``
(``moe_layer up TYPE D H E k THREADS T``): ggml's MUL_MAT_ID.

--what layer: the whole MoE FFN (gate, up, SwiGLU, down, score-weighted sum
over the k experts); ours is mlx_moe_kernels.switch_glu with scores, stock
is mlx-lm's SwitchGLU composition on mx.gather_mm (sorting the rows when
there are >= 64, as mlx-lm does) plus the weighted sum; the peer is
``moe_layer layer ...``, llama.cpp's build_moe_ffn graph.

Cache-cold as in DESIGN.md: at T=1 each call uses a set of k experts that
the previous calls did not touch (disjoint sets over a permutation of the
experts); for larger T the routing is re-drawn every call. The weights of
all E experts (hundreds of MB) exceed the 32 MB L3.

--bits B [--group-size G]: quantized experts (mx.quantize, affine mode)
with ``--dtype`` activations and scales; ours is the quantized
switch_glu / gather_qmm, stock goes through ``mx.gather_qmm``, and the peers
are ggml's quantized types named by ``--ggml-types`` (default q4_0,q4_K for
4 bits, q8_0 for 8 bits). Each round also measures the machine's read
bandwidth with two threads (NumPy sums over halves of a 512 MB array), and
the table reports our packed-weight streaming rate against it.

Interleaving: rounds of (ours, ggml, stock) per T, the order of ours and
ggml alternating between rounds (this machine's memory bandwidth drifts by
up to 2x over seconds, so only paired figures compare); the reported time of
each is the median over rounds of each round's median, and the speedup
"x vs ggml" is the median of the per-round ratios.

--huge-pages: back the expert weights with transparent huge pages first
(mlx_moe_kernels.use_huge_pages, Linux; ours and stock share the weights,
the ggml peer allocates its own, in 4 KiB pages).

usage: python benchmarks/vs_ggml.py [--what up|layer] [--dtype float32]
       [--tokens 1,64,1024] [--rounds 5] [--bits 4 --group-size 64
       --ggml-types q4_0,q4_K] [--huge-pages] [--ggml PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np

import mlx_moe_kernels as mk
from mlx_moe_kernels.bench import stock_switch_glu
from mlx_moe_kernels.bench.timing import read_bandwidth

GGML_TYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def ggml_binary(path: str | None) -> str:
    """Path of the ggml moe_layer binary, building it with the shared script."""
    if path:
        return path
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "..", "shared", "peers", "ggml_moe", "build.sh")
    out = subprocess.run(["bash", script], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def routings(rng, tokens: int, experts: int, top_k: int, count: int, start: int,
             flat_sorted: bool = True):
    """`count` routings, cache-cold in sequence: sorted flat uint32 arrays
    [T*k] (flat_sorted, for one projection) or [T, k] top-k choices."""
    result = []
    if tokens == 1:
        perm = rng.permutation(experts)
        sets = experts // top_k
        for i in range(count):
            j = (start + i) % sets
            result.append(np.sort(perm[j * top_k : (j + 1) * top_k]).reshape(1, top_k))
    else:
        for _ in range(count):
            result.append(np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k])
    if flat_sorted:
        result = [np.sort(r.reshape(-1)) for r in result]
    return [mx.array(r.astype(np.uint32)) for r in result]


def quantize(w: mx.array, group_size: int, bits: int, dtype) -> tuple:
    """mx.quantize (affine) with scales and biases in the activation dtype."""
    q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return q, scales.astype(dtype), biases.astype(dtype)


def time_calls(fn, index_list, warmup: int = 3) -> float:
    """Median ms of fn(indices) over the index arrays after `warmup` untimed
    calls (each call evaluated alone)."""
    for idx in index_list[:warmup]:
        mx.eval(fn(idx))
    times = []
    for idx in index_list[warmup:]:
        t0 = time.perf_counter()
        mx.eval(fn(idx))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", default="up", choices=["up", "layer"])
    parser.add_argument("--dtype", default="float32", choices=sorted(GGML_TYPE))
    parser.add_argument("--tokens", default="1,64,1024")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--ggml", default=None)
    parser.add_argument("--no-stock", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("-D", type=int, default=2048)
    parser.add_argument("-H", type=int, default=768)
    parser.add_argument("-E", type=int, default=128)
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--bits", type=int, default=None, help="quantize the experts (affine)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--huge-pages", action="store_true",
                        help="back the expert weights (ours and stock share them) with transparent "
                             "huge pages first (mlx_moe_kernels.use_huge_pages)")
    parser.add_argument("--ggml-types", default=None,
                        help="comma-separated ggml types (default: from --dtype / --bits)")
    args = parser.parse_args()
    D, H, E, k = args.D, args.H, args.E, args.k
    dtype = getattr(mx, args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    binary = ggml_binary(args.ggml)
    layer = args.what == "layer"

    bits, group_size = args.bits, args.group_size
    if args.ggml_types:
        ggml_types = args.ggml_types.split(",")
    elif bits is None:
        ggml_types = [GGML_TYPE[args.dtype]]
    else:
        ggml_types = {4: ["q4_0", "q4_K"], 8: ["q8_0"]}.get(bits, ["q4_0"])

    rng = np.random.default_rng(0)
    up = (mx.random.normal((E, H, D)) / D**0.5).astype(dtype)
    gate = (mx.random.normal((E, H, D)) / D**0.5).astype(dtype) if layer else None
    down = (mx.random.normal((E, D, H)) / H**0.5).astype(dtype) if layer else None
    mx.eval(up, gate, down)
    # Bytes one expert's weights occupy per projection (packed codes, scales
    # and biases when quantized).
    expert_bytes = H * D * up.itemsize
    if bits is not None:
        up = quantize(up, group_size, bits, dtype)
        gate = quantize(gate, group_size, bits, dtype) if layer else None
        down = quantize(down, group_size, bits, dtype) if layer else None
        mx.eval(up, gate, down)
        expert_bytes = sum(a.nbytes for a in up) // E
    if args.huge_pages:
        placed = mk.use_huge_pages([up, gate, down] if layer else [up])
        print(f"huge pages: {placed / 1e6:.0f} MB of expert weights", flush=True)
    quantization = dict(group_size=group_size, bits=bits) if bits is not None else {}
    bandwidth_buffer = np.ones(128 * 1024 * 1024, dtype=np.float32) if bits is not None else None
    projections = 3 if layer else 1
    rows = []
    for T in tokens:
        if layer:
            x = mx.random.normal((T, D)).astype(dtype)
            scores = mx.softmax(mx.random.normal((T, k)), axis=-1).astype(dtype)

            def ours(idx):
                return mk.switch_glu(x, gate, up, down, idx, scores, **quantization)

            def stock(idx):
                return stock_switch_glu(x, gate, up, down, idx, scores, **quantization)

            def reference(idx):
                return mk.reference.switch_glu(x, gate, up, down, idx, scores, **quantization)
        else:
            x = mx.random.normal((T * k, 1, D)).astype(dtype)
            if bits is not None:

                def ours(idx):
                    return mk.gather_qmm(x, *up, rhs_indices=idx, sorted_indices=True, **quantization)

                def stock(idx):
                    return mx.gather_qmm(x, *up, rhs_indices=idx, sorted_indices=True, **quantization)

                def reference(idx):
                    return mk.reference.gather_qmm(x, *up, rhs_indices=idx, **quantization)
            else:
                b = up.swapaxes(-1, -2)

                def ours(idx):
                    return mk.gather_mm(x, b, rhs_indices=idx, sorted_indices=True)

                def stock(idx):
                    return mx.gather_mm(x, b, rhs_indices=idx, sorted_indices=True)

                def reference(idx):
                    return mk.reference.gather_mm(x, b, rhs_indices=idx)
        mx.eval(x)
        calls = 15 if T <= 64 else 5
        # Correctness first, against the reference where it fits in memory
        # (it gathers a float32 copy of an expert per row).
        idx = routings(rng, T, E, k, 1, 0, flat_sorted=not layer)[0]
        rel_err = float("nan")
        if T * k <= 512:
            got, want = ours(idx).astype(mx.float32), reference(idx).astype(mx.float32)
            rel_err = (mx.abs(got - want).max() / mx.abs(want).max()).item()
        ours_ms, stock_ms, bandwidths = [], [], []
        ggml_ms = {t: [] for t in ggml_types}
        for r in range(args.rounds):
            index_list = routings(rng, T, E, k, 3 + calls, r * (3 + calls), flat_sorted=not layer)
            mx.eval(index_list)
            def run_ggml():
                for gtype in ggml_types:
                    out = subprocess.run(
                        [binary, args.what, gtype, str(D), str(H), str(E), str(k),
                         str(args.threads), str(T)],
                        check=True, capture_output=True, text=True)
                    ggml_ms[gtype].append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])

            if r % 2:
                run_ggml()
            # 3 warm-up calls, as ggml's harness makes.
            ours_ms.append(time_calls(ours, index_list))
            if r % 2 == 0:
                run_ggml()
            if bandwidth_buffer is not None:
                bandwidths.append(read_bandwidth(bandwidth_buffer, threads=2, passes=3))  # two threads, as ggml's run
            # Stock MLX: float32 only for gather_mm; quantized stock is very
            # slow on the CPU (a few calls suffice).
            if bits is not None and not args.no_stock:
                # Seconds per call at T=64: time one call, in the first round.
                if r == 0:
                    stock_ms.append(time_calls(stock, index_list[:4 if T == 1 else 2], warmup=1))
            elif not args.no_stock and dtype == mx.float32:
                # Stock is slow at large T: fewer calls there.
                stock_calls = index_list if T <= 64 else index_list[:3]
                stock_ms.append(time_calls(stock, stock_calls, warmup=1))
        ours_t = statistics.median(ours_ms)
        stock_t = statistics.median(stock_ms) if stock_ms else float("nan")
        touched = len(np.unique(np.array(idx)))
        weight_bytes = projections * touched * expert_bytes
        gbs = weight_bytes / (ours_t / 1e3) / 1e9
        gflops = 2 * projections * T * k * D * H / (ours_t / 1e3) / 1e9
        bandwidth = statistics.median(bandwidths) if bandwidths else float("nan")
        label = args.dtype if bits is None else f"{args.dtype} w{bits}g{group_size}"
        for gtype in ggml_types:
            ggml_t = statistics.median(ggml_ms[gtype])
            paired = statistics.median(g / o for g, o in zip(ggml_ms[gtype], ours_ms))
            row = dict(what=args.what, dtype=args.dtype, bits=bits, group_size=group_size,
                       ggml_type=gtype, T=T, ours_ms=ours_t, ggml_ms=ggml_t,
                       stock_ms=stock_t, vs_ggml=paired, vs_stock=stock_t / ours_t,
                       GBps=gbs, read_GBps=bandwidth, GFLOPs=gflops, rel_err=rel_err,
                       ours_rounds=ours_ms, ggml_rounds=ggml_ms[gtype], stock_rounds=stock_ms)
            rows.append(row)
            bw_text = f"  ({gbs / bandwidth:4.0%} of {bandwidth:5.1f} GB/s 2-thread read)" if bandwidths else ""
            print(f"{args.what:5s} {label:18s} T={T:5d} ours {ours_t:9.3f} ms  "
                  f"ggml {gtype:5s} {ggml_t:9.3f} ms  stock {stock_t:9.3f} ms  x{paired:5.2f} vs ggml  "
                  f"x{stock_t / ours_t:6.2f} vs stock  {gbs:6.1f} GB/s{bw_text}  {gflops:6.1f} GFLOP/s  "
                  f"err {rel_err:.1e}  rounds ours {['%.2f' % v for v in ours_ms]} "
                  f"ggml {['%.2f' % v for v in ggml_ms[gtype]]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
