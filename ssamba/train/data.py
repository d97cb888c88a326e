"""From an experiment config to data loaders: manifest (or demo corpus), statistics, cache, splits."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader

from ssamba.base.errors import ManifestError
from ssamba.config import ClipInput, ExperimentConfig, FrontendConfig
from ssamba.data.dataset import ClipDataset, collate
from ssamba.data.features import FeatureCache, compute_stats
from ssamba.data.manifest import Manifest, read_manifest
from ssamba.train.loop import EpochSampler


def load_manifest(path: str, *, progress: bool = True, log=print) -> Manifest:
    """A manifest file, or the demo corpus (built on first use) when ``path`` is empty."""
    if path:
        return read_manifest(path)
    from ssamba.data.demo import make_demo_corpus

    demo = make_demo_corpus(progress=progress)
    log(f"using the demo corpus {demo}")
    return read_manifest(demo)


def select(manifest: Manifest, split: str, fold: int = 0, role: str = "train") -> Manifest:
    """Rows for a role: by fold (``fold > 0``: that fold evaluates, the others train) or by split."""
    if fold > 0:
        folds = manifest.df["fold"]
        if folds.isna().all():
            raise ManifestError(f"fold {fold} requested but manifest {manifest.meta.get('dataset')!r} has no folds")
        mask = (folds == fold) if role != "train" else (folds != fold)
        return manifest.subset(mask.fillna(False).to_numpy(bool))
    if not split:
        return manifest
    return manifest.split(split)


def resolve_stats(
    manifest: Manifest, fe: FrontendConfig, clip: ClipInput, use_manifest: bool, cache_root: str | None, log=print
) -> tuple[float, float, str]:
    """``(mean, std, source)``: the manifest's stored stats for this front end, computed ones, or the stage's."""
    if not use_manifest:
        return clip.mean, clip.std, "config"
    stats = manifest.stats
    if stats and stats.get("frontend_key") == fe.fbank_key():
        return float(stats["mean"]), float(stats["std"]), "manifest"
    mean, std, n, _, failed = compute_stats(manifest, fe, cache_root=cache_root or None, progress=False)
    log(
        f"computed fbank statistics of {n} clips: mean {mean:.4f} std {std:.4f}"
        + (f" ({len(failed)} undecodable clips left out)" if failed else "")
        + "; store them with `python -m ssamba.data stats MANIFEST`"
    )
    return mean, std, "computed"


@dataclass
class Loaders:
    train: DataLoader
    eval: DataLoader | None
    clip: ClipInput  # the stage's input, with the statistics actually used
    label_vocab: list[str]
    stats_source: str


def make_loaders(
    manifest: Manifest,
    fe: FrontendConfig,
    clip: ClipInput,
    *,
    cfg: ExperimentConfig,
    train_split: str,
    eval_split: str,
    fold: int,
    batch_size: int,
    use_manifest_stats: bool,
    log=print,
    rank: int = 0,
    world: int = 1,
) -> Loaders:
    """Train and eval loaders over the manifest; the train loader's sampler is an :class:`EpochSampler`."""
    d = cfg.data
    train_m = select(manifest, train_split, fold, "train")
    eval_m = None
    if fold > 0 or (eval_split and eval_split in set(manifest.df["split"].dropna())):
        eval_m = select(manifest, eval_split, fold, "eval")
    if len(train_m) == 0:
        raise ManifestError(
            f"no training clips (split {train_split!r}, fold {fold}) in {manifest.meta.get('dataset')!r}"
        )
    mean, std, source = resolve_stats(train_m, fe, clip, use_manifest_stats, d.cache_dir, log)
    clip = replace(clip, mean=mean, std=std)
    cache = None
    if d.use_cache:
        cache, report = FeatureCache(fe, d.cache_dir or None).build(manifest, progress=False)
        if report.computed:
            log(
                f"feature cache: {report.computed} clips computed, {report.reused} reused, "
                f"{len(report.failed)} undecodable ({report.seconds:.1f} s)"
            )
    vocab = manifest.label_vocab
    train_ds = ClipDataset(
        train_m, fe, clip, train=True, cache=cache, label_vocab=vocab, strict=d.strict, seed=cfg.seed
    )
    sampler = EpochSampler(len(train_ds), cfg.seed, rank=rank, world=world, with_epoch=True)
    # persistent loader processes: no re-spawn at every epoch (the sampler carries the epoch to them)
    train = DataLoader(
        train_ds,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=d.num_workers,
        drop_last=len(sampler) > batch_size,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=d.num_workers > 0,
    )
    ev = None
    if eval_m is not None and len(eval_m):
        eval_ds = ClipDataset(
            eval_m, fe, clip.for_evaluation(), train=False, cache=cache, label_vocab=vocab, strict=d.strict
        )
        ev = DataLoader(eval_ds, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=d.num_workers)
    return Loaders(train, ev, clip, vocab, source)
