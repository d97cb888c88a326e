"""Import of the authors' released ``.pth`` files (SSAMBA and SSAST; pretraining and fine-tuned forms).

One filter function per source family (docs/model.md section 6): unwrap and strip ``module.``, detect
architecture, size, depth, norm type, mixer type and geometry from the keys, drop the unused heads
(each with its reason), then load strictly: every other unmatched key is an error listing them all.
Layer pairing cannot be seen in the keys; the official recipes use it, so it defaults to on.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from ssamba.config import SIZES, SSAST_HEADS, ModelConfig
from ssamba.model.audio_model import AudioModel, Geometry
from ssamba.model.checkpoints import CheckpointError, load_strict, safe_load
from ssamba.model.layers import grid_shape

# Fine-tuning geometries of the official recipes (docs/model.md section 2.3): patches -> (fstride, tstride, frames).
RECIPE_GEOMETRIES = {
    12 * 101: (10, 10, 1024),  # AudioSet
    12 * 50: (10, 10, 512),  # ESC-50
    12 * 12: (10, 10, 128),  # Speech Commands
    8 * 64: (16, 16, 1024),  # pretraining geometry
}


def load_official_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an official checkpoint safely (``weights_only=True``) -> its state dict (``module.`` kept)."""
    state = safe_load(path, "official checkpoint")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def detect_config(state: dict[str, torch.Tensor], *, layer_pairing: bool = True) -> ModelConfig:
    """The :class:`ModelConfig` an official state dict (``module.`` stripped) was built with."""
    if "v.cls_token" not in state:
        raise CheckpointError(
            f"not an official SSAMBA/SSAST state dict: no 'v.cls_token' (keys start with {sorted(state)[:5]})"
        )
    d = int(state["v.cls_token"].shape[-1])
    size = {v: k for k, v in SIZES.items()}.get(d)
    patch = int(state["v.patch_embed.proj.weight"].shape[-1])
    if any(k.startswith("v.blocks.") for k in state):
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("v.blocks."))
        heads = SSAST_HEADS.get(size, max(1, d // 64))
        return ModelConfig(arch="ssast", embed_dim=d, depth=depth, num_heads=heads, patch_size=patch, drop_path=0.0)
    if not any(k.startswith("v.layers.") for k in state):
        raise CheckpointError("official state dict has neither 'v.layers.*' (SSAMBA) nor 'v.blocks.*' (SSAST) keys")
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("v.layers."))
    norm = "layernorm" if "v.layers.0.norm.bias" in state else "rmsnorm"
    bimamba = "v.layers.0.mixer.conv1d_b.weight" in state
    d_inner, d_state = state["v.layers.0.mixer.A_log"].shape
    dt_rank = int(state["v.layers.0.mixer.dt_proj.weight"].shape[1])
    d_conv = int(state["v.layers.0.mixer.conv1d.weight"].shape[-1])
    return ModelConfig(
        arch="ssamba",
        embed_dim=d,
        depth=depth,
        patch_size=patch,
        d_state=int(d_state),
        d_conv=d_conv,
        expand=int(d_inner) // d,
        dt_rank=dt_rank if dt_rank != -(-d // 16) else 0,
        bimamba=bimamba,
        layer_pairing=layer_pairing and depth % 2 == 0,
        norm=norm,
        final_norm_twice=True,
    )


def _geometry(
    state, cfg: ModelConfig, n_prefix: int, fstride, tstride, input_tdim, input_fdim
) -> tuple[ModelConfig, Geometry]:
    n_patches = int(state["v.pos_embed"].shape[1]) - n_prefix
    if fstride is None and tstride is None and input_tdim is None:
        if "p_input_tdim" in state:  # pretraining form: stride = patch size
            fdim, tdim = int(state["p_input_fdim"]), int(state["p_input_tdim"])
            fs = ts = cfg.patch_size
        elif n_patches in RECIPE_GEOMETRIES:
            fs, ts, tdim = RECIPE_GEOMETRIES[n_patches]
            fdim = input_fdim
        else:
            raise CheckpointError(
                f"cannot tell the fine-tuning geometry of a position embedding with {n_patches} patches; "
                f"pass fstride=, tstride= and input_tdim= (e.g. 10, 10, 512 for ESC-50)"
            )
    else:
        fs, ts, tdim, fdim = fstride or 10, tstride or 10, input_tdim or 1024, input_fdim
    grid = grid_shape(fdim, tdim, cfg.patch_size, fs, ts)
    if grid[0] * grid[1] != n_patches:
        raise CheckpointError(
            f"position embedding has {n_patches} patches but stride ({fs}, {ts}) on {fdim} x {tdim} gives "
            f"{grid[0]} x {grid[1]} = {grid[0] * grid[1]}; pass the geometry the checkpoint was fine-tuned with"
        )
    return replace(cfg, fstride=fs, tstride=ts), Geometry(fdim, tdim)


def import_official(
    path_or_state: str | os.PathLike | dict,
    *,
    layer_pairing: bool = True,
    fstride: int | None = None,
    tstride: int | None = None,
    input_tdim: int | None = None,
    input_fdim: int = 128,
    settings: dict[str, Any] | None = None,
) -> tuple[AudioModel, dict[str, Any]]:
    """Build our model from an official checkpoint and load it strictly.

    ``layer_pairing`` must be what the checkpoint was trained with (the keys cannot tell); ``settings``
    are ``ModelConfig`` fields that do not change the weights (``scan_backend``, ``pooling``, ...).

    Pretraining form (``p_input_*``, ``mask_embed``, ``cpredlayer``, ``gpredlayer``): the model has
    the MSPM heads, stride = patch size. Fine-tuned form (``mlp_head``): the classifier is kept and
    the geometry is read from the position embedding (recipe geometries) or given explicitly.
    Returns ``(model, info)`` with ``info["dropped"]`` naming each ignored key and why.
    """
    raw = path_or_state if isinstance(path_or_state, dict) else load_official_state(path_or_state)
    state = _strip(raw)
    cfg = detect_config(state, layer_pairing=layer_pairing)
    n_prefix = 2 if cfg.arch == "ssast" else 1
    cfg, geom = _geometry(state, cfg, n_prefix, fstride, tstride, input_tdim, input_fdim)
    if settings:
        cfg = replace(cfg, **settings)
    pretrain_heads = "mask_embed" in state
    num_classes = int(state["mlp_head.1.weight"].shape[0]) if "mlp_head.1.weight" in state else 0
    dropped: list[str] = []
    keep: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k in ("p_input_fdim", "p_input_tdim"):
            dropped.append(f"{k} (geometry, read: {int(v)})")
        elif k in ("v.head.weight", "v.head.bias", "v.head_dist.weight", "v.head_dist.bias"):
            dropped.append(f"{k} (the backbone's ImageNet-style head, unused by SSAMBA/SSAST)")
        else:
            keep[k] = v
    model = AudioModel(cfg, geom, num_classes=num_classes, pretrain_heads=pretrain_heads)
    load_strict(
        model, keep, source=str(path_or_state) if not isinstance(path_or_state, dict) else "official state dict"
    )
    info = {
        "config": cfg,
        "geometry": geom,
        "form": "pretraining" if pretrain_heads else "fine-tuned",
        "num_classes": num_classes,
        "dropped": dropped,
    }
    return model, info


def load_official(
    path: str | os.PathLike,
    *,
    layer_pairing: bool = True,
    scan_backend: str = "auto",
    pooling: str = "mean",
    **geometry: Any,
) -> AudioModel:
    """An official SSAMBA (or SSAST) checkpoint as our model, in eval mode: the public import function.

    ``layer_pairing``: whether the checkpoint was trained with the official layer pairing (the
    recipes' default; a checkpoint trained without it needs ``False``, or its outputs are wrong).
    ``scan_backend``: ``auto``, ``reference`` or ``cuda``. ``pooling``: ``mean`` (official ``ft_avgtok``),
    ``cls`` (``ft_cls``) or ``per_second`` (``ft_avgtok_1sec``: logits ``(batch, 60, classes)``).
    ``geometry``: ``fstride``, ``tstride``, ``input_tdim``, ``input_fdim`` when the position embedding
    alone cannot tell them (see :func:`import_official`)."""
    model, _ = import_official(
        path, layer_pairing=layer_pairing, settings={"scan_backend": scan_backend, "pooling": pooling}, **geometry
    )
    return model.eval()
