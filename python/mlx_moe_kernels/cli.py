"""The ``mlx-moe`` command line.

``mlx-moe bench`` times our kernels against MLX's stock ops and the plain-MLX
reference on real MoE model shapes (see :mod:`mlx_moe_kernels.bench`);
``mlx-moe bench --mode model`` benchmarks a whole model, prefill, decode and
the parts of a decode step (see :mod:`mlx_moe_kernels.bench.model`).
``mlx-moe generate`` generates text from a local checkpoint folder with our
model definitions (see :mod:`mlx_moe_kernels.generate`), optionally side by
side with the stock (unfused) path.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Optional, Sequence

import mlx_moe_kernels
from mlx_moe_kernels import bench
from mlx_moe_kernels.cli_bench import run_bench
from mlx_moe_kernels.cli_common import (  # noqa: F401  (EXIT_* are part of the module's API)
    EXIT_DISAGREEMENT,
    EXIT_OK,
    EXIT_USAGE,
    MODEL_MODE,
    _HELP_WIDTH,
    _positive_int,
    _wrap,
)
from mlx_moe_kernels.cli_generate import _stock_model, run_generate  # noqa: F401


def _models_help() -> str:
    lines = []
    for shape in bench.MODEL_SHAPES.values():
        lines.append(
            f"  {shape.name:<20} D={shape.hidden_size:<5} H={shape.expert_hidden_size:<5}"
            f" E={shape.num_experts:<4} k={shape.experts_per_token}"
        )
    for alias, target in bench.MODEL_ALIASES.items():
        lines.append(f"  {alias:<20} (same shapes as {target})")
    return "\n".join(lines)


def _defaults_help() -> str:
    lines = []
    for device_type, defaults in bench.DEFAULTS_BY_DEVICE.items():
        models = ",".join(defaults["models"])
        tokens = ",".join(str(t) for t in defaults["tokens"])
        dtypes = ",".join(defaults["dtypes"])
        lines.append(f"  {device_type}: --model {models}")
        lines.append(f"       --tokens {tokens} --dtype {dtypes}")
    return "\n".join(lines)


_MODEL_MODE_SUMMARY = (
    "A whole model (random weights from a built-in config, or --checkpoint) in each "
    "--format: prefill and decode tokens/s, the parts of a decode step (ms, GB/s) and "
    "the share of the read bandwidth a step reaches."
)


def _modes_help() -> str:
    lines = []
    summaries = {mode: bench.mode_summary(mode) for mode in bench.MODES}
    summaries[MODEL_MODE] = _MODEL_MODE_SUMMARY
    for mode, summary in summaries.items():
        default = " (default)" if mode == bench.DEFAULT_MODE else ""
        lines.append(
            textwrap.fill(
                summary + default,
                width=_HELP_WIDTH,
                initial_indent=f"  {mode:<12}",
                subsequent_indent=" " * 14,
            )
        )
    return "\n".join(lines)


def _model_configs_help() -> str:
    lines = []
    for name, config in bench.model.MODEL_CONFIGS.items():
        shared = config.get("shared_expert_intermediate_size")
        lines.append(
            f"  {name:<20} {config['num_hidden_layers']} layers, D={config['hidden_size']}, "
            f"{config['num_attention_heads']}/{config.get('num_key_value_heads')} heads, "
            f"E={config['num_experts']} k={config['num_experts_per_tok']} "
            f"H={config['moe_intermediate_size']}" + (f", shared {shared}" if shared else "")
        )
    return "\n".join(lines)


def _tolerances_help() -> str:
    return ", ".join(f"{dtype} {tolerance:g}" for dtype, tolerance in bench.TOLERANCES.items())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mlx-moe`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="mlx-moe",
        description="Fast Mixture-of-Experts kernels for MLX: tools.",
        epilog="Run 'mlx-moe COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {mlx_moe_kernels.__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench_parser = commands.add_parser(
        "bench",
        help="time our kernels against stock MLX and the reference",
        description=_wrap(
            "Time our kernels side by side with MLX's stock ops and the plain-MLX "
            "reference on the expert shapes of real MoE models, cache-cold "
            "(every call reads expert weights the previous call did not) and "
            "interleaved (ours, stock, reference, ours, ...), and print a table "
            "of medians. Before timing, each cell checks that ours and stock "
            "agree with the reference; the exit status is 1 if one does not "
            f"({_tolerances_help()}, relative to the largest output). "
            "With --bits, --group-size or --quant-mode the experts are quantized "
            "on the fly (mx.quantize, mlx-lm's layout) and the quantized ops are "
            "timed: ours (gather_qmm; switch_glu on the quantized triples) against "
            "mx.gather_qmm and the reference. --mode model instead benchmarks a whole "
            "model (see 'whole model' below)."
        ),
        epilog=(
            "modes:\n"
            f"{_modes_help()}\n"
            "\nmodels (name: D hidden, H expert hidden, E experts, k per token):\n"
            f"{_models_help()}\n"
            "\ndefaults by device:\n"
            f"{_defaults_help()}\n"
            f"\nmodels of --mode model (default {bench.model.DEFAULT_MODEL}, "
            f"--layers {bench.model.DEFAULT_LAYERS}):\n"
            f"{_model_configs_help()}\n"
            "\nexamples:\n"
            "  mlx-moe bench\n"
            "  mlx-moe bench --model all --tokens 1,16 --dtype bfloat16\n"
            "  mlx-moe bench --tokens 1 --dtype float32 --repeats 3 --json out.json\n"
            "  mlx-moe bench --no-reference --plot speedup.png\n"
            "  mlx-moe bench --bits 4 --tokens 1,8 --dtype bfloat16\n"
            "  mlx-moe bench --mode gather_mm --quant-mode mxfp4\n"
            "  mlx-moe bench --mode model --layers 2 --format bf16,q4 --json model.json\n"
            "  mlx-moe bench --mode model --checkpoint path/to/Qwen3-30B-A3B --format q4\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_parser.add_argument(
        "--mode",
        choices=[*bench.MODES, MODEL_MODE],
        default=bench.DEFAULT_MODE,
        help=f"the operation to benchmark (default: {bench.DEFAULT_MODE})",
    )
    bench_parser.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="model shapes to use; repeat the option or give a comma list; "
        "'all' for every built-in model (default: per device, see below)",
    )
    bench_parser.add_argument(
        "--tokens",
        action="append",
        metavar="LIST",
        help="token counts T, comma-separated, e.g. 1,8,64 (default: per device)",
    )
    bench_parser.add_argument(
        "--dtype",
        action="append",
        metavar="LIST",
        help=f"dtypes, comma-separated, from {','.join(bench.DTYPES)} (default: per device)",
    )
    bench_parser.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        help="device to run on (default: MLX's default device)",
    )
    bench_parser.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="timed calls per implementation and cell (default: as many as fit "
        f"in ~{bench.CELL_TIME_BUDGET_S:g} s per cell, at most {bench.MAX_REPEATS}); "
        f"the reference makes at most {bench.REFERENCE_MAX_REPEATS}. --mode model: timed "
        f"prefill and decode runs per format (default {bench.model.DEFAULT_REPEATS})",
    )
    bench_parser.add_argument(
        "--no-reference",
        dest="include_reference",
        action="store_false",
        help="do not time the plain-MLX reference (it still checks agreement)",
    )
    bench_parser.add_argument(
        "--seed", type=int, default=0, help="seed of weights, inputs and routings (default: 0)"
    )
    bench_parser.add_argument(
        "--json", metavar="FILE", help="also write every cell and the machine info to FILE"
    )
    bench_parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also plot speedup against tokens to FILE.png (needs matplotlib)",
    )
    quant = bench_parser.add_argument_group(
        "quantized experts",
        textwrap.fill(
            "given any of these options, the expert weights are drawn in the --dtype, "
            "quantized with mx.quantize (mlx-lm's QuantizedSwitchLinear layout: uint32 codes, "
            "affine scales and biases in the --dtype, mxfp4 uint8 scales) and the quantized "
            "ops are timed: ours (gather_qmm in gather_mm mode, the quantized switch_glu in "
            "switch_glu mode) against stock (mx.gather_qmm, mlx-lm's SwitchGLU on it) and the "
            "reference. GB/s counts the packed weights, scales and biases read. On a CPU, "
            "MLX's gather_qmm is very slow: stock runs only on cells of at most "
            f"{bench.QUANTIZED_CPU_STOCK_MAX_ROWS} rows (T*k; 'skip' above) and, like the "
            "reference, makes a single timed call ('*' in the table)",
            width=_HELP_WIDTH - 2,
        ),
    )
    quant.add_argument(
        "--bits", type=_positive_int, metavar="B",
        help="bits per weight: affine 1, 2, 3, 4, 5, 6 or 8; mxfp4 4 (default: 4)",
    )
    quant.add_argument(
        "--group-size", type=_positive_int, metavar="G",
        help="weights per scale: affine 32, 64 or 128 (default 64); mxfp4 32 (default 32)",
    )
    quant.add_argument(
        "--quant-mode", choices=list(bench.QUANT_MODES),
        help="quantization mode (default: affine)",
    )
    whole = bench_parser.add_argument_group(
        "whole model (--mode model)",
        textwrap.fill(
            "build a whole model with random weights from a built-in config (--model, "
            "truncated to --layers) or load --checkpoint, and per --format measure prefill "
            "tokens/s (the last position's logits only), decode tokens/s (greedy steps from a "
            "fresh cache, as llama-bench's tg, pipelined as generate runs them), the parts of a decode step (experts, router, "
            "attention projections, attention, lm_head, rest) in ms and GB/s, and the share "
            "of a read-bandwidth probe that a step's bytes reach",
            width=_HELP_WIDTH - 2,
        ),
    )
    whole.add_argument(
        "--layers", type=_positive_int, metavar="N",
        help=f"decoder layers of a built-in model (default: {bench.model.DEFAULT_LAYERS})",
    )
    whole.add_argument(
        "--format", action="append", metavar="LIST",
        help=f"weight formats, comma-separated, from {','.join(bench.model.FORMATS)} "
        "(q8/q4: affine, group size 64; default: all)",
    )
    whole.add_argument(
        "--prompt-tokens", type=_positive_int, metavar="N",
        help=f"prompt length of the prefill test (default: {bench.model.DEFAULT_PROMPT_TOKENS})",
    )
    whole.add_argument(
        "--decode-tokens", type=_positive_int, metavar="N",
        help=f"steps of the decode test (default: {bench.model.DEFAULT_DECODE_TOKENS})",
    )
    whole.add_argument(
        "--distributed", action="store_true", default=None,
        help="run under mlx.launch on every rank: decode tokens/s of the model on rank 0 alone "
        "and sharded over all ranks (experts 'tensor', 'expert', and pipeline stages), each "
        "rank's weight bytes, and the backend's all_sum latency and bandwidth; one --format "
        "(default q4), rank 0 prints",
    )
    whole.add_argument(
        "--checkpoint", metavar="DIR",
        help="load this checkpoint folder instead of building random weights "
        "(a quantized one runs as stored)",
    )
    bench_parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="do not show the progress bar",
    )
    bench_parser.set_defaults(handler=run_bench, command_parser=bench_parser)

    generate_parser = commands.add_parser(
        "generate",
        help="generate text from a local checkpoint folder",
        description=_wrap(
            "Load a Qwen2-MoE, Qwen3-MoE or Qwen3-VL-MoE (text) checkpoint folder "
            "(config.json, model.safetensors or a sharded index, tokenizer.json; "
            "float or MLX-quantized weights) "
            "with our model definitions, stream the completion of a prompt and "
            "print prompt and generation speed. With --compare, also run the stock "
            "path (mlx-lm's model class with its unfused SwitchGLU if mlx-lm is "
            "installed and supports the config, else our model with the "
            "plain-MLX reference experts) and print its speeds and the largest "
            "logit difference over the prompt."
        ),
    )
    generate_parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    generate_parser.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt (raw text)")
    generate_parser.add_argument(
        "--max-tokens", type=_positive_int, default=100, metavar="N",
        help="most tokens to generate (default: 100)",
    )
    generate_parser.add_argument(
        "--temp", type=float, default=0.0, metavar="T", help="sampling temperature; 0 is greedy (default: 0)"
    )
    generate_parser.add_argument(
        "--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1, off)"
    )
    generate_parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"],
        help="cast the weights to this dtype (default: as stored)",
    )
    generate_parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    quant = generate_parser.add_argument_group(
        "quantize on the fly",
        "quantize a float checkpoint after loading (nn.quantize with the model's predicate, "
        "e.g. Qwen3-MoE's 8-bit routers; layers whose input size is not a multiple of the "
        "group size stay float); given any of these options",
    )
    quant.add_argument(
        "--bits", type=_positive_int, metavar="N", help="bits per weight (default: the mode's, 4)"
    )
    quant.add_argument(
        "--group-size", type=_positive_int, metavar="N",
        help="quantization group size (default: the mode's; affine 64, mxfp4 32)",
    )
    quant.add_argument(
        "--quant-mode", choices=["affine", "mxfp4", "nvfp4", "mxfp8"],
        help="quantization mode (default: affine); our kernels take affine and mxfp4",
    )
    generate_parser.add_argument(
        "--compare", action="store_true", help="also run the stock path and compare speed and logits"
    )
    generate_parser.add_argument(
        "--huge-pages", action="store_true",
        help="back the weights with transparent huge pages after loading (Linux; faster CPU decoding)",
    )
    generate_parser.add_argument(
        "--shard", choices=["tensor", "expert", "pipeline"],
        help="run sharded over mx.distributed (start it with mlx.launch; see the README's "
        "'Across machines'): 'tensor' splits every expert's hidden size across the ranks, "
        "'expert' gives each rank whole experts (E / n of them), "
        "'pipeline' the decoder layers into one stage per rank",
    )
    generate_parser.add_argument(
        "--shard-attention", choices=["replicate", "tensor"], default="replicate",
        help="with --shard: every rank runs the whole attention (default), or heads split across ranks",
    )
    generate_parser.set_defaults(handler=run_generate, command_parser=generate_parser)

    selftest_parser = commands.add_parser(
        "selftest",
        help="check every kernel on this machine and time ours against MLX's; a report to send us",
        description=_wrap(
            "Check every kernel family on every device MLX has here (the CPU, and the GPU when "
            "there is one) and dtype against a float64 oracle, beside MLX's own op; time the MoE "
            "layer, ours against the stock composition, for decode and prompt sizes; print the "
            "machine facts and the results as Markdown to paste into an issue. Exit status 1 if "
            "a check fails."
        ),
    )
    selftest_parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    selftest_parser.add_argument("--quick", action="store_true", help="time the decode size only, once")
    selftest_parser.set_defaults(handler=_run_selftest, command_parser=selftest_parser)
    return parser


def _run_selftest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mlx_moe_kernels.selftest import run_selftest, write_json

    report = run_selftest(quick=args.quick)
    print(report.markdown())
    if args.json:
        write_json(report, args.json)
        print(f"\nwrote {args.json}")
    return EXIT_OK if not report.failures else EXIT_DISAGREEMENT


def _restart_with_huge_page_malloc() -> None:
    """Re-execute this command with glibc's ``glibc.malloc.hugetlb=1``
    tunable when it is not set yet (Linux, glibc >= 2.35), so that every
    weight buffer MLX allocates is in transparent huge pages from its first
    write: decoding streams the weights, and 4 KiB pages slow that down by
    an amount that depends on how scattered they happen to be. No-op
    elsewhere, when already set, or with ``MLX_MOE_HUGE_PAGES=0``."""
    from mlx_moe_kernels.memory import huge_page_malloc_environment

    environ = huge_page_malloc_environment()
    if environ is None:
        return
    environ[HUGE_PAGES_ENV_DONE] = "1"  # never loop, whatever glibc does
    if os.environ.get(HUGE_PAGES_ENV_DONE):
        return
    os.execve(sys.executable, [sys.executable, "-m", "mlx_moe_kernels.cli", *sys.argv[1:]], environ)


HUGE_PAGES_ENV_DONE = "MLX_MOE_HUGE_PAGES_REEXEC"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mlx-moe``; returns the exit status.

    0: success; 1: ``bench`` found an implementation that disagrees with the
    reference (after printing the table); 2: a usage error.
    """
    if argv is None:
        _restart_with_huge_page_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.handler(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
