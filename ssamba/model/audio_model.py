"""The whole model: an encoder (SSAMBA or SSAST) with the MSPM heads and an optional classifier.

Names follow the official checkpoints once ``module.`` is stripped: ``v.*`` (encoder),
``mask_embed``, ``cpredlayer``, ``gpredlayer``, ``mlp_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ssamba.config import ModelConfig
from ssamba.config.schema import PER_SECOND_CHUNKS
from ssamba.model.heads import classifier_head, gather_masked, info_nce, masked_mse, patch_targets, pred_head
from ssamba.model.masking import check_masks


@dataclass(frozen=True)
class Geometry:
    """Input size the position embedding is built for: ``input_fdim`` mel bins x ``input_tdim`` frames."""

    input_fdim: int = 128
    input_tdim: int = 1024


def build_encoder(cfg: ModelConfig, geom: Geometry) -> nn.Module:
    if cfg.arch == "ssamba":
        from ssamba.model.encoder import MambaEncoder

        return MambaEncoder(cfg, geom.input_fdim, geom.input_tdim)
    from ssamba.model.ssast import ViTEncoder

    return ViTEncoder(cfg, geom.input_fdim, geom.input_tdim)


class AudioModel(nn.Module):
    """Encoder + ``mask_embed`` + MSPM heads (+ ``mlp_head`` when ``num_classes`` > 0)."""

    def __init__(
        self, cfg: ModelConfig, geom: Geometry = Geometry(), num_classes: int = 0, pretrain_heads: bool = True
    ):
        super().__init__()
        self.cfg, self.geom, self.num_classes = cfg, geom, num_classes
        self.v = build_encoder(cfg, geom)
        d = cfg.embed_dim
        k = cfg.patch_size * cfg.patch_size
        if pretrain_heads:
            self.mask_embed = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.xavier_normal_(self.mask_embed)
            self.cpredlayer = pred_head(d, k)
            self.gpredlayer = pred_head(d, k)
        if num_classes > 0:
            self.mlp_head = classifier_head(d, num_classes)

    @property
    def grid(self) -> tuple[int, int]:
        return self.v.grid

    @property
    def num_patches(self) -> int:
        return self.v.num_patches

    def encode(self, fbank: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """``fbank (B, T, F)`` -> tokens ``(B, n_prefix + N, D)``; ``masks (B, M)`` patch indices."""
        if masks is not None:
            if not hasattr(self, "mask_embed"):
                raise ValueError("this model has no mask_embed (built without pretraining heads)")
            return self.v(fbank, masks, self.mask_embed)
        return self.v(fbank)

    def pooled(self, fbank: torch.Tensor) -> torch.Tensor:
        """Utterance embedding ``(B, D)``: mean of patch tokens or the cls token (``cfg.pooling``); with
        ``per_second`` (the official ``ft_avgtok_1sec``) ``(B, 60, D)``: every token, prefix included, cut
        into 60 chunks of ``L // 60`` tokens, each averaged, the trailing ``L % 60`` tokens dropped."""
        tokens = self.encode(fbank)
        p = self.v.n_prefix
        if self.cfg.pooling == "mean":
            return tokens[:, p:].mean(dim=1)
        if self.cfg.pooling == "per_second":
            b, n, d = tokens.shape
            size = n // PER_SECOND_CHUNKS
            if size == 0:
                raise ValueError(f"per_second pooling needs at least {PER_SECOND_CHUNKS} tokens, the model makes {n}")
            return tokens[:, : PER_SECOND_CHUNKS * size].reshape(b, PER_SECOND_CHUNKS, size, d).mean(dim=2)
        return tokens[:, :p].mean(dim=1)  # SSAMBA: token 0; SSAST: mean of cls and dist tokens

    def forward(
        self,
        fbank: torch.Tensor,
        task: str = "classify",
        mask_d: torch.Tensor | None = None,
        mask_g: torch.Tensor | None = None,
        mse_weight: float = 10.0,
    ):
        """``task="classify"``: logits ``(B, C)`` (``(B, 60, C)`` with ``per_second`` pooling);
        ``task="pretrain"``: :meth:`pretrain_losses`.

        (One ``forward`` for both so that a DistributedDataParallel wrapper syncs either job.)
        """
        if task == "pretrain":
            return self.pretrain_losses(fbank, mask_d, mask_g, mse_weight)
        if task != "classify":
            raise ValueError(f"task must be 'classify' or 'pretrain', got {task!r}")
        if self.num_classes <= 0:
            raise ValueError("model has no classifier head (num_classes=0); use encode() or pretrain_losses()")
        return self.mlp_head(self.pooled(fbank))

    def _masked_outputs(self, fbank, masks):
        if self.cfg.fstride != self.cfg.patch_size or self.cfg.tstride != self.cfg.patch_size:
            raise ValueError(
                f"MSPM pretraining needs non-overlapping patches (stride = patch size {self.cfg.patch_size}); "
                f"got fstride={self.cfg.fstride}, tstride={self.cfg.tstride}"
            )
        check_masks(masks, self.num_patches)
        tokens = self.encode(fbank, masks)
        out = gather_masked(tokens[:, self.v.n_prefix :], masks)  # encoder output at index + n_prefix
        target = gather_masked(patch_targets(fbank, self.cfg.patch_size), masks)
        return out, target

    def pretrain_losses(
        self, fbank: torch.Tensor, mask_d: torch.Tensor, mask_g: torch.Tensor | None = None, mse_weight: float = 10.0
    ) -> dict[str, torch.Tensor]:
        """MSPM: ``loss = nce + mse_weight * mse`` (official weight 10).

        ``mask_d`` masks the discriminative (InfoNCE) pass, ``mask_g`` the generative (MSE) pass:
        two forward passes as the official step; ``mask_g=None`` computes both from one pass.
        """
        out, target = self._masked_outputs(fbank, mask_d)
        nce, acc = info_nce(self.cpredlayer(out), target)
        if mask_g is not None:
            out, target = self._masked_outputs(fbank, mask_g)
        mse = masked_mse(self.gpredlayer(out), target)
        return {"loss": nce + mse_weight * mse, "nce": nce, "mse": mse, "acc": acc}
