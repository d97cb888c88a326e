"""The Ray Train worker of a trial: its stages (shared pretraining, then each fine-tuning task).

This is Ray Train's one touch point in the training code (``ray.train`` context, report, DDP
preparation). Each stage runs the plain jobs of :mod:`ssamba.train.jobs`, which resume from their
``last.pt`` when a worker is restarted. Rank 0 logs metrics to the trial's MLflow run.

A pretraining is shared by every trial whose pretraining config is identical (same key): the
first computes it under a file lock in the sweep's storage and marks it ``DONE`` (written last,
atomically); the others wait on the lock, then reuse it. A killed computation leaves no ``DONE``,
so the next trial to take the lock resumes it from its ``last.pt``.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from ssamba.config import ExperimentConfig, from_flat, to_flat
from ssamba.train.jobs import run_finetune, run_pretrain


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (``flock``) held for the block; released if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def stage_cost(seconds: float, world: int, per_worker: float, samples: int) -> dict[str, float]:
    """Wall time, device-hours (workers x device share x hours) and throughput of a stage."""
    return {"wall_s": seconds, "device_hours": seconds * world * per_worker / 3600.0,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0}


def trial_worker(job: dict[str, Any]) -> None:
    """Ray Train entry (``train_loop_per_worker``). ``job`` is built by :mod:`ssamba.trial`."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: ExperimentConfig = from_flat(ExperimentConfig, job["config"])
    device = ray.train.torch.get_device() if job["use_gpu"] else torch.device("cpu")
    wrap = ray.train.torch.prepare_model if world > 1 else None
    tracker = None
    if rank == 0 and job.get("mlflow_uri"):
        from ssamba.tracking import Tracker

        tracker = Tracker(job["mlflow_uri"])
    run_id = job.get("run_id")
    log = (lambda msg: print(f"[{job['trial_name']}] {msg}", flush=True)) if rank == 0 else (lambda msg: None)

    def reporter(stage_offset: int):
        def report(metrics: dict[str, float], _ckpt_dir) -> None:
            step = int(metrics.get(next((k for k in metrics if k.endswith("/step")), ""), 0))
            if tracker is not None and run_id:
                tracker.log_metrics(run_id, metrics, step=stage_offset + step)
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        return report

    results: dict[str, Any] = {}
    # ---- stage 1: pretraining (shared by key)
    pre = job.get("pretrain")
    init = None
    if pre:
        pdir = Path(pre["dir"])
        done = pdir / "DONE"
        with ExitStack() as stack:
            if rank == 0:  # rank 0 holds the lock while every rank of this trial computes
                stack.enter_context(file_lock(pdir.parent / f"{pdir.name}.lock"))
            reuse = done.is_file()
            if world > 1:
                reuse = _broadcast(reuse)
            if reuse:
                log(f"reusing pretraining {pdir.name}")
                stored = json.loads(done.read_text()) if rank == 0 else {}
                # its cost was paid by the trial that computed it: not counted again here
                results["pretrain"] = {**{k: v for k, v in stored.items() if not k.startswith("cost/")},
                                       "reused": True}
            else:
                results["pretrain"] = _pretrain(cfg, pdir, world, job, device, wrap, reporter(0), log, rank)
                if tracker is not None and run_id:
                    tracker.log_metrics(run_id, {k: v for k, v in results["pretrain"].items() if k.startswith("cost/")},
                                        step=int(results["pretrain"].get("pretrain/step", 0)))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # best.pt (written by rank 0) exists before any rank starts fine-tuning
        init = pdir / "best.pt"
    # ---- stage 2: fine-tuning on each task
    for i, task in enumerate(job["tasks"]):
        tcfg = from_flat(ExperimentConfig, task["config"])
        t0 = time.perf_counter()
        res = run_finetune(tcfg, task["dir"], init=init, report=reporter(0), log=log, rank=rank, world=world,
                           device=device, wrap_model=wrap)
        cost = stage_cost(time.perf_counter() - t0, world, job["device_share"], res.samples)
        final = dict(res.last_eval)
        final.update({f"cost/ft_{task['name']}_{k}": v for k, v in cost.items()})
        results[f"ft/{task['name']}"] = final
        if tracker is not None and run_id:  # what the per-evaluation reports did not already log
            tracker.log_metrics(run_id, {k: v for k, v in final.items()
                                         if "/best_" in k or "/test_" in k or k.endswith("/final") or k.startswith("cost/")},
                                step=res.steps)
            if res.best_path is not None and job.get("log_checkpoints", True):
                tracker.log_artifact(run_id, res.best_path, f"checkpoints/ft_{task['name']}")
    if rank == 0:
        write_json_atomic(Path(job["result_file"]), results)


def _pretrain(cfg, pdir: Path, world: int, job: dict, device, wrap, report, log, rank: int) -> dict:
    t0 = time.perf_counter()
    res = run_pretrain(cfg, pdir, report=report, log=log, rank=rank, world=world, device=device, wrap_model=wrap)
    cost = stage_cost(time.perf_counter() - t0, world, job["device_share"], res.samples)
    out = dict(res.last_eval)
    out.update({f"cost/pretrain_{k}": v for k, v in cost.items()})
    out["reused"] = False
    if rank == 0:
        write_json_atomic(pdir / "DONE", {**out, "config": to_flat(cfg), "trial": job["trial_name"]})
        if job.get("keep_checkpoints", "best") != "all" and (pdir / "last.pt").is_file():
            (pdir / "last.pt").unlink()  # only needed to resume; the pretraining is complete
    return out


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
