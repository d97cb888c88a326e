"""What a study ran on and how it used it: the cards, and samples taken in a background thread.

- :func:`cards`: the GPUs as nvidia-smi names them (else as torch does), or the CPU when there is no GPU.
- :class:`UsageSampler`: every ``every_s`` seconds, one CSV row per GPU (time, index, utilisation: the percent
  of the sample period in which a kernel ran, as nvidia-smi reports it; memory used in MiB; the ids of the
  processes holding a compute context on it, one per trial worker, which nvidia-smi may not see inside a
  container), and one row of the trial workers alive (their count and ids, from a ``workers`` callable: the
  study asks Ray). Without nvidia-smi it samples no GPU and says why; the workers are sampled all the same.
- :func:`usage_summary`: the GPU samples of a time window -> per GPU and overall numbers;
  :func:`held_time`: the worker samples of a window -> worker-seconds held, mean and most at once.

nvidia-smi is the one source of GPU numbers (it is installed wherever the NVIDIA driver is); nothing here
imports CUDA or Ray.
"""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

NVIDIA_SMI = "nvidia-smi"
SAMPLE_FIELDS = ("time", "gpu", "utilization", "memory_used_mib", "pids")
WORKER_FIELDS = ("time", "workers", "pids")


def _smi(*query: str, timeout: float = 20.0) -> list[list[str]] | None:
    """Rows of ``nvidia-smi QUERY --format=csv,noheader,nounits`` split on commas; None without nvidia-smi
    or when it fails (no driver, no device)."""
    exe = shutil.which(NVIDIA_SMI)
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, *query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def _number(text: str) -> float | None:
    """nvidia-smi's value, or None for ``[N/A]``, ``[Not Supported]`` and the like."""
    try:
        return float(text)
    except ValueError:
        return None


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``) and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def cards() -> dict[str, Any]:
    """``{"gpus": [{"index", "name", "memory_mib", "uuid"}], "source", "cpu", "text"}``: what the study ran
    on, from nvidia-smi, else torch (a CUDA device nvidia-smi does not list), else the CPU alone."""
    info: dict[str, Any] = {"gpus": [], "source": "none", "cpu": cpu_name()}
    rows = _smi("--query-gpu=index,uuid,name,memory.total,driver_version")
    if rows:
        info["source"] = "nvidia-smi"
        info["driver"] = rows[0][4] if len(rows[0]) > 4 else ""
        info["gpus"] = [
            {"index": int(r[0]), "uuid": r[1], "name": r[2], "memory_mib": _number(r[3])} for r in rows if len(r) >= 4
        ]
    else:
        try:
            import torch

            if torch.cuda.is_available():
                info["source"] = "torch"
                info["gpus"] = [
                    {
                        "index": i,
                        "uuid": "",
                        "name": torch.cuda.get_device_name(i),
                        "memory_mib": torch.cuda.get_device_properties(i).total_memory / 2**20,
                    }
                    for i in range(torch.cuda.device_count())
                ]
        except ImportError:
            pass
    info["text"] = describe_cards(info)
    return info


def describe_cards(info: dict[str, Any]) -> str:
    """``8 x NVIDIA H100 80GB HBM3`` (names grouped), or ``CPU only: <model>, N cores``."""
    gpus = info.get("gpus") or []
    if not gpus:
        return f"CPU only (no GPU: nvidia-smi and torch found none): {info.get('cpu', 'unknown CPU')}"
    counts: dict[str, int] = {}
    for g in gpus:
        counts[g["name"]] = counts.get(g["name"], 0) + 1
    return ", ".join(f"{n} x {name}" for name, n in counts.items())


