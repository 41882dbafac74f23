"""Load a local Hugging Face checkpoint folder into our model definitions.

A folder holds ``config.json`` and either ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``. ``load_model`` picks the
architecture from ``model_type``, reads the tensors lazily with ``mx.load``
(so peak memory stays about one copy of the weights), converts them with the
model's ``sanitize``, checks every name and shape against the model, and
loads them strictly: nothing is left at its random initial value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_moe_kernels.models import ARCHITECTURES

__all__ = ["load_model", "load_config", "load_weights", "build_model", "hub_style_config"]

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

PathLike = Union[str, Path]


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
    model: nn.Module, weights: Dict[str, mx.array], dtype: Optional[mx.Dtype]
) -> Dict[str, mx.array]:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint is missing weight {missing[0]!r}{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"checkpoint has unexpected weight {extra[0]!r}{more}")
    out = {}
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"weight {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        out[key] = value
    return out


def load_model(path: PathLike, *, dtype: Optional[Union[str, mx.Dtype]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load the checkpoint folder ``path``; returns ``(model, config)``.

    Args:
        path: A folder with ``config.json`` (Hub or transformers-5 style;
            ``model_type`` one of qwen2_moe, qwen3_moe, qwen3_vl_moe) and
            ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``.
        dtype: Cast floating-point weights to this dtype (an ``mx.Dtype`` or
            ``"float32"``/``"float16"``/``"bfloat16"``); ``None`` keeps the
            checkpoint's dtypes.

    Returns:
        The model, with every parameter from the checkpoint (evaluated), and
        the config dict as read.

    Raises:
        FileNotFoundError: The folder, config.json or a weight file is missing.
        ValueError: Unreadable config or weights, unsupported model_type,
            a missing, unexpected or wrongly shaped weight (named), or expert
            tensors whose layout cannot be determined.
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
        dtype = _DTYPES[dtype]
    config = load_config(path)
    model = build_model(config)
    weights = model.sanitize(load_weights(path))
    weights = _check_and_cast(model, weights, dtype)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    mx.eval(model.parameters())
    model.eval()
    return model, config
