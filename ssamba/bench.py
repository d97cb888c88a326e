"""Encoder efficiency benchmark (docs/model.md section 8): latency, throughput and peak memory vs tokens.

``python -m ssamba.bench`` times a ``no_grad`` encoder forward of every model on one card, in one
process: latency at batch 1 (CUDA events, warm-up, median), throughput at the largest batch that fits
(doubling then bisection on out-of-memory), peak ``max_memory_allocated`` at batch 1 (weights
included), for growing token counts until out of memory; plus one MSPM training step per model.
``--paper-protocol`` measures as the paper did (fp32, batch 2, no warm-up, mean of 5 runs).
Writes ``results[_paper].json``, ``table[_paper].md`` and log-log plots to ``--out``, prints the table
and a headline in the paper's wording. Results are saved after every point; ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ssamba.config import SCAN_BACKENDS, ModelConfig, model_preset
from ssamba.files import write_text_atomic

DEFAULT_TOKENS = [512, 1024, 2048, 4096, 8192, 16384, 22000, 32768, 65536]
QUICK_TOKENS = [512, 2048, 8192, 22000]
SIZES = ("tiny", "small", "base")
ALL_MODELS = ([f"ssamba-{s}-{v}" for s in SIZES for v in ("bi", "uni")]
              + [f"ssast-{s}-{v}" for s in SIZES for v in ("mat", "fused")])
PAPER_CLAIM = "Paper: 92.7% faster and 95.4% more memory-efficient than SSAST-tiny at ~22k tokens (L40, fp32, batch 2)"
MiB = 2 ** 20
OOM = torch.cuda.OutOfMemoryError


@dataclass
class Settings:
    device: str = "cuda"
    dtypes: tuple = ("fp32", "bf16")
    tokens: tuple = tuple(DEFAULT_TOKENS)
    warmup: int = 3
    repeats: int = 10
    reduce: str = "median"  # median | mean (paper)
    batch: int = 1  # latency / memory batch (paper: 2)
    max_batch: int = 64
    throughput: bool = True
    train: bool = True
    train_tokens: int = 512
    train_batch: int = 8
    scan_backend: str = "auto"
    protocol: str = "default"  # default | paper
    graphs: bool = False  # batch-1 latency/memory from a replayed CUDA graph


def model_config(name: str, scan_backend: str = "auto") -> tuple[str, ModelConfig]:
    """``ssamba-{size}-{bi|uni}`` / ``ssast-{size}-{mat|fused}`` -> (canonical name, config)."""
    parts = name.strip().lower().split("-")
    if len(parts) != 3:
        raise ValueError(f"model name {name!r}: expected e.g. ssamba-tiny-bi or ssast-tiny-fused")
    arch, size, var = parts
    var = {"materialized": "mat", "materialised": "mat", "bidirectional": "bi", "unidirectional": "uni"}.get(var, var)
    if arch == "ssamba" and var in ("bi", "uni"):
        cfg = replace(model_preset(size, "ssamba"), scan_backend=scan_backend)
        if var == "uni":
            cfg = replace(cfg, bimamba=False, layer_pairing=False)
    elif arch == "ssast" and var in ("mat", "fused"):
        cfg = replace(model_preset(size, "ssast"), attention="materialized" if var == "mat" else "fused")
    else:
        raise ValueError(f"model name {name!r}: ssamba takes bi|uni, ssast takes mat|fused")
    return f"{arch}-{size}-{var}", cfg


def build_model(name: str, tokens: int, device: torch.device, train: bool, scan_backend: str = "auto"):
    """An ``AudioModel`` whose position embedding fits ``tokens`` patches (8 x tokens/8), on ``device``."""
    from ssamba.model.audio_model import AudioModel, Geometry

    _, cfg = model_config(name, scan_backend)
    with torch.device(device):
        model = AudioModel(cfg, Geometry(128, frames(tokens)), num_classes=0, pretrain_heads=train)
    return model.train(train)


def frames(tokens: int) -> int:
    return 16 * (tokens // 8)


def parse_tokens(text: str) -> list[int]:
    """``512,1024`` or ``512:22528:256`` (inclusive range); each rounded up to a multiple of 8 (8 mel patches)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if ":" in part:
            a, b, *s = (int(x) for x in part.split(":"))
            out += list(range(a, b + 1, s[0] if s else 256))
        else:
            out.append(int(part))
    fixed = sorted({-(-n // 8) * 8 for n in out if n > 0})
    if not fixed:
        raise ValueError(f"no token counts in {text!r}")
    return fixed


def free_memory(device: torch.device | None = None) -> None:
    from ssamba.model.scan import clear_workspace

    clear_workspace()
    if device is not None and device.type == "cuda":  # (on CPU, refcounting frees it and memory is not measured)
        gc.collect()
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError``, or a library's allocation failure (cuBLAS, extensions) said in words."""
    return isinstance(e, OOM) or (isinstance(e, RuntimeError) and any(
        k in str(e) for k in ("out of memory", "ALLOC_FAILED", "OutOfMemory")))


def fits(fn: Callable[[], object], device: torch.device | None = None) -> bool:
    """Run ``fn``; False (memory freed) if it runs out of memory; other errors propagate."""
    try:
        fn()
        return True
    except RuntimeError as e:
        if not is_oom(e):
            raise
    free_memory(device)  # outside the except block: the traceback no longer holds the tensors
    return False


def find_max_batch(ok: Callable[[int], bool], limit: int, start: int = 1) -> tuple[int, bool]:
    """Largest ``b <= limit`` with ``ok(b)`` (``ok(start)`` assumed): doubling, then bisection.

    Returns ``(batch, capped)``; ``capped`` is True when ``limit`` itself fits (memory did not bound it).
    """
    good, bad = start, None
    while good < limit:
        b = min(2 * good, limit)
        if ok(b):
            good = b
        else:
            bad = b
            break
    if bad is None:
        return good, True
    while bad - good > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, False


def sweep_lengths(tokens: Iterable[int], measure: Callable[[int], dict], free: Callable[[], None] = lambda: None
                  ) -> Iterator[dict]:
    """Yield ``measure(n)`` for growing ``n``; an OOM (or error) is recorded and ends the sweep."""
    for n in tokens:
        try:
            entry = {"tokens": n, "status": "ok", **measure(n)}
        except Exception as e:  # noqa: BLE001 - a long run records it and goes on to the next model
            entry = ({"tokens": n, "status": "oom"} if is_oom(e) else
                     {"tokens": n, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]})
        free()
        yield entry
        if entry["status"] != "ok":
            return


class Timer:
    """CUDA events and ``max_memory_allocated`` on CUDA; ``perf_counter`` and no memory on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def runs(self, fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
        """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        return [self._once(fn) for _ in range(repeats)]

    def _once(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


class Bench:
    def __init__(self, models: list[str], s: Settings, out: Path, build: Callable = build_model, resume: bool = False):
        self.models, self.s, self.out, self.build = models, s, Path(out), build
        self.device = torch.device(s.device)
        self.timer = Timer(self.device)
        self.path = self.out / ("results_paper.json" if s.protocol == "paper" else "results.json")
        self.res = {"meta": {}, "models": {}, "inference": [], "train": [], "headline": []}
        if resume and self.path.exists():  # keep measured points and OOMs; errors are tried again
            self.res.update(json.loads(self.path.read_text()))
            for k in ("inference", "train"):
                self.res[k] = [e for e in self.res[k] if e["status"] != "error"]
        self.res["meta"] = environment(self.device) | {"settings": json.loads(json.dumps(asdict(s)))}

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.res, indent=1))

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def _describe(self, name: str, model) -> None:
        from ssamba.model.kernels import _cuda_conv

        if name in self.res["models"]:
            return
        enc = getattr(model, "v", model)
        cfg = getattr(enc, "cfg", None)
        backend = getattr(enc, "backend", None)
        if backend is None and cfg is not None:
            backend = "attention:" + cfg.attention
        self.res["models"][name] = {
            "params": sum(p.numel() for p in model.parameters()), "backend": backend or "n/a",
            "conv": "causal_conv1d" if backend == "cuda" and _cuda_conv() is not None else "reference",
            "config": asdict(cfg) if cfg is not None else {}}

    def _forward(self, model, b: int, n: int, dtype: str) -> Callable[[], None]:
        x = torch.randn(b, frames(n), 128, device=self.device)

        def fwd():
            with torch.no_grad(), autocast(self.device, dtype):
                model.encode(x)
        return fwd

    def _inference_point(self, name: str, dtype: str, n: int) -> dict:
        s, t0 = self.s, time.perf_counter()
        model = self.build(name, n, self.device, False)
        self._describe(name, model)
        fwd, graphed = self._forward(model, s.batch, n, dtype), None
        if s.graphs and self.device.type == "cuda":
            from ssamba.model.graphs import GraphedInference

            graphed = GraphedInference(model.encode, autocast=dtype)
            fwd = functools.partial(graphed, torch.randn(s.batch, frames(n), 128, device=self.device))
        self.timer.reset_peak()
        runs = self.timer.runs(fwd, s.warmup, s.repeats)
        entry = {"batch": s.batch, "latency_ms": _reduce(runs, s.reduce), "latency_runs_ms": runs,
                 "peak_mem_bytes": self.timer.peak()}
        del fwd, graphed  # (a graph holds its memory pool)
        if s.throughput:
            entry.update(self._throughput(model, n, dtype))
        else:
            entry.update(max_batch=s.batch, throughput_seq_s=s.batch * 1e3 / entry["latency_ms"])
        entry["elapsed_s"] = round(time.perf_counter() - t0, 2)
        return entry

    def _throughput(self, model, n: int, dtype: str) -> dict:
        def ok(b: int) -> bool:
            return fits(lambda: self._forward(model, b, n, dtype)(), self.device)

        best, capped = find_max_batch(ok, self.s.max_batch, start=1)
        for _ in range(4):  # near the limit a timing run can still fail (fragmentation): back off
            runs: list[float] = []
            if fits(lambda: runs.extend(self.timer.runs(self._forward(model, best, n, dtype), 1,
                                                        max(2, self.s.repeats // 2))), self.device):
                ms = _reduce(runs, "median")
                return {"max_batch": best, "batch_capped": capped, "throughput_batch_ms": ms,
                        "throughput_seq_s": best * 1e3 / ms}
            best, capped = max(1, int(best * 0.9)), False
        raise OOM(f"throughput timing ran out of memory down to batch {best}")

    def _train_point(self, name: str, dtype: str, n: int) -> dict:
        from ssamba.masking import make_masks

        s, dev = self.s, self.device
        model = self.build(name, n, dev, True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=5e-8)
        f, t = model.grid
        rng = np.random.default_rng(0)
        count = min(400, f * t // 2)
        x = torch.randn(s.train_batch, frames(n), 128, device=dev)
        m_d, m_g = (make_masks("random", s.train_batch, f, t, count, rng).to(dev) for _ in range(2))

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast(dev, dtype):
                loss = model.pretrain_losses(x, m_d, m_g)["loss"]
            loss.backward()
            opt.step()
        self.timer.reset_peak()
        runs = self.timer.runs(step, max(1, s.warmup), max(1, s.repeats // 2))  # warm-up: optimizer state
        return {"batch": s.train_batch, "step_ms": _reduce(runs, "median"), "step_runs_ms": runs,
                "peak_mem_bytes": self.timer.peak(), "masked": count}

    def run(self) -> dict:
        s, free = self.s, (lambda: free_memory(self.device))
        for name in self.models:
            for dtype in s.dtypes:
                done = [e for e in self.res["inference"] if e["model"] == name and e["dtype"] == dtype]
                if any(e["status"] != "ok" for e in done):
                    self.log(f"{name} {dtype}: stopped earlier ({done[-1]['status']} at {done[-1]['tokens']}), skipped")
                    continue
                have = {e["tokens"] for e in done}
                todo = [n for n in s.tokens if n not in have]
                for e in sweep_lengths(todo, lambda n: self._inference_point(name, dtype, n), free):
                    self.res["inference"].append({"model": name, "dtype": dtype, **e})
                    self.save()
                    self.log(f"{name:18s} {dtype:4s} N={e['tokens']:6d} {_progress(e)}")
                if s.train and not any(e["model"] == name and e["dtype"] == dtype for e in self.res["train"]):
                    e = next(sweep_lengths([s.train_tokens], lambda n: self._train_point(name, dtype, n), free))
                    self.res["train"].append({"model": name, "dtype": dtype, **e})
                    self.save()
                    self.log(f"{name:18s} {dtype:4s} train N={s.train_tokens} x {s.train_batch}: "
                             + (f"{e['step_ms']:.1f} ms/step, peak {fmt_bytes(e['peak_mem_bytes'])}"
                                if e["status"] == "ok" else e["status"]))
        self.res["headline"] = headline(self.res)
        self.save()
        return self.res


def _reduce(runs: list[float], how: str) -> float:
    return statistics.fmean(runs) if how == "mean" else statistics.median(runs)


def _progress(e: dict) -> str:
    if e["status"] != "ok":
        return e["status"].upper() + (f" {e.get('error', '')}" if e["status"] == "error" else "")
    return (f"latency {e['latency_ms']:.2f} ms (batch {e['batch']}), peak {fmt_bytes(e['peak_mem_bytes'])}, "
            f"{e['throughput_seq_s']:.2f} seq/s at batch {e['max_batch']}  [{e['elapsed_s']:.1f} s]")


def environment(device: torch.device) -> dict:
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda, "device_type": device.type,
            "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "argv": sys.argv[1:]}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        meta.update(device=prop.name, device_memory_bytes=prop.total_memory)
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("mamba-ssm", "causal-conv1d"):
        with contextlib.suppress(PackageNotFoundError):
            meta[pkg] = version(pkg)
    return meta


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / MiB:.0f} MiB" if b < 1024 * MiB else f"{b / 1024 / MiB:.1f} GiB"


def relative(a: float, b: float, better: str, worse: str) -> tuple[float, str]:
    """``a`` (SSAMBA) against ``b`` (SSAST), lower is better: ``1 - a/b`` in ``better``, else ``a/b - 1`` in ``worse``.

    The paper's "92.7% faster" is ``1 - t_ssamba / t_ssast``; the percentage returned is negative when worse.
    """
    if a <= b:
        pct = 100.0 * (1.0 - a / b)
        return pct, better.format(pct)
    pct = 100.0 * (a / b - 1.0)
    return -pct, worse.format(pct)


def compare(a: dict, b: dict) -> dict:
    """Two inference entries (SSAMBA ``a``, SSAST ``b``) -> ratios and the paper-style phrases."""
    faster, speed = relative(a["latency_ms"], b["latency_ms"], "{:.1f}% faster", "{:.1f}% slower")
    out = {"latency_ratio": b["latency_ms"] / a["latency_ms"], "faster_pct": faster, "speed_phrase": speed,
           "memory_less_pct": None, "memory_phrase": "memory n/a", "throughput_ratio": None}
    if a.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
        out["memory_less_pct"], out["memory_phrase"] = relative(
            a["peak_mem_bytes"], b["peak_mem_bytes"], "{:.1f}% more memory-efficient", "needs {:.1f}% more memory")
    if a.get("throughput_seq_s") and b.get("throughput_seq_s"):
        out["throughput_ratio"] = a["throughput_seq_s"] / b["throughput_seq_s"]
    return out


def label(name: str) -> str:
    arch, size, var = name.split("-")
    return f"{arch.upper()}-{size} ({ {'mat': 'materialised'}.get(var, var)})"


def headline(res: dict, target: int = 22000) -> list[dict]:
    """Per dtype and size (tiny first): SSAMBA-bi vs SSAST materialised and fused at the length nearest ``target``."""
    rows = []
    sizes = sorted({e["model"].split("-")[1] for e in res["inference"]},
                   key=lambda z: (("tiny", "small", "base").index(z) if z in SIZES else 3, z))
    for size in sizes:
        ours = f"ssamba-{size}-bi"
        for dtype in sorted({e["dtype"] for e in res["inference"]}):
            def ok(m):
                return {e["tokens"]: e for e in res["inference"]
                        if e["model"] == m and e["dtype"] == dtype and e["status"] == "ok"}
            mine = ok(ours)
            for base in (f"ssast-{size}-mat", f"ssast-{size}-fused"):
                theirs = ok(base)
                common = set(mine) & set(theirs)
                if not common:
                    continue
                n = min(common, key=lambda k: (abs(k - target), -k))
                a, b = mine[n], theirs[n]
                c = compare(a, b)
                mem = f" and {c['memory_phrase']}" if c["memory_less_pct"] is not None else ""
                thr = (f", throughput {a['throughput_seq_s']:.1f} vs {b['throughput_seq_s']:.1f} seq/s "
                       f"({c['throughput_ratio']:.2f}x; batch {a['max_batch']} vs {b['max_batch']})"
                       if c["throughput_ratio"] else "")
                line = (f"[{dtype}, {n} tokens, batch {a['batch']}] {label(ours)} is {c['speed_phrase']}{mem} than "
                        f"{label(base)}: latency {a['latency_ms']:.1f} ms vs {b['latency_ms']:.1f} ms "
                        f"({c['latency_ratio']:.2f}x), peak memory {fmt_bytes(a.get('peak_mem_bytes'))} vs "
                        f"{fmt_bytes(b.get('peak_mem_bytes'))}{thr}; scan backend "
                        f"{res.get('models', {}).get(ours, {}).get('backend', '?')}")
                if n != target:
                    stop = [f"; {e['model']} {'out of memory' if e['status'] == 'oom' else e['status']} at {e['tokens']}"
                            for e in res["inference"] if e["model"] in (ours, base) and e["dtype"] == dtype
                            and e["status"] != "ok"]
                    line += f" [nearest measured to {target}{''.join(stop)}]"
                rows.append({"dtype": dtype, "tokens": n, "ours": ours, "baseline": base, **c, "line": line})
    return rows


def markdown(res: dict) -> str:
    models = res.get("models", {})
    out = [f"Device: {res['meta'].get('device')} | torch {res['meta'].get('torch')} | {res['meta'].get('date')} | "
           f"protocol {res['meta'].get('settings', {}).get('protocol')}", "",
           "| model | dtype | backend | tokens | batch | latency ms | peak memory | max batch | seq/s | status |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for e in res["inference"]:
        be = models.get(e["model"], {}).get("backend", "")
        if e["status"] == "ok":
            out.append(f"| {e['model']} | {e['dtype']} | {be} | {e['tokens']} | {e['batch']} | {e['latency_ms']:.2f} | "
                       f"{fmt_bytes(e['peak_mem_bytes'])} | {e['max_batch']} | {e['throughput_seq_s']:.2f} | ok |")
        else:
            out.append(f"| {e['model']} | {e['dtype']} | {be} | {e['tokens']} | | | | | | {e['status']} |")
    if res["train"]:
        out += ["", "| model | dtype | tokens x batch | train step ms | peak memory | status |",
                "|---|---|---|---:|---:|---|"]
        for e in res["train"]:
            ok = e["status"] == "ok"
            out.append(f"| {e['model']} | {e['dtype']} | {e['tokens']} x {e.get('batch', '')} | "
                       f"{e['step_ms']:.1f} | {fmt_bytes(e['peak_mem_bytes'])} | ok |" if ok else
                       f"| {e['model']} | {e['dtype']} | {e['tokens']} | | | {e['status']} |")
    return "\n".join(out)


def plot(res: dict, out: Path, prefix: str = "") -> list[Path]:
    """Log-log plots of latency, peak memory and throughput vs tokens; an x marks where a model ran out."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (rerun with --replot where it is)", flush=True)
        return []
    written = []
    metrics = [("latency_ms", 1.0, "latency (ms)"), ("peak_mem_bytes", 1 / MiB, "peak memory (MiB)"),
               ("throughput_seq_s", 1.0, "throughput (sequences/s)")]
    series = sorted({(e["model"], e["dtype"]) for e in res["inference"]})
    names = sorted({m for m, _ in series})
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for key, scale, ylabel in metrics:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        drawn = False
        for m, d in series:
            pts = [(e["tokens"], e[key] * scale) for e in res["inference"]
                   if e["model"] == m and e["dtype"] == d and e["status"] == "ok" and e.get(key)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            color = cmap(names.index(m) % cmap.N)
            ax.plot(xs, ys, marker="o", ms=3, label=f"{m} {d}", ls="--" if d != "fp32" else "-", color=color)
            if any(e["model"] == m and e["dtype"] == d and e["status"] == "oom" for e in res["inference"]):
                ax.plot(xs[-1], ys[-1], marker="x", ms=10, color=color)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="tokens", ylabel=ylabel, title=f"{ylabel} vs tokens ({res['meta'].get('device')})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        path = Path(out) / f"{prefix}{key.split('_')[0]}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def report(res: dict, out: Path, paper: bool) -> None:
    prefix = "paper_" if paper else ""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(res)
    (out / f"table{'_paper' if paper else ''}.md").write_text(table + "\n")
    print(table)
    for p in plot(res, out, prefix):
        print(f"plot: {p}")
    print()
    for h in res["headline"] or [{"line": "no headline: it needs ssamba-<size>-bi and ssast-<size>-mat/fused measured at a common length"}]:
        print("HEADLINE " + h["line"])
    print(PAPER_CLAIM, flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ssamba.bench", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--models", default="all", help=f"comma list (default all: {','.join(ALL_MODELS)})")
    add("--dtypes", default="fp32,bf16", help="fp32 (as the paper), bf16 / fp16 (autocast)")
    add("--tokens", help="e.g. 512,4096,22000 or 512:22528:256 (rounded up to multiples of 8)")
    add("--max-batch", type=int, default=64, help="cap of the throughput batch search (default 64)")
    add("--warmup", type=int, help="untimed runs (default 3, --quick 1, paper 0)")
    add("--repeats", type=int, help="timed runs (default 10, --quick 3, paper 5)")
    add("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}, 1 warm-up, 3 repeats")
    add("--paper-protocol", action="store_true", help="fp32, batch 2, no warm-up, mean of 5 runs, no search")
    add("--no-throughput", action="store_true", help="skip the batch search (throughput = batch / latency)")
    add("--no-train", action="store_true", help="skip the training-step timing")
    add("--train-tokens", type=int, default=512)
    add("--train-batch", type=int, default=8)
    add("--scan-backend", default="auto", choices=list(SCAN_BACKENDS))
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    add("--out", default="bench_results")
    add("--resume", action="store_true", help="keep the points (and OOM stops) already in the results file")
    add("--replot", action="store_true", help="only redo table, headline and plots from the results file")
    add("--graphs", action="store_true", help="batch-1 latency and memory from a replayed CUDA graph (every model)")
    add("--ladder", action="store_true",
        help="time SSAMBA-tiny bi at each speed-up step vs fused SSAST-tiny and the memory-bound floor "
             "(default tokens 16384,22000; first --dtypes entry)")
    add("--ladder-batch", type=int, default=64, help="throughput batch of --ladder (default 64)")
    add("--pretrain", action="store_true",
        help="pretraining throughput through the real data path (paper-tiny, 512 tokens, bf16) and GPU idle time")
    add("--pretrain-manifest", default="", help="manifest for --pretrain (default: the demo corpus)")
    add("--pretrain-batch", type=int, help="batch of --pretrain (default: the preset's)")
    add("--num-workers", type=int, default=8, help="loader processes of --pretrain")
    add("--train-ladder", action="store_true",
        help="training step (pretraining MSPM and speechcommands fine-tuning) at each speed-up step vs SSAST "
             "fused of the same size: samples/s, peak memory (--models, --dtypes, --train-batches)")
    add("--geometries", default="pretrain,finetune", help="--train-ladder geometries (pretrain, finetune)")
    add("--train-batches", default="32,max", help="--train-ladder batches: numbers and/or 'max' (largest that fits)")
    add("--levels", default="all", choices=["all", "last"], help="--train-ladder: every speed-up step or the last")
    add("--profile", action="store_true", help="--train-ladder: top kernels of one profiled step per model")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.train_ladder:
        from ssamba.bench_train import run_train_ladder

        if not torch.cuda.is_available():
            p.error("--train-ladder needs a CUDA device")
        names = ([f"ssamba-{s}-{v}" for s in SIZES for v in ("bi", "uni")] + [f"ssast-{s}-fused" for s in SIZES]
                 if a.models == "all" else [model_config(m)[0] for m in a.models.split(",") if m.strip()])
        return run_train_ladder(names, [g.strip() for g in a.geometries.split(",") if g.strip()],
                                [d.strip() for d in a.dtypes.split(",") if d.strip()],
                                [b.strip() for b in a.train_batches.split(",") if b.strip()], a.levels,
                                a.warmup if a.warmup is not None else 3, a.repeats or 10, profile=a.profile, out=out)
    if a.pretrain:
        from ssamba.bench_pretrain import run_pretrain_bench

        if not torch.cuda.is_available():
            p.error("--pretrain needs a CUDA device")
        return run_pretrain_bench(manifest=a.pretrain_manifest, batch_size=a.pretrain_batch,
                                  num_workers=a.num_workers, out=out)
    if a.ladder:
        from ssamba.bench_ladder import run_ladder

        if not torch.cuda.is_available():
            p.error("--ladder needs a CUDA device")
        return run_ladder(parse_tokens(a.tokens) if a.tokens else [16384, 22000], a.dtypes.split(",")[0].strip(),
                          a.ladder_batch, a.repeats or 20, out, "cuda" if a.scan_backend == "auto" else a.scan_backend)
    if a.replot:
        path = out / ("results_paper.json" if a.paper_protocol else "results.json")
        res = json.loads(path.read_text())
        res["headline"] = headline(res)
        report(res, out, a.paper_protocol)
        return res
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible (use --device cpu)")
    models = ALL_MODELS if a.models == "all" else [model_config(m)[0] for m in a.models.split(",") if m.strip()]
    s = Settings(device=a.device, dtypes=tuple(d.strip() for d in a.dtypes.split(",") if d.strip()),
                 tokens=tuple(parse_tokens(a.tokens) if a.tokens else (QUICK_TOKENS if a.quick else DEFAULT_TOKENS)),
                 warmup=1 if a.quick else 3, repeats=3 if a.quick else 10, max_batch=a.max_batch,
                 throughput=not a.no_throughput, train=not a.no_train, train_tokens=-(-a.train_tokens // 8) * 8,
                 train_batch=a.train_batch, scan_backend=a.scan_backend, graphs=a.graphs)
    if a.paper_protocol:
        s = replace(s, dtypes=("fp32",), warmup=0, repeats=5, reduce="mean", batch=2, throughput=False,
                    train=False, protocol="paper")
    s = replace(s, warmup=s.warmup if a.warmup is None else a.warmup, repeats=s.repeats if a.repeats is None else a.repeats)
    bad = [d for d in s.dtypes if d not in ("fp32", "bf16", "fp16")]
    if bad:
        p.error(f"--dtypes: unknown {bad} (fp32, bf16, fp16)")
    bench = Bench(models, s, out, lambda n_, t, d, tr: build_model(n_, t, d, tr, s.scan_backend), resume=a.resume)
    bench.log(f"device {bench.res['meta']['device']}, torch {torch.__version__}, {len(models)} models x "
              f"{list(s.dtypes)}, tokens {list(s.tokens)}, protocol {s.protocol} -> {bench.path}")
    res = bench.run()
    report(res, out, a.paper_protocol)
    return res


if __name__ == "__main__":
    main()
