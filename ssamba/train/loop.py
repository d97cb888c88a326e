"""The one training loop, for pretraining and fine-tuning alike; runs with or without Ray.

Per optimiser step: ``grad_accum`` micro-batches (loss scaled by 1/accum), optional gradient
clipping, the schedule's lr. Evaluations run every ``eval_every`` steps (0: every epoch) and at
the end; the best evaluation (task metric, maximised) is saved as ``best.pt`` in our checkpoint
format, and ``last.pt`` holds the full training state so a restarted run resumes where it was.
A non-finite loss raises :class:`NonFiniteLossError` naming the step, the batch and its clips.
Clips that cannot be read are skipped and counted, in training and evaluation batches alike
(:class:`SkipLog`, kept across a resume). Checkpoints are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ssamba.base.errors import SSAMBAError
from ssamba.base.files import atomic_path
from ssamba.data.dataset import SkipLog
from ssamba.model.checkpoints import save_checkpoint


class NonFiniteLossError(SSAMBAError, FloatingPointError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SSAMBAError("device 'cuda' requested but no CUDA device is visible. Fix: --set device=cpu")
    return torch.device(name)


class EpochSampler(Sampler[int]):
    """A permutation of ``range(n)`` seeded by ``(seed, epoch)``, optionally starting part-way (resume).

    With ``world > 1`` (data parallel), worker ``rank`` takes every ``world``-th index of the
    permutation, truncated so that every worker sees the same number of samples.
    """

    def __init__(
        self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1, with_epoch: bool = False
    ):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0
        # yield ``(index, epoch)``: the dataset then draws its augmentation for that epoch even in loader
        # processes that outlive an epoch (persistent workers never see ``dataset.set_epoch``)
        self.with_epoch = with_epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        full = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
            if self.shuffle
            else list(range(self.n))
        )
        if self.world > 1:
            per = self.n // self.world
            full = full[self.rank :: self.world][:per]
        return full

    def __iter__(self):
        order = self.order()[self.start :]
        if self.with_epoch:
            return iter([(i, self.epoch) for i in order])
        return iter(order)

    def __len__(self) -> int:
        return (self.n // self.world if self.world > 1 else self.n) - self.start


@dataclass
class FitResult:
    """What a fit produced: best metric and checkpoint, final evaluation, cost, skipped clips."""

    best_metric: float = float("-inf")
    best_path: Path | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    epochs: int = 0
    samples: int = 0
    seconds: float = 0.0
    skipped: SkipLog = field(default_factory=SkipLog)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class LoopSettings:
    epochs: int
    max_steps: int = 0
    grad_accum: int = 1
    clip_grad: float = 0.0
    amp: bool = True
    eval_every: int = 0
    log_every: int = 20
    fault_nan_at_step: int = 0  # testing hook: > 0 makes that step's loss NaN (never a config value)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def tap_skipped(loader, skipped: SkipLog):
    """Iterate ``loader``, recording the clips its batches skipped (evaluation batches count too)."""
    for batch in loader:
        skipped.add(batch.get("skipped", []))
        yield batch


def fit(
    model: torch.nn.Module,
    task,
    train_loader: DataLoader,
    eval_loader: DataLoader | None,
    settings: LoopSettings,
    *,
    device: torch.device,
    out_dir: str | os.PathLike,
    checkpoint_meta: dict[str, Any] | None = None,
    report: Callable[[dict[str, float], Path | None], None] | None = None,
    log: Callable[[str], None] = print,
    is_main: bool = True,
    on_resume: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``task``; see the module docstring. Resumes from ``out_dir/last.pt`` if present.

    ``report(metrics, checkpoint_dir)`` is called after every evaluation with metrics named
    ``<task.prefix>/<name>`` (and ``.../train_<name>``, ``lr``), and the folder holding ``best.pt``. Between
    evaluations, at the first step of a run and every ``log_every`` steps, a progress point is printed
    (training loss, lr, samples/s, ETA) and, if ``report`` has a ``progress(metrics, step)`` method, passed
    to it: ``.../train_<name>`` (means since the previous point), ``lr`` (the one the last step used),
    ``samples_per_s`` (a measurement: never part of an evaluation, which stays repeatable). An evaluation at
    the step of a point repeats that point's training means.
    ``on_resume(step)`` is called once when the run continues from ``last.pt`` at that step.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main:  # leftovers of a writer killed mid-write (the caller owns out_dir: a trial's, or under the lock)
        for stale in out.glob("*.tmp"):
            stale.unlink(missing_ok=True)
    meta = checkpoint_meta or {}
    model.to(device)
    optimizer = task.optimizer(model)
    schedule = task.schedule(optimizer)
    use_amp = settings.amp and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    sampler = train_loader.sampler if isinstance(train_loader.sampler, EpochSampler) else None
    n_train = len(sampler.order()) if sampler is not None else len(train_loader.dataset)
    per_epoch = max(1, n_train // max(1, train_loader.batch_size or 1))
    steps_per_epoch = max(1, per_epoch // settings.grad_accum)
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps:
        total_steps = min(total_steps, settings.max_steps) if settings.epochs else settings.max_steps
    res = FitResult()
    step, epoch, batch_in_epoch = 0, 0, 0
    last = out / "last.pt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True)
        getattr(model, "module", model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        res.best_metric = state["best_metric"]
        res.best_path = out / "best.pt" if (out / "best.pt").is_file() else None
        res.samples = state["samples"]
        res.skipped = SkipLog(dict(state.get("skipped", {})), int(state.get("skip_events", 0)))
        log(f"[{task.prefix}] resumed from {last} at step {step} (epoch {epoch})")
        if on_resume is not None:
            on_resume(step)

    def evaluate_and_report(final: bool = False) -> None:
        nonlocal res
        model.eval()
        metrics = (
            task.evaluate(model, tap_skipped(eval_loader, res.skipped), device, autocast)
            if eval_loader is not None
            else {}
        )
        model.train()
        named = {f"{task.prefix}/{k}": v for k, v in metrics.items()}
        named[f"{task.prefix}/lr"] = schedule.lr
        named[f"{task.prefix}/step"] = step
        named[f"{task.prefix}/epoch"] = epoch
        named[f"{task.prefix}/skipped_clips"] = len(res.skipped)
        point = last_point[1] if last_point is not None and last_point[0] == step else take_window()
        named.update({k: v for k, v in point.items() if k.startswith(f"{task.prefix}/train_")})
        res.last_eval = named
        value = metrics.get(task.metric, float("nan"))
        schedule.after_eval(value)
        improved = value == value and value > res.best_metric
        if improved or res.best_path is None:
            if value == value:
                res.best_metric = value
            res.best_metrics = dict(named)
            if is_main:
                res.best_path = save_checkpoint(out / "best.pt", model, metrics=named, **meta)
        if is_main:
            with atomic_path(last) as tmp:
                torch.save(
                    {
                        "model": getattr(model, "module", model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "step": step,
                        "epoch": epoch,
                        "batch_in_epoch": batch_in_epoch,
                        "best_metric": res.best_metric,
                        "samples": res.samples,
                        "skipped": dict(res.skipped.skipped),
                        "skip_events": res.skipped.events,
                    },
                    tmp,
                )
        shown = ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in named.items() if isinstance(v, float))
        log(f"[{task.prefix}] step {step}/{total_steps} epoch {epoch}: {shown}" + (" (final)" if final else ""))
        if report is not None:
            report(named, out if res.best_path is not None else None)

    train_window: dict[str, Any] = {}  # sums of the loss parts (0-d tensors, read back when logged)
    train_window_n = 0
    last_point: tuple[int, dict[str, float]] | None = None  # (step, training metrics) of the latest progress point
    progress = getattr(report, "progress", None)

    def take_window() -> dict[str, float]:
        """The training window's means (``<prefix>/train_<part>``) since the previous point; starts a new one."""
        nonlocal train_window, train_window_n
        out = {f"{task.prefix}/train_{k}": float(v) / max(train_window_n, 1) for k, v in train_window.items()}
        train_window, train_window_n = {}, 0
        return out

    def speed() -> tuple[float, float]:
        """(samples/s, seconds left) of this attempt so far."""
        elapsed = max(time.perf_counter() - t0, 1e-9)
        done = max(step - step0, 1)
        return (res.samples - samples0) / elapsed, (total_steps - step) * elapsed / done

    def progress_point() -> None:
        nonlocal last_point
        rate, left = speed()
        point = take_window()
        point[f"{task.prefix}/lr"] = schedule.lr
        point[f"{task.prefix}/samples_per_s"] = rate
        last_point = (step, point)
        loss = point.get(f"{task.prefix}/train_loss", float("nan"))
        log(
            f"[{task.prefix}] step {step}/{total_steps} loss {loss:.4f} lr {schedule.lr:.2e} "
            f"({rate:.1f} samples/s, ETA {duration(left)})"
        )
        if progress is not None:
            progress(point, step)

    pending = None  # (loss, step, epoch, batch in epoch, first clip indices) not yet checked for finiteness

    def check_finite() -> None:
        nonlocal pending
        if pending is None:
            return
        loss_t, at_step, at_epoch, at_batch, idx = pending
        pending = None
        if not bool(torch.isfinite(loss_t)):
            ds = train_loader.dataset
            idx = idx.tolist()
            paths = [ds.paths[i] for i in idx] if hasattr(ds, "paths") else idx
            raise NonFiniteLossError(
                f"[{task.prefix}] non-finite loss {float(loss_t)} at step {at_step} (epoch {at_epoch}, batch "
                f"{at_batch} of the epoch; first clips {paths}). Fix: lower the learning rate, "
                f"enable clipping (clip_grad) or check these clips."
            )

    t0, step0, samples0 = time.perf_counter(), step, res.samples  # this attempt's start (after a resume)
    model.train()
    done = step >= total_steps
    while not done:
        if sampler is not None:
            sampler.set_epoch(epoch, batch_in_epoch * (train_loader.batch_size or 1))
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        micro = 0
        optimizer.zero_grad(set_to_none=True)
        for batch in train_loader:
            batch_in_epoch += 1
            res.skipped.add(batch.get("skipped", []))
            if batch["fbank"].shape[0] == 0:
                continue
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            schedule.apply(step)
            with autocast():
                loss, parts = task.loss(model, batch, step, micro)
            if settings.fault_nan_at_step and step == settings.fault_nan_at_step:
                loss = loss * float("nan")  # fault injection (testing hook)
                parts = {**parts, "loss": loss.detach()}
            # the finite check of this loss waits until its backward is queued (reading it back now would
            # leave the GPU idle while the host launches the backward): it runs before the optimizer step
            # (or the next micro-batch), so a non-finite loss never reaches the weights
            check_finite()
            pending = (loss.detach(), step, epoch, batch_in_epoch - 1, batch["index"][:4])  # read only on failure
            (loss / settings.grad_accum).backward()
            for k, v in parts.items():
                train_window[k] = train_window[k] + v if k in train_window else v
            train_window_n += 1
            res.samples += batch["fbank"].shape[0]
            micro += 1
            if micro < settings.grad_accum:
                continue
            check_finite()  # before the update: a non-finite loss never reaches the weights
            if settings.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            micro = 0
            step += 1
            if settings.log_every and (step % settings.log_every == 0 or step == step0 + 1):
                progress_point()
            if settings.eval_every and step % settings.eval_every == 0 and step < total_steps:
                evaluate_and_report()
            if step >= total_steps:
                done = True
                break
        else:
            epoch += 1
            batch_in_epoch = 0
            schedule.after_epoch(epoch)
            if not settings.eval_every and step < total_steps:
                evaluate_and_report()
        if done:
            break
    res.steps, res.epochs = step, epoch
    res.seconds = time.perf_counter() - t0
    evaluate_and_report(final=True)
    if res.skipped.skipped:
        log(f"[{task.prefix}] {res.skipped.summary()}")
    if not math.isfinite(res.best_metric):
        log(f"[{task.prefix}] warning: no finite evaluation metric {task.metric!r} (empty validation split?)")
    return res
