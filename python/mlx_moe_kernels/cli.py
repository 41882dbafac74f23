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
import importlib.util
import os
import sys
import textwrap
from typing import List, Optional, Sequence

import mlx.core as mx

import mlx_moe_kernels
from mlx_moe_kernels import bench

EXIT_OK = 0
EXIT_DISAGREEMENT = 1
EXIT_USAGE = 2

_HELP_WIDTH = 79


def _split_list(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """Flatten repeated and comma-separated option values; ``None`` if unset."""
    if not values:
        return None
    items = [item.strip() for value in values for item in value.split(",")]
    return [item for item in items if item]


def _model_names(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    names = _split_list(values)
    if names is None:
        return None
    expanded: List[str] = []
    for name in names:
        for item in (bench.MODEL_SHAPES if name.lower() == "all" else [name]):
            if item not in expanded:
                expanded.append(item)
    return expanded


def _token_counts(values: Optional[Sequence[str]]) -> Optional[List[int]]:
    items = _split_list(values)
    if items is None:
        return None
    try:
        return [int(item) for item in items]
    except ValueError:
        raise ValueError(
            f"--tokens takes positive integers, e.g. 1,8,64 (got {','.join(items)})"
        ) from None


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


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


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=_HELP_WIDTH)


MODEL_MODE = "model"
"""``--mode model``: the whole-model benchmark (:mod:`mlx_moe_kernels.bench.model`)."""

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
    bench_parser.set_defaults(handler=_run_bench, command_parser=bench_parser)

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
    generate_parser.set_defaults(handler=_run_generate, command_parser=generate_parser)
    return parser


def _stock_model(model, config):
    """The stock path for ``--compare``: (model, description). mlx-lm's
    class of the same architecture holding our model's weight arrays (the
    parameter names are the same), or, if mlx-lm is missing or cannot
    represent the config, our own model with the reference experts (the
    caller switches it with ``set_fused``)."""
    from mlx.utils import tree_flatten

    from mlx_moe_kernels.loading import hub_style_config

    import mlx.nn as nn

    model_type = config["model_type"]
    hub = hub_style_config(config)
    # Quantized layers of ours, by path: the stock model is quantized alike.
    quantized = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
        for path, m in model.named_modules() if "scales" in m
    }
    # mlx-lm's Qwen2-MoE ignores these fields; it would compute another model.
    if model_type == "qwen2_moe" and (
        hub.get("norm_topk_prob") or hub.get("decoder_sparse_step", 1) != 1
        or hub.get("mlp_only_layers") or hub.get("tie_word_embeddings")
    ):
        return None, "our model with the plain-MLX reference experts (mlx-lm's qwen2_moe cannot represent this config)"
    try:
        import importlib

        arch = importlib.import_module(f"mlx_lm.models.{model_type}")
        stock = arch.Model(arch.ModelArgs.from_dict(hub))
        if quantized:
            nn.quantize(stock, class_predicate=lambda path, _: dict(quantized[path]) if path in quantized else False)
        stock.load_weights(tree_flatten(model.parameters()), strict=True)
        stock.eval()
        matmul = "mx.gather_qmm" if quantized else "mx.gather_mm"
        return stock, f"mlx-lm's mlx_lm.models.{model_type} (stock SwitchGLU on {matmul})"
    except Exception as error:  # ImportError, or a config/weights mlx-lm does not take
        return None, f"our model with the plain-MLX reference experts (mlx-lm unavailable: {error})"


def _quant_summary(section) -> str:
    """``group_size 64, bits 4, mode affine (+2 layers with their own settings)``."""
    overrides = len(section) - 3
    extra = f" (+{overrides} layers with their own settings)" if overrides else ""
    return f"group_size {section['group_size']}, bits {section['bits']}, mode {section['mode']}{extra}"


