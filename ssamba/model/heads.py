"""MSPM heads and losses (InfoNCE + MSE, docs/model.md sections 4.3-4.4), the patch targets, and the classifier head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pred_head(dim: int, out: int) -> nn.Sequential:
    """``Linear(D, D) -> ReLU -> Linear(D, out)`` (``cpredlayer`` / ``gpredlayer``)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


def classifier_head(dim: int, num_classes: int) -> nn.Sequential:
    """``mlp_head``: ``LayerNorm(D) -> Linear(D, C)``."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))


def patch_targets(fbank: torch.Tensor, patch: int) -> torch.Tensor:
    """Targets of every patch: ``fbank (B, T, F)`` -> ``(B, N, patch * patch)``, detached.

    The input viewed as ``(B, 1, F, T)`` cut into non-overlapping ``patch x patch`` blocks in token
    order (frequency-major); within a patch the value index is ``freq_offset * patch + time_offset``.
    No per-patch normalisation.
    """
    x = fbank.transpose(1, 2).unsqueeze(1)
    return F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2).detach()


def gather_masked(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``x (B, N, K)``, ``masks (B, M)`` -> ``(B, M, K)``."""
    return torch.gather(x, 1, masks[..., None].expand(-1, -1, x.shape[-1]))


def info_nce(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over the masked patches of each spectrogram -> ``(nce, accuracy)``.

    ``pred, target: (B, M, K)``. ``S = target @ pred^T`` (raw dot products: no temperature, no
    L2 normalisation); ``nce = -mean_j log_softmax(S, -1)[j, j]`` averaged over the batch; the
    accuracy is the mean over k of ``argmax_j softmax(S, -1)[j, k] == k`` (official convention).
    """
    scores = torch.bmm(target.float(), pred.float().transpose(1, 2))  # (B, M, M)
    logp = F.log_softmax(scores, dim=-1)
    nce = -torch.diagonal(logp, dim1=1, dim2=2).mean()
    with torch.no_grad():
        hits = logp.exp().argmax(dim=1) == torch.arange(scores.shape[1], device=scores.device)
        acc = hits.float().mean()
    return nce, acc


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches (``pred, target: (B, M, K)``)."""
    return torch.mean((pred.float() - target.float()) ** 2)
