"""``python -m ablations.study ... --pilot``: one trial of the study, timed on this machine, and the study's cost
worked out from it, before the study commits its GPU-hours.

1. The study's data steps (the same commands, into ``OUT/data``; the feature cache they build serves the study too).
2. The trial: the first ablation's reference arm, seed 0, planned and settled by the sweep's own code
   (:func:`ssamba.sweep.plan.make_plan`, :func:`ssamba.sweep.records.settle_data`), so its configs are the
   ones the study's trial runs. Its stages run as its Ray Train worker runs them (``run_pretrain`` then
   ``run_finetune`` per task, on the settled statistics), without Ray or MLflow, each in a process of its own:
   pretraining capped at ``--pilot-steps`` steps, each task's fine-tuning at ``--pilot-epochs`` epochs.
3. ``--pilot-share K``: K pretraining stages at once on the one device, as the study packs ``1 / GPU share``
   trials on a card: the slowdown each then sees.
4. The cost: each stage's time per step (or epoch) scaled to the preset's full budget, plus its start-up
   (wall time outside training); the study's trials and its distinct pretrainings counted from the four
   plans (the sweeps share their pretrainings: the reference arms are one config); GPU-hours held at the study's share per trial, and the makespan on 1 and 8 GPUs if perfectly
   packed. What it leaves out is printed with it: Ray's and MLflow's per-trial overhead, the unidirectional
   arm's cheaper scan (counted as bidirectional), and the sweeps' ramp-up and tail.

The record is ``OUT/pilot.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ablations import study_data as D
from ssamba.base.errors import SSAMBAError


def run_data_steps(data: str, out: str, workers: int) -> float:
    """The study's data steps, all of them (each is quick again once the feature cache exists); their seconds."""
    t0 = time.time()
    for step in D.data_steps(data, out, workers):
        print(f"pilot data: {step.name}", flush=True)
        D.run_step(step, Path(out) / "logs" / "data.log")
    return time.time() - t0


def pilot_cell(factor: str, options: list[str]):
    """The reference arm's seed-0 trial of ``factor``'s sweep with these options, settled as the driver does."""
    from ablations.run import sweep_argv
    from ssamba.sweep.driver import build_parser
    from ssamba.sweep.factors import FACTORS
    from ssamba.sweep.plan import make_plan
    from ssamba.sweep.records import settle_data

    f = FACTORS[factor]
    args = build_parser(f).parse_args(sweep_argv(f, options))
    plan = settle_data(make_plan(f, args, sweep_id="pilot"), log=lambda s: None)
    cell = next(c for c in plan.cells if c.arm == f.reference and c.seed == plan.seeds[0])
    return plan, cell


def study_counts(factors: list[str], options: list[str]) -> dict[str, int]:
    """The study's trials and its distinct pretrainings: every ablation planned with the study's options; trials
    whose pretraining has the same config and seed share one (the sweeps share ``--pretrain-store``)."""
    from ablations.run import sweep_argv
    from ssamba.sweep.driver import build_parser
    from ssamba.sweep.factors import FACTORS
    from ssamba.sweep.plan import make_plan

    trials, pretrainings = 0, set()
    for f in factors:
        args = build_parser(FACTORS[f]).parse_args(sweep_argv(FACTORS[f], options))
        with contextlib.redirect_stdout(io.StringIO()):
            plan = make_plan(FACTORS[f], args, sweep_id="pilot")
        trials += len(plan.cells)
        pretrainings |= {c.pretrain_dir for c in plan.cells if c.pretrained}
    return {"trials": trials, "pretrainings": len(pretrainings)}


