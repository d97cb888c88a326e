"""Pure summary of ablation runs: a DataFrame of MLflow runs -> one :class:`FactorTable` per factor.

Input: the frame ``ssamba.sweep.tracking.Tracker.runs_frame`` returns (``run_id``, ``status``,
``start_time``, ``params.<dotted key>``, ``tags.<key>``, ``metrics.<key>``), parents and trials of one
or more sweeps. No I/O happens here.

Conventions (stated once, used by every renderer):
- A trial is *finished* when its MLflow status is FINISHED, its ``trial.status`` tag is ``finished``
  (or absent) and it logged ``ft/<task>/final`` for every task of its sweep. FINISHED otherwise is
  *incomplete*; RUNNING/SCHEDULED is *running*; ``trial.status=interrupted`` (a stopped sweep) is
  *interrupted*; FAILED/KILLED or ``trial.status=failed`` otherwise is *failed*.
  Only finished trials enter the statistics; the others are counted per row.
- Rows: the trials of one arm grouped by every config param except the seed and :data:`NOISE_PARAMS`,
  so different presets or settings are never averaged together. Several groups of one arm are
  labelled by the params that differ between them, e.g. ``400 (finetune.lr=0.001)``.
- One run per seed: when a seed was run twice with identical settings, the latest finished run counts
  and the older one is counted as a ``duplicate``.
- Cells: mean ± sample std (ddof=1) over seeds, with n. Task columns are ``ft/<task>/final``; extra
  columns ``pretrain/acc``, ``pretrain/loss`` and ``cost/device_hours`` (mean per finished trial).
- Difference to the reference arm: per task, over seeds present in both the row and its reference row
  (the reference arm's row with the fewest differing params), d_i = row_i - ref_i; the interval is
  mean(d) ± t_{0.975, n-1} * sd(d) / sqrt(n). One pair gives the difference without an interval.
- Difference to the from-scratch arm (a sweep run with ``--scratch``, parent tag ``sweep.scratch_arm``):
  the same paired difference, against the scratch row whose settings differ least: does pretraining pay?
- Best per column: highest mean (tasks, ``pretrain/acc``) or lowest (``pretrain/loss``), marked when at
  least two rows have a value and they are not all equal; ties are all marked. Cost is not ranked.
  A task column is ranked on **validation**, never on the test score it shows: each row's mean over
  seeds of ``ft/<task>/best_<metric>`` (the best validation score of the run, ``metric`` the task's
  ``finetune.metric``; :attr:`Row.selection`). A task whose runs logged no validation score marks no best.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd

from ablations.stats import Diff, Stat, describe, natural_key, paired_difference
from ssamba.base import names as N
from ssamba.base.errors import SSAMBAError

# Params that vary between runs without changing what is measured: never used to split rows.
NOISE_PARAMS = frozenset(
    {
        "seed",  # the replicate axis itself
        "device",  # auto | cpu | cuda: where it ran
        "data.cache_dir",  # where the feature cache lives
        "data.num_workers",  # DataLoader processes
        "model.scan_backend",  # reference or CUDA kernel: the same math
    }
)
PRETRAIN_COLUMNS = ("pretrain/acc", "pretrain/loss")
COST_COLUMN = N.COST_DEVICE_HOURS


def _tag(name: str) -> str:
    """The run-table column of a tag."""
    return N.column("tags", name)


HIGHER_IS_BETTER = {"pretrain/acc": True, "pretrain/loss": False}  # tasks: higher (accuracy / mAP)
STATUSES = ("finished", "failed", "interrupted", "running", "incomplete", "duplicate")
UNFINISHED = ("interrupted", "running", "incomplete")  # left out of the statistics unless asked
MAX_LABEL_KEYS = 3


class SummaryError(SSAMBAError, ValueError):
    """The runs or the options asked of the summary are unusable (names the rule, value and fix)."""


@dataclass(frozen=True)
class Row:
    arm: str
    label: str
    settings: dict[str, str]  # the group's params (without the seed and noise params)
    distinct: dict[str, str]  # the params that tell this row from the arm's other rows
    counts: dict[str, int]  # status -> number of runs
    cells: dict[str, Stat]  # column -> statistic over finished seeds
    diffs: dict[str, Diff]  # task -> difference to the reference
    best: tuple[str, ...]  # columns in which this row is best (task columns ranked on validation)
    is_reference: bool
    run_ids: tuple[str, ...]
    failures: tuple[tuple[str, str, str], ...]  # (run_id, seed, error) of failed trials
    selection: dict[str, Stat] = field(default_factory=dict)  # task -> validation score over finished seeds
    scratch_diffs: dict[str, Diff] = field(default_factory=dict)  # task -> difference to the from-scratch arm

    @property
    def status_line(self) -> str:
        return ", ".join(f"{self.counts[s]} {s}" for s in STATUSES if self.counts.get(s))


@dataclass(frozen=True)
class FactorTable:
    factor: str
    reference_arm: str | None
    arms: tuple[str, ...]  # natural order, then arms outside ``sweep.arms`` sorted
    tasks: tuple[str, ...]
    columns: tuple[str, ...]  # tasks, then pretraining and cost columns
    rows: tuple[Row, ...]
    parent_run_ids: tuple[str, ...]
    sweep_ids: tuple[str, ...]
    total_device_hours: float | None  # every trial that logged cost, failed and running included
    confidence: float = 0.95
    notes: tuple[str, ...] = field(default_factory=tuple)
    scratch_arm: str | None = None  # the sweep's no-pretraining arm, when it has one


# ------------------------------------------------------------------------------ the summary
def summarize(
    runs: pd.DataFrame,
    reference: str | dict[str, str] | None = None,
    *,
    ignore_params: tuple[str, ...] = (),
    confidence: float = 0.95,
    include_unfinished: bool = False,
) -> list[FactorTable]:
    """Runs of one or more sweeps -> one table per ablation factor (sorted by factor name).

    ``reference``: an arm label for every factor, or ``{factor: arm}``; default each factor's parent
    ``sweep.reference_arm``. ``ignore_params``: extra dotted keys that must not split rows.
    ``include_unfinished``: interrupted, running and incomplete trials enter the statistics with whatever
    they logged (off: they are only counted, and a note says how many were left out).
    """
    if runs is None or runs.empty:
        return []
    runs = runs.reset_index(drop=True)
    role = _col(runs, _tag(N.ROLE))
    arm = _col(runs, _tag(N.ARM))
    parents = runs[role == "parent"]
    trials = runs[(role == "trial") | (role.isna() & arm.notna())]
    trials = trials[_col(trials, _tag(N.ARM)).notna()]
    factors = sorted(set(_col(trials, _tag(N.FACTOR)).fillna("unknown")))
    noise = NOISE_PARAMS | {k.removeprefix("params.") for k in ignore_params}
    refs = reference if isinstance(reference, dict) else {f: reference for f in factors} if reference else {}
    unknown = set(refs) - set(factors) if isinstance(reference, dict) else set()
    if unknown:
        raise SummaryError(
            f"--reference names factor(s) {sorted(unknown)} but the runs hold factors {factors}. "
            "Fix: use FACTOR=ARM with one of those factors."
        )
    tables = []
    for factor in factors:
        ft = trials[_col(trials, _tag(N.FACTOR)).fillna("unknown") == factor]
        fp = parents[_col(parents, _tag(N.FACTOR)).fillna("unknown") == factor]
        tables.append(_factor_table(factor, ft, fp, refs.get(factor), noise, confidence, include_unfinished))
    return tables


def _factor_table(
    factor: str,
    trials: pd.DataFrame,
    parents: pd.DataFrame,
    reference: str | None,
    noise: frozenset[str],
    confidence: float,
    include_unfinished: bool = False,
) -> FactorTable:
    notes: list[str] = []
    parents = parents.sort_values("start_time", kind="stable") if "start_time" in parents else parents
    natural = _merge_lists(_json_list(v) for v in _col(parents, _tag(N.SWEEP_ARMS)))
    listed_tasks = _merge_lists(_json_list(v) for v in _col(parents, _tag(N.SWEEP_TASKS)))
    seen_tasks = sorted(
        {
            c.split("/")[1]
            for c in trials.columns
            if c.startswith("metrics.") and N.is_final(c[len("metrics.") :]) and trials[c].notna().any()
        }
    )
    tasks = tuple(listed_tasks + [t for t in seen_tasks if t not in listed_tasks])
    sweep_tasks = {
        sid: _json_list(t)
        for sid, t in zip(_col(parents, _tag(N.SWEEP_ID)), _col(parents, _tag(N.SWEEP_TASKS)))
        if isinstance(t, str)
    }
    present = set(_col(trials, _tag(N.ARM)).astype(str))
    arms = tuple([a for a in natural if a in present] + sorted(present - set(natural), key=natural_key))

    declared = [r for r in _col(parents, _tag(N.SWEEP_REFERENCE)) if isinstance(r, str) and r]
    if len(set(declared)) > 1:
        notes.append(
            f"the sweeps declare different reference arms {sorted(set(declared))}; the latest, "
            f"{declared[-1]!r}, is used"
        )
    ref_arm = reference or (declared[-1] if declared else None)
    scratch_tags = [r for r in _col(parents, _tag(N.SWEEP_SCRATCH)) if isinstance(r, str) and r]
    scratch_arm = scratch_tags[-1] if scratch_tags and scratch_tags[-1] in arms else None
    if reference and reference not in arms:
        raise SummaryError(
            f"reference arm {reference!r} is not an arm of factor {factor!r} (arms: {list(arms)}). "
            f"Fix: pass one of those, or --reference {factor}=ARM to set it for this factor only."
        )
    if ref_arm is not None and ref_arm not in arms:
        notes.append(f"reference arm {ref_arm!r} has no runs: no differences computed")

    # one record per trial: status, seed, settings key
    param_cols = sorted(c for c in trials.columns if c.startswith("params.") and c[len("params.") :] not in noise)
    records = []
    for _, r in trials.iterrows():
        settings = {c[len("params.") :]: str(r[c]) for c in param_cols if _present(r[c])}
        required = sweep_tasks.get(r.get(_tag(N.SWEEP_ID)), list(tasks))
        records.append(
            dict(
                run_id=str(r["run_id"]),
                arm=str(r[_tag(N.ARM)]),
                seed=_seed(r),
                status=_trial_status(r, required),
                start=_num(r.get("start_time")) or 0.0,
                settings=settings,
                key=tuple(sorted(settings.items())),
                row=r,
            )
        )

    groups: dict[tuple[str, tuple], list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["arm"], rec["key"]), []).append(rec)
    labels = _labels(groups)
    columns = tasks + tuple(c for c in (*PRETRAIN_COLUMNS, COST_COLUMN) if f"metrics.{c}" in trials.columns)

    # per group: the finished run of each seed (latest), its per-column values
    built = []
    for (arm_label, key), recs in groups.items():
        counts = {s: 0 for s in STATUSES}
        latest: dict[str, dict] = {}
        for rec in sorted(recs, key=lambda x: x["start"]):
            prev = latest.get(rec["seed"])
            if rec["status"] == "finished":
                if prev is not None and prev["status"] == "finished":
                    counts["duplicate"] += 1
                    counts["finished"] -= 1
                latest[rec["seed"]] = rec  # the latest finished run of a seed counts
            elif include_unfinished and rec["status"] in UNFINISHED and (prev is None or prev["status"] != "finished"):
                latest[rec["seed"]] = rec  # what an unfinished run logged, unless the seed also finished
            counts[rec["status"]] += 1
        per_col = {
            c: {s: v for s, rec in latest.items() if _present(v := _num(rec["row"].get(_metric_col(c, tasks))))}
            for c in columns
        }
        per_valid = {
            t: {
                s: v for s, rec in latest.items() if _present(v := _num(rec["row"].get(_validation_col(t, rec["row"]))))
            }
            for t in tasks
        }
        failures = tuple(
            (rec["run_id"], rec["seed"], _text(rec["row"].get(_tag(N.TRIAL_ERROR)))[:300])
            for rec in recs
            if rec["status"] == "failed"
        )
        built.append(
            dict(
                arm=arm_label,
                key=key,
                settings=dict(key),
                counts=counts,
                values=per_col,
                valid=per_valid,
                failures=failures,
                run_ids=tuple(rec["run_id"] for rec in recs),
            )
        )

    left_out = sum(g["counts"].get(s, 0) for g in built for s in UNFINISHED)
    if left_out and not include_unfinished:
        notes.append(
            f"{left_out} unfinished trial(s) (interrupted, running or incomplete) left out of the statistics; "
            f"--include-unfinished uses what they logged"
        )
    elif left_out:
        notes.append(f"{left_out} unfinished trial(s) included with what they logged (--include-unfinished)")
    order = {a: i for i, a in enumerate(arms)}
    built.sort(key=lambda g: (order[g["arm"]], labels[(g["arm"], g["key"])][0]))
    ref_groups = [g for g in built if g["arm"] == ref_arm]
    scratch_groups = [g for g in built if g["arm"] == scratch_arm]

    rows = []
    for g in built:
        label, distinct = labels[(g["arm"], g["key"])]
        cells = {c: describe(g["values"][c]) for c in columns}
        diffs = {}
        if g["arm"] == ref_arm:
            diffs = {t: Diff(0.0, None, None, cells[t].n, label, "reference") for t in tasks}
        elif ref_groups:
            match, why = _closest(g, ref_groups)
            vs = labels[(match["arm"], match["key"])][0] if match else ref_arm
            for t in tasks:
                diffs[t] = (
                    paired_difference(g["values"][t], match["values"][t], vs, confidence)
                    if match
                    else Diff(None, None, None, 0, vs, why)
                )
        scratch_diffs = {}
        if scratch_groups and g["arm"] != scratch_arm:
            match, why = _closest(g, scratch_groups)
            vs = labels[(match["arm"], match["key"])][0] if match else scratch_arm
            for t in tasks:
                scratch_diffs[t] = (
                    paired_difference(g["values"][t], match["values"][t], vs, confidence)
                    if match
                    else Diff(None, None, None, 0, vs, why)
                )
        rows.append(
            dict(
                arm=g["arm"],
                scratch_diffs=scratch_diffs,
                label=label,
                settings=g["settings"],
                distinct=distinct,
                counts=g["counts"],
                cells=cells,
                diffs=diffs,
                is_reference=g["arm"] == ref_arm,
                run_ids=g["run_ids"],
                failures=g["failures"],
                selection={t: describe(g["valid"][t]) for t in tasks},
            )
        )

    best = _best(rows, columns, tasks)
    final_rows = tuple(Row(**r, best=tuple(c for c in columns if i in best[c])) for i, r in enumerate(rows))
    costs = [v for v in (_num(x) for x in _col(trials, f"metrics.{COST_COLUMN}")) if _present(v)]
    return FactorTable(
        factor=factor,
        reference_arm=ref_arm if ref_arm in arms else None,
        scratch_arm=scratch_arm,
        arms=arms,
        tasks=tasks,
        columns=columns,
        rows=final_rows,
        parent_run_ids=tuple(str(x) for x in _col(parents, "run_id")),
        sweep_ids=tuple(sorted({str(s) for s in _col(trials, _tag(N.SWEEP_ID)).dropna()})),
        total_device_hours=sum(costs) if costs else None,
        confidence=confidence,
        notes=tuple(notes),
    )


def _trial_status(r: pd.Series, required_tasks: list[str]) -> str:
    mstatus = str(r.get("status") or "").upper()
    tstatus = r.get(_tag(N.TRIAL_STATUS))
    tstatus = str(tstatus).lower() if _present(tstatus) else None
    if tstatus == "interrupted":
        return "interrupted"
    if mstatus in ("FAILED", "KILLED") or tstatus == "failed":
        return "failed"
    if mstatus in ("RUNNING", "SCHEDULED"):
        return "running"
    complete = all(_present(_num(r.get(f"metrics.{N.ft_final(t)}"))) for t in required_tasks)
    if mstatus == "FINISHED" and tstatus in (None, "finished") and complete:
        return "finished"
    return "incomplete"


def _labels(groups: dict[tuple[str, tuple], list]) -> dict[tuple[str, tuple], tuple[str, dict[str, str]]]:
    """Label each group by its arm plus the params that differ between the groups of that arm."""
    out = {}
    by_arm: dict[str, list[tuple]] = {}
    for arm, key in groups:
        by_arm.setdefault(arm, []).append(key)
    for arm, keys in by_arm.items():
        dicts = [dict(k) for k in keys]
        varying = sorted(
            {k for d in dicts for k in d if len({e.get(k) for e in dicts}) > 1}, key=lambda k: (k != "name", k)
        )  # the preset first: it explains the rest
        used = set()
        for key, d in zip(keys, dicts):
            distinct = {k: d.get(k, "<unset>") for k in varying}
            shown = [f"{k}={v}" for k, v in list(distinct.items())[:MAX_LABEL_KEYS]]
            if len(distinct) > MAX_LABEL_KEYS:
                shown.append(f"+{len(distinct) - MAX_LABEL_KEYS} more")
            label = f"{arm} ({', '.join(shown)})" if shown else arm
            base, i = label, 2
            while label in used:
                label, i = f"{base} #{i}", i + 1
            used.add(label)
            out[(arm, key)] = (label, distinct)
    return out


def _closest(g: dict, candidates: list[dict]) -> tuple[dict | None, str]:
    """The reference row whose settings differ from ``g``'s in the fewest params (ties: none)."""

    def distance(c):
        keys = set(g["settings"]) | set(c["settings"])
        return sum(g["settings"].get(k) != c["settings"].get(k) for k in keys)

    dist = [distance(c) for c in candidates]
    best = min(dist)
    tied = [c for c, d in zip(candidates, dist) if d == best]
    if len(tied) > 1:
        return None, f"ambiguous: {len(tied)} reference rows equally close"
    return tied[0], ""


