"""One Ray Tune trial: an ablation arm with one seed, run by a Ray Train ``TorchTrainer``, tracked in MLflow.

The trial resolves its config (preset + sweep overrides + arm + seed + tuned values), gets or
continues its MLflow child run (keyed by ``trial.key``, so a retried or resumed trial never
duplicates its run), launches the workers (:func:`ssamba.sweep.worker.trial_worker`), then logs the
final metrics and reports them to Tune. Ray Tune and Ray Train meet only here and in ``sweep.py``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ssamba.base import names as N
from ssamba.config import apply_overrides, to_flat
from ssamba.config.presets import preset

# Config sections that decide a pretraining (a shared pretraining is reused when these are equal).
PRETRAIN_SECTIONS = ("frontend.", "augment.", "model.", "data.", "pretrain.")
PRETRAIN_RUNTIME_KEYS = ("data.num_workers", "model.scan_backend", "model.fused_add_norm")  # do not change the result


def digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def pretrain_key(flat: dict[str, Any]) -> str:
    """Hash of everything that decides a pretraining: its config sections and the seed."""
    items = {k: v for k, v in flat.items()
             if k.startswith(PRETRAIN_SECTIONS) and k not in PRETRAIN_RUNTIME_KEYS}
    items["seed"] = flat["seed"]
    return digest(items, 16)


def trial_overrides(ctx: dict[str, Any], params: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    """``(arm label, seed, overrides)`` of a trial from its Tune params."""
    cell = ctx["cells"][int(params["cell"])]
    arm, seed = cell["arm"], int(cell["seed"])
    tuned = {k: v for k, v in params.items() if k != "cell"}
    overrides = {**ctx["overrides"], **ctx["arms"][arm], "seed": seed, **tuned}
    return arm, seed, overrides


def build_job(ctx: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Everything a trial needs, as plain data (also used by the driver to validate before Ray starts)."""
    arm, seed, overrides = trial_overrides(ctx, params)
    cfg = apply_overrides(preset(ctx["preset"]), overrides)
    cfg.check_pretraining()  # every trial pretrains (or reuses a pretraining of this config)
    use_gpu = ctx["gpus_per_trial"] > 0
    # settings that depend on the device, resolved here so that the logged params are the values used
    cfg = replace(cfg, data=replace(cfg.data, num_workers=cfg.data.resolved_num_workers("cuda" if use_gpu else "cpu")))
    flat = to_flat(cfg)
    tuned = {k: v for k, v in params.items() if k != "cell"}
    key = digest({"sweep": ctx["sweep_id"], "arm": arm, "seed": seed, "tuned": tuned})
    root = Path(ctx["storage"])
    trial_dir = root / "trials" / key
    tasks = []
    for name, task_over in ctx["tasks"].items():
        tcfg = apply_overrides(cfg, task_over)
        tasks.append({"name": name, "config": to_flat(tcfg), "dir": str(trial_dir / f"ft-{name}")})
    pkey = pretrain_key(flat)
    share = ctx["gpus_per_trial"] / ctx["workers_per_trial"] if use_gpu else ctx["cpus_per_worker"]
    return {
        "arm": arm, "seed": seed, "tuned": tuned, "trial_key": key, "trial_name": f"{arm}-s{seed}-{key[:6]}",
        "config": flat, "tasks": tasks, "pretrain": {"key": pkey, "dir": str(root / "pretrain" / pkey)},
        "result_file": str(trial_dir / "result.json"), "use_gpu": use_gpu, "device_share": share,
        "mlflow_uri": ctx["mlflow_uri"], "log_checkpoints": ctx.get("log_checkpoints", True),
        "keep_checkpoints": ctx.get("keep_checkpoints", "best"),
    }


def task_params(job: dict[str, Any]) -> dict[str, Any]:
    """MLflow params: the trial's config, plus each task's fine-tuning values that differ from it."""
    params = dict(job["config"])
    for t in job["tasks"]:
        for k, v in t["config"].items():
            if k.startswith("finetune.") and params.get(k) != v:
                params[f"tasks.{t['name']}.{k[len('finetune.'):]}"] = v
    return params


