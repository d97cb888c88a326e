"""The sweep's parent run in MLflow: opened (or found again by ``--resume``) with the plan's params and tags,
described in the UI, summarised per arm while trials finish, and closed as finished, failed or interrupted.
The trials' own runs are opened by ``trial.py``; every name comes from :mod:`ssamba.base.names`."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import replace
from typing import Any

from ssamba.base import names as N
from ssamba.base.files import write_json_atomic
from ssamba.sweep.plan import SweepPlan


def open_records(plan: SweepPlan, tracker, ray_mode: str, resume: bool) -> SweepPlan:
    """The MLflow experiment and the sweep's parent run (created, or found again on resume), and
    ``sweep.json`` in the sweep's folder; returns the plan with their ids."""
    factor, res = plan.factor, plan.resources
    exp_id = tracker.experiment(
        plan.experiment,
        {
            N.EXPERIMENT_MARK: "1",
            N.FACTOR: factor.name,
            N.EXPERIMENT_KIND: N.EXPERIMENT_KIND_ML,  # the UI's "Machine learning" kind: runs, not GenAI traces
            N.NOTE: experiment_note(plan),
        },
    )
    parent_tags = {
        N.ROLE: N.PARENT,
        N.FACTOR: factor.name,
        N.SWEEP_ARMS: json.dumps(list(plan.arms)),
        N.SWEEP_REFERENCE: factor.reference,
        N.SWEEP_TASKS: json.dumps(list(plan.tasks)),
        N.SWEEP_PRESET: plan.preset,
        **({N.SWEEP_SCRATCH: N.SCRATCH_ARM} if plan.scratch else {}),
        N.GIT_COMMIT: plan.git_commit,
        N.SWEEP_RAY: ray_mode,
    }
    parent_params = {
        "preset": plan.preset,
        "seeds": json.dumps(list(plan.seeds)),
        "tasks": json.dumps(list(plan.tasks)),
        "workers_per_trial": res.workers,
        "gpus_per_trial": res.gpus,
        "cpus_per_worker": res.cpus_per_worker,
        "max_concurrent": res.concurrent,
        "tune": json.dumps({k: list(v) for k, v in plan.tune.items()}),
        "tune_samples": plan.tune_samples if plan.searching else 0,
        **{f"set.{k}": v for k, v in plan.overrides.items()},
    }
    parent_id, created = tracker.get_or_create_run(
        exp_id,
        key_tags={N.SWEEP_ID: plan.sweep_id, N.ROLE: N.PARENT},
        name=plan.sweep_id,
        tags=parent_tags,
        params=parent_params,
    )
    if created:
        tracker.set_tags(parent_id, {N.NOTE: sweep_note(plan)})
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json_atomic(
            plan.sweep_dir / "sweep.json",
            {
                "sweep_id": plan.sweep_id,
                "factor": factor.name,
                "preset": plan.preset,
                "experiment": plan.experiment,
                "parent_run_id": parent_id,
            },
        )
    return replace(plan, experiment_id=exp_id, parent_run_id=parent_id)


def _selection_metrics(plan: SweepPlan) -> dict[str, str]:
    """Each task's validation score (what selection uses): task -> ``ft/<task>/best_<metric>``."""
    cell = plan.cells[0] if plan.cells else None
    return {t.name: f"{N.ft(t.name)}/best_{t.config.finetune.metric}" for t in (cell.tasks if cell else ())}


def experiment_note(plan: SweepPlan) -> str:
    """The experiment's description (MLflow's ``mlflow.note.content``, shown above its runs)."""
    f = plan.factor
    return (
        f"**Ablation of {f.description or f.name}** (factor `{f.name}`): arms {', '.join(f.arms)}, "
        f"reference `{f.reference}`.\n\n"
        f"Each **parent run** is one sweep (`python -m ablations.run {f.name} ...` or `sweeps/{f.name}.py`); "
        f"its **child runs** are the trials, one arm x seed each: a masked-patch pretraining, then a "
        f"fine-tuning on each task (`pretrain/...`, `ft/<task>/...`; `ft/<task>/final` is the test score). "
        f"A parent run carries each arm's summary as `arm/<arm>/...` metrics (means over seeds, `n` seeds) "
        f"and a table in its description.\n\n"
        f"Tables with differences and intervals: `python -m ablations.summarize --experiment {plan.experiment}`."
    )


