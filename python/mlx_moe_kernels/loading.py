"""Load a local Hugging Face checkpoint folder into our model definitions.

A folder holds ``config.json`` and either ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``. ``load_model`` picks the
architecture from ``model_type``, reads the tensors lazily with ``mx.load``
(so peak memory stays about one copy of the weights), converts them with the
model's ``sanitize``, checks every name and shape against the model, and
loads them strictly: nothing is left at its random initial value.

MLX-quantized folders (as ``mlx_lm.convert -q`` or :func:`quantize_model`
write them) are read too: ``config.json``'s ``quantization`` (or
``quantization_config``) section gives ``group_size``, ``bits``, an
optional ``mode`` and per-layer overrides keyed by module path (a dict of
those settings, or ``false`` to leave the layer unquantized). Before
loading, ``nn.quantize`` turns into its quantized form every layer whose
``<path>.scales`` the checkpoint holds (and every layer an override names),
as mlx-lm's loader does, so loading stays strict.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_moe_kernels.models import ARCHITECTURES
from mlx_moe_kernels.memory import use_huge_pages

__all__ = [
    "load_model",
    "load_config",
    "load_weights",
    "build_model",
    "hub_style_config",
    "quantization_config",
    "quantize_model",
]

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

PathLike = Union[str, Path]

# mx.quantize's modes and their (group_size, bits) defaults, as mlx.nn's
# quantized layers default them.
QUANT_MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
_QUANT_SETTINGS = ("group_size", "bits", "mode")
_MAX_BITS = 8


def load_config(path: PathLike) -> Dict[str, Any]:
    """The parsed ``config.json`` of the checkpoint folder ``path``.

    Raises FileNotFoundError if the folder or file is missing, ValueError if
    it is not a JSON object with a ``model_type``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {config_file}: {error}") from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{config_file} has no 'model_type'")
    return config


def hub_style_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of ``config`` (and of its ``text_config``) in the Hub's
    naming (``rope_theta``, ``num_experts``), for readers such as mlx-lm's
    ``ModelArgs`` that do not know transformers 5's ``rope_parameters`` /
    ``num_local_experts``. Keys already present are kept."""
    from mlx_moe_kernels.models.base import normalize_text_config

    out = normalize_text_config(config)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = normalize_text_config(out["text_config"])
    return out


def build_model(config: Dict[str, Any]) -> nn.Module:
    """Our model for ``config`` (randomly initialised). Raises ValueError
    for an unsupported ``model_type``."""
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return arch.Model(arch.ModelArgs.from_dict(config))


def _check_quant_settings(settings: Dict[str, Any], where: str, default_mode: str) -> Dict[str, Any]:
    """``settings`` (group_size, bits, mode; missing ones from the mode's
    defaults) validated; errors name ``where``, the config key."""
    mode = settings.get("mode", default_mode)
    if mode not in QUANT_MODES:
        raise ValueError(f"{where}['mode'] must be one of {', '.join(QUANT_MODES)} (got {mode!r})")
    group_size, bits = (settings.get(k, d) for k, d in zip(("group_size", "bits"), QUANT_MODES[mode]))
    if type(group_size) is not int or group_size < 1:
        raise ValueError(f"{where}['group_size'] must be a positive integer (got {group_size!r})")
    if type(bits) is not int or not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"{where}['bits'] must be an integer from 1 to {_MAX_BITS} (got {bits!r})")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def quantization_config(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The checkpoint's MLX quantization settings, validated, or ``None``
    if ``config`` has none.

    Read from ``quantization``, else ``quantization_config`` (mlx-lm writes
    both), of ``config`` or else of its ``text_config``. Returns
    ``{"group_size", "bits", "mode", "overrides"}``, ``overrides`` mapping
    module paths to their own settings (a dict, mlx-lm's rule: missing keys
    take the defaults of the layer's mode, ``"affine"`` if not given) or
    ``False`` (not quantized).

    Raises ValueError, naming the key, for a section that is not an MLX
    one (e.g. a GPTQ/AWQ ``quant_method``) or a malformed setting.
    """
    sources = [("", config)]
    if isinstance(config.get("text_config"), dict):
        sources.append(("text_config.", config["text_config"]))
    found = next(
        ((f"{prefix}{name}", src[name]) for prefix, src in sources for name in ("quantization", "quantization_config")
         if src.get(name) is not None),
        None,
    )
    if found is None:
        return None
    name, section = found
    where = f"config.json's {name}"
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be an object (got {section!r})")
    if "quant_method" in section:  # Hugging Face formats (GPTQ, AWQ, fp8, ...): not mx.quantize's
        raise ValueError(
            f"{where} describes a {section['quant_method']!r} checkpoint: only MLX-quantized "
            "checkpoints (mx.quantize; group_size, bits, mode) are supported"
        )
    for key in ("group_size", "bits"):
        if key not in section:
            raise ValueError(f"{where} has no {key!r}")
    out = _check_quant_settings(section, where, "affine")
    overrides: Dict[str, Any] = {}
    for path, value in section.items():
        if path in _QUANT_SETTINGS:
            continue
        where = f"config.json's {name}[{path!r}]"
        if isinstance(value, bool):
            overrides[path] = dict(out) if value else False
        elif isinstance(value, dict):
            unknown = sorted(set(value) - set(_QUANT_SETTINGS))
            if unknown:
                raise ValueError(
                    f"{where} has unsupported setting {unknown[0]!r} (supported: {', '.join(_QUANT_SETTINGS)})"
                )
            overrides[path] = _check_quant_settings(value, where, "affine")
        else:
            raise ValueError(
                f"{where} must be a dict of {', '.join(_QUANT_SETTINGS)} or false (got {value!r}); "
                "keys other than those settings are per-layer overrides keyed by module path"
            )
    out["overrides"] = overrides
    return out


