"""One Ray Tune trial: an ablation arm with one seed, run by a Ray Train ``TorchTrainer``, tracked in MLflow.

The trial reads its spec from the sweep's plan (:meth:`ssamba.sweep.plan.SweepPlan.trial`: the cell's
resolved config plus the values Optuna chose), gets or continues its MLflow child run (keyed by ``trial.key``, so a retried or resumed trial never
duplicates its run), launches the workers (:func:`ssamba.sweep.worker.trial_worker`), then logs the
final metrics and reports them to Tune. Ray Tune and Ray Train meet only here and in ``driver.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ssamba.base import names as N
from ssamba.sweep.plan import SweepPlan, TrialSpec

TRIAL_ERROR_KEY = "trial_error"  # in a trial's last Tune result: it failed on its inputs (not retried)


def run_trial(params: dict[str, Any], plan: SweepPlan) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters(run_trial, plan=...)``)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ssamba.sweep.tracking import Tracker
    from ssamba.sweep.worker import quiet_actor_exit, trial_worker

    quiet_actor_exit()
    spec = plan.trial(params)
    tracker = Tracker(plan.mlflow_uri)
    tags = {
        N.MLFLOW_PARENT: plan.parent_run_id,
        N.ROLE: N.TRIAL,
        N.FACTOR: plan.factor.name,
        N.ARM: spec.arm,
        N.SEED: str(spec.seed),
        N.GIT_COMMIT: plan.git_commit,
        N.TRIAL_STATUS: "running",
        N.PRETRAIN_KEY: spec.pretrain_key,
    }
    done_before = _finished_before(tracker, plan, spec)
    if done_before is not None:  # a resumed sweep: this trial completed before the driver died
        run_id, final = done_before
        tune.report(final_report(plan, spec, final, run_id))
        return
    run_id, created = tracker.get_or_create_run(
        plan.experiment_id,
        key_tags={N.SWEEP_ID: plan.sweep_id, N.TRIAL_KEY: spec.key},
        name=spec.name,
        tags=tags,
        params=spec.params(),
    )
    if created:
        tracker.log_dict(run_id, spec.record(), "config.json")
    t0 = time.time()
    try:
        res = spec.resources
        trainer = TorchTrainer(
            trial_worker,
            train_loop_config={"spec": spec, "run_id": run_id},
            scaling_config=ray.train.ScalingConfig(
                num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=res.per_worker()
            ),
            run_config=ray.train.RunConfig(
                name=f"{spec.key}-{time.time_ns()}",
                storage_path=str(plan.sweep_dir / "ray_train"),
                failure_config=ray.train.FailureConfig(max_failures=plan.worker_retries),
                # Train's own INFO lines (worker-group set-up, a `Reporting training result ...` dump per report)
                # stay in its log files under the Ray session; warnings and errors still reach the console
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                # Optuna reads the metric from every intermediate result: with a search, report only the final one
                callbacks=[] if plan.searching else [TuneReportCallback()],
            ),
        )
        trainer.fit()
        results = json.loads(spec.result_file.read_text())
        if "error" in results:  # an error of the inputs, recorded by the worker: fail once, no retry
            text = f"{results['error']['type']}: {results['error']['message']}"
            tracker.set_tags(run_id, {N.TRIAL_STATUS: "failed", N.TRIAL_ERROR: text[:4000]})
            tracker.finish(run_id, "FAILED")
            tune.report({TRIAL_ERROR_KEY: text, "arm": spec.arm, "seed": spec.seed})
            return
        final = _final_metrics(results, time.time() - t0)
        pre = results.get("pretrain", {})
        if not spec.pretrained:
            pass  # the from-scratch arm: no pretraining to tag or keep
        elif pre.get("reused"):
            tracker.set_tags(run_id, {N.PRETRAIN_REUSED: "true", N.PRETRAIN_COMPUTED_BY: pre.get("trial", "")})
        else:
            tracker.set_tags(run_id, {N.PRETRAIN_REUSED: "false"})
            best = spec.pretrain_dir / "best.pt"
            if best.is_file() and spec.log_checkpoints:
                tracker.log_artifact(run_id, best, "checkpoints/pretrain")
        # the workers logged every stage's metrics; add the totals (and a reused pretraining's results)
        extra = {k: v for k, v in final.items() if k in (N.COST_WALL, N.COST_DEVICE_HOURS, N.COST_SAMPLES)}
        if pre.get("reused"):
            extra.update(
                {k: v for k, v in pre.items() if k.startswith(f"{N.PRETRAIN}/") and isinstance(v, (int, float))}
            )
        tracker.log_metrics_once(run_id, extra, step=0)
        tracker.set_tags(run_id, {N.TRIAL_STATUS: "finished"})
        tracker.finish(run_id, "FINISHED")
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised for Tune
        tracker.set_tags(run_id, {N.TRIAL_STATUS: "failed", N.TRIAL_ERROR: _error_text(exc)[:4000]})
        tracker.finish(run_id, "FAILED")
        raise
    _apply_retention(spec)
    tune.report(final_report(plan, spec, final, run_id))


def final_report(plan: SweepPlan, spec: TrialSpec, final: dict[str, float], run_id: str) -> dict[str, Any]:
    """A finished trial's last result for Tune: the columns of every report first (``stage`` done, the last
    stage's ``step`` and ``loss``, ``score``: the validation score selection uses, ``samples_per_s``), then
    every final metric, arm, seed and run."""
    last = N.ft(spec.tasks[-1].name) if spec.tasks else N.PRETRAIN
    lead = {
        "stage": "done",
        "step": final.get(f"{last}/step"),
        "loss": final.get(f"{last}/loss"),
        "score": final.get(plan.metric),
        "samples_per_s": final.get(N.COST_SAMPLES),
    }
    return {
        **{k: v for k, v in lead.items() if v is not None},
        **final,
        "arm": spec.arm,
        "seed": spec.seed,
        "mlflow_run_id": run_id,
    }


def _error_text(exc: BaseException) -> str:
    """The error to show first: the failing Ray Train worker's own exception (e.g. ``NonFiniteLossError: ...
    at step 2 (epoch 0, batch 2 ...``), not Train's ``WorkerGroupError`` wrapper around it."""
    failures = getattr(exc, "worker_failures", None) or {}
    root = failures[min(failures)] if failures else getattr(exc, "controller_failure", None) or exc
    text = f"{type(root).__name__}: {root}"
    return text if root is exc else f"{text}\n(reported by Ray Train as {type(exc).__name__})"


