"""An ablation factor, and the paper's four (docs/model.md section 9): what each arm sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ssamba.config import grid_shape

Overrides = dict[str, Any]


@dataclass(frozen=True)
class Factor:
    """An ablation factor: its arms in natural order (label -> config overrides) and the paper's arm.

    ``scale`` maps an arm's overrides to the preset at hand (e.g. mask counts given for 512 patches
    scaled to a smaller demo grid); it receives ``(label, overrides, experiment config)``.
    """

    name: str
    arms: dict[str, Overrides]
    reference: str
    description: str = ""
    scale: Callable[[str, Overrides, Any], Overrides] | None = None


OFFICIAL_PATCHES = 512  # 128 x 1024 input, 16 x 16 patches


def _scale_mask_count(label: str, overrides: dict, cfg) -> dict:
    """Mask counts are given for the paper's 512 patches; a smaller grid keeps the same fraction."""
    c = cfg.model
    f, t = grid_shape(cfg.frontend.num_mel_bins, cfg.pretrain.target_length, c.patch_size, c.patch_size, c.patch_size)
    n = f * t
    count = int(overrides["pretrain.mask_count"])
    if n != OFFICIAL_PATCHES:
        count = max(1, min(n - 2, round(count * n / OFFICIAL_PATCHES)))
    return {**overrides, "pretrain.mask_count": count}


MASKING = Factor(
    name="masking",
    description="the number of masked patches (of 512)",
    arms={
        "250": {"pretrain.mask_count": 250},
        "300": {"pretrain.mask_count": 300},
        "400": {"pretrain.mask_count": 400},
    },
    reference="400",
    scale=_scale_mask_count,
)
DIRECTION = Factor(
    name="direction",
    description="bidirectional (v2 mixer + layer pairing) vs unidirectional Mamba",
    arms={
        "bidirectional": {"model.bimamba": True, "model.layer_pairing": True},
        "unidirectional": {"model.bimamba": False, "model.layer_pairing": False},
    },
    reference="bidirectional",
)
NORM = Factor(
    name="norm",
    description="RMSNorm vs LayerNorm",
    arms={"layernorm": {"model.norm": "layernorm"}, "rmsnorm": {"model.norm": "rmsnorm"}},
    reference="layernorm",
)
MASKING_STRATEGY = Factor(
    name="masking_strategy",
    description="cluster patch vs random patch vs frame (time-axis) masking",
    arms={
        "cluster": {"pretrain.mask_strategy": "cluster"},
        "random": {"pretrain.mask_strategy": "random"},
        "frame": {"pretrain.mask_strategy": "frame"},
    },
    reference="cluster",
)

FACTORS = {f.name: f for f in (MASKING, DIRECTION, NORM, MASKING_STRATEGY)}
