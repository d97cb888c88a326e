"""GPU pretraining throughput, and whether the data path keeps the GPU busy.

``python -m ssamba.bench --pretrain`` runs MSPM pretraining steps of a preset's model (default
``paper-tiny``: 512 tokens, bf16 autocast) on a manifest (default: the demo corpus) through the real
loaders (feature cache, augmentation, ``--num-workers`` processes) and reports, after warm-up:

- samples/s end to end;
- the host's wait for each batch from the loader (``data wait``): zero when the workers keep ahead;
- the GPU's idle gap between consecutive steps (CUDA events at the end of one step's work and the
  start of the next one's): the time the GPU waited for the host (data, launches, the loss read-back);
- the same steps on one batch kept on the GPU (no loader): the ceiling the data path is judged against.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ssamba.bench.encoder import environment


def run_pretrain_bench(
    preset_name: str = "paper-tiny",
    manifest: str = "",
    steps: int = 60,
    warmup: int = 10,
    batch_size: int | None = None,
    num_workers: int = 8,
    out: Path | None = None,
) -> dict:
    from ssamba.config.presets import preset
    from ssamba.model.audio_model import AudioModel, Geometry
    from ssamba.train.data import load_manifest, make_loaders
    from ssamba.train.tasks import PretrainTask

    device = torch.device("cuda")
    cfg = preset(preset_name)
    p = replace(cfg.pretrain, batch_size=batch_size or cfg.pretrain.batch_size)
    cfg = replace(
        cfg,
        pretrain=p,
        data=replace(cfg.data, manifest=manifest, num_workers=num_workers),
        model=replace(cfg.model, scan_backend="auto"),
    )
    fe = cfg.frontend
    loaders = make_loaders(
        load_manifest(cfg.data.manifest),
        fe,
        p.clip_input(),
        cfg=cfg,
        train_split=cfg.data.train_split,
        eval_split="",
        fold=0,
        batch_size=p.batch_size,
        use_manifest_stats=cfg.data.stats_from_manifest,
    )
    model = AudioModel(cfg.model, Geometry(fe.num_mel_bins, p.target_length), num_classes=0, pretrain_heads=True).to(
        device
    )
    task = PretrainTask(p, model.grid, cfg.seed)
    opt = task.optimizer(model)
    model.train()
    tokens = model.grid[0] * model.grid[1]

    def step(batch: dict, i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = task.loss(model, batch, i, 0)
        loss.backward()
        bool(torch.isfinite(loss.detach()))  # as the training loop: one read-back, after the backward is queued
        opt.step()

    def batches():
        while True:
            for b in loaders.train:
                if b["fbank"].shape[0] == p.batch_size:
                    yield b

    it = batches()
    waits, gaps, n_samples = [], [], 0
    prev_end = None
    t_start = None
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t_start, n_samples, waits, gaps = time.perf_counter(), 0, [], []
        t0 = time.perf_counter()
        batch = next(it)
        waits.append(time.perf_counter() - t0)
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        step(batch, i)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        if prev_end is not None and i > warmup:
            start.synchronize()
            gaps.append(prev_end.elapsed_time(start) / 1e3)
        prev_end = end
        n_samples += p.batch_size
    torch.cuda.synchronize()
    wall = time.perf_counter() - t_start
    # the ceiling: the same steps on one batch that stays on the GPU
    fixed = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(it).items()}
    for i in range(3):
        step(fixed, i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps // 2):
        step(fixed, i)
    torch.cuda.synchronize()
    gpu_only = (time.perf_counter() - t0) / (steps // 2)
    res = {
        "meta": environment(device),
        "preset": preset_name,
        "tokens": tokens,
        "batch": p.batch_size,
        "num_workers": num_workers,
        "steps": steps,
        "samples_per_s": n_samples / wall,
        "step_s": wall / steps,
        "step_s_fixed_batch": gpu_only,
        "samples_per_s_fixed_batch": p.batch_size / gpu_only,
        "data_wait_s_mean": statistics.fmean(waits),
        "data_wait_s_max": max(waits),
        "gpu_gap_s_mean": statistics.fmean(gaps) if gaps else 0.0,
        "gpu_gap_s_max": max(gaps) if gaps else 0.0,
        "gpu_idle_fraction": sum(gaps) / wall if gaps else 0.0,
        "steps_with_data_wait_over_1ms": sum(w > 1e-3 for w in waits),
    }
    lines = [
        f"Pretraining throughput, {res['meta'].get('device', '?')}, {preset_name} ({tokens} tokens), bf16, "
        f"batch {p.batch_size}, {num_workers} loader workers, {steps} steps after {warmup} warm-up",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| samples/s (real loader) | {res['samples_per_s']:.1f} |",
        f"| samples/s (one batch kept on the GPU) | {res['samples_per_s_fixed_batch']:.1f} |",
        f"| step time, real loader / fixed batch (ms) | {res['step_s'] * 1e3:.1f} / {gpu_only * 1e3:.1f} |",
        f"| host wait for a batch, mean / max (ms) | {res['data_wait_s_mean'] * 1e3:.2f} / {res['data_wait_s_max'] * 1e3:.2f} |",
        f"| steps whose batch took > 1 ms to arrive | {res['steps_with_data_wait_over_1ms']} of {steps} |",
        f"| GPU idle gap between steps, mean / max (ms) | {res['gpu_gap_s_mean'] * 1e3:.2f} / {res['gpu_gap_s_max'] * 1e3:.2f} |",
        f"| GPU idle fraction of wall time | {res['gpu_idle_fraction'] * 100:.1f}% |",
    ]
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pretrain_throughput.json").write_text(json.dumps(res, indent=1))
        (out / "pretrain_throughput.md").write_text(table)
    return res
