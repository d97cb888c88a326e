"""The study's results as files: per ablation its tables, plot and a README built from the run's record; the
study's own page (``study.md``) with its cost.

The tables are what ``python -m ablations.summarize --mlflow-uri URI --sweep-id ID`` prints for the sweep (the
same functions with the same arguments: :func:`sweep_tables`), in every format. Nothing here interprets a
number: each README ends with a section "Reading" that a person writes; regenerating the page keeps it.
"""

from __future__ import annotations

import datetime
import json
import math
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from ablations.render import FORMATS, plot_all, render, table_filename
from ablations.table import FactorTable
from ablations.usage import held_time
from ssamba.base import names as N

READING_START = (
    "<!-- reading: start. A person writes this section after looking at the numbers above; "
    "python -m ablations.study never writes between these two lines and keeps what is here. -->"
)
READING_END = "<!-- reading: end -->"
CONFIG_KEYS = (
    "model.embed_dim",
    "model.depth",
    "model.bimamba",
    "model.layer_pairing",
    "model.norm",
    "pretrain.target_length",
    "pretrain.mask_strategy",
    "pretrain.mask_count",
    "pretrain.max_steps",
    "pretrain.batch_size",
    "pretrain.lr",
    "finetune.epochs",
    "finetune.batch_size",
    "finetune.lr",
    "finetune.fstride",
)
TASK_KEYS = ("target_length", "loss", "metric", "mixup", "freqm", "timem", "noise")


# ------------------------------------------------------------------------------ reading the store
def sweep_tables(uri: str, sweep_id: str) -> tuple[pd.DataFrame, list[FactorTable]]:
    """The runs of one sweep and their summary, exactly as ``python -m ablations.summarize --mlflow-uri URI
    --sweep-id ID`` computes them (no reference override, no ignored params, unfinished trials left out)."""
    from ablations.summarize import check_store, collect_runs
    from ablations.table import summarize
    from ssamba.sweep.tracking import Tracker, resolve_uri

    check_store(uri, resolve_uri(uri))
    runs = collect_runs(Tracker(uri), [], sweep_id)
    return runs, summarize(runs)


def summarize_command(uri: str, sweep_id: str, fmt: str | None = None) -> str:
    extra = ["--format", fmt] if fmt and fmt != "markdown" else []
    return shlex.join(["python", "-m", "ablations.summarize", "--mlflow-uri", uri, "--sweep-id", sweep_id, *extra])


def write_tables(tables: list[FactorTable], folder: str | Path) -> dict[str, Path]:
    """``folder/ablation-<factor>.{md,csv,tex,json}`` (summarize's output, byte for byte) and the plot."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for fmt in FORMATS:
        path = folder / table_filename(tables[0].factor, fmt)
        path.write_text(render(tables, fmt))
        out[fmt] = path
    out.update({f"plot:{k}": v for k, v in plot_all(tables, folder).items()})
    return out


def trial_intervals(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Each trial run of ``runs``: arm, seed, status, start and end (s since the epoch; end None while it
    runs), stage device-hours (``cost/device_hours``)."""
    role = runs.get(N.column("tags", N.ROLE))
    if role is None:
        return []
    out = []
    for _, r in runs[role == N.TRIAL].iterrows():
        end = r.get("end_time")
        cost = r.get(N.column("metrics", N.COST_DEVICE_HOURS))
        out.append(
            {
                "arm": str(r.get(N.column("tags", N.ARM))),
                "seed": str(r.get(N.column("tags", N.SEED))),
                "status": str(r.get(N.column("tags", N.TRIAL_STATUS)) or r.get("status")),
                "start": float(r["start_time"]) / 1000,
                "end": None if _missing(end) else float(end) / 1000,
                "device_hours": None if _missing(cost) else float(cost),
            }
        )
    return out


