"""Helpers shared by the ``mlx-moe`` subcommands: exit codes and option
parsing."""

from __future__ import annotations

import argparse
import textwrap
from typing import List, Optional, Sequence

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


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=_HELP_WIDTH)


MODEL_MODE = "model"
"""``--mode model``: the whole-model benchmark (:mod:`mlx_moe_kernels.bench.model`)."""
