"""Index-entry layouts shared by the gather kernels' simulator tests
(test_metal_gather_mm.py, test_metal_gather_qmm.py): the routing the kernels
read (offsets over sorted positions, order, lhs) for given entries per
expert, as route.metal and the Metal dispatch produce it."""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np


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
