"""What a trial's MLflow record says it ran, settled before Ray starts: each stage's data file and the
normalisation statistics the stage will use.

:func:`settle_data` reads every manifest of a plan once (the demo corpus is built if it is the one used)
and returns the plan with each stage's ``mean`` / ``std`` set to the values its job will use: the
manifest's stored statistics for this front end, or statistics computed from the training rows (the same
computation the job makes, :func:`ssamba.train.data.resolve_stats`), or the configured ones when
``data.stats_from_manifest`` is off. The trial logs those as its params, so the params are what ran; each
stage's manifest is logged too (``files.<stage>.path``, ``.sha256``, ``.size``, ``.mtime``). A pretraining
manifest without the split pretraining reads, or a task without a split to select on, stops the sweep here.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ssamba.base.errors import ConfigError
from ssamba.config import ExperimentConfig
from ssamba.sweep.plan import SweepPlan, TaskSpec, TrialSpec


def file_facts(path: str | Path) -> dict[str, str | int]:
    """Absolute path, size, modification time (UTC, ISO) and SHA-256 of a file."""
    p = Path(path).resolve()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    st = p.stat()
    mtime = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    return {"path": str(p), "size": st.st_size, "mtime": mtime, "sha256": h.hexdigest()}


class _Stats:
    """Statistics per (manifest, rows, front end), each read or computed once."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.memo, self.paths = log, {}, {}

    def manifest_path(self, path: str) -> str:
        if path:
            return str(Path(path).resolve())
        if "" not in self.paths:
            from ssamba.data.demo import make_demo_corpus

            self.paths[""] = str(Path(make_demo_corpus(progress=False)).resolve())
        return self.paths[""]

    def splits(self, path: str) -> set[str]:
        from ssamba.data.manifest import read_manifest

        key = ("splits", self.manifest_path(path))
        if key not in self.memo:
            self.memo[key] = set(read_manifest(key[1]).df["split"].dropna())
        return self.memo[key]

    def __call__(self, cfg: ExperimentConfig, manifest: str, split: str, fold: int, clip) -> tuple[float, float]:
        if not cfg.data.stats_from_manifest:
            return clip.mean, clip.std
        from ssamba.data.manifest import read_manifest
        from ssamba.train.data import resolve_stats, select

        path = self.manifest_path(manifest)
        key = (path, split, fold, cfg.frontend.fbank_key(), cfg.data.cache_dir)
        if key not in self.memo:
            rows = select(read_manifest(path), split, fold, "train")
            mean, std, source = resolve_stats(rows, cfg.frontend, clip, True, cfg.data.cache_dir, self.log)
            self.memo[key] = (mean, std)
            self.log(f"statistics of {Path(path).name} ({source}): mean {mean:.4f} std {std:.4f}")
        return self.memo[key]


def check_selection_split(name: str, ft, manifest_path: str, splits: set[str]) -> None:
    """A task must have rows to select on that are not its test rows: a fold (cross-validation) or its
    validation split. Without one the sweep refuses, before Ray starts (selection never uses test)."""
    if ft.fold > 0 or (ft.eval_split and ft.eval_split in splits):
        return
    raise ConfigError(
        f"task {name}: manifest {manifest_path} has no {ft.eval_split or 'validation'!r} split (splits: "
        f"{sorted(splits)}), and selection (--tune, the summary's best) is made on validation, never on test. "
        f"Fix: give it a validation split (python -m ssamba.data prepare ... --speaker-split, or split it "
        f"yourself), set finetune.eval_split to the split to select on, or use folds (finetune.fold)"
    )


def check_pretrain_split(data, manifest_path: str, splits: set[str]) -> None:
    """Pretraining reads the rows of ``data.train_split`` (every row when it is empty): a manifest without that
    split would leave nothing to pretrain on, so the sweep refuses before Ray starts."""
    if not data.train_split or data.train_split in splits:
        return
    raise ConfigError(
        f"pretraining: manifest {manifest_path} has no {data.train_split!r} split (splits: {sorted(splits)}), "
        f"so data.train_split={data.train_split} leaves nothing to pretrain on. Fix: pretrain on every clip with "
        f"--set data.train_split= (empty), give the manifest splits (python -m ssamba.data prepare ... "
        f"--speaker-split 0.8,0.1,0.1), or set data.train_split to one of its splits"
    )


def settle_trial(spec: TrialSpec, stats: _Stats) -> TrialSpec:
    cfg = spec.config
    files = {}
    if spec.pretrained:  # (the from-scratch arm reads no pretraining data)
        check_pretrain_split(cfg.data, stats.manifest_path(cfg.data.manifest), stats.splits(cfg.data.manifest))
        mean, std = stats(cfg, cfg.data.manifest, cfg.data.train_split, 0, cfg.pretrain.clip_input())
        cfg = replace(cfg, pretrain=replace(cfg.pretrain, mean=mean, std=std))
        files["pretrain"] = file_facts(stats.manifest_path(cfg.data.manifest))
    tasks = []
    for t in spec.tasks:
        ft = t.config.finetune
        check_selection_split(t.name, ft, stats.manifest_path(ft.manifest), stats.splits(ft.manifest))
        mean, std = stats(t.config, ft.manifest, ft.train_split, ft.fold, ft.clip_input())
        tcfg = replace(t.config, pretrain=cfg.pretrain, finetune=replace(ft, mean=mean, std=std))
        tasks.append(TaskSpec(t.name, tcfg, t.dir))
        files[f"ft.{t.name}"] = file_facts(stats.manifest_path(ft.manifest))
    return replace(spec, config=cfg, tasks=tuple(tasks), files=files)


def settle_data(plan: SweepPlan, log: Callable[[str], None] = print) -> SweepPlan:
    """The plan with every cell's statistics and data files settled (see the module docstring)."""
    stats = _Stats(log)
    return replace(plan, cells=tuple(settle_trial(c, stats) for c in plan.cells))
