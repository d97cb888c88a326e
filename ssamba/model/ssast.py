"""The SSAST baseline encoder: a DeiT-style ViT with cls + distillation tokens (docs/model.md section 7).

Shapes: ``fbank (B, T, F)`` -> ``tokens (B, 2 + F' * T', D)``; patch tokens start at index 2.
Attention is either materialised (``softmax(q k^T / sqrt(d)) v``, as the original) or fused
(``scaled_dot_product_attention``). Names follow the official checkpoints (``blocks.{i}.norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``cls_token``, ``dist_token``, ``norm``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssamba.config import ModelConfig
from ssamba.model.layers import DropPath, PatchEmbed, grid_shape

VIT_EPS = 1e-6  # DeiT's LayerNorm eps


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, d_head)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=VIT_EPS)
        self.attn = Attention(d, cfg.num_heads, cfg.attention == "fused")
        self.norm2 = nn.LayerNorm(d, eps=VIT_EPS)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTEncoder(nn.Module):
    """Patch embedding + cls + dist tokens + positions + ViT blocks + final norm."""

    n_prefix = 2

    def __init__(self, cfg: ModelConfig, input_fdim: int = 128, input_tdim: int = 1024):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.grid = grid_shape(input_fdim, input_tdim, cfg.patch_size, cfg.fstride, cfg.tstride)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(d, cfg.patch_size, cfg.fstride, cfg.tstride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 2, d))
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(ViTBlock(cfg, rates[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=VIT_EPS)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(
        self, fbank: torch.Tensor, masks: torch.Tensor | None = None, mask_embed: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.patch_embed(fbank)
        if x.shape[1] != self.num_patches:
            raise ValueError(f"input gives {x.shape[1]} patches but the position embedding has {self.num_patches}")
        if masks is not None:
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            x = x.clone()
            x[rows, masks] = mask_embed.to(x.dtype).expand(x.shape[0], masks.shape[1], -1)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