def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters(run_trial, ctx=...)``)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ssamba.sweep.tracking import Tracker
    from ssamba.sweep.worker import trial_worker

    job = build_job(ctx, params)
    tracker = Tracker(ctx["mlflow_uri"])
    tags = {N.MLFLOW_PARENT: ctx["parent_run_id"], N.ROLE: N.TRIAL, N.FACTOR: ctx["factor"],
            N.ARM: job["arm"], N.SEED: str(job["seed"]), N.GIT_COMMIT: ctx["git_commit"],
            N.TRIAL_STATUS: "running", N.PRETRAIN_KEY: job["pretrain"]["key"]}
    done_before = _finished_before(tracker, ctx, job)
    if done_before is not None:  # a resumed sweep: this trial completed before the driver died
        run_id, final = done_before
        tune.report({**final, "arm": job["arm"], "seed": job["seed"], "mlflow_run_id": run_id})
        return
    run_id, created = tracker.get_or_create_run(
        ctx["experiment_id"], key_tags={N.SWEEP_ID: ctx["sweep_id"], N.TRIAL_KEY: job["trial_key"]},
        name=job["trial_name"], tags=tags, params=task_params(job))
    if created:
        tracker.log_dict(run_id, {"config": job["config"], "tasks": {t["name"]: t["config"] for t in job["tasks"]},
                                  "tuned": job["tuned"]}, "config.json")
    job["run_id"] = run_id
    t0 = time.time()
    try:
        workers = ctx["workers_per_trial"]
        per_worker = {"CPU": ctx["cpus_per_worker"]}
        if job["use_gpu"]:
            per_worker["GPU"] = ctx["gpus_per_trial"] / workers
        trainer = TorchTrainer(
            trial_worker, train_loop_config=job,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=job["use_gpu"],
                                                   resources_per_worker=per_worker),
            run_config=ray.train.RunConfig(
                name=f"{job['trial_key']}-{time.time_ns()}", storage_path=str(Path(ctx["storage"]) / "ray_train"),
                failure_config=ray.train.FailureConfig(max_failures=ctx["worker_retries"]),
                # Optuna reads the metric from every intermediate result: with a search, report only the final one
                callbacks=[] if ctx.get("searching") else [TuneReportCallback()]),
        )
        trainer.fit()
        results = json.loads(Path(job["result_file"]).read_text())
        final = _final_metrics(results, time.time() - t0)
        pre = results.get("pretrain", {})
        if pre.get("reused"):
            tracker.set_tags(run_id, {N.PRETRAIN_REUSED: "true", N.PRETRAIN_COMPUTED_BY: pre.get("trial", "")})
        else:
            tracker.set_tags(run_id, {N.PRETRAIN_REUSED: "false"})
            best = Path(job["pretrain"]["dir"]) / "best.pt"
            if best.is_file() and job["log_checkpoints"]:
                tracker.log_artifact(run_id, best, "checkpoints/pretrain")
        # the workers logged every stage's metrics; add the totals (and a reused pretraining's results)
        extra = {k: v for k, v in final.items() if k in (N.COST_WALL, N.COST_DEVICE_HOURS, N.COST_SAMPLES)}
        if pre.get("reused"):
            extra.update({k: v for k, v in pre.items()
                          if k.startswith(f"{N.PRETRAIN}/") and isinstance(v, (int, float))})
        tracker.log_metrics_once(run_id, extra, step=0)
        tracker.set_tags(run_id, {N.TRIAL_STATUS: "finished"})
        tracker.finish(run_id, "FINISHED")
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised for Tune
        tracker.set_tags(run_id, {N.TRIAL_STATUS: "failed", N.TRIAL_ERROR: _error_text(exc)[:4000]})
        tracker.finish(run_id, "FAILED")
        raise
    _apply_retention(job)
    tune.report({**final, "arm": job["arm"], "seed": job["seed"], "mlflow_run_id": run_id})


def _error_text(exc: BaseException) -> str:
    """The error to show first: the failing Ray Train worker's own exception (e.g. ``NonFiniteLossError: ...
    at step 2 (epoch 0, batch 2 ...``), not Train's ``WorkerGroupError`` wrapper around it."""
    failures = getattr(exc, "worker_failures", None) or {}
    root = failures[min(failures)] if failures else getattr(exc, "controller_failure", None) or exc
    text = f"{type(root).__name__}: {root}"
    return text if root is exc else f"{text}\n(reported by Ray Train as {type(exc).__name__})"


def _finished_before(tracker, ctx: dict[str, Any], job: dict[str, Any]) -> tuple[str, dict] | None:
    """``(run_id, final metrics)`` when this trial already finished (its run says so and its result exists)."""
    result = Path(job["result_file"])
    if not result.is_file():
        return None
    run_id = tracker.find_run(ctx["experiment_id"], {N.SWEEP_ID: ctx["sweep_id"], N.TRIAL_KEY: job["trial_key"]})
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


def _apply_retention(job: dict[str, Any]) -> None:
    """``all``: keep every file; ``best``: drop the resume state (``last.pt``); ``none``: drop both
    (the best checkpoints are still in MLflow when ``log_checkpoints`` is on). A shared pretraining
    drops its ``last.pt`` when done (unless ``all``); with ``none`` it goes at the end of the sweep
    (:func:`drop_pretrainings`), since later trials of the sweep may reuse it."""
    keep = job.get("keep_checkpoints", "best")
    names = {"all": (), "best": ("last.pt",), "none": ("last.pt", "best.pt")}[keep]
    for t in job["tasks"]:
        for name in names:
            p = Path(t["dir"]) / name
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