def sweep_share(runs: pd.DataFrame) -> tuple[str, float]:
    """``("GPU", gpus per trial)`` or ``("CPU", CPUs per trial)``, from the sweep's parent run params."""
    role = runs.get(N.column("tags", N.ROLE))
    parents = runs[role == N.PARENT] if role is not None else runs.iloc[:0]

    def param(key: str, default: float) -> float:
        col = N.column("params", key)
        if col not in parents or parents.empty or _missing(parents[col].iloc[0]):
            return default
        return float(parents[col].iloc[0])

    gpus = param("gpus_per_trial", 0.0)
    if gpus > 0:
        return "GPU", gpus
    return "CPU", param("cpus_per_worker", 1.0) * param("workers_per_trial", 1.0)


def trials_summary(intervals: list[dict[str, Any]]) -> dict[str, Any]:
    """The ended trial runs: how many, their span (first start to last end) and the device-hours inside their
    training stages (``cost/device_hours``, summed)."""
    done = [t for t in intervals if t["end"] is not None]
    stage = [t["device_hours"] for t in done if t["device_hours"] is not None]
    if not done:
        return {"trials": 0}
    return {
        "trials": len(done),
        "span_s": max(t["end"] for t in done) - min(t["start"] for t in done),
        "stage_device_h": sum(stage) if stage else None,
    }


def packing(
    t0: float, t1: float, workers: list[dict[str, Any]], every_s: float, share: float, devices: float, unit: str
) -> dict[str, Any]:
    """How well the trials filled ``devices`` (GPUs, or CPUs) from ``t0`` to ``t1`` (the makespan) when each
    trial worker held ``share`` of them, from the samples of the workers alive (:func:`held_time`).

    held: worker-seconds x share, the device time the trials held; ideal: held / devices, the makespan of a
    perfect packing; ratio: makespan / ideal (1.0 is perfect; the issue's goal is 1.1 or less); idle: devices x
    makespan - held, the device time no trial held."""
    h = held_time(workers, t0, t1, every_s)
    makespan = t1 - t0
    held = h["worker_s"] * share
    ideal = held / devices if devices > 0 else 0.0
    busy = [r["time"] for r in workers if t0 <= r["time"] <= t1 and r["workers"] > 0]
    first, last = (busy[0], busy[-1]) if busy else (t1, t1)
    return {
        "ramp_s": first - t0,  # no trial worker yet: data checks, the sweeps' start-up, the first trials' set-up
        "tail_s": t1 - last,  # no trial worker any more: the sweeps' ends (summaries, MLflow)
        "idle_between_device_h": max(
            0.0, devices * (last - first) - share * held_time(workers, first, last, every_s)["worker_s"]
        )
        / 3600,
        "unit": unit,
        "makespan_s": makespan,
        "devices": devices,
        "share": share,
        "capacity": devices / share if share > 0 else 0.0,
        "every_s": every_s,
        "samples": h["samples"],
        "held_device_h": held / 3600,
        "ideal_s": ideal,
        "ratio": makespan / ideal if ideal > 0 else None,
        "idle_device_h": (devices * makespan - held) / 3600,
        "mean_concurrency": h["mean"],
        "max_concurrency": h["most"],
        "workers_seen": h["distinct"],
    }


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# ------------------------------------------------------------------------------ the pages
def keep_reading(path: Path) -> str:
    """What a person wrote in the reading section of an existing page (empty when there is none)."""
    if not path.is_file():
        return ""
    text = path.read_text()
    if READING_START not in text or READING_END not in text:
        return ""
    return text.split(READING_START, 1)[1].split(READING_END, 1)[0].strip("\n")


def _param(runs: pd.DataFrame, arm: str, key: str) -> str:
    col = N.column("params", key)
    trials = runs[runs.get(N.column("tags", N.ARM)) == arm] if N.column("tags", N.ARM) in runs else runs.iloc[:0]
    if col not in trials or trials[col].dropna().empty:
        return "-"
    return str(trials[col].dropna().mode().iloc[0])


