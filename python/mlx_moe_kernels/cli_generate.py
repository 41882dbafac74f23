"""``mlx-moe generate``: load a checkpoint, stream a completion, and with
``--compare`` run the stock path beside it."""

from __future__ import annotations

import argparse

import mlx.core as mx

from mlx_moe_kernels.cli_common import EXIT_OK

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


def run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