def _quantize_for_checkpoint(model: nn.Module, quantization: Dict[str, Any], weights: Dict[str, mx.array]) -> None:
    """Quantize, in place, the layers of ``model`` the checkpoint holds
    quantized: those an override names (with its settings) and those with
    ``<path>.scales`` in ``weights`` (with the section's settings)."""
    overrides = quantization["overrides"]
    current = [None]

    def predicate(path: str, module: nn.Module):
        current[0] = path
        if path in overrides:
            settings = overrides[path]
            if settings and not hasattr(module, "to_quantized"):
                raise ValueError(f"quantization[{path!r}]: a {type(module).__name__} cannot be quantized")
            return dict(settings) if settings else False  # a copy: nn.quantize may edit it
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    defaults = {k: quantization[k] for k in _QUANT_SETTINGS}
    try:
        nn.quantize(model, **defaults, class_predicate=predicate)
    except ValueError as error:  # e.g. a group size that does not divide the layer
        if str(error).startswith("quantization["):
            raise
        settings = overrides.get(current[0]) or defaults
        raise ValueError(f"cannot quantize {current[0]!r} with {settings}: {error}") from error


def _module_quantization(model: nn.Module, key: str) -> str:
    """`` (quantized: group_size G, bits B, mode M)`` for a parameter of a
    quantized layer, else ``""``: context for a shape error."""
    modules = dict(model.named_modules())
    module = modules.get(key.rsplit(".", 1)[0])
    if module is None or not hasattr(module, "bits") or not hasattr(module, "group_size"):
        return ""
    mode = getattr(module, "mode", "affine")
    return f" (quantized: group_size {module.group_size}, bits {module.bits}, mode {mode})"


def quantize_model(
    model: nn.Module,
    config: Dict[str, Any],
    *,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    quant_predicate: Optional[Callable[[str, nn.Module], Union[bool, Dict[str, Any]]]] = None,
) -> Dict[str, Any]:
    """Quantize a float ``model`` in place, as ``mlx_lm.convert -q`` does;
    returns a copy of ``config`` with the ``quantization`` section (also
    as ``quantization_config``) that :func:`load_model` reads back.

    Every layer with ``to_quantized`` (linears, embeddings, expert
    projections) whose input size is a multiple of ``group_size`` is
    quantized, with the settings ``quant_predicate`` (default: the model's
    ``quant_predicate``, e.g. Qwen3-MoE's 8-bit routers) returns for it;
    per-layer settings are recorded in the section. ``group_size`` and
    ``bits`` default to the mode's (affine: 64 and 4).
    """
    given = {"group_size": group_size, "bits": bits, "mode": mode}
    defaults = _check_quant_settings({k: v for k, v in given.items() if v is not None}, "quantization", mode)
    predicate = quant_predicate or getattr(model, "quant_predicate", None)
    section: Dict[str, Any] = dict(defaults)

    def wrapped(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % defaults["group_size"]:
            return False
        settings = True if predicate is None else predicate(path, module)
        if isinstance(settings, dict):
            section[path] = dict(settings)
        return settings

    nn.quantize(model, **defaults, class_predicate=wrapped)
    out = copy.deepcopy(config)
    out["quantization"] = section
    out["quantization_config"] = copy.deepcopy(section)
    return out


def _read(file: Path) -> Dict[str, mx.array]:
    if not file.is_file():
        raise FileNotFoundError(f"weight file not found: {file}")
    try:
        return mx.load(str(file))
    except Exception as error:  # mx.load raises RuntimeError/ValueError on bad files
        raise ValueError(f"cannot read weight file {file}: {error}") from error


def load_weights(path: PathLike) -> Dict[str, mx.array]:
    """All tensors of the checkpoint folder ``path``, by name, as read
    (lazily) by ``mx.load``: ``model.safetensors``, or every shard named in
    ``model.safetensors.index.json``.

    Raises FileNotFoundError for missing files, ValueError for unreadable
    ones, a malformed index, or a tensor the index places in a shard that
    does not hold it.
    """
    folder = Path(path)
    index_file = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"cannot read {index_file}: {error}") from error
        weights: Dict[str, mx.array] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = _read(folder / shard)
            for key in tensors:
                if key in weights:
                    raise ValueError(f"tensor {key!r} appears in more than one shard ({shard})")
            weights.update(tensors)
        for key, shard in weight_map.items():
            if key not in weights:
                raise ValueError(f"tensor {key!r} is listed in {index_file.name} but missing from {shard}")
        return weights
    if single.is_file():
        return _read(single)
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def _check_and_cast(
    model: nn.Module, weights: Dict[str, mx.array], dtype: Optional[mx.Dtype], quantized: bool = False
) -> Dict[str, mx.array]:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint is missing weight {missing[0]!r}{more}{_module_quantization(model, missing[0])}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        hint = ""
        if not quantized and any(k.endswith(".scales") for k in extra):
            hint = " (quantized weights, but config.json has no 'quantization' section)"
        raise ValueError(f"checkpoint has unexpected weight {extra[0]!r}{more}{hint}")
    out = {}
    for key, value in weights.items():
        want = expected[key]
        if tuple(value.shape) != tuple(want.shape):
            prefix = key.rsplit(".", 1)[0]
            if value.dtype == mx.uint32 and key.endswith(".weight") and f"{prefix}.scales" not in weights:
                raise ValueError(f"weight {key!r} is packed (uint32) but the checkpoint has no {prefix + '.scales'!r}")
            raise ValueError(
                f"weight {key!r} has shape {tuple(value.shape)}, the model expects {tuple(want.shape)}"
                f"{_module_quantization(model, key)}"
            )
        if not mx.issubdtype(want.dtype, mx.floating) and value.dtype != want.dtype:
            # Packed weights and mxfp4 scales: a float here means another format.
            raise ValueError(
                f"weight {key!r} has dtype {value.dtype}, the model expects {want.dtype}"
                f"{_module_quantization(model, key)}"
            )
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        out[key] = value
    return out