def config_table(runs: pd.DataFrame, table: FactorTable) -> list[str]:
    """Markdown: the main settings (rows) of each arm (columns), as the trials logged them."""
    arms = list(table.arms)
    head = [f"{a} (no pretraining)" if a == table.scratch_arm else a for a in arms]
    lines = ["| setting | " + " | ".join(head) + " |", "|---|" + "---|" * len(arms)]
    for key in CONFIG_KEYS:
        vals = ["-" if (a == table.scratch_arm and key.startswith("pretrain.")) else _param(runs, a, key) for a in arms]
        lines.append(f"| `{key}` | " + " | ".join(vals) + " |")
    return lines


def task_table(runs: pd.DataFrame, table: FactorTable, manifests: dict[str, Any]) -> list[str]:
    """Markdown: each task's data (clips per split, classes) and the task settings its trials used."""
    arm = table.reference_arm or table.arms[0]
    lines = [
        "| task | train / validation / test clips | classes | " + " | ".join(TASK_KEYS) + " |",
        "|---|---|---|" + "---|" * len(TASK_KEYS),
    ]
    for task in table.tasks:
        facts = manifests.get(task, {})
        splits = facts.get("splits", {})
        clips = " / ".join(str(splits.get(s, 0)) for s in ("train", "validation", "test"))
        vals = []
        for k in TASK_KEYS:
            own = _param(runs, arm, f"{N.TASK_PARAM_PREFIX}{task}.{k}")
            vals.append(own if own != "-" else _param(runs, arm, f"finetune.{k}"))
        lines.append(f"| {task} | {clips} | {facts.get('classes', '-')} | " + " | ".join(vals) + " |")
    return lines


def pretraining_lines(manifests: dict[str, Any]) -> list[str]:
    union = manifests.get("pretrain")
    if not union:
        return []
    per = ", ".join(f"{src} {c.get('train', 0)}" for src, c in union.get("sources", {}).items())
    val = union.get("splits", {}).get("validation", 0)
    return [
        f"- pretraining data: `{union['path']}`, {union['splits'].get('train', 0)} training clips ({per}) and "
        f"{val} validation clips for the pretraining's own evaluation; no test clip of any task."
    ]


