"""The Ray Train worker of a trial: its stages (shared pretraining, then each fine-tuning task).

This is Ray Train's one touch point in the training code (``ray.train`` context, report, DDP
preparation). Each stage runs the plain jobs of :mod:`ssamba.train.jobs`, which resume from their
``last.pt`` when a worker is restarted. Rank 0 logs metrics to the trial's MLflow run.

A pretraining is shared by every trial whose pretraining config is identical (same key): the
first computes it under a file lock in the sweep's storage and marks it ``DONE`` (written last,
atomically); the others wait on the lock, then reuse it. A killed computation leaves no ``DONE``,
so the next trial to take the lock resumes it from its ``last.pt`` (:func:`shared_pretraining`).

MLflow logging is idempotent per step: a restarted stage re-logs no evaluation and no final metric
that its run already holds, and logs ``<stage>/resumed_from_step`` once per resume. The clips a stage
skipped are listed in the run as ``skipped_clips/<stage>.json``.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch

from ssamba.base import names as N
from ssamba.base.errors import AudioError, ConfigError, ManifestError
from ssamba.base.files import file_lock, write_json_atomic
from ssamba.config import to_flat
from ssamba.model.checkpoints import CheckpointError
from ssamba.sweep.plan import TrialSpec
from ssamba.train.jobs import run_finetune, run_pretrain


class RunLog:
    """The trial's MLflow run as a rank sees it: rank 0 writes through the tracker, other ranks (and a
    trial without a run) do nothing, so the stage code calls it unconditionally."""

    def __init__(self, tracker, run_id: str | None):
        self.tracker, self.run_id = tracker, run_id
        self.on = tracker is not None and bool(run_id)

    def metric_history(self, key: str) -> list:
        return self.tracker.metric_history(self.run_id, key) if self.on else []

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.on:
            self.tracker.log_metrics(self.run_id, metrics, step=step)

    def log_metrics_once(self, metrics: dict, step: int) -> None:
        if self.on:
            self.tracker.log_metrics_once(self.run_id, metrics, step=step)

    def log_dict(self, obj: dict, path: str) -> None:
        if self.on:
            self.tracker.log_dict(self.run_id, obj, path)

    def log_artifact(self, local: Path, folder: str) -> None:
        if self.on:
            self.tracker.log_artifact(self.run_id, local, folder)


def shared_pretraining(
    pdir: Path,
    compute: Callable[[], dict],
    *,
    owner: str,
    is_main: bool = True,
    agree: Callable[[bool], bool] = lambda x: x,
    drop_resume_state: bool = True,
    log=print,
) -> dict:
    """The results of the pretraining stored in ``pdir``, computed at most once per key (no Ray needed).

    Rank 0 (``is_main``) holds an exclusive lock on ``<pdir>.lock`` for the whole block, so two trials
    never compute the same pretraining at once. With ``pdir/DONE`` present, its stored results are
    returned (``reused`` True, unless ``owner``, the trial name, computed it before a restart); else
    ``compute()`` runs (resuming from ``pdir/last.pt``), then ``DONE`` is written last, atomically, and
    ``last.pt`` dropped (``drop_resume_state``). A ``best.pt`` without ``DONE`` is never reused.
    ``agree`` makes every rank take rank 0's decision (a broadcast under DDP).
    """
    with ExitStack() as stack:
        if is_main:
            stack.enter_context(file_lock(pdir.parent / f"{pdir.name}.lock"))
        done = pdir / "DONE"
        if agree(done.is_file()):
            stored = json.loads(done.read_text()) if is_main else {}
            own = stored.get("trial") == owner
            log(f"reusing pretraining {pdir.name}" + (" (computed by this trial before a restart)" if own else ""))
            # its cost was paid by the trial that computed it: not counted again here
            return {**{k: v for k, v in stored.items() if own or not k.startswith(N.COST_PREFIX)}, "reused": not own}
        out = compute()
        if is_main:
            write_json_atomic(done, {**out, "trial": owner})
            if drop_resume_state and (pdir / "last.pt").is_file():
                (pdir / "last.pt").unlink()  # only needed to resume; the pretraining is complete
        return {**out, "reused": False}


# errors of the inputs (config, manifest, audio in strict mode, checkpoint): the trial fails once with the
# message; Ray Train's worker restarts and Tune's trial retries are for worker, node and infrastructure failures
DETERMINISTIC_ERRORS = (ConfigError, ManifestError, AudioError, CheckpointError)

FAULT_ENV = "SSAMBA_TEST_NAN_AT_STEP"  # "ARM:STEP": that arm's pretraining loss is NaN at STEP (tests only)


def injected_nan_step(arm: str, environ=None) -> int:
    """The pretraining step whose loss a test makes NaN for trials of ``arm`` (0: none). A testing hook
    outside the config: ``$SSAMBA_TEST_NAN_AT_STEP=ARM:STEP`` in the environment Ray's workers inherit."""
    import os

    spec = (environ if environ is not None else os.environ).get(FAULT_ENV, "")
    name, _, step = spec.rpartition(":")
    return int(step) if spec and name == arm and step.isdigit() else 0


