"""Our checkpoint format (weights + full config + front-end statistics) and position-embedding adaptation.

A checkpoint is a dict of plain types and tensors, so it loads with ``torch.load(weights_only=True)``:
``format``, ``version``, ``model`` (flat ModelConfig), ``geometry``, ``num_classes``, ``pretrain_heads``,
``state_dict``, ``config`` (the flat experiment config), ``frontend`` (fbank settings and the
normalisation statistics the weights were trained with), ``label_vocab``, ``metrics``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssamba.base.errors import SSAMBAError
from ssamba.base.files import atomic_path
from ssamba.config import ModelConfig, from_flat, to_flat
from ssamba.model.audio_model import AudioModel, Geometry

FORMAT = "ssamba-checkpoint"
VERSION = 1


class CheckpointError(SSAMBAError):
    """A checkpoint cannot be loaded (wrong format, unmatched keys, incompatible shapes)."""


def save_checkpoint(
    path: str | os.PathLike,
    model: AudioModel,
    *,
    config: dict[str, Any] | None = None,
    frontend: dict[str, Any] | None = None,
    label_vocab: list[str] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write atomically (temp file + rename): a reader never sees a half-written checkpoint."""
    model = getattr(model, "module", model)  # unwrap DDP
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": to_flat(model.cfg),
        "geometry": {"input_fdim": model.geom.input_fdim, "input_tdim": model.geom.input_tdim},
        "num_classes": int(model.num_classes),
        "pretrain_heads": hasattr(model, "mask_embed"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": dict(config or {}),
        "frontend": dict(frontend or {}),
        "label_vocab": list(label_vocab or []),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def safe_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on CPU; a missing or unsafe file is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
        if found:  # torch's own message goes on to suggest weights_only=False: not repeated here
            raise CheckpointError(
                f"{what} {path} holds a pickled Python object ({found.group(1)}); weights_only=True refuses to "
                f"load it, since unpickling it could run arbitrary code. Fix: load only checkpoints of plain "
                f"types and tensors (what ssamba writes); never load this file with weights_only=False unless "
                f"you trust its source"
            ) from None
        raise CheckpointError(f"{what} {path} cannot be loaded safely (weights_only=True): {exc}") from None


def is_ours(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw payload, loaded safely (``weights_only=True``)."""
    payload = safe_load(path)
    if not is_ours(payload):
        raise CheckpointError(
            f"{path} is not an ssamba checkpoint (no format={FORMAT!r}); for the authors' released .pth "
            f"files use ssamba.model.official.import_official"
        )
    return payload


def load_checkpoint(path: str | os.PathLike) -> tuple[AudioModel, dict[str, Any]]:
    """Rebuild the model from a checkpoint and load its weights strictly."""
    payload = read_checkpoint(path)
    cfg = from_flat(ModelConfig, payload["model"])
    model = AudioModel(cfg, Geometry(**payload["geometry"]), payload["num_classes"], payload["pretrain_heads"])
    load_strict(model, payload["state_dict"], source=str(path))
    return model, payload


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that lists every missing, unexpected and mis-shaped key in one error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not match the model: missing {missing}, unexpected {unexpected}, shape mismatches {shapes}"
        )
    model.load_state_dict(state, strict=True)


def adapt_pos_embed(
    pos: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], n_prefix: int
) -> torch.Tensor:
    """Position embedding of a pretraining grid re-laid for a fine-tuning grid (docs/model.md section 5.3).

    ``pos (1, n_prefix + pf * pt, D)`` -> ``(1, n_prefix + f * t, D)``. Time: crop the centre
    columns ``[pt//2 - t//2 : ... + t]`` when ``t < pt``, else bilinear-resize to ``(pf, t)``;
    frequency likewise (crop rows, or bilinear to ``(f, t)``). The official code hard-codes
    ``pf = 8`` in the time resize; the grid here comes from the checkpoint (same result for 128 bins).
    The prefix (cls [, dist]) positions are kept in front.
    """
    pf, pt = src_grid
    f, t = dst_grid
    d = pos.shape[-1]
    if pos.shape[1] != n_prefix + pf * pt:
        raise CheckpointError(f"pos_embed has {pos.shape[1]} positions, expected {n_prefix} + {pf}x{pt}")
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    grid = grid.transpose(1, 2).reshape(1, d, pf, pt)
    if t < pt:
        start = int(pt / 2) - int(t / 2)
        grid = grid[:, :, :, start : start + t]
    else:
        grid = F.interpolate(grid, size=(pf, t), mode="bilinear", align_corners=False)
    if f < pf:
        start = int(pf / 2) - int(f / 2)
        grid = grid[:, :, start : start + f, :]
    else:
        grid = F.interpolate(grid, size=(f, t), mode="bilinear", align_corners=False)
    grid = grid.reshape(1, d, f * t).transpose(1, 2)
    return torch.cat([prefix, grid], dim=1)


def transfer_encoder(src_state: dict[str, torch.Tensor], src_grid: tuple[int, int], model: AudioModel) -> list[str]:
    """Load a pretrained encoder (``v.*`` keys) into ``model`` at its own geometry and stride.

    The position embedding is adapted (:func:`adapt_pos_embed`); the patch conv keeps its weights
    with the new stride. Returns the pretraining-only keys that were dropped (mask_embed, MSPM heads),
    each named; any other unmatched key is an error.
    """
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in src_state.items():
        if k.startswith("v."):
            new[k] = v
        elif k == "mask_embed" or k.startswith(("cpredlayer.", "gpredlayer.")):
            if k in own:
                new[k] = v
            else:
                dropped.append(f"{k} (pretraining head, unused when fine-tuning)")
        elif k.startswith("mlp_head."):
            dropped.append(f"{k} (classifier of another task)")
        else:
            raise CheckpointError(f"unexpected key {k!r} in pretrained weights")
    new["v.pos_embed"] = adapt_pos_embed(src_state["v.pos_embed"], src_grid, model.grid, model.v.n_prefix)
    for k in own:
        if k.startswith("mlp_head.") and k not in new:
            new[k] = own[k]  # a fresh classifier
    load_strict(model, new, source="pretrained encoder")
    return dropped


def grid_of(payload: dict[str, Any]) -> tuple[int, int]:
    """Patch grid a checkpoint's position embedding was built for."""
    m, g = payload["model"], payload["geometry"]
    p = m["patch_size"]
    return ((g["input_fdim"] - p) // m["fstride"] + 1, (g["input_tdim"] - p) // m["tstride"] + 1)


__all__ = [
    "save_checkpoint",
    "safe_load",
    "is_ours",
    "read_checkpoint",
    "load_checkpoint",
    "load_strict",
    "adapt_pos_embed",
    "transfer_encoder",
    "grid_of",
    "CheckpointError",
]
