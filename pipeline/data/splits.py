"""Seeded train / held-out splits of a dataset's examples."""
from __future__ import annotations

from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


def split_holdout(examples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held-out): a seeded permutation, ``round(fraction * n)`` examples held out
    (at least one when ``fraction > 0`` and there are two or more examples)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(examples), generator=g).tolist()
    n_val = max(1, int(round(len(examples) * fraction))) if fraction > 0 and len(examples) > 1 else 0
    val = [examples[i] for i in perm[:n_val]]
    train = [examples[i] for i in perm[n_val:]]
    return train, val
