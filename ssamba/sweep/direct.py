"""A direct run (``python -m ssamba.pretrain`` / ``ssamba.finetune``, no Ray), recorded in MLflow on request.

:func:`run_direct` runs one job of :mod:`ssamba.train.jobs`. With an MLflow URI it records the job as one
run in the layout of a sweep's trial runs (docs/architecture.md section 5.5), written through the same
:class:`~ssamba.sweep.tracking.Tracker` and named by :mod:`ssamba.base.names`: params are the dotted
config keys the stage ran with (statistics resolved) plus ``files.<stage>.*`` for its manifest (and
``files.init.*`` for a fine-tuning's initial weights); metrics ``pretrain/...`` or ``ft/<task>/...`` at
their steps, ``ft/<task>/final``, ``<stage>/resumed_from_step`` and ``cost/...``; tags ``sweep.role=direct``,
``direct.out``, ``seed``, ``git.commit``, ``trial.status`` (and ``trial.error``); artifacts ``config.json``
and ``skipped_clips/<stage>.json``. A rerun into the same output folder resumes from its ``last.pt`` and
continues the same run, logging no evaluation twice. Without a URI nothing touches MLflow.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ssamba.base import names as N
from ssamba.config import ExperimentConfig, to_flat
from ssamba.train.loop import FitResult

JOBS = ("pretrain", "finetune")


class DirectRecord:
    """The MLflow run of one direct job: created (or continued) by :meth:`open`, fed by the job's callbacks."""

    def __init__(self, tracker, experiment_id: str, run_id: str, prefix: str):
        self.tracker, self.experiment_id, self.run_id, self.prefix = tracker, experiment_id, run_id, prefix
        self.logged_step: int | None = None  # last step whose evaluation the run holds (read once)

    @classmethod
    def open(cls, uri: str, experiment: str, *, cfg: ExperimentConfig, out_dir: Path, prefix: str) -> DirectRecord:
        from ssamba.sweep.provenance import git_commit
        from ssamba.sweep.tracking import Tracker

        tracker = Tracker(uri)
        exp_id = tracker.experiment(experiment)
        run_id, _ = tracker.get_or_create_run(
            exp_id,
            key_tags={N.ROLE: N.DIRECT, N.DIRECT_OUT: str(out_dir.resolve())},
            name=out_dir.name,
            tags={N.SEED: str(cfg.seed), N.GIT_COMMIT: git_commit(), N.TRIAL_STATUS: "running"},
        )
        return cls(tracker, exp_id, run_id, prefix)

    # ------------------------------------------------------------------ the job's callbacks
    def started(self, config: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
        """Params (once per run: a continued run keeps its own) and ``config.json``."""
        if self.tracker.client.get_run(self.run_id).data.params:
            return
        params = dict(config)
        for stage, facts in files.items():
            params.update({f"{N.FILES_PARAM_PREFIX}{stage}.{k}": v for k, v in facts.items()})
        self.tracker.log_params(self.run_id, params)
        self.tracker.log_dict(self.run_id, {"config": config, "files": files}, "config.json")

    def report(self, metrics: dict[str, float], _checkpoint_dir=None) -> None:
        """An evaluation's metrics at its step (skipped when a continued run already holds that step)."""
        key = f"{self.prefix}/step"
        step = int(metrics.get(key, 0))
        if self.logged_step is None:
            self.logged_step = max((s for s, _ in self.tracker.metric_history(self.run_id, key)), default=-1)
        if step > self.logged_step:
            self.tracker.log_metrics(self.run_id, metrics, step=step)
            self.logged_step = step

    def resumed(self, step: int) -> None:
        self.tracker.log_metrics(self.run_id, {f"{self.prefix}/resumed_from_step": step}, step=step)

    # ------------------------------------------------------------------ the end
    def finished(self, res: FitResult, wall_s: float, device_share: float) -> None:
        from ssamba.sweep.worker import stage_cost

        stage = "pretrain" if self.prefix == N.PRETRAIN else f"ft_{self.prefix.split('/', 1)[1]}"
        cost = stage_cost(wall_s, 1, device_share, res.samples)
        final = {
            k: v
            for k, v in res.last_eval.items()
            if "/best_" in k or "/test_" in k or N.is_final(k) or k.startswith(N.PRETRAIN)
        }
        final.update({f"{N.COST_PREFIX}{stage}_{k}": v for k, v in cost.items()})
        self.tracker.log_metrics_once(self.run_id, final, step=res.steps)
        totals = {N.COST_WALL: wall_s, N.COST_DEVICE_HOURS: cost["device_hours"], N.COST_SAMPLES: cost["samples_per_s"]}
        self.tracker.log_metrics_once(self.run_id, totals, step=0)
        if res.skipped.skipped:
            record = {"stage": self.prefix, "count": len(res.skipped), "clips": dict(res.skipped.skipped)}
            self.tracker.log_dict(self.run_id, record, f"skipped_clips/{self.prefix.replace('/', '_')}.json")
        self.tracker.set_tags(self.run_id, {N.TRIAL_STATUS: "finished"})
        self.tracker.finish(self.run_id, "FINISHED")

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt):
            self.tracker.set_tags(self.run_id, {N.TRIAL_STATUS: "interrupted"})
            self.tracker.finish(self.run_id, "KILLED")
            return
        text = f"{type(exc).__name__}: {exc}"
        self.tracker.set_tags(self.run_id, {N.TRIAL_STATUS: "failed", N.TRIAL_ERROR: text[:4000]})
        self.tracker.finish(self.run_id, "FAILED")

    def where(self) -> str:
        """Where to look at the run (one line)."""
        from ssamba.sweep.tracking import redact_uri

        uri = self.tracker.uri
        if uri.startswith(("http://", "https://")):
            view = f"open {redact_uri(uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        else:
            view = f"python -m ssamba.sweep.tracking ui --backend-store-uri {redact_uri(uri)}"
        return f"MLflow run {self.run_id} (experiment {self.experiment_id}) in {redact_uri(uri)}; to look: {view}"


