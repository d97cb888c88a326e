"""The two jobs, pretraining and fine-tuning, as plain functions of an experiment config (no Ray).

The Ray Train worker and the command lines call these; each returns the loop's :class:`FitResult`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ssamba.base import names as N
from ssamba.base.errors import ConfigError
from ssamba.config import ExperimentConfig, ModelConfig, from_flat, to_flat
from ssamba.model.audio_model import AudioModel, Geometry
from ssamba.model.checkpoints import grid_of, is_ours, load_checkpoint, read_checkpoint, safe_load, transfer_encoder
from ssamba.train.data import load_manifest, make_loaders, select
from ssamba.train.loop import FitResult, LoopSettings, fit, pick_device, seed_everything, tap_skipped
from ssamba.train.tasks import FinetuneTask, PretrainTask

Report = Callable[[dict[str, float], Path | None], None]
OnResume = Callable[[int], None]
OnStart = Callable[[dict], None]  # called with the flat config the stage runs with, before its first step


def _threads() -> None:
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))  # Ray sets OMP_NUM_THREADS per task; a reused worker keeps its first


def resolve_runtime(cfg: ExperimentConfig, device: torch.device, log=print) -> ExperimentConfig:
    """``cfg`` with the settings that depend on the device resolved (``data.num_workers=-1``: auto)."""
    n = cfg.data.resolved_num_workers(device.type)
    if n != cfg.data.num_workers:
        log(f"data.num_workers auto -> {n} loader processes ({device.type})")
        cfg = replace(cfg, data=replace(cfg.data, num_workers=n))
    return cfg


def stage_record(cfg: ExperimentConfig, section: str, clip) -> dict:
    """What a checkpoint stores of its config: the flat config with the stage's statistics replaced by the
    ones the run used (the manifest's, when they came from there), and the front end with the stage's input."""
    used = replace(cfg, **{section: replace(getattr(cfg, section), mean=clip.mean, std=clip.std)})
    fe = {**to_flat(cfg.frontend), "target_length": clip.target_length, "mean": clip.mean, "std": clip.std}
    return {"config": to_flat(used), "frontend": fe}


def _fit_stage(
    model, task, loaders, settings, meta, device, out_dir, report, log, is_main, on_resume, on_start, wrap_model
) -> FitResult:
    """A stage's common end: announce its flat config (``on_start``), place and wrap the model, train."""
    if on_start is not None:
        on_start(meta["config"])
    model.to(device)
    if wrap_model is not None:
        model = wrap_model(model)
    return fit(
        model,
        task,
        loaders.train,
        loaders.eval,
        settings,
        device=device,
        out_dir=out_dir,
        checkpoint_meta=meta,
        report=report,
        log=log,
        is_main=is_main,
        on_resume=on_resume,
    )


def run_pretrain(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    report: Report | None = None,
    log=print,
    rank: int = 0,
    world: int = 1,
    device=None,
    wrap_model: Callable | None = None,
    on_resume: OnResume | None = None,
    fault_nan_at_step: int = 0,
    on_start: OnStart | None = None,
    stats_settled: bool = False,
) -> FitResult:
    """MSPM pretraining on ``cfg.data.manifest`` (the demo corpus when empty); ``best.pt`` in ``out_dir``.

    ``on_start(config)``: the flat config the stage runs with (statistics and runtime settings resolved, as
    its checkpoints store it), before training starts.
    ``fault_nan_at_step`` (a testing hook, never a config value): > 0 makes that optimiser step's loss NaN.
    ``stats_settled``: the stage's ``mean``/``std`` were already resolved by the caller (a sweep settles them
    before Ray starts, ``ssamba.sweep.records``): they are used as they are, with no manifest read or
    computation again."""
    _threads()
    seed_everything(cfg.seed)
    device = device or pick_device(cfg.device)
    cfg = resolve_runtime(cfg, device, log)
    cfg.check_pretraining()
    is_main = rank == 0
    p = cfg.pretrain
    manifest = load_manifest(cfg.data.manifest, log=log)
    fe = cfg.frontend
    loaders = make_loaders(
        manifest,
        fe,
        p.clip_input(),
        cfg=cfg,
        train_split=cfg.data.train_split,
        eval_split=cfg.data.eval_split,
        fold=0,
        batch_size=p.batch_size,
        use_manifest_stats=cfg.data.stats_from_manifest and not stats_settled,
        log=log,
        rank=rank,
        world=world,
    )
    model = AudioModel(cfg.model, Geometry(fe.num_mel_bins, p.target_length), num_classes=0, pretrain_heads=True)
    task = PretrainTask(p, model.grid, cfg.seed)
    settings = LoopSettings(
        epochs=p.epochs,
        max_steps=p.max_steps,
        grad_accum=p.grad_accum,
        clip_grad=p.clip_grad,
        amp=p.amp,
        eval_every=p.plateau_every,
        fault_nan_at_step=fault_nan_at_step,
    )
    log(
        f"[pretrain] {cfg.model.arch} D={cfg.model.embed_dim} depth={cfg.model.depth} grid {model.grid}, "
        f"{sum(x.numel() for x in model.parameters()):,} parameters, {len(loaders.train.dataset)} clips, "
        f"masks {p.mask_count} ({p.mask_strategy}), device {device} x {world} worker(s), scan {getattr(model.v, 'backend', '-')}"
    )
    meta = stage_record(cfg, "pretrain", loaders.clip)
    return _fit_stage(
        model, task, loaders, settings, meta, device, out_dir, report, log, is_main, on_resume, on_start, wrap_model
    )


def finetune_model_config(cfg: ExperimentConfig, init_payload: dict | None) -> ModelConfig:
    """The encoder of the checkpoint (if any) at the fine-tuning stride, with this run's head/runtime settings."""
    ft = cfg.finetune
    base = cfg.model
    if init_payload is not None:
        base = from_flat(ModelConfig, init_payload["model"])
        base = replace(
            base, pooling=cfg.model.pooling, drop_path=cfg.model.drop_path, scan_backend=cfg.model.scan_backend
        )
    return replace(base, fstride=ft.fstride, tstride=ft.tstride)


def load_init(init: str | os.PathLike, log=print, layer_pairing: bool = True) -> dict:
    """Pretrained weights as our checkpoint payload: our ``.pt``, or an official ``.pth`` imported strictly
    with ``layer_pairing`` (``model.layer_pairing``: the keys cannot tell whether it was trained with it)."""
    payload = safe_load(init, "pretrained weights")
    if is_ours(payload):
        return read_checkpoint(init)
    from ssamba.model.official import import_official

    model, info = import_official(payload, layer_pairing=layer_pairing)
    log(
        f"imported official {info['form']} checkpoint {init}: {model.cfg.arch} D={model.cfg.embed_dim} "
        f"depth={model.cfg.depth} norm={model.cfg.norm}, layer pairing "
        f"{'on' if model.cfg.layer_pairing else 'off'} (model.layer_pairing); "
        f"dropped: {', '.join(info['dropped']) or 'nothing'}"
    )
    return {
        "model": to_flat(model.cfg),
        "geometry": {"input_fdim": model.geom.input_fdim, "input_tdim": model.geom.input_tdim},
        "state_dict": model.state_dict(),
        "pretrain_heads": info["form"] == "pretraining",
        "num_classes": info["num_classes"],
    }


def run_finetune(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    init: str | os.PathLike | None = None,
    report: Report | None = None,
    log=print,
    rank: int = 0,
    world: int = 1,
    device=None,
    wrap_model: Callable | None = None,
    on_resume: OnResume | None = None,
    on_start: OnStart | None = None,
    stats_settled: bool = False,
) -> FitResult:
    """Fine-tune on ``cfg.finetune`` from ``init`` (our checkpoint) or from scratch (``init=None``).

    After training, the best checkpoint is evaluated on the test split (when the manifest has one);
    those metrics are added as ``ft/<task>/test_<m>``. ``on_start``, ``stats_settled``: as in :func:`run_pretrain`.
    """
    _threads()
    seed_everything(cfg.seed)
    device = device or pick_device(cfg.device)
    cfg = resolve_runtime(cfg, device, log)
    is_main = rank == 0
    ft = cfg.finetune
    manifest = load_manifest(ft.manifest, log=log)
    fe = cfg.frontend
    loaders = make_loaders(
        manifest,
        fe,
        ft.clip_input(),
        cfg=cfg,
        train_split=ft.train_split,
        eval_split=ft.eval_split,
        fold=ft.fold,
        batch_size=ft.batch_size,
        use_manifest_stats=cfg.data.stats_from_manifest and not stats_settled,
        log=log,
        rank=rank,
        world=world,
    )
    if cfg.model.pooling == "per_second":
        raise ConfigError(
            "model.pooling=per_second gives one prediction per second (logits (batch, 60, classes)); it is for "
            "inference with official checkpoints (ssamba.model.official.load_official), not for fine-tuning"
        )
    payload = load_init(init, log, layer_pairing=cfg.model.layer_pairing) if init else None
    mcfg = finetune_model_config(cfg, payload)
    if payload is not None and payload.get("pretrain_heads") is False and payload.get("num_classes"):
        log(f"[ft/{ft.task}] starting from a fine-tuned checkpoint: its classifier is replaced")
    model = AudioModel(
        mcfg, Geometry(fe.num_mel_bins, ft.target_length), num_classes=len(loaders.label_vocab), pretrain_heads=False
    )
    if payload is not None:
        dropped = transfer_encoder(payload["state_dict"], grid_of(payload), model)
        log(
            f"[ft/{ft.task}] encoder from {init} (grid {grid_of(payload)} -> {model.grid}); dropped: "
            + (", ".join(dropped) or "nothing")
        )
    task = FinetuneTask(ft, len(loaders.label_vocab))
    settings = LoopSettings(
        epochs=ft.epochs,
        max_steps=ft.max_steps,
        grad_accum=ft.grad_accum,
        clip_grad=ft.clip_grad,
        amp=ft.amp,
        eval_every=0,
    )
    meta = {**stage_record(cfg, "finetune", loaders.clip), "label_vocab": loaders.label_vocab}
    res = _fit_stage(
        model, task, loaders, settings, meta, device, out_dir, report, log, is_main, on_resume, on_start, wrap_model
    )
    test = _test_metrics(cfg, manifest, loaders, res, task, device, log) if is_main else {}
    final = dict(res.last_eval)
    final.update(
        {
            f"{task.prefix}/best_{k.split('/')[-1]}": v
            for k, v in res.best_metrics.items()
            if k.split("/")[-1] in ("acc", "map", "loss")
        }
    )
    final.update(test)
    headline = test.get(f"{task.prefix}/test_{ft.metric}", final.get(f"{task.prefix}/best_{ft.metric}"))
    if headline is not None:
        final[f"{task.prefix}/{N.FINAL}"] = headline  # the task's headline number (test if any, else best validation)
    res.last_eval = final
    return res


def _test_metrics(cfg, manifest, loaders, res, task, device, log) -> dict[str, float]:
    ft = cfg.finetune
    if ft.fold > 0 or not ft.test_split or ft.test_split not in set(manifest.df["split"].dropna()):
        return {}
    if res.best_path is None:
        return {}
    from torch.utils.data import DataLoader

    from ssamba.data.dataset import ClipDataset, collate

    test_m = select(manifest, ft.test_split)
    ds = ClipDataset(
        test_m,
        cfg.frontend,
        loaders.clip.for_evaluation(),
        cache=loaders.train.dataset.cache,
        label_vocab=loaders.label_vocab,
        strict=cfg.data.strict,
    )
    loader = DataLoader(ds, batch_size=ft.batch_size, collate_fn=collate, num_workers=cfg.data.num_workers)
    best, _ = load_checkpoint(res.best_path)
    best.to(device).eval()
    import contextlib

    metrics = task.evaluate(best, tap_skipped(loader, res.skipped), device, contextlib.nullcontext)
    out = {f"{task.prefix}/test_{k}": v for k, v in metrics.items()}
    log(f"[{task.prefix}] test: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in out.items()))
    return out