SHARD_MODES = ("tensor", "expert", "pipeline")


def load_model(
    path: PathLike,
    *,
    dtype: Optional[Union[str, mx.Dtype]] = None,
    huge_pages: bool = False,
    group: Optional[mx.distributed.Group] = None,
    shard: Optional[str] = None,
    attention: str = "replicate",
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load the checkpoint folder ``path``; returns ``(model, config)``.

    Args:
        path: A folder with ``config.json`` (Hub or transformers-5 style;
            ``model_type`` one of qwen2_moe, qwen3_moe, qwen3_vl_moe; with an
            MLX ``quantization`` section for quantized weights) and
            ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``.
        dtype: Cast floating-point weights to this dtype (an ``mx.Dtype`` or
            ``"float32"``/``"float16"``/``"bfloat16"``); ``None`` keeps the
            checkpoint's dtypes.
        huge_pages: Back the loaded weights with transparent huge pages
            (Linux; see :func:`mlx_moe_kernels.use_huge_pages`): faster
            decoding on the CPU for a one-time cost at load.
        group: The ``mx.distributed`` group to shard over (default:
            ``mx.distributed.init()``); used with ``shard``.
        shard: ``None`` (the whole model), ``"tensor"`` or ``"expert"``
            (:func:`mlx_moe_kernels.sharding.shard_model` with that experts
            mode and ``attention``) or ``"pipeline"``
            (:func:`mlx_moe_kernels.sharding.pipeline_model`). The weights
            are sharded before they are read: a pipeline stage reads only
            its layers from the files; tensor and expert parallelism read a
            layer's tensors one layer at a time and keep the rank's slices.
        attention: With ``shard="tensor"`` or ``"expert"``:
            ``"replicate"`` or ``"tensor"``.

    Returns:
        The model, with every parameter from the checkpoint (evaluated), and
        the config dict as read.

    Raises:
        FileNotFoundError: The folder, config.json or a weight file is missing.
        ValueError: Unreadable config or weights, unsupported model_type,
            a malformed quantization section (the key named), a missing,
            unexpected or wrongly shaped weight (named; quantized ones with
            their layer's settings), or expert tensors whose layout cannot be
            determined.
    """
    if shard is not None and shard not in SHARD_MODES:
        raise ValueError(f"shard must be one of {', '.join(SHARD_MODES)} or None (got {shard!r})")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
        dtype = _DTYPES[dtype]
    config = load_config(path)
    quantization = quantization_config(config)
    model = build_model(config)
    weights = model.sanitize(load_weights(path))
    if quantization is not None:
        _quantize_for_checkpoint(model, quantization, weights)
    weights = _check_and_cast(model, weights, dtype, quantized=quantization is not None)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if shard is not None:
        # Still lazy: only what the rank keeps is ever read.
        from mlx_moe_kernels.sharding import pipeline_model, shard_model

        if shard == "pipeline":
            pipeline_model(model, group)
        else:
            shard_model(model, group, experts=shard, attention=attention)
    mx.eval(model.parameters())
    if huge_pages:
        use_huge_pages(model)
    model.eval()
    return model, config