def ablation_readme(
    factor: str, description: str, table: FactorTable, runs: pd.DataFrame, record: dict, files: dict[str, Path],
    reading: str = "",
) -> str:  # fmt: skip
    """The README of one ablation's folder, from its table, its runs and the study's record."""
    sweep = record["sweeps"][factor]
    uri, sid = record["mlflow_uri"], sweep["sweep_id"]
    md = files["markdown"].read_text()
    seeds = sorted({t["seed"] for t in trial_intervals(runs)}, key=lambda s: (len(s), s))
    arms = ", ".join(f"**{a}**" if a == table.reference_arm else a for a in table.arms if a != table.scratch_arm)
    lines = [
        f"# Ablation: {factor} ({description})",
        "",
        f"Generated by `python -m ablations.study` on {record['finished_text']} from the study's MLflow store "
        f"(`{uri}`) and its record (`run.json` here): every number on this page is read from them. Regenerating "
        f'the page keeps the section "Reading", which a person writes.',
        "",
        md.rstrip("\n"),
        "",
    ]
    if "plot:" + factor in files:
        lines += [f"![{factor}: mean ± std over seeds per arm]({files['plot:' + factor].name})", ""]
    lines += [
        f"`{summarize_command(uri, sid)}` prints exactly this table; `--format csv`, `latex` and `json` print "
        + ", ".join(f"`{files[f].name}`" for f in ("csv", "latex", "json"))
        + ". Each task's number is the test score of the checkpoint chosen on that task's validation split; bold "
        "marks the best arm by validation score; nothing was tuned on a test split.",
        "",
        "## What ran",
        "",
        f"- arms: {arms} (reference in bold)"
        + (f", and `{table.scratch_arm}`: the same fine-tuning from random weights" if table.scratch_arm else ""),
        f"- seeds: {', '.join(seeds)}; preset `{record['preset']}`"
        + (f" with {', '.join(f'`{s}`' for s in record['settings'])}" if record.get("settings") else ""),
        f"- sweep `{sid}`: {sum(r.counts.get('finished', 0) for r in table.rows)} trials finished, "
        f"{sum(r.counts.get('failed', 0) for r in table.rows)} failed",
        *pretraining_lines(record.get("manifests", {})),
        "",
        *config_table(runs, table),
        "",
        *task_table(runs, table, record.get("manifests", {})),
        "",
        "## Reproduce",
        "",
        f"- commit `{record['commit']}`"
        + (" (the working tree had uncommitted changes)" if record.get("dirty") else "")
        + "; the trial runs' `git.commit`: "
        + ", ".join(f"`{c}`" for c in sorted(set(runs.get(N.column("tags", N.GIT_COMMIT), pd.Series()).dropna())))
        + ".",
        f"- the whole study: `{record['command']}`" + _continued(record),
        "- its data steps, in order:",
        *(f"  - `{s['command']}`" for s in record["data"]["steps"]),
        f"- this sweep: `{sweep['command']}`",
        f"- this table: `{summarize_command(uri, sid)}`",
        "",
        "## Cost",
        "",
        *cost_lines(record, factor, trials_summary(trial_intervals(runs))),
        "",
        "## Reading (written by a person)",
        "",
        READING_START,
        *([reading] if reading else []),
        READING_END,
        "",
    ]
    return "\n".join(lines)


def _continued(record: dict) -> str:
    """`` (continued: `...`)`` for each later invocation of the study (``--resume``), and their commits."""
    later = record.get("invocations", [])[1:]
    if not later:
        return ""
    return " (continued: " + "; ".join(f"`{i['command']}` at commit `{i['commit']}`" for i in later) + ")"