def _run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mlx_moe_kernels.generate import eos_token_ids, load_tokenizer, stream_generate
    from mlx_moe_kernels.loading import load_model, quantization_config, quantize_model

    if args.temp < 0 or not 0.0 < args.top_p <= 1.0:
        parser.error("--temp must be >= 0 and --top-p in (0, 1]")
    try:
        rank = 0
        group = None
        if args.shard:
            if args.compare:
                raise ValueError("--compare is not supported with --shard")
            group = mx.distributed.init()
            rank = group.rank()
        quantize_after_loading = (args.bits, args.group_size, args.quant_mode) != (None, None, None)
        # Sharded while loading (only the rank's part is read), unless the
        # model is quantized on the fly first.
        shard_at_load = args.shard if not quantize_after_loading else None
        model, config = load_model(
            args.model, dtype=args.dtype, group=group, shard=shard_at_load, attention=args.shard_attention
        )
        if quantize_after_loading:
            if quantization_config(config) is not None:
                raise ValueError(f"{args.model} is already quantized: drop --bits/--group-size/--quant-mode")
            config = quantize_model(
                model, config, group_size=args.group_size, bits=args.bits, mode=args.quant_mode or "affine"
            )
            # Quantize now, not inside the first prompt (its speed would
            # include the quantization).
            mx.eval(model.parameters())
            if rank == 0:
                print(f"[quantized on the fly: {_quant_summary(config['quantization'])}]")
            if args.shard == "pipeline":
                model.pipeline(group)
            elif args.shard:
                model.shard(group, experts=args.shard, attention=args.shard_attention)
        if args.shard and rank == 0:
            from mlx.utils import tree_flatten

            layout = "pipeline stages" if args.shard == "pipeline" else (
                f"experts {args.shard}, attention {args.shard_attention}")
            held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            print(f"[sharded: {layout}, {group.size()} ranks; rank 0 holds {held / 1e6:.1f} MB of weights]")
        if args.huge_pages:
            from mlx_moe_kernels.memory import use_huge_pages

            print(f"[huge pages: {use_huge_pages(model) / 1e6:.0f} MB of weights]")
        tokenizer = load_tokenizer(args.model)
        eos_ids = eos_token_ids(config, args.model)
    except (FileNotFoundError, ValueError, ImportError) as error:
        parser.error(str(error))
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        parser.error("the prompt encodes to no tokens")
    options = dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, eos_ids=eos_ids)

    def run(which, label, echo):
        # Sharded: every rank computes (and samples with the same seed from
        # the same all-summed logits); rank 0 prints.
        echo = echo and rank == 0
        mx.random.seed(args.seed)
        last = None
        for chunk in stream_generate(which, tokenizer, prompt, **options):
            if echo:
                print(chunk.text, end="", flush=True)
            last = chunk
        if echo:
            print()
        if rank != 0:
            return
        print(
            f"{label}: prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s; "
            f"generation {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s"
            f" ({last.finish_reason})"
        )

    if rank == 0:
        print(args.prompt, end="", flush=True)
    run(model, "ours", echo=True)
    if args.compare:
        stock, description = _stock_model(model, config)
        tokens = mx.array([prompt], dtype=mx.uint32)

        def compare(stock_model):
            run(stock_model, "stock", echo=False)
            stock_logits = stock_model(tokens).astype(mx.float32)
            model.set_fused(True)
            ours_logits = model(tokens).astype(mx.float32)
            return mx.abs(ours_logits - stock_logits).max().item()

        print(f"stock: {description}")
        difference = None
        try:
            if stock is not None:
                try:
                    difference = compare(stock)
                except RuntimeError as error:
                    # e.g. MLX's CPU gather_mm supports float32 only.
                    print(f"stock: mlx-lm's model failed ({error}); "
                          "using our model with the plain-MLX reference experts instead")
            if difference is None:
                model.set_fused(False)
                difference = compare(model)
        finally:
            model.set_fused(True)
        print(f"max |logit difference| over the prompt ({len(prompt)} tokens): {difference:.3g}")
    return EXIT_OK


# Options of the cell modes and of the model mode, by argparse dest: each
# mode rejects the other's (a silently ignored option misleads).
_CELL_ONLY_OPTIONS = {
    "tokens": "--tokens", "dtype": "--dtype", "bits": "--bits", "group_size": "--group-size",
    "quant_mode": "--quant-mode", "plot": "--plot",
}
_MODEL_ONLY_OPTIONS = {
    "layers": "--layers", "format": "--format", "prompt_tokens": "--prompt-tokens",
    "decode_tokens": "--decode-tokens", "checkpoint": "--checkpoint",
}