def sweep_note(plan: SweepPlan, table: str = "") -> str:
    """The parent run's description: what the sweep runs and how it selects, then (once it ends) its arms."""
    sel = _selection_metrics(plan)
    res = plan.resources
    tune = f"; Optuna tunes {', '.join(plan.tune)} ({plan.tune_samples} samples per arm x seed)" if plan.tune else ""
    text = (
        f"**Sweep `{plan.sweep_id}`**: {plan.factor.name}, arms {', '.join(plan.arms)} (reference "
        f"`{plan.factor.reference}`) x seeds {', '.join(map(str, plan.seeds))} = {plan.n_trials} trials on preset "
        f"`{plan.preset}`, tasks {', '.join(plan.tasks)}{tune}.\n\n"
        f"Selection uses the validation score ({', '.join(f'`{m}`' for m in sel.values())}), never the test "
        f"score (`ft/<task>/final`). Resources: {res.workers} worker(s) per trial, "
        f"{res.cpus_per_worker} CPU{f' + {res.gpus} GPU' if res.use_gpu else ''} each, {res.concurrent} trials "
        f"at once. Storage: `{plan.sweep_dir}`. Commit: `{plan.git_commit}`."
    )
    cmd = shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else ""
    if cmd:
        text += f"\n\nCommand: `{cmd}`"
    return text + (f"\n\n{table}" if table else "")


def arm_summary(trials: list[tuple[str, str, dict[str, float]]], plan: SweepPlan) -> dict[str, dict[str, float]]:
    """Each arm's mean over its seeds of every task's validation score (``ft/<task>/best_<metric>``) and test
    score (``ft/<task>/final``), and ``n`` (seeds). ``trials`` are the finished trials as ``(arm, seed,
    metrics)``; with Optuna samples, a seed counts the sample with the best validation score (``plan.metric``).
    Arms in the plan's order; an arm without a finished trial is left out."""
    chosen: dict[tuple[str, str], dict[str, float]] = {}
    for arm, seed, metrics in trials:
        best = chosen.get((arm, seed))
        score = metrics.get(plan.metric, float("-inf"))
        if best is None or score > best.get(plan.metric, float("-inf")):
            chosen[(arm, seed)] = metrics
    keys = [k for task, m in _selection_metrics(plan).items() for k in (m, N.ft_final(task))]
    out: dict[str, dict[str, float]] = {}
    for arm in plan.arms:
        runs = [m for (a, _), m in chosen.items() if a == arm]
        if not runs:
            continue
        summary: dict[str, float] = {"n": float(len(runs))}
        for k in keys:
            values = [m[k] for m in runs if k in m and m[k] == m[k]]
            if values:
                summary[k] = sum(values) / len(values)
        out[arm] = summary
    return out


