"""The SSAMBA encoder: patch tokens, cls at index 0, learned positions, pre-norm Mamba blocks, final norm.

Shapes: ``fbank (B, T, F)`` -> ``tokens (B, 1 + F' * T', D)``, frequency-major, cls at index 0.
Block, layer pairing and output follow docs/model.md sections 3.1-3.4; names follow the official
checkpoints (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``layers.{i}.{norm,mixer}``, ``norm_f``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssamba.config import ModelConfig
from ssamba.model.layers import DropPath, PatchEmbed, grid_shape, make_norm, official_drop_path_rates
from ssamba.model.mixer import Mamba
from ssamba.ops.backends import add_norm_fn, resolve_backend


def fused_add_norm(
    norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool, prenorm: bool = True
):
    """``norm(residual + hidden)`` (and the new residual when ``prenorm``) in one Triton kernel (mamba-ssm)."""
    rms = isinstance(norm, nn.RMSNorm)
    eps = norm.eps if norm.eps is not None else torch.finfo(hidden.dtype).eps
    return add_norm_fn()(
        hidden,
        norm.weight,
        None if rms else norm.bias,
        residual=residual,
        eps=eps,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=rms,
    )


class Block(nn.Module):
    """Pre-norm block, "add then norm then mixer": returns ``(mixer(norm(residual)), residual)``.

    With ``fused_norm`` (default on the CUDA backend when mamba-ssm's Triton norm imports, and
    ``model.fused_add_norm``) the add and the norm run as one kernel, in training too: drop-path is
    applied to the mixer output before it goes in (``norm(residual + drop_path(hidden))`` either way,
    same random draws).
    """

    def __init__(self, cfg: ModelConfig, drop_path: float, backend: str):
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.embed_dim, cfg.norm_eps)
        self.mixer = Mamba(cfg, backend)
        self.drop_path = DropPath(drop_path)
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.fused_norm = cfg.fused_add_norm and backend == "cuda" and add_norm_fn() is not None

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, reverse: bool = False):
        if self.fused_norm:
            if residual is not None:
                hidden = self.drop_path(hidden)
            normed, residual = fused_add_norm(self.norm, hidden, residual, self.residual_in_fp32)
            return self.mixer(normed, reverse=reverse), residual
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        normed = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.float()
        return self.mixer(normed, reverse=reverse), residual


class MambaEncoder(nn.Module):
    """Patch embedding + cls + positions + ``depth`` Mamba blocks (optionally paired) + ``norm_f``.

    ``input_fdim`` x ``input_tdim`` is the spectrogram size the position embedding is built for.
    """

    n_prefix = 1  # tokens before the patches (cls)

    def __init__(self, cfg: ModelConfig, input_fdim: int = 128, input_tdim: int = 1024):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.backend = resolve_backend(cfg.scan_backend)
        self.grid = grid_shape(input_fdim, input_tdim, cfg.patch_size, cfg.fstride, cfg.tstride)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(d, cfg.patch_size, cfg.fstride, cfg.tstride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, d))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        rates = official_drop_path_rates(cfg.depth, cfg.drop_path)
        self.layers = nn.ModuleList(Block(cfg, rates[i], self.backend) for i in range(cfg.depth))
        self.norm_f = make_norm(cfg.norm, d, cfg.norm_eps)
        self.drop_path_f = DropPath(cfg.drop_path)

    def embed(
        self, fbank: torch.Tensor, masks: torch.Tensor | None = None, mask_embed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tokens before the blocks ``(B, 1 + N, D)``; masked patches get ``mask_embed`` before positions."""
        x = self.patch_embed(fbank)
        if x.shape[1] != self.num_patches:
            raise ValueError(
                f"input gives {x.shape[1]} patches but the position embedding has {self.num_patches} "
                f"(grid {self.grid}); pad/crop the input to the model's target length"
            )
        if masks is not None:
            rows = torch.arange(x.shape[0], device=x.device)[:, None]
            x = x.clone()
            x[rows, masks] = mask_embed.to(x.dtype).expand(x.shape[0], masks.shape[1], -1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.pos_embed.to(x.dtype)

    def blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the blocks and the final add + norm: ``(B, L, D)`` -> ``(B, L, D)``."""
        residual = None
        if self.cfg.layer_pairing:
            for i in range(0, len(self.layers), 2):
                h_f, r_f = self.layers[i](hidden, residual)
                odd = self.layers[i + 1]
                if odd.mixer.fast:  # the odd layer on the flipped sequence, without the flips
                    h_b, r_b = odd(hidden, residual, reverse=True)
                else:
                    h_b, r_b = odd(hidden.flip(1), None if residual is None else residual.flip(1))
                    h_b, r_b = h_b.flip(1), r_b.flip(1)
                hidden, residual = h_f + h_b, r_f + r_b
        else:
            for layer in self.layers:
                hidden, residual = layer(hidden, residual)
        if self.layers[-1].fused_norm:
            out = fused_add_norm(self.norm_f, self.drop_path_f(hidden), residual, False, prenorm=False)
        else:
            residual = residual + self.drop_path_f(hidden)
            out = self.norm_f(residual.to(self.norm_f.weight.dtype))
        if self.cfg.final_norm_twice:
            out = self.norm_f(out)  # official quirk (docs/model.md section 3.4)
        return out

    def forward(
        self, fbank: torch.Tensor, masks: torch.Tensor | None = None, mask_embed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``fbank (B, T, F)`` -> ``tokens (B, 1 + N, D)``."""
        return self.blocks(self.embed(fbank, masks, mask_embed))


def set_speedups(
    model: nn.Module,
    fuse_directions: bool | None = None,
    pad: bool | None = None,
    fused_norm: bool | None = None,
    chunk_scan: bool | None = None,
    train_scan: bool | None = None,
    fused_gate: bool | None = None,
) -> None:
    """Switch the encoder's speed-ups (same result; for benchmarks and tests). ``None`` leaves one as is.

    ``fused_norm=True`` needs the CUDA backend and mamba-ssm's Triton norm. ``chunk_scan`` (inference on
    CUDA, fast path only) is used where it compiles (:mod:`ssamba.ops.chunk_scan`); so is ``train_scan``
    (with gradients, fast path only; :mod:`ssamba.ops.train_scan`).
    """
    for m in model.modules():
        if isinstance(m, Mamba):
            if fuse_directions is not None:
                m.fast = fuse_directions
            if pad is not None:
                m.pad_to_chunk = pad
            if chunk_scan is not None:
                m.chunk_scan = chunk_scan
            if train_scan is not None:
                m.train_scan = train_scan
            if fused_gate is not None:
                m.fused_gate = fused_gate
        if isinstance(m, Block) and fused_norm is not None:
            if fused_norm and add_norm_fn() is None:
                raise RuntimeError("fused add-norm needs a CUDA device and mamba-ssm's Triton layer norm")
            m.fused_norm = fused_norm