def write_ablation(folder: str | Path, factor: str, description: str, record: dict) -> dict[str, Path]:
    """``folder``: the tables, the plot, ``run.json`` and ``README.md`` of one ablation of the study."""
    folder = Path(folder)
    sweep = record["sweeps"][factor]
    runs, tables = sweep_tables(record["mlflow_uri"], sweep["sweep_id"])
    table = next(t for t in tables if t.factor == factor)
    files = write_tables([table], folder)
    run = {k: v for k, v in record.items() if k != "sweeps"}
    run["sweep"] = sweep
    run["trials"] = trials_summary(trial_intervals(runs))
    (folder / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    readme = folder / "README.md"
    readme.write_text(ablation_readme(factor, description, table, runs, record, files, keep_reading(readme)))
    files["readme"] = readme
    return files


def _share_devices(runs: pd.DataFrame, record: dict) -> tuple[float, float, str]:
    """(share per trial, devices of that kind in the Ray cluster, "GPU" or "CPU")."""
    kind, share = sweep_share(runs)
    ray = record.get("ray", {})
    return share, float(ray.get("gpus" if kind == "GPU" else "cpus", 0) or 0), kind


def study_packing(record: dict, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`packing` of the whole study: from the first sweep's start to the last one's end, every trial of
    every sweep (their runs read from the store), with the sampled trial workers."""
    sweeps = [s for s in record["sweeps"].values() if s.get("start") and s.get("end")]
    intervals, kind = [], None
    for s in sweeps:
        if s.get("sweep_id"):
            runs, _ = sweep_tables(record["mlflow_uri"], s["sweep_id"])
            intervals += trial_intervals(runs)
            kind = kind or _share_devices(runs, record)
    if not sweeps or kind is None:
        return {"trials": trials_summary(intervals)}
    t0, t1 = min(s["start"] for s in sweeps), max(s["end"] for s in sweeps)
    pack = packing(t0, t1, workers, record.get("every_s", 5.0), *kind)
    return {**pack, "trials": trials_summary(intervals), "probe_error": record.get("usage", {}).get("probe_error", "")}


def study_page(record: dict) -> str:
    """``study.md``: the study run as a whole (commands, cards, wall times, packing, GPU utilisation)."""
    lines = [
        "# The ablation study: its run",
        "",
        f"Generated by `python -m ablations.study` on {record['finished_text']} from its record (`study.json` in "
        f"`{record['out']}`) and its MLflow store (`{record['mlflow_uri']}`). The ablations' pages are in the "
        "folders beside this file.",
        "",
        f"- command: `{record['command']}`" + _continued(record),
        f"- commit `{record['commit']}`" + (" (uncommitted changes present)" if record.get("dirty") else ""),
        f"- cards: {record['cards']['text']}",
        f"- wall time: {hms(record['wall_s'])} in all; data {hms(record['phases'].get('data', 0))}, sweeps "
        f"{hms(record['phases'].get('sweeps', 0))}, results {hms(record['phases'].get('results', 0))}",
        "",
        "| ablation | sweep id | wall time | exit status |",
        "|---|---|---|---|",
    ]
    for factor, s in record["sweeps"].items():
        lines.append(
            f"| [{factor}]({factor}/README.md) | `{s.get('sweep_id', '-')}` | {hms(s['wall_s'])} | {s['rc']} |"
        )
    lines += ["", "## Cost of the study", "", *packing_lines(record.get("packing", {}))]
    lines += ["", *usage_lines(record.get("usage", {})), ""]
    lines += ["## Data steps", "", "| step | seconds | command |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['seconds']} | `{s['command']}` |" for s in record["data"]["steps"]]
    return "\n".join(lines) + "\n"


def now_text(t: float | None = None) -> str:
    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc) if t else datetime.datetime.now(datetime.timezone.utc)
    return d.strftime("%Y-%m-%d %H:%M UTC")


# ------------------------------------------------------------------------------ cost in words
def hms(seconds: float | None) -> str:
    """``1 h 02 min``, ``4 min 05 s``, ``12 s``."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def packing_lines(pack: dict[str, Any]) -> list[str]:
    """The numbers of :func:`study_packing` in words (GPUs, or CPUs where the trials held no GPU)."""
    trials = pack.get("trials", {})
    if "makespan_s" not in pack:
        return [f"- {trials.get('trials', 0)} trials ended: no packing to measure"]
    unit, ratio = pack["unit"], pack["ratio"]
    lines = [
        f"- makespan (the first sweep's start to the last one's end): {hms(pack['makespan_s'])}; each trial held "
        f"{pack['share']:g} {unit} of {pack['devices']:g} ({int(pack['capacity'] + 1e-9)} trials fit at once)",
    ]
    if not pack["samples"]:
        why = f" ({pack['probe_error']})" if pack.get("probe_error") else ""
        return lines + [f"- the trial workers were not sampled{why}: no held time to compare with"]
    lines += [
        f"- the trials' {unit} time (trial workers alive, sampled every {pack['every_s']:g} s, x {pack['share']:g} "
        f"{unit}): {_h(pack['held_device_h'])} {unit}-hours; over {pack['devices']:g} {unit}s that is "
        f"{hms(pack['ideal_s'])}; makespan / that = **{ratio:.2f}x** (goal: 1.1x or less)"
        if ratio is not None
        else f"- no trial worker was seen alive in {pack['samples']} samples",
        f"- {unit} time no trial held within the makespan: {_h(pack['idle_device_h'])} {unit}-hours: "
        f"{hms(pack['ramp_s'])} before the first trial worker, {hms(pack['tail_s'])} after the last, and "
        f"{_h(pack['idle_between_device_h'])} {unit}-hours in between (fewer trials than fit)",
        f"- trials at once: {pack['mean_concurrency']:.1f} on average, {pack['max_concurrency']} at most; "
        f"{pack['workers_seen']} trial worker processes seen"
        + (
            f", {pack['workers_seen'] / pack['devices']:.1f} per GPU on average"
            if unit == "GPU" and pack["devices"]
            else ""
        ),
    ]
    if trials.get("trials"):
        lines.append(
            f"- {trials['trials']} trial runs ended, from the first one's start to the last one's end "
            f"{hms(trials['span_s'])}; {_h(trials['stage_device_h'])} {unit}-hours inside their training stages "
            "(`cost/device_hours`, summed): the rest of the held time is the workers' start-up, loading and "
            "hand-over between stages"
        )
    return lines


def usage_lines(usage: dict[str, Any]) -> list[str]:
    """GPU utilisation of :func:`ablations.gpu_usage.usage_summary` in words and a table (or why there is none)."""
    if not usage.get("gpus"):
        return [f"- GPU utilisation: {usage.get('note') or 'no samples'}"]
    mean = usage.get("mean_utilization")
    lines = [
        f"- GPU utilisation (nvidia-smi every {usage.get('every_s', '?')} s, {usage['samples']} samples): mean "
        f"{'-' if mean is None else f'{mean:.0f} %'} over the GPUs",
        "",
        "| GPU | samples | mean utilisation | samples at 0 % | peak memory | processes seen | most at once |",
        "|---|---|---|---|---|---|---|",
    ]
    for gpu, g in usage["gpus"].items():
        util = "-" if g["mean_utilization"] is None else f"{g['mean_utilization']:.0f} %"
        idle = "-" if g["idle_share"] is None else f"{100 * g['idle_share']:.0f} %"
        mem = "-" if g["peak_memory_mib"] is None else f"{g['peak_memory_mib'] / 1024:.1f} GiB"
        lines.append(
            f"| {gpu} | {g['samples']} | {util} | {idle} | {mem} | {g['processes_seen']} | {g['max_processes']} |"
        )
    lines.append("")
    lines.append(
        "processes seen: the distinct processes that held a CUDA context on the GPU, one per trial worker (0 "
        "where nvidia-smi cannot see the processes, e.g. inside a container)."
    )
    return lines


def cost_lines(record: dict, factor: str, trials: dict[str, Any]) -> list[str]:
    """The Cost section of an ablation's page: its sweep, its trials, the GPUs while it ran, the study."""
    sweep = record["sweeps"][factor]
    ray = record.get("ray", {})
    others = [f for f, s in record["sweeps"].items() if f != factor and _overlap(s, sweep)]
    unit = "GPU" if float(ray.get("gpus", 0) or 0) > 0 and record.get("gpus_per_trial", 0) else "CPU"
    lines = [
        f"- cards: {record['cards']['text']}; Ray: {ray.get('cpus', 0):g} CPUs, {ray.get('gpus', 0):g} GPUs",
        f"- this sweep's wall time: {hms(sweep['wall_s'])}"
        + (f", alongside {', '.join(others)} (the sweeps shared the machine)" if others else ""),
    ]
    if trials.get("trials"):
        lines.append(
            f"- its {trials['trials']} trial runs: first start to last end {hms(trials['span_s'])}; "
            f"{_h(trials['stage_device_h'])} {unit}-hours inside their training stages (`cost/device_hours`, summed)"
        )
    lines += usage_lines(sweep.get("usage", {}))
    study = record.get("packing", {})
    if "makespan_s" in study:
        lines += ["", "The whole study (every sweep it ran; [study.md](../study.md)):", "", *packing_lines(study)]
    return lines


def _overlap(a: dict, b: dict) -> bool:
    return bool(
        a.get("start")
        and b.get("start")
        and a["start"] < (b.get("end") or 1e18)
        and b["start"] < (a.get("end") or 1e18)
    )