# ------------------------------------------------------------------------------ one stage, in its own process
def _stage(spec_file: str, stage: str, out_dir: str, cap: str, init: str, result_file: str) -> None:
    import torch

    from ssamba.train.jobs import run_finetune, run_pretrain

    spec = json.loads(Path(spec_file).read_text())  # the trial planned again here, as the sweep's code plans it
    _, cell = pilot_cell(spec["factor"], spec["options"])
    cap = int(cap)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quiet = lambda s: None  # noqa: E731
    t0 = time.time()
    rows = []
    if stage == "pretrain":
        p = cell.config.pretrain
        cfg = replace(cell.config, pretrain=replace(p, max_steps=cap, plateau_every=max(1, cap // 2)))
        r = run_pretrain(cfg, Path(out_dir), log=quiet, device=device, stats_settled=True)
        rows.append({"stage": "pretrain", "steps": r.steps, "fit_s": r.seconds, "wall_s": time.time() - t0,
                     "full_steps": p.max_steps, "batch": p.batch_size, "samples_per_s": r.samples_per_s})  # fmt: skip
    else:
        for task in cell.tasks:
            ft = task.config.finetune
            cfg = replace(task.config, finetune=replace(ft, epochs=min(ft.epochs, cap)))
            t = time.time()
            r = run_finetune(cfg, Path(out_dir) / task.name, init=init or None, log=quiet, device=device,
                             stats_settled=True)  # fmt: skip
            rows.append({"stage": f"ft/{task.name}", "steps": r.steps, "fit_s": r.seconds,
                         "wall_s": time.time() - t, "epochs": cfg.finetune.epochs, "full_epochs": ft.epochs,
                         "max_steps": ft.max_steps, "batch": ft.batch_size,
                         "samples_per_s": r.samples_per_s})  # fmt: skip
    Path(result_file).write_text(json.dumps(rows))


def _run_stages(spec_file: Path, jobs: list[tuple[str, str, int, str]], work: Path) -> list[list[dict]]:
    """``jobs`` (stage, out dir, cap, init) all at once, each in its own process; their rows."""
    procs = []
    # each process gets its share of the cores, as Ray gives a trial's worker (OMP_NUM_THREADS)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // len(jobs))))
    for i, (stage, out_dir, cap, init) in enumerate(jobs):
        shutil.rmtree(out_dir, ignore_errors=True)  # a stage finds its own last.pt and resumes: start afresh
        res = work / f"stage-{stage}-{i}.json"
        res.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "ablations.pilot", str(spec_file), stage, out_dir, str(cap), init, str(res)]
        procs.append((subprocess.Popen(argv, env=env), res))
    out = []
    for proc, res in procs:
        if proc.wait() != 0 or not res.is_file():
            raise SSAMBAError(f"pilot: the {jobs[0][0]} stage failed (exit {proc.returncode}); its output is above")
        out.append(json.loads(res.read_text()))
    return out


# ------------------------------------------------------------------------------ the cost
def full_steps(row: dict[str, Any]) -> int:
    """The steps of the stage at its full budget: pretraining's ``max_steps``; a task's epochs at the pilot's
    steps per epoch, capped by its ``max_steps`` when it has one."""
    if row["stage"] == "pretrain":
        return row["full_steps"] or row["steps"]
    steps = round(row["steps"] / max(row["epochs"], 1) * row["full_epochs"])
    return min(steps, row["max_steps"]) if row.get("max_steps", 0) > 0 else steps


def stage_estimate(row: dict[str, Any]) -> float:
    """Seconds of the stage at its full budget: its training time per step times :func:`full_steps` (evaluations
    included, at the pilot's cadence), plus what lay outside training (start-up, the test)."""
    outside = max(0.0, row["wall_s"] - row["fit_s"])
    return row["fit_s"] / max(row["steps"], 1) * full_steps(row) + outside


def study_cost(alone: list[dict], shared: list[list[dict]] | None, counts: dict[str, int], share: float) -> dict:
    """GPU-hours and makespans from the pilot's stages (see the module docstring)."""
    pre = [stage_estimate(r) for r in alone if r["stage"] == "pretrain"]
    ft = sum(stage_estimate(r) for r in alone if r["stage"] != "pretrain")
    trial_pre, trial_scratch = (pre[0] if pre else 0.0) + ft, ft  # a trial that pretrains; one that reuses or not
    slowdown = 1.0
    if shared:
        step = next(r["fit_s"] / max(r["steps"], 1) for r in alone if r["stage"] == "pretrain")
        together = [rows[0]["fit_s"] / max(rows[0]["steps"], 1) for rows in shared]
        slowdown = (sum(together) / len(together)) / step
    alone_s = counts["pretrainings"] * (trial_pre - trial_scratch) + counts["trials"] * trial_scratch
    held_h = alone_s * slowdown * share / 3600
    return {
        "trial_pretrained_s": trial_pre,
        "trial_scratch_s": trial_scratch,
        "share_slowdown": slowdown,
        "trials": counts,
        "trial_hours_alone": alone_s / 3600,
        "gpu_hours_held": held_h,
        "makespan_h": {"1": held_h, "8": held_h / 8},
    }


def cost_text(rows: list[dict], cost: dict, share: float, k: int, device: str) -> str:
    lines = [f"pilot on {device}: one trial's stages (capped), then the study's cost worked out from them", ""]
    lines.append("| stage | steps run | training s | wall s | samples/s | s per step | full budget, estimated s |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        full = f"{full_steps(r)} steps" + ("" if r["stage"] == "pretrain" else f", {r['full_epochs']} epochs")
        lines.append(
            f"| {r['stage']} | {r['steps']} | {r['fit_s']:.1f} | {r['wall_s']:.1f} | {r['samples_per_s']:.0f} | "
            f"{r['fit_s'] / max(r['steps'], 1):.3f} | {stage_estimate(r):.0f} ({full}) |"
        )
    c = cost
    lines += [
        "",
        f"a trial that pretrains ~{c['trial_pretrained_s'] / 60:.1f} min alone, one that fine-tunes only ~"
        f"{c['trial_scratch_s'] / 60:.1f} min; {c['trials']['trials']} trials, {c['trials']['pretrainings']} "
        f"distinct pretrainings: {c['trial_hours_alone']:.2f} trial-hours alone",
        f"{k} pretrainings at once: each step {c['share_slowdown']:.2f}x its time alone"
        if k > 1
        else "sharing not measured (--pilot-share 2 measures it): counted as no slowdown",
        f"at {share:g} device per trial: {c['gpu_hours_held']:.2f} device-hours held; makespan if perfectly packed "
        f"{c['makespan_h']['1']:.2f} h on 1 device, {c['makespan_h']['8'] * 60:.0f} min on 8",
        "not counted: Ray's and MLflow's start-up per trial, the unidirectional arm's cheaper scan (counted as "
        "bidirectional), the sweeps' ramp-up and tail",
    ]
    return "\n".join(lines)


def run_pilot(
    args, factors: list[str], seeds: tuple[int, ...], sets: list[str], out: str, share: float, sweep_options
) -> int:
    """The pilot (module docstring); ``share``: the GPUs a study trial would hold; ``sweep_options``: the study's
    options of one sweep (``ablations.study.sweep_options``, passed in: this module sits below the study)."""
    import torch

    t0 = time.time()
    data_s = run_data_steps(args.data, out, args.workers)
    cpus = max(1, int((os.cpu_count() or 1) * min(share, 1.0)))  # a trial's share of the cores, as of the device
    options = sweep_options(out, (0,), sets, share, cpus, 1)
    _, cell = pilot_cell(factors[0], options)
    work = Path(out) / "pilot"
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / "trial.json"
    spec_file.write_text(json.dumps({"factor": factors[0], "options": options}))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(
        f"pilot: {factors[0]} arm {cell.arm}, seed {cell.seed}; pretraining capped at {args.pilot_steps} steps "
        f"(of {cell.config.pretrain.max_steps}), fine-tuning at {args.pilot_epochs} epochs; on {device}",
        flush=True,
    )
    [pre] = _run_stages(spec_file, [("pretrain", str(work / "pretrain"), args.pilot_steps, "")], work)
    init = str(work / "pretrain" / "best.pt")
    [ft] = _run_stages(spec_file, [("finetune", str(work / "finetune"), args.pilot_epochs, init)], work)
    shared = None
    if args.pilot_share > 1:
        jobs = [("pretrain", str(work / f"shared-{i}"), args.pilot_steps, "") for i in range(args.pilot_share)]
        shared = _run_stages(spec_file, jobs, work)
    rows = pre + ft
    study_options = sweep_options(out, seeds, sets, share, cpus, 1)
    cost = study_cost(rows, shared, study_counts(factors, study_options), share)
    text = cost_text(rows, cost, share, args.pilot_share, device)
    record = {
        "device": device,
        "factor": factors[0],
        "arm": cell.arm,
        "options": options,
        "data_s": data_s,
        "wall_s": time.time() - t0,
        "stages": rows,
        "shared": shared,
        "cost": cost,
    }
    (Path(out) / "pilot.json").write_text(json.dumps(record, indent=1))
    print(text)
    print(f"pilot: {time.time() - t0:.0f} s (data steps {data_s:.0f} s); record {out}/pilot.json")
    return 0


if __name__ == "__main__":
    _stage(*sys.argv[1:])  # spec, stage, out dir, cap, init, result file
