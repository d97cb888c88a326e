"""Learning-rate schedules of the recipes, with plain-data state (checkpoints load with weights_only).

Each schedule owns a multiplier applied to every parameter group's base lr:
- pretraining: linear warm-up, then ReduceLROnPlateau(max, factor, patience) on masked accuracy;
- fine-tuning: linear warm-up, then MultiStepLR per epoch with milestones ``range(start, 1000, step)``.
"""

from __future__ import annotations

from typing import Any

import torch


class Schedule:
    """Base: warm-up over ``warmup_steps`` optimiser steps, times a decay factor set by subclasses."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int):
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.decay = 1.0
        self.apply(0)

    def apply(self, step: int) -> None:
        """Set the lr for optimiser step ``step`` (0-based)."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * warm * self.decay

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def after_epoch(self, epoch: int) -> None:  # epoch: number of epochs completed
        pass

    def after_eval(self, metric: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])


class PlateauSchedule(Schedule):
    """Halve (``factor``) the lr when the metric has not improved for more than ``patience`` checks."""

    def __init__(self, optimizer, warmup_steps: int, factor: float, patience: int, threshold: float = 1e-4):
        super().__init__(optimizer, warmup_steps)
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.best = float("-inf")
        self.bad = 0

    def after_eval(self, metric: float) -> None:
        if metric != metric:  # NaN: no information
            return
        if metric > self.best * (1 + self.threshold) if self.best > 0 else metric > self.best:
            self.best, self.bad = metric, 0
        else:
            self.bad += 1
        if self.bad > self.patience:
            self.decay *= self.factor
            self.bad = 0

    def state_dict(self):
        return {"decay": self.decay, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state):
        self.decay, self.best, self.bad = float(state["decay"]), float(state["best"]), int(state["bad"])


class MultiStepSchedule(Schedule):
    """``lr = base * decay ** #{milestones <= epochs completed}``, milestones ``range(start, 1000, step)``."""

    def __init__(self, optimizer, warmup_steps: int, start: int, step: int, gamma: float):
        self.milestones = list(range(start, 1000, max(step, 1)))
        self.gamma = gamma
        super().__init__(optimizer, warmup_steps)

    def after_epoch(self, epoch: int) -> None:
        self.decay = self.gamma ** sum(1 for m in self.milestones if m <= epoch)