def arm_table(summary: dict[str, dict[str, float]], plan: SweepPlan) -> str:
    """A Markdown table of :func:`arm_summary` for the parent run's description."""
    sel = _selection_metrics(plan)
    cols = [(m, f"{t} validation") for t, m in sel.items()] + [(N.ft_final(t), f"{t} test") for t in sel]
    lines = [
        "| arm | n | " + " | ".join(label for _, label in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for arm, m in summary.items():
        cells = [f"{m[k]:.4f}" if k in m else "-" for k, _ in cols]
        lines.append(f"| {arm} | {int(m['n'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(means over seeds; the summary's intervals: `python -m ablations.summarize`)"


def log_arm_summary(plan: SweepPlan, tracker) -> dict[str, dict[str, float]]:
    """Put each arm's summary on the parent run: metrics ``arm/<arm>/<metric>`` and ``arm/<arm>/n`` (at the
    step = the number of finished trials, so a resumed sweep adds a later point) and a table in its
    description, so that the runs table compares arms and sweeps without opening the children."""
    trials = [
        (r.data.tags.get(N.ARM, "?"), r.data.tags.get(N.SEED, "?"), dict(r.data.metrics))
        for r in tracker.trial_runs(plan.experiment_id, plan.sweep_id)
        if r.info.status == "FINISHED" and r.data.tags.get(N.TRIAL_STATUS, "finished") == "finished"
    ]
    summary = arm_summary(trials, plan)
    metrics = {N.arm_metric(arm, k): v for arm, m in summary.items() for k, v in m.items()}
    if metrics:
        tracker.log_metrics_once(plan.parent_run_id, metrics, step=len(trials))
        tracker.set_tags(plan.parent_run_id, {N.NOTE: sweep_note(plan, arm_table(summary, plan))})
    return summary


def mark_interrupted(plan: SweepPlan, tracker, trials: list[dict[str, Any]] | None) -> int:
    """The parent run and every trial run of the sweep that neither finished nor failed on its own: KILLED,
    ``sweep.status`` / ``trial.status`` ``interrupted``. ``trials`` are Tune's results when it returned (its
    errored trials keep their failure); returns the number of trial runs marked."""
    failed_keys = {plan.trial(t["config"]).key for t in trials or [] if t["error"]}
    marked = 0
    for run in tracker.trial_runs(plan.experiment_id, plan.sweep_id):
        tags = run.data.tags
        if tags.get(N.TRIAL_STATUS) == "finished" or tags.get(N.TRIAL_KEY) in failed_keys:
            continue
        if run.info.status == "FAILED" and tags.get(N.TRIAL_STATUS) == "failed" and trials is None:
            continue  # failed before the signal (Tune's results are not known)
        tracker.set_tags(run.info.run_id, {N.TRIAL_STATUS: "interrupted"})
        tracker.finish(run.info.run_id, "KILLED")
        marked += 1
    done = sum(bool(t.get("done")) for t in trials or [])
    tracker.set_tags(
        plan.parent_run_id, {N.SWEEP_STATUS: "interrupted", N.SWEEP_TRIALS: str(plan.n_trials), N.SWEEP_DONE: str(done)}
    )
    tracker.finish(plan.parent_run_id, "KILLED")
    return marked


def finish(plan: SweepPlan, tracker, trials: list[dict[str, Any]]) -> None:
    """Mark the parent run finished or failed, with the trial counts; apply the sweep-end retention."""
    status = "FINISHED" if all(t["error"] is None for t in trials) else "FAILED"
    if status == "FINISHED" and plan.keep_checkpoints == "none" and plan.pretrain_store is None:
        from ssamba.sweep.trial import drop_pretrainings

        drop_pretrainings(plan.sweep_dir)  # no trial left that could reuse them (a shared store is left alone)
    log_arm_summary(plan, tracker)
    tracker.set_tags(
        plan.parent_run_id,
        {
            N.SWEEP_STATUS: status.lower(),
            N.SWEEP_TRIALS: str(len(trials)),
            N.SWEEP_FAILED: str(sum(t["error"] is not None for t in trials)),
        },
    )
    tracker.finish(plan.parent_run_id, status)


def finished_before(plan: SweepPlan, tracker):
    """The parent run of this sweep when it already finished with every trial (``--resume`` has nothing to
    do), else None. Read from MLflow alone: no Ray needed to tell."""
    run = tracker.parent_run(plan.experiment, plan.sweep_id)
    if run is None or run.info.status != "FINISHED" or run.data.tags.get(N.SWEEP_STATUS) != "finished":
        return None
    return run
