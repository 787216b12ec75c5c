"""Supernet mode's selection data: where candidates are scored (docs/supernet.md,
"Searching over the supernet").

``data.search`` names a .beton of its own; ``data.search_fraction`` splits that fraction of
``data.train`` off, deterministically (a permutation seeded by ``train.seed``), and the
supernet trains on the rest only. With neither, candidates are scored on ``data.val``
(then the same images choose and report: the search says so).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["search_split", "search_source"]


def search_split(data: Any, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(indices of ``data.train`` the supernet trains on, indices it holds out for scoring),
    both sorted; ``(None, None)`` without ``data.search_fraction``."""
    if not getattr(data, "search_fraction", None):
        return None, None
    from tntsearch.data import read_info

    n = read_info(data.train).num_samples
    k = min(n - 1, max(1, round(n * data.search_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


def search_source(data: Any, seed: int) -> tuple[str, np.ndarray | None, str]:
    """(.beton path, indices or None, a description) of the images candidates are scored on."""
    if getattr(data, "search", None):
        return data.search, None, f"data.search ({data.search})"
    _, held_out = search_split(data, seed)
    if held_out is not None:
        return data.train, held_out, f"{len(held_out)} images held out of data.train (data.search_fraction {data.search_fraction})"
    return data.val, None, "data.val (no data.search or data.search_fraction: val both chooses and reports)"