def stage_files(job: str, cfg: ExperimentConfig, init: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """``files.<stage>.*`` of a direct run: the stage's manifest (the demo corpus when none is set) and, for a
    fine-tuning from a checkpoint, ``init``."""
    from ssamba.sweep.records import file_facts

    manifest = cfg.data.manifest if job == "pretrain" else cfg.finetune.manifest
    if not manifest:
        from ssamba.data.demo import make_demo_corpus

        manifest = make_demo_corpus(progress=False)  # built by the job already: found again here
    stage = "pretrain" if job == "pretrain" else f"ft.{cfg.finetune.task}"
    files = {stage: file_facts(manifest)}
    if init:
        files["init"] = file_facts(init)
    return files


def run_direct(
    job: str,
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    init: str | os.PathLike | None = None,
    mlflow_uri: str | None = None,
    experiment: str = N.DIRECT_EXPERIMENT,
    threads: int = 1,
    log=print,
) -> FitResult:
    """Run ``job`` (``pretrain`` or ``finetune``) on ``cfg`` into ``out_dir``; with ``mlflow_uri``, record it
    (see the module docstring). ``threads``: the torch threads it runs with (its CPU device-hours)."""
    from ssamba.train.jobs import run_finetune, run_pretrain
    from ssamba.train.loop import pick_device

    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    out = Path(out_dir)
    device = pick_device(cfg.device)
    prefix = N.PRETRAIN if job == "pretrain" else N.ft(cfg.finetune.task)
    rec = DirectRecord.open(mlflow_uri, experiment, cfg=cfg, out_dir=out, prefix=prefix) if mlflow_uri else None
    hooks: dict[str, Any] = {}
    if rec is not None:
        hooks = {
            "report": rec.report,
            "on_resume": rec.resumed,
            "on_start": lambda config: rec.started(config, stage_files(job, cfg, init)),
        }
        log(f"recording in {rec.where()}")
    t0 = time.perf_counter()
    try:
        if job == "pretrain":
            res = run_pretrain(cfg, out, log=log, device=device, **hooks)
        else:
            res = run_finetune(cfg, out, init=init, log=log, device=device, **hooks)
    except BaseException as exc:
        if rec is not None:
            if not rec.tracker.client.get_run(rec.run_id).data.params:
                rec.tracker.log_params(rec.run_id, to_flat(cfg))  # failed before it started: the config as given
            rec.failed(exc)
        raise
    if rec is not None:
        rec.finished(res, time.perf_counter() - t0, 1.0 if device.type == "cuda" else float(threads))
        log(f"recorded in {rec.where()}")
    return res