class UsageSampler:
    """Every ``every_s`` seconds until stopped: each GPU into ``path`` (CSV, :data:`SAMPLE_FIELDS`) and, when
    ``workers`` is given (a callable returning the process ids of the trial workers alive), one row into
    ``workers_path`` (:data:`WORKER_FIELDS`). A probe that raises skips that sample (``errors`` counts them).

    ``available`` is False (and ``note`` says why) where nvidia-smi lists no GPU: no GPU is sampled then."""

    def __init__(
        self,
        path: str | Path,
        every_s: float = 5.0,
        workers: Callable[[], list[int]] | None = None,
        workers_path: str | Path | None = None,
    ):
        self.path, self.every_s = Path(path), float(every_s)
        self.workers = workers
        self.workers_path = Path(workers_path) if workers_path else self.path.with_name("workers.csv")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.last_error = ""  # the last probe's failure, if any
        self.available = bool(_smi("--query-gpu=index"))
        self.note = (
            ""
            if self.available
            else "no GPU: nvidia-smi is not installed or lists no GPU, so no utilisation was sampled"
        )

    def sample(self) -> list[dict[str, Any]]:
        """One row per GPU now (empty when nvidia-smi fails)."""
        gpus = _smi("--query-gpu=index,uuid,utilization.gpu,memory.used")
        if not gpus:
            self.errors += 1
            return []
        apps = _smi("--query-compute-apps=gpu_uuid,pid,used_memory") or []
        pids: dict[str, list[str]] = {}
        for a in apps:
            if len(a) >= 2 and a[1].isdigit():
                pids.setdefault(a[0], []).append(a[1])
        now = time.time()
        return [
            {
                "time": round(now, 3),
                "gpu": int(g[0]),
                "utilization": _number(g[2]),
                "memory_used_mib": _number(g[3]),
                "pids": " ".join(pids.get(g[1], [])),
            }
            for g in gpus
            if len(g) >= 4
        ]

    def sample_workers(self) -> dict[str, Any] | None:
        try:
            pids = sorted(int(p) for p in self.workers())
        except Exception as exc:  # noqa: BLE001 - a probe of another system (Ray): a missed sample, never a stop
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            return None
        return {"time": round(time.time(), 3), "workers": len(pids), "pids": " ".join(map(str, pids))}

    def _run(self) -> None:
        with contextlib.ExitStack() as files:
            gpu_w = _writer(files, self.path, SAMPLE_FIELDS) if self.available else None
            work_w = _writer(files, self.workers_path, WORKER_FIELDS) if self.workers else None
            while not self._stop.is_set():
                if gpu_w is not None:
                    gpu_w[1].writerows(self.sample())
                    gpu_w[0].flush()
                row = self.sample_workers() if work_w is not None else None
                if row is not None:
                    work_w[1].writerow(row)
                    work_w[0].flush()
                self._stop.wait(self.every_s)

    def start(self) -> UsageSampler:
        if (self.available or self.workers) and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="usage-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def _writer(files: contextlib.ExitStack, path: Path, fields: tuple[str, ...]):
    """(file, csv writer) appending to ``path`` (a header when the file is new)."""
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    f = files.enter_context(open(path, "a", newline=""))
    w = csv.DictWriter(f, fieldnames=fields)
    if new:
        w.writeheader()
    return f, w


def read_workers(path: str | Path) -> list[dict[str, Any]]:
    """The worker rows a :class:`UsageSampler` wrote (none when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {"time": float(r["time"]), "workers": int(r["workers"]), "pids": r["pids"].split()}
            for r in csv.DictReader(f)
        ]


def held_time(rows: list[dict[str, Any]], t0: float, t1: float, every_s: float) -> dict[str, Any]:
    """Worker samples of ``[t0, t1]`` -> ``{"worker_s", "mean", "most", "distinct", "samples"}``: each sample's
    count held until the next sample (at most 3 sample periods: a longer gap is a missed sample, not a hold)
    and the last until ``t1``; the mean number of workers at once over the window, the most, and how many
    distinct worker processes were seen (one per trial attempt)."""
    inside = [r for r in rows if t0 <= r["time"] <= t1]
    worker_s = 0.0
    for r, nxt in zip(inside, [*inside[1:], None]):
        end = nxt["time"] if nxt is not None else t1
        worker_s += r["workers"] * min(end - r["time"], 3 * every_s)
    span = t1 - t0
    return {
        "samples": len(inside),
        "worker_s": worker_s,
        "mean": worker_s / span if span > 0 else 0.0,
        "most": max((r["workers"] for r in inside), default=0),
        "distinct": len({p for r in inside for p in r["pids"]}),
    }


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The rows a :class:`UsageSampler` wrote (none when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {
                "time": float(r["time"]),
                "gpu": int(r["gpu"]),
                "utilization": _number(r["utilization"]),
                "memory_used_mib": _number(r["memory_used_mib"]),
                "pids": r["pids"].split(),
            }
            for r in csv.DictReader(f)
        ]


def usage_summary(samples: list[dict[str, Any]], t0: float | None = None, t1: float | None = None) -> dict[str, Any]:
    """The samples of ``[t0, t1]`` -> ``{"samples", "gpus": {index: {...}}, "mean_utilization"}``.

    Per GPU: samples, mean utilisation (%), the share of samples at 0 % (no kernel ran in the period), peak
    memory (MiB), the distinct compute processes seen (one per trial worker that used the GPU; 0 when
    nvidia-smi shows none, e.g. inside a container), and the mean and largest number of processes at once."""
    rows = [s for s in samples if (t0 is None or s["time"] >= t0) and (t1 is None or s["time"] <= t1)]
    per: dict[int, dict[str, Any]] = {}
    for s in rows:
        per.setdefault(s["gpu"], []).append(s)
    gpus: dict[str, dict[str, Any]] = {}
    for gpu, ss in sorted(per.items()):
        util = [s["utilization"] for s in ss if s["utilization"] is not None]
        mem = [s["memory_used_mib"] for s in ss if s["memory_used_mib"] is not None]
        procs = [len(s["pids"]) for s in ss]
        gpus[str(gpu)] = {
            "samples": len(ss),
            "mean_utilization": sum(util) / len(util) if util else None,
            "idle_share": sum(u == 0 for u in util) / len(util) if util else None,
            "peak_memory_mib": max(mem) if mem else None,
            "processes_seen": len({p for s in ss for p in s["pids"]}),
            "mean_processes": sum(procs) / len(procs) if procs else 0.0,
            "max_processes": max(procs) if procs else 0,
        }
    means = [g["mean_utilization"] for g in gpus.values() if g["mean_utilization"] is not None]
    return {
        "samples": len(rows),
        "gpus": gpus,
        "mean_utilization": sum(means) / len(means) if means else None,
        "window": [t0, t1],
    }
