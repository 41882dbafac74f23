"""Helpers shared by the Metal kernels' simulator tests (test_metal_*.py):
a cached simulator build per source and variant, device buffers in the
kernels' dtypes (bfloat16 as its bits), NaN-filled output buffers, a bound
check, index-entry layouts (the routing the gather kernels read: offsets
over sorted positions, order, lhs, as route.metal and the Metal dispatch
produce it) and quantized weights with their exact float64 values."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence, Tuple

import mlx.core as mx
import numpy as np

from metal_sim import build


def simulator(tmp_path_factory, source: Path) -> Callable:
    """get(race_check=True, **defines) -> the built Library of `source`
    (cached per variant, for a session fixture). Defines select fault
    toggles or a subset of instantiations."""
    build_dir = tmp_path_factory.mktemp(source.stem)
    cache = {}

    def get(race_check: bool = True, **defines):
        key = (race_check, tuple(sorted(defines.items())))
        if key not in cache:
            cache[key] = build([source], build_dir=build_dir, defines=defines, race_check=race_check)
        return cache[key]

    return get


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite inputs)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF).astype(np.uint16)


def to_device(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the buffer a kernel reads (bfloat16 as its bits)."""
    if dtype == "float32":
        return np.ascontiguousarray(values, np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(values.astype(np.float16))
    return np.ascontiguousarray(bf16_bits(values))


def from_device(buf: np.ndarray, dtype: str) -> np.ndarray:
    """A kernel's buffer of `dtype` as float64 (exact)."""
    if dtype == "bfloat16":
        return (np.asarray(buf, np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(buf).astype(np.float64)


def nan_buffer(shape, dtype: str) -> np.ndarray:
    """An output buffer full of NaN: an element the kernel never writes shows."""
    if dtype == "bfloat16":
        return np.full(shape, 0xFFFF, np.uint16)
    return np.full(shape, np.nan, np.float32 if dtype == "float32" else np.float16)


def check(got: np.ndarray, exact: np.ndarray, bound: np.ndarray, what: str):
    """|got - exact| <= bound everywhere (NaN fails), with the first miss."""
    bad = ~(np.abs(got - exact) <= bound)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} wrong, first at {np.argwhere(bad)[0]}: "
        f"got {got[bad][0]}, exact {exact[bad][0]}, bound {bound[bad][0]}"
    )


def routed_entries(counts: Sequence[int], rng: np.random.Generator, identity: bool = False):
    """(offsets [E + 1], order [entries], lhs [entries], lhs_batches) for
    ``counts[e]`` index entries on expert e. The entries are shuffled (order:
    the entry at each sorted position) and read random x matrices with
    repeats, two of them unused (lhs), unless ``identity``: x already grouped
    by expert (order = lhs = arange)."""
    entries = int(sum(counts))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    if identity:
        order = np.arange(entries, dtype=np.uint32)
        return offsets, order, order.copy(), entries
    order = rng.permutation(entries).astype(np.uint32)
    lhs_batches = entries + 2
    lhs = rng.integers(0, lhs_batches, entries).astype(np.uint32)
    return offsets, order, lhs, lhs_batches


def entries_by_expert(offsets: np.ndarray, order: np.ndarray, lhs: np.ndarray) -> Iterator[Tuple[int, int, int]]:
    """(expert, entry, x matrix) of every sorted position: what the kernels compute."""
    for e in range(len(offsets) - 1):
        for pos in range(int(offsets[e]), int(offsets[e + 1])):
            entry = int(order[pos])
            yield e, entry, int(lhs[entry])


def device_buffer(a: mx.array) -> np.ndarray:
    """An mx array -> the bytes a kernel reads (bfloat16 as its bits)."""
    if a.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.array(a.view(mx.uint16)))
    return np.ascontiguousarray(np.array(a))


def quantized_weights(w: mx.array, dtype, bits: int, group_size: int, mode: str):
    """mx.quantize's packing of float weights w [..., rows, cols] as the
    kernels read it, and the exact weights: (codes, scales, biases) device
    buffers (biases: a placeholder for mxfp4), the dequantized weights in
    float64, and |s| q + |b| per element (the magnitude the kernels' float
    sums see, for error bounds). Affine scales/biases are cast to ``dtype``."""
    qa = dict(group_size=group_size, bits=bits, mode=mode)
    if mode == "affine":
        wq, scales, biases = mx.quantize(w, **qa)
        scales, biases = scales.astype(dtype), biases.astype(dtype)
        # The codes, exactly: mx.dequantize with scale 1, bias 0 in float32.
        # (mx.dequantize with 16-bit scales rounds s * q + b to the scales'
        # dtype even with dtype=float32, so the weights s * q + b are formed
        # here in float64 from the codes and the 16-bit scales/biases.)
        one, zero = mx.ones(scales.shape, mx.float32), mx.zeros(biases.shape, mx.float32)
        codes = np.array(mx.dequantize(wq, one, zero, dtype=mx.float32, **qa), np.float64)

        def rep(a):
            return np.repeat(np.array(a.astype(mx.float32), np.float64), group_size, axis=-1)

        exact = rep(scales) * codes + rep(biases)
        magnitude = np.abs(rep(scales)) * codes + np.abs(rep(biases))
        bias_buffer = device_buffer(biases)
    else:
        wq, scales = mx.quantize(w, **qa)
        exact = np.array(mx.dequantize(wq, scales, None, dtype=mx.float32, **qa), np.float64)
        magnitude = np.abs(exact)
        bias_buffer = np.zeros(16, np.uint8)  # unused, but bound
    return np.ascontiguousarray(np.array(wq)), device_buffer(scales), bias_buffer, exact, magnitude