def _best(rows: list[dict], columns: tuple[str, ...], tasks: tuple[str, ...]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {c: set() for c in columns}
    for c in columns:
        if c not in tasks and c not in HIGHER_IS_BETTER:
            continue
        sign = 1.0 if (c in tasks or HIGHER_IS_BETTER[c]) else -1.0
        by = "selection" if c in tasks else "cells"  # a task is ranked on validation, never on its test score
        scored = [(i, sign * r[by][c].mean) for i, r in enumerate(rows) if r[by][c].n > 0 and r["cells"][c].n > 0]
        if len(scored) < 2:
            continue
        top = max(s for _, s in scored)
        winners = {i for i, s in scored if s >= top - 1e-12 * max(1.0, abs(top))}
        if len(winners) < len(scored):  # every row equal: nothing to mark
            out[c] = winners
    return out


# ------------------------------------------------------------------------------ small helpers
def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _text(v: Any) -> str:
    return str(v) if _present(v) else ""


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _seed(r: pd.Series) -> str:
    for k in (_tag(N.SEED), "params.seed"):
        if _present(r.get(k)):
            return str(r[k])
    return f"run:{r['run_id']}"  # no seed recorded: the run is its own replicate


def _validation_col(task: str, row: pd.Series) -> str:
    """The run's best validation score of ``task``: ``metrics.ft/<task>/best_<metric>``."""
    metric = row.get(f"params.{N.TASK_PARAM_PREFIX}{task}.metric")
    if not _present(metric):
        metric = row.get("params.finetune.metric")
    return f"metrics.{N.ft(task)}/best_{metric if _present(metric) else 'acc'}"


def _metric_col(column: str, tasks: tuple[str, ...]) -> str:
    return f"metrics.{N.ft_final(column)}" if column in tasks else f"metrics.{column}"


def _json_list(v: Any) -> list[str]:
    if not isinstance(v, str):
        return []
    try:
        out = json.loads(v)
    except json.JSONDecodeError:
        return []
    return [str(x) for x in out] if isinstance(out, list) else []


def _merge_lists(lists) -> list[str]:
    out: list[str] = []
    for lst in lists:
        out.extend(x for x in lst if x not in out)
    return out


# ------------------------------------------------------------------------------ plain-data form
def to_dict(tables: list[FactorTable]) -> list[dict]:
    """Tables -> JSON-ready lists and dicts (the inverse is :func:`from_dict`)."""

    def conv(obj):
        if isinstance(obj, (FactorTable, Row, Stat, Diff)):
            return {f.name: conv(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        if isinstance(obj, (tuple, list)):
            return [conv(v) for v in obj]
        return obj

    return [conv(t) for t in tables]


def from_dict(data: list[dict]) -> list[FactorTable]:
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    def row(d):
        return Row(
            **{
                **d,
                "cells": {
                    k: Stat(**{**s, "seeds": tup(s["seeds"]), "values": tup(s["values"])})
                    for k, s in d["cells"].items()
                },
                "diffs": {k: Diff(**x) for k, x in d["diffs"].items()},
                "scratch_diffs": {k: Diff(**x) for k, x in d.get("scratch_diffs", {}).items()},
                "best": tup(d["best"]),
                "selection": {
                    k: Stat(**{**s, "seeds": tup(s["seeds"]), "values": tup(s["values"])})
                    for k, s in d.get("selection", {}).items()
                },
                "run_ids": tup(d["run_ids"]),
                "failures": tup(d["failures"]),
            }
        )

    return [
        FactorTable(
            **{
                **t,
                "rows": tuple(row(r) for r in t["rows"]),
                **{k: tup(t[k]) for k in ("arms", "tasks", "columns", "parent_run_ids", "sweep_ids", "notes")},
            }
        )
        for t in data
    ]