def _run_model_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    given = [flag for dest, flag in _CELL_ONLY_OPTIONS.items() if getattr(args, dest) is not None]
    if not args.include_reference:
        given.append("--no-reference")
    if given:
        parser.error(f"{', '.join(given)}: not used by --mode model")
    models = _split_list(args.model)
    if models is not None and (len(models) != 1 or args.checkpoint):
        parser.error("--mode model takes one --model, or --checkpoint instead")
    layers = args.layers
    if layers is None and args.checkpoint is None:
        layers = bench.model.DEFAULT_LAYERS  # a checkpoint loads all of its layers
    options = dict(
        checkpoint=args.checkpoint,
        layers=layers,
        formats=_split_list(args.format),
        prompt_tokens=args.prompt_tokens or bench.model.DEFAULT_PROMPT_TOKENS,
        decode_tokens=args.decode_tokens or bench.model.DEFAULT_DECODE_TOKENS,
        repeats=args.repeats or bench.model.DEFAULT_REPEATS,
        seed=args.seed,
        device=None if args.device is None else mx.Device(getattr(mx, args.device)),
    )
    name = models[0] if models else bench.model.DEFAULT_MODEL
    try:
        plan = bench.plan_model_bench(name, **options)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    report = bench.run_model_bench(name, progress=args.progress, **options)
    layers = plan.config.get("num_hidden_layers", plan.config.get("text_config", {}).get("num_hidden_layers"))
    source = "checkpoint" if plan.checkpoint else "random weights"
    layers_text = f"{layers} layer{'' if layers == 1 else 's'}"
    print(f"mlx-moe bench --mode model: {report.model} ({layers_text}, {source}), prompt "
          f"{report.prompt_tokens} tokens, decode {report.decode_tokens} tokens, on "
          f"{report.machine['device']} ({report.machine['platform']}, mlx "
          f"{report.machine['mlx_version']}), {report.wall_time_s:.0f} s")
    print(report.format_table())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return EXIT_OK


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.mode == MODEL_MODE:
        return _run_model_bench(args, parser)
    given = [flag for dest, flag in _MODEL_ONLY_OPTIONS.items() if getattr(args, dest) is not None]
    if given:
        parser.error(f"{', '.join(given)}: only used by --mode model")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error(
            "--plot needs matplotlib, which is not installed: "
            "pip install matplotlib (or mlx-moe-kernels[plot])"
        )
    device = None if args.device is None else mx.Device(getattr(mx, args.device))
    try:
        models = _model_names(args.model)
        tokens = _token_counts(args.tokens)
        dtypes = _split_list(args.dtype)
        quantization = bench.make_quantization(args.bits, args.group_size, args.quant_mode)
        bench.plan_grid(
            args.mode, models=models, tokens=tokens, dtypes=dtypes, device=device,
            quantization=quantization,
        )
    except ValueError as exc:
        parser.error(str(exc))
    report = bench.run(
        args.mode,
        models=models,
        tokens=tokens,
        dtypes=dtypes,
        device=device,
        include_reference=args.include_reference,
        repeats=args.repeats,
        seed=args.seed,
        progress=args.progress,
        quantization=quantization,
    )

    quantized = ""
    if quantization is not None:
        quantized = (
            f" --bits {quantization.bits} --group-size {quantization.group_size} "
            f"--quant-mode {quantization.mode}"
        )
    print(f"mlx-moe bench --mode {report.mode}{quantized} on {report.machine['device']} "
          f"({report.machine['platform']}, mlx {report.machine['mlx_version']}), "
          f"{report.wall_time_s:.0f} s")
    print(report.format_table())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot_speedups(report, args.plot)
        print(f"wrote {args.plot}")
    failures = report.failures
    if failures:
        print("\nFAILED: implementations disagree with the reference:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return EXIT_DISAGREEMENT
    return EXIT_OK


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
