"""Task objects: what differs between pretraining (MSPM) and fine-tuning (classification).

A task gives the loop its loss on a batch, its evaluation, its optimiser and schedule, and the
metric (always maximised) that picks the best checkpoint. Metric names are the MLflow names:
``pretrain/<m>`` and ``ft/<task>/<m>``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssamba.base import names as N
from ssamba.base.errors import ConfigError
from ssamba.config import FinetuneConfig, PretrainConfig, max_mask_count
from ssamba.model.masking import make_masks
from ssamba.train.metrics import accuracy, mean_average_precision
from ssamba.train.schedules import MultiStepSchedule, PlateauSchedule, Schedule


def _unwrap(model):
    return getattr(model, "module", model)


class PretrainTask:
    """Masked spectrogram patch modelling: ``loss = nce + mse_weight * mse`` over masked patches."""

    kind = "pretrain"
    prefix = N.PRETRAIN
    metric = "acc"  # masked-patch InfoNCE accuracy on the validation split

    def __init__(self, cfg: PretrainConfig, grid: tuple[int, int], seed: int):
        self.cfg, self.grid, self.seed = cfg, grid, seed
        n = grid[0] * grid[1]
        most = max_mask_count(cfg.mask_strategy, n)  # (ExperimentConfig checks this too; a task may be built alone)
        if cfg.mask_count > most:
            raise ConfigError(
                f"pretrain.mask_count {cfg.mask_count} is too large for {n} patches (grid {grid[0]} x {grid[1]}, "
                f"strategy {cfg.mask_strategy}); it must be at most {most}. Lower it or lengthen pretrain.target_length"
            )

    def masks(self, batch: int, rng: np.random.Generator, device) -> torch.Tensor:
        f, t = self.grid
        return make_masks(self.cfg.mask_strategy, batch, f, t, self.cfg.mask_count, rng).to(device)

    def loss(self, model, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its parts (detached 0-d tensors: the loop reads them back only when it logs)."""
        x = batch["fbank"]
        rng = np.random.default_rng([self.seed, step, micro])
        mask_d = self.masks(x.shape[0], rng, x.device)
        mask_g = self.masks(x.shape[0], rng, x.device) if self.cfg.passes == 2 else None
        out = model(x, task="pretrain", mask_d=mask_d, mask_g=mask_g, mse_weight=self.cfg.mse_weight)
        return out["loss"], {k: v.detach() for k, v in out.items()}  # tensors: read back only when logged

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast) -> dict[str, float]:
        """Masked accuracy, nce and mse with masks fixed by batch position (comparable across evals)."""
        sums: dict[str, float] = {}
        n = 0
        for i, batch in enumerate(loader):
            if self.cfg.eval_batches and i >= self.cfg.eval_batches:
                break
            x = batch["fbank"].to(device)
            if x.shape[0] == 0:
                continue
            rng = np.random.default_rng([self.seed, 10**9, i])
            mask = self.masks(x.shape[0], rng, device)
            with autocast():
                out = model(x, task="pretrain", mask_d=mask, mask_g=None, mse_weight=self.cfg.mse_weight)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * x.shape[0]
            n += x.shape[0]
        return {k: v / n for k, v in sums.items()} if n else {}

    def optimizer(self, model) -> torch.optim.Optimizer:
        c = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, betas=(c.beta1, c.beta2))

    def schedule(self, optimizer) -> Schedule:
        c = self.cfg
        return PlateauSchedule(optimizer, c.warmup_steps, c.plateau_factor, c.plateau_patience)


class FinetuneTask:
    """Classification with cross-entropy (single label) or BCE (multi-label); accuracy and mAP."""

    kind = "finetune"

    def __init__(self, cfg: FinetuneConfig, num_classes: int):
        self.cfg, self.num_classes = cfg, num_classes
        self.prefix = N.ft(cfg.task)
        self.metric = cfg.metric

    def loss(self, model, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["fbank"])
        loss = self._loss(logits, batch["label"])
        return loss, {"loss": loss.detach()}

    def _loss(self, logits, target):
        if self.cfg.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), target)
        return F.cross_entropy(logits.float(), target)  # soft targets (mixup) allowed

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast) -> dict[str, float]:
        all_logits, all_targets = [], []
        for batch in loader:
            x = batch["fbank"].to(device)
            if x.shape[0] == 0:
                continue
            with autocast():
                all_logits.append(model(x).float().cpu())
            all_targets.append(batch["label"])
        if not all_logits:
            return {}
        logits, targets = torch.cat(all_logits), torch.cat(all_targets)
        scores = torch.sigmoid(logits) if self.cfg.loss == "bce" else torch.softmax(logits, -1)
        return {
            "loss": float(self._loss(logits, targets)),
            "acc": accuracy(logits, targets),
            "map": mean_average_precision(scores, targets),
            "n": float(len(targets)),
        }

    def optimizer(self, model) -> torch.optim.Optimizer:
        c = self.cfg
        m = _unwrap(model)
        head = [p for n, p in m.named_parameters() if n.startswith("mlp_head.") and p.requires_grad]
        head_ids = {id(p) for p in head}
        body = [p for p in m.parameters() if id(p) not in head_ids and p.requires_grad]
        groups = [{"params": body, "lr": c.lr}, {"params": head, "lr": c.lr * c.head_lr}]
        return torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay, betas=(c.beta1, c.beta2))

    def schedule(self, optimizer) -> Schedule:
        c = self.cfg
        return MultiStepSchedule(optimizer, c.warmup_steps, c.lr_decay_start, c.lr_decay_step, c.lr_decay)
