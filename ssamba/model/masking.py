"""Masks for masked spectrogram patch modelling: cluster patches (official), random patches, frames.

Conventions (docs/model.md section 4.1): a mask is a ``(B, M)`` int64 tensor of **patch indices** in
``[0, N)`` with ``N = F' * T'`` patches in frequency-major order (index ``f' * T' + t'``), sorted
ascending, unique per row. The cls token is not a patch: the encoder output of patch ``i`` sits at
token ``i + 1``. Every spectrogram of a batch masks the same count ``M``.
"""

from __future__ import annotations

import numpy as np
import torch

from ssamba.config import MASK_STRATEGIES as STRATEGIES  # the one list of the choices


def cluster_mask(n_patches: int, t_grid: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """The official cluster patch mask for one spectrogram -> sorted ``(count,)`` patch indices.

    Draw a cluster size ``c`` in {3, 4, 5} once; then repeatedly pick a start ``s`` uniformly in
    ``[0, N)`` and add the ``c x c`` block ``s + t_grid * i + j`` (indices kept only when
    ``0 < idx < N``: patch 0 is never masked, and a block can wrap across a row end) until more
    than ``count`` unique indices exist; keep the ``count`` smallest. Only ``N - 1`` patches can be
    masked and the draw stops once more than ``count`` are, so ``count`` must be below ``N - 1``.
    """
    if not 0 < count < n_patches - 1:
        raise ValueError(
            f"cluster mask count must be in (0, {n_patches - 1}) for {n_patches} patches "
            f"(patch 0 is never masked and the draw needs more than count candidates), "
            f"got {count}"
        )
    c = int(rng.integers(0, 3)) + 3
    offsets = (t_grid * np.arange(c)[:, None] + np.arange(c)[None, :]).ravel()
    chosen = np.zeros(n_patches, dtype=bool)
    n_chosen = 0
    while n_chosen <= count:
        cand = int(rng.integers(0, n_patches)) + offsets
        cand = cand[(cand > 0) & (cand < n_patches)]  # distinct: the block's offsets are
        n_chosen += int(cand.size - np.count_nonzero(chosen[cand]))
        chosen[cand] = True
    return np.flatnonzero(chosen)[:count]


def random_mask(n_patches: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct patches uniformly at random (any patch, index 0 included), sorted."""
    if not 0 < count <= n_patches:
        raise ValueError(f"mask count must be in (0, {n_patches}], got {count}")
    return np.sort(rng.choice(n_patches, size=count, replace=False))


def frame_mask(f_grid: int, t_grid: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Time-axis (frame) masking: whole time columns of patches, every frequency band at once.

    ``ceil(count / F')`` distinct time positions are drawn uniformly; all their patches are
    masked, except that the last column drawn keeps only its lowest bands so that exactly
    ``count`` patches are masked.
    """
    n = f_grid * t_grid
    if not 0 < count <= n:
        raise ValueError(f"mask count must be in (0, {n}], got {count}")
    n_cols = -(-count // f_grid)
    cols = rng.choice(t_grid, size=n_cols, replace=False)
    idx = (np.arange(f_grid)[None, :] * t_grid + cols[:, None]).ravel()  # column by column, low band first
    return np.sort(idx[:count])


def make_masks(
    strategy: str, batch: int, f_grid: int, t_grid: int, count: int, rng: np.random.Generator
) -> torch.Tensor:
    """``(batch, count)`` int64 masks drawn with ``strategy`` in ``cluster | random | frame``."""
    n = f_grid * t_grid
    if strategy == "cluster":
        rows = [cluster_mask(n, t_grid, count, rng) for _ in range(batch)]
    elif strategy == "random":
        rows = [random_mask(n, count, rng) for _ in range(batch)]
    elif strategy == "frame":
        rows = [frame_mask(f_grid, t_grid, count, rng) for _ in range(batch)]
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}; choose one of {STRATEGIES}")
    return torch.from_numpy(np.stack(rows)).long()


def check_masks(masks: torch.Tensor, n_patches: int) -> None:
    """Validate explicitly passed masks: ``(B, M)`` int, in range, unique per row."""
    if masks.ndim != 2 or masks.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"masks must be a (B, M) integer tensor, got {tuple(masks.shape)} {masks.dtype}")
    if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= n_patches):
        raise ValueError(
            f"mask indices must lie in [0, {n_patches}), got range [{int(masks.min())}, {int(masks.max())}]"
        )
    srt = masks.sort(dim=1).values
    if masks.shape[1] > 1 and (srt[:, 1:] == srt[:, :-1]).any():
        raise ValueError("mask indices must be unique within each row")