def stage_cost(seconds: float, world: int, per_worker: float, samples: int) -> dict[str, float]:
    """Wall time, device-hours (workers x device share x hours) and throughput of a stage."""
    return {
        "wall_s": seconds,
        "device_hours": seconds * world * per_worker / 3600.0,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
    }


def quiet_train_reports() -> None:
    """Ray Train 2.60 logs ``Reporting training result N: TrainingReport(...)`` (every metric) at INFO for each
    ``ray.train.report``, through a logger named by its source file rather than under ``ray.train`` (so the
    trainer's ``LoggingConfig`` does not reach it), which the worker's root handler prints: raise that logger
    to WARNING in this worker process."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_actor_exit() -> None:
    """Ray stops a finished trial's processes with SIGTERM, whose handler raises ``SystemExit``; when the
    signal lands in a weakref callback or a destructor, Python prints "Exception ignored in ..." with a
    traceback on the console. In this process, such a ``SystemExit`` (nowhere to go: the process is ending)
    is not printed; every other unraisable exception still is."""
    if getattr(sys.unraisablehook, "_ssamba", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, SystemExit):
            previous(unraisable)

    hook._ssamba = True
    sys.unraisablehook = hook


def console_log(prefix: str) -> Callable[[str], None]:
    """A worker's console lines, each written once. Ray Train 2.60 replaces ``print`` in its workers with one
    that writes the line and also logs it through the root logger, whose console handler writes it again;
    writing to the stream directly keeps one copy."""

    def log(msg: str) -> None:
        sys.stdout.write(f"{prefix}{msg}\n")
        sys.stdout.flush()

    return log


def stage_done(name: str, res: dict[str, Any], cost_prefix: str) -> str:
    """One line when a stage ends: its steps, time and samples/s (or that it was reused)."""
    if res.get("reused"):
        return f"{name} reused (computed by {res.get('trial', 'another trial')})"
    step = next((int(v) for k, v in res.items() if k.endswith("/step") and isinstance(v, (int, float))), 0)
    wall, rate = res.get(f"{cost_prefix}wall_s"), res.get(f"{cost_prefix}samples_per_s")
    if wall is None:
        return f"{name} done: {step} steps"
    return f"{name} done: {step} steps in {wall:.0f} s ({rate or 0:.1f} samples/s)"


class StageReporter:
    """What the training loop reports for one stage (``report`` of :func:`ssamba.train.loop.fit`): each
    evaluation to MLflow and to Ray Train (hence Tune's trial table), each progress point to MLflow only.

    A metric is logged at a step only once, and never at a step the run already holds for it (read once per
    metric and attempt), so a restarted stage does not log its points twice and an evaluation does not repeat
    the progress point of its step. The report to Ray leads with ``stage``, ``step``, ``loss``, ``score``
    (the stage's metric) and ``samples_per_s`` (of the latest progress point): the same columns for every
    stage in Tune's table."""

    def __init__(self, run: RunLog, stage: str, metric: str, ray_report: Callable[[dict], None] | None):
        self.run, self.stage, self.metric, self.ray_report = run, stage, metric, ray_report
        self.last: dict[str, int] = {}  # metric -> last step in the run
        self.samples_per_s: float | None = None  # of the latest progress point

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if not self.run.on:
            return
        fresh = {}
        for k, v in metrics.items():
            if k not in self.last:
                self.last[k] = max((s for s, _ in self.run.metric_history(k)), default=-1)
            if step > self.last[k]:
                fresh[k] = v
                self.last[k] = step
        if fresh:
            self.run.log_metrics(fresh, step=step)

    def progress(self, metrics: dict[str, float], step: int) -> None:
        self.samples_per_s = metrics.get(f"{self.stage}/samples_per_s", self.samples_per_s)
        self._log(metrics, step)

    def __call__(self, metrics: dict[str, float], _ckpt_dir) -> None:
        step = int(metrics.get(f"{self.stage}/step", 0))
        self._log(metrics, step)
        if self.ray_report is not None:
            lead = {
                "stage": self.stage,
                "step": step,
                "loss": metrics.get(f"{self.stage}/loss"),
                "score": metrics.get(f"{self.stage}/{self.metric}"),
                "samples_per_s": self.samples_per_s,
            }
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.ray_report({**{k: v for k, v in lead.items() if v is not None}, **numbers})


def trial_worker(job: dict[str, Any]) -> None:
    """Ray Train entry (``train_loop_per_worker``): ``job`` is ``{"spec": TrialSpec, "run_id": str | None}``
    (:func:`ssamba.sweep.trial.run_trial`)."""
    import ray.train
    import ray.train.torch

    quiet_train_reports()
    quiet_actor_exit()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec: TrialSpec = job["spec"]
    cfg = spec.config
    device = ray.train.torch.get_device() if spec.resources.use_gpu else torch.device("cpu")
    wrap = ray.train.torch.prepare_model if world > 1 else None
    tracker = None
    if rank == 0 and spec.mlflow_uri:
        from ssamba.sweep.tracking import Tracker

        tracker = Tracker(spec.mlflow_uri)
    run = RunLog(tracker, job.get("run_id"))
    log = console_log(f"[{spec.name}] ") if rank == 0 else (lambda msg: None)

    def reporter(stage: str, metric: str):
        return StageReporter(run, stage, metric, ray.train.report)

    def resumed(stage: str):
        def on_resume(step: int) -> None:
            log(f"{stage} resumed from its last checkpoint at step {step}")
            run.log_metrics({f"{stage}/resumed_from_step": step}, step=step)

        return on_resume

    def list_skipped(stage: str, skipped: dict[str, str]) -> None:
        if skipped:
            run.log_dict(
                {"stage": stage, "count": len(skipped), "clips": skipped},
                f"skipped_clips/{stage.replace('/', '_')}.json",
            )

    try:
        results: dict[str, Any] = {}
        # ---- stage 1: pretraining (shared by key); none for the from-scratch arm
        init = None
        if not spec.pretrained:
            log("no pretraining: the from-scratch arm fine-tunes from random weights")
        else:
            pdir = spec.pretrain_dir
            results["pretrain"] = shared_pretraining(
                pdir,
                lambda: _pretrain(
                    cfg,
                    pdir,
                    world,
                    spec.resources.device_share,
                    device,
                    wrap,
                    reporter(N.PRETRAIN, "acc"),
                    resumed("pretrain"),
                    log,
                    rank,
                    injected_nan_step(spec.arm),
                ),
                owner=spec.name,
                is_main=rank == 0,
                agree=_broadcast if world > 1 else (lambda x: x),
                drop_resume_state=spec.keep_checkpoints != "all",
                log=log,
            )
            pre_res = results["pretrain"]
            log(stage_done("pretraining", pre_res, f"{N.COST_PREFIX}pretrain_"))
            if not pre_res.get("reused"):
                run.log_metrics_once(
                    {k: v for k, v in pre_res.items() if k.startswith(N.COST_PREFIX)},
                    step=int(pre_res.get(f"{N.PRETRAIN}/step", 0)),
                )
            list_skipped("pretrain", pre_res.get("skipped_clips") or {})
            if world > 1:
                import torch.distributed as dist

                dist.barrier()  # best.pt (written by rank 0) exists before any rank starts fine-tuning
            init = pdir / "best.pt"
        # ---- stage 2: fine-tuning on each task
        for task in spec.tasks:
            t0 = time.perf_counter()
            res = run_finetune(
                task.config,
                task.dir,
                init=init,
                report=reporter(N.ft(task.name), task.config.finetune.metric),
                log=log,
                rank=rank,
                world=world,
                device=device,
                wrap_model=wrap,
                on_resume=resumed(N.ft(task.name)),
                stats_settled=True,  # by the driver (ssamba.sweep.records), as the trial logged them
            )
            cost = stage_cost(time.perf_counter() - t0, world, spec.resources.device_share, res.samples)
            final = dict(res.last_eval)
            final.update({f"{N.COST_PREFIX}ft_{task.name}_{k}": v for k, v in cost.items()})
            results[N.ft(task.name)] = final
            log(stage_done(f"fine-tuning {task.name}", final, f"{N.COST_PREFIX}ft_{task.name}_"))
            # what the per-evaluation reports did not already log
            run.log_metrics_once(
                {
                    k: v
                    for k, v in final.items()
                    if "/best_" in k or "/test_" in k or N.is_final(k) or k.startswith(N.COST_PREFIX)
                },
                step=res.steps,
            )
            list_skipped(N.ft(task.name), dict(res.skipped.skipped))
            if res.best_path is not None and spec.log_checkpoints:
                run.log_artifact(res.best_path, f"checkpoints/ft_{task.name}")
        if rank == 0:
            write_json_atomic(spec.result_file, results)
    except DETERMINISTIC_ERRORS as exc:  # a retry cannot fix it: recorded once, no Ray Train or Tune retry
        log(f"{type(exc).__name__}: {exc} (not retried: the same config and data would fail again)")
        if rank == 0:
            write_json_atomic(spec.result_file, {"error": {"type": type(exc).__name__, "message": str(exc)}})


def _pretrain(
    cfg, pdir: Path, world: int, device_share: float, device, wrap, report, on_resume, log, rank: int, nan_step: int = 0
) -> dict:
    t0 = time.perf_counter()
    res = run_pretrain(
        cfg,
        pdir,
        report=report,
        log=log,
        rank=rank,
        world=world,
        device=device,
        wrap_model=wrap,
        on_resume=on_resume,
        fault_nan_at_step=nan_step,
        stats_settled=True,  # by the driver (ssamba.sweep.records), as the trial logged them
    )
    cost = stage_cost(time.perf_counter() - t0, world, device_share, res.samples)
    out = dict(res.last_eval)
    out.update({f"{N.COST_PREFIX}pretrain_{k}": v for k, v in cost.items()})
    out.update({"config": to_flat(cfg), "skipped_clips": dict(res.skipped.skipped)})
    return out


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
