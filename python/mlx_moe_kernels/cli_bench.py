"""``mlx-moe bench``: the cell modes, the whole model (``--mode model``)
and the distributed benchmark (``--mode model --distributed``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import mlx.core as mx

from mlx_moe_kernels import bench
from mlx_moe_kernels.cli_common import (
    EXIT_DISAGREEMENT,
    EXIT_OK,
    MODEL_MODE,
    _model_names,
    _split_list,
    _token_counts,
)

# Options of the cell modes and of the model mode, by argparse dest: each
# mode rejects the other's (a silently ignored option misleads).
_CELL_ONLY_OPTIONS = {
    "tokens": "--tokens", "dtype": "--dtype", "bits": "--bits", "group_size": "--group-size",
    "quant_mode": "--quant-mode", "plot": "--plot",
}
_MODEL_ONLY_OPTIONS = {
    "layers": "--layers", "format": "--format", "prompt_tokens": "--prompt-tokens",
    "decode_tokens": "--decode-tokens", "checkpoint": "--checkpoint", "distributed": "--distributed",
}


def _run_distributed_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mlx_moe_kernels.bench.distributed import run_distributed_bench

    formats = _split_list(args.format) or ["q4"]
    models = _split_list(args.model) or [bench.model.DEFAULT_MODEL]
    if len(formats) != 1 or formats[0] not in bench.model.FORMATS or len(models) != 1:
        parser.error(f"--distributed takes one --model and one --format from {','.join(bench.model.FORMATS)}")
    if args.checkpoint or args.prompt_tokens:
        parser.error("--distributed builds a model with random weights and times decode only "
                     "(no --checkpoint, --prompt-tokens)")
    group = mx.distributed.init()
    if group.size() < 2:
        parser.error("--distributed needs at least 2 ranks: start it with mlx.launch (see the README)")
    layers = args.layers or bench.model.DEFAULT_LAYERS
    modes = [m for m in ("tensor", "expert", "pipeline") if m != "pipeline" or layers >= group.size()]
    try:
        report = run_distributed_bench(
            models[0], layers, formats[0], modes, decode_tokens=args.decode_tokens or 32,
            repeats=args.repeats or 2, seed=args.seed, group=group,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if group.rank() == 0:
        note = f"; {report.backend_note}" if report.backend_note else ""
        print(f"mlx-moe bench --distributed: {report.model} ({report.layers} layers, random weights, "
              f"{report.format}), {report.ranks} ranks{note}")
        print(report.format_table())
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump(report.to_dict(), f, indent=2)
            print(f"wrote {args.json}")
    return EXIT_OK


def _run_model_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    given = [flag for dest, flag in _CELL_ONLY_OPTIONS.items() if getattr(args, dest) is not None]
    if args.distributed:
        if given:
            parser.error(f"{', '.join(given)}: not used by --mode model")
        return _run_distributed_bench(args, parser)
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


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
