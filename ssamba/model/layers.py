"""Building blocks shared by the encoders: patch embedding, drop-path, norms, token grid geometry."""

from __future__ import annotations

import torch
import torch.nn as nn

from ssamba.config import grid_shape  # noqa: F401 - defined with the config (pure); the model's layers use it


class PatchEmbed(nn.Module):
    """``fbank (B, T, F)`` -> patch tokens ``(B, F' * T', D)``, frequency-major (index ``f' * T' + t'``).

    The spectrogram is viewed as an image ``(B, 1, F, T)`` and cut by ``Conv2d(1, D, p, stride)``.
    """

    def __init__(self, dim: int, patch: int, fstride: int, tstride: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=(patch, patch), stride=(fstride, tstride))

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = fbank.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, F' * T', D)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's branch with probability ``p`` (scaled by ``1/(1-p)``)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``layernorm`` (weight + bias) or ``rmsnorm`` (weight only), as the official checkpoints."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


def official_drop_path_rates(depth: int, rate: float) -> list[float]:
    """Block i's drop-path rate: ``([0] + linspace(0, rate, depth))[i]`` (the official off-by-one)."""
    return ([0.0] + torch.linspace(0, rate, depth).tolist())[:depth]
