"""Evaluation metrics: accuracy and mean average precision (mAP) over classes."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy: ``argmax(logits) == argmax(targets)``; ``logits, targets: (B, C)``."""
    if logits.shape[0] == 0:
        return float("nan")
    return float((logits.argmax(-1) == targets.argmax(-1)).float().mean())


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AP of one class: mean precision at the rank of each positive (``scores, labels: (N,)``)."""
    pos = labels > 0.5
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    hits = pos[order].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / n_pos)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over the classes that have at least one positive (``(N, C)`` each)."""
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    aps = [a for a in aps if a == a]
    return float(sum(aps) / len(aps)) if aps else float("nan")