def _finished_before(tracker, plan: SweepPlan, spec: TrialSpec) -> tuple[str, dict] | None:
    """``(run_id, final metrics)`` when this trial already finished (its run says so and its result exists)."""
    if not spec.result_file.is_file():
        return None
    run_id = tracker.find_run(plan.experiment_id, {N.SWEEP_ID: plan.sweep_id, N.TRIAL_KEY: spec.key})
    if run_id is None:
        return None
    run = tracker.client.get_run(run_id)
    if run.info.status != "FINISHED" or run.data.tags.get(N.TRIAL_STATUS) != "finished":
        return None
    return run_id, {k: v for k, v in run.data.metrics.items()}


def _final_metrics(results: dict[str, Any], wall_s: float) -> dict[str, float]:
    """Flatten the stage results (pretraining metrics, each task's, costs) and add totals."""
    out: dict[str, float] = {}
    for stage, metrics in results.items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    out[N.COST_WALL] = wall_s
    out[N.COST_DEVICE_HOURS] = sum(v for k, v in out.items() if k.endswith("_device_hours"))
    samples = [v for k, v in out.items() if k.endswith("_samples_per_s")]
    out[N.COST_SAMPLES] = sum(samples) / len(samples) if samples else 0.0
    return out


def _apply_retention(spec: TrialSpec) -> None:
    """``all``: keep every file; ``best``: drop the resume state (``last.pt``); ``none``: drop both
    (the best checkpoints are still in MLflow when ``log_checkpoints`` is on). A shared pretraining
    drops its ``last.pt`` when done (unless ``all``); with ``none`` it goes at the end of the sweep
    (:func:`drop_pretrainings`), since later trials of the sweep may reuse it."""
    names = {"all": (), "best": ("last.pt",), "none": ("last.pt", "best.pt")}[spec.keep_checkpoints]
    for t in spec.tasks:
        for name in names:
            p = t.dir / name
            if p.is_file():
                p.unlink()


def drop_pretrainings(sweep_dir: str | Path) -> int:
    """Retention ``none``, once every trial of a sweep finished: delete each shared pretraining's files
    (``DONE`` too, so that a later trial recomputes it rather than reusing a missing checkpoint); its
    best checkpoint stays in MLflow when ``log_checkpoints`` is on. Returns the number of bytes freed."""
    freed = 0
    for pdir in sorted(Path(sweep_dir).glob("pretrain/*/")):
        for name in ("DONE", "best.pt", "last.pt"):  # DONE first: never a DONE without its checkpoint
            p = pdir / name
            if p.is_file():
                freed += p.stat().st_size
                p.unlink()
    return freed
