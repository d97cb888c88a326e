"""The study's data, prepared as a user would: each step a command line, run as shown and recorded.

From the published layouts under ``--data`` (``fsdd/``, ``esc10/``, ``speech_commands*/``), into ``OUT/data/``:

1. the importers (``python -m ssamba.data prepare``): FSDD re-split by speaker (``--speaker-split
   0.67,0.17,0.16``: 4 / 1 / 1 of its 6 speakers, none shared between splits); ESC-10 with its five folds,
   made splits by :func:`split_by_fold` (folds 1-3 train, 4 validation, 5 test: a fold keeps the clips cut from
   one recording together, and the test fold is never used to choose anything); Speech Commands with its own
   ``validation_list.txt`` / ``testing_list.txt``;
2. the feature cache of every task manifest (``python -m ssamba.data cache``) and the statistics of each
   training split (``python -m ssamba.data stats --split train``);
3. the pretraining manifest, :func:`pretraining_union`: the training splits of the three (pretraining reads
   ``train``) plus their validation splits (the pretraining's own evaluation, which picks its best checkpoint
   and drives its plateau schedule); never a test clip. Paths stay absolute; no audio is copied.

The steps that have no command of their own (2 of them) are ``python -c`` calls of the functions below, so
that every step is a command a person can run again.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssamba.base.errors import ConfigError, ManifestError

TASKS = ("fsdd", "esc10", "speechcommands")  # task names = recipe names (ssamba.config.presets.TASK_RECIPES)
FSDD_SPLIT = "0.67,0.17,0.16"  # shares of clips; with 6 speakers of 500 clips: 4 / 1 / 1 speakers
ESC_FOLD_SPLITS = {1: "train", 2: "train", 3: "train", 4: "validation", 5: "test"}
PRETRAIN_SPLITS = ("train", "validation")  # train: what pretraining learns from; validation: its evaluation
SETS = {"fsdd": ("fsdd",), "esc10": ("esc10",), "speechcommands": ("speech_commands_v0.01_mini", "speech_commands")}


@dataclass(frozen=True)
class Step:
    """One data step: its command line (``python`` stands for the interpreter running the study) and the
    file it writes."""

    name: str
    argv: tuple[str, ...]
    output: str

    def text(self) -> str:
        return shlex.join(["python", *self.argv])


def find_sets(data: str | Path) -> dict[str, str]:
    """Task name -> its dataset folder under ``data`` (as given, joined); a missing one is a ConfigError."""
    base = Path(data)
    found, missing = {}, []
    for task, names in SETS.items():
        hit = next((n for n in names if (base / n).is_dir()), None)
        if hit is None:
            missing.append(" or ".join(f"{n}/" for n in names))
        else:
            found[task] = str(Path(data) / hit)
    if missing:
        raise ConfigError(
            f"--data {data}: no {', '.join(missing)} in {base.resolve()}. Fix: point --data at the folder holding "
            f"fsdd/, esc10/ and speech_commands_v0.01_mini/ in their published layouts (e.g. ../shared/data)"
        )
    return found


def data_steps(data: str, out: str, workers: int = 2) -> list[Step]:
    """Every data step, in order (paths as given: relative ones are relative to where the study runs)."""
    sets = find_sets(data)
    d = str(Path(out) / "data")
    m = {t: f"{d}/{t}.parquet" for t in TASKS}
    folds = f"{d}/esc10-folds.parquet"
    union = f"{d}/pretrain.parquet"
    prep = ("-m", "ssamba.data", "prepare")
    steps = [
        Step(
            "prepare fsdd",
            (*prep, "fsdd", sets["fsdd"], "--out", m["fsdd"], "--speaker-split", FSDD_SPLIT, "--quiet"),
            m["fsdd"],
        ),
        Step("prepare esc10", (*prep, "esc10", sets["esc10"], "--out", folds, "--quiet"), folds),
        Step("esc10 folds as splits", _call("split_by_fold", _str(folds), _str(m["esc10"])), m["esc10"]),
        Step(
            "prepare speech_commands",
            (*prep, "speech_commands", sets["speechcommands"], "--out", m["speechcommands"], "--quiet"),
            m["speechcommands"],
        ),
    ]
    for t in TASKS:
        steps.append(
            Step(f"cache {t}", ("-m", "ssamba.data", "cache", m[t], "--workers", str(workers), "--quiet"), m[t])
        )
    for t in TASKS:
        steps.append(Step(f"stats {t}", ("-m", "ssamba.data", "stats", m[t], "--split", "train", "--quiet"), m[t]))
    parts = ", ".join(f"{t}={_str(m[t])}" for t in TASKS)
    steps.append(Step("pretraining union", _call("pretraining_union", _str(union), parts), union))
    steps.append(Step("stats pretrain", ("-m", "ssamba.data", "stats", union, "--split", "train", "--quiet"), union))
    return steps


def _str(text: str) -> str:
    return json.dumps(text)  # a Python string literal in double quotes: the shell quotes the code in single ones


def _call(function: str, *args: str) -> tuple[str, ...]:
    return ("-c", f"from ablations.study_data import {function}; {function}({', '.join(args)})")


def run_step(step: Step, log_file: Path, cwd: str | Path | None = None) -> dict[str, Any]:
    """Run ``step`` with this interpreter (output appended to ``log_file``); its record. A failure raises
    :class:`ManifestError` naming the command and the log."""
    t0 = time.time()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write(f"$ {step.text()}\n")
        log.flush()
        rc = subprocess.run([sys.executable, *step.argv], stdout=log, stderr=subprocess.STDOUT, cwd=cwd).returncode
    record = {"name": step.name, "command": step.text(), "seconds": round(time.time() - t0, 1), "rc": rc}
    if rc != 0:
        raise ManifestError(f"data step {step.name!r} failed (exit {rc}): {step.text()}; its output is in {log_file}")
    return record


def split_by_fold(src: str | os.PathLike, dst: str | os.PathLike, folds: dict[int, str] | None = None) -> Path:
    """``src`` (a manifest with folds, e.g. ESC-10's) written to ``dst`` with ``split`` set from each row's fold
    (default :data:`ESC_FOLD_SPLITS`). A fold without a split is a ManifestError naming it."""
    from ssamba.data.manifest import read_manifest

    folds = dict(folds or ESC_FOLD_SPLITS)
    m = read_manifest(src)
    present = sorted({int(f) for f in m.df["fold"].dropna()})
    unmapped = [f for f in present if f not in folds]
    if not present or unmapped or m.df["fold"].isna().any():
        raise ManifestError(
            f"{src}: split by fold needs a fold on every row, each one of {sorted(folds)}; folds present {present}, "
            f"unmapped {unmapped}, rows without a fold {int(m.df['fold'].isna().sum())}. Fix: prepare it with "
            f"the esc10/esc50 importer"
        )
    m.df["split"] = [folds[int(f)] for f in m.df["fold"]]
    m.meta.setdefault("notes", {})["split_by_fold"] = {str(k): v for k, v in sorted(folds.items())}
    return m.write(dst)


def pretraining_union(dst: str | os.PathLike, **parts: str | os.PathLike) -> Path:
    """The pretraining manifest: :data:`PRETRAIN_SPLITS` of the task manifests ``parts`` (name=path), as
    :func:`ssamba.data.manifest.union_manifests` joins them, written to ``dst``."""
    from ssamba.data.manifest import read_manifest, union_manifests

    if not parts:
        raise ManifestError("pretraining_union needs at least one part: name=path.parquet")
    union = union_manifests({k: read_manifest(v) for k, v in parts.items()}, PRETRAIN_SPLITS, dataset="study-union")
    return union.write(dst)


def manifest_facts(path: str | os.PathLike) -> dict[str, Any]:
    """What a manifest holds: clips per split (and per source for a union), classes, speakers per split and
    the stored statistics."""
    from ssamba.data.manifest import read_manifest

    m = read_manifest(path)
    df = m.df
    splits = df["split"].fillna("(none)")
    facts: dict[str, Any] = {
        "path": str(path),
        "clips": len(df),
        "classes": len(m.label_vocab),
        "splits": {str(k): int(v) for k, v in splits.value_counts().sort_index().items()},
        "speakers": {str(k): int(v) for k, v in df.groupby(splits)["speaker"].nunique().sort_index().items()},
    }
    if "source" in df.columns:
        facts["sources"] = {
            str(src): {str(k): int(v) for k, v in part["split"].fillna("(none)").value_counts().sort_index().items()}
            for src, part in df.groupby("source")
        }
    if m.stats:
        facts["stats"] = {k: m.stats[k] for k in ("mean", "std", "n_clips") if k in m.stats}
    return facts
