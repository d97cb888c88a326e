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

import contextlib
import datetime
import functools
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

from ssamba.base.files import write_text_atomic
from ssamba.bench.timing import OOM, Timer, autocast, find_max_batch, fits, free_memory, is_oom
from ssamba.config import ModelConfig, model_preset

DEFAULT_TOKENS = [512, 1024, 2048, 4096, 8192, 16384, 22000, 32768, 65536]
QUICK_TOKENS = [512, 2048, 8192, 22000]
SIZES = ("tiny", "small", "base")
ALL_MODELS = [f"ssamba-{s}-{v}" for s in SIZES for v in ("bi", "uni")] + [
    f"ssast-{s}-{v}" for s in SIZES for v in ("mat", "fused")
]
PAPER_CLAIM = "Paper: 92.7% faster and 95.4% more memory-efficient than SSAST-tiny at ~22k tokens (L40, fp32, batch 2)"
MiB = 2**20


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


def sweep_lengths(
    tokens: Iterable[int], measure: Callable[[int], dict], free: Callable[[], None] = lambda: None
) -> Iterator[dict]:
    """Yield ``measure(n)`` for growing ``n``; an OOM (or error) is recorded and ends the sweep."""
    for n in tokens:
        try:
            entry = {"tokens": n, "status": "ok", **measure(n)}
        except Exception as e:  # noqa: BLE001 - a long run records it and goes on to the next model
            entry = (
                {"tokens": n, "status": "oom"}
                if is_oom(e)
                else {"tokens": n, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
            )
        free()
        yield entry
        if entry["status"] != "ok":
            return


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
        from ssamba.ops.backends import mamba_conv

        if name in self.res["models"]:
            return
        enc = getattr(model, "v", model)
        cfg = getattr(enc, "cfg", None)
        backend = getattr(enc, "backend", None)
        if backend is None and cfg is not None:
            backend = "attention:" + cfg.attention
        self.res["models"][name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "backend": backend or "n/a",
            "conv": "causal_conv1d" if backend == "cuda" and mamba_conv() is not None else "reference",
            "config": asdict(cfg) if cfg is not None else {},
        }

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
            from ssamba.ops.graphs import GraphedInference

            graphed = GraphedInference(model.encode, autocast=dtype)
            fwd = functools.partial(graphed, torch.randn(s.batch, frames(n), 128, device=self.device))
        self.timer.reset_peak()
        runs = self.timer.runs(fwd, s.warmup, s.repeats)
        entry = {
            "batch": s.batch,
            "latency_ms": _reduce(runs, s.reduce),
            "latency_runs_ms": runs,
            "peak_mem_bytes": self.timer.peak(),
        }
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
            if fits(
                lambda: runs.extend(
                    self.timer.runs(self._forward(model, best, n, dtype), 1, max(2, self.s.repeats // 2))
                ),
                self.device,
            ):
                ms = _reduce(runs, "median")
                return {
                    "max_batch": best,
                    "batch_capped": capped,
                    "throughput_batch_ms": ms,
                    "throughput_seq_s": best * 1e3 / ms,
                }
            best, capped = max(1, int(best * 0.9)), False
        raise OOM(f"throughput timing ran out of memory down to batch {best}")

    def _train_point(self, name: str, dtype: str, n: int) -> dict:
        from ssamba.model.masking import make_masks

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
        return {
            "batch": s.train_batch,
            "step_ms": _reduce(runs, "median"),
            "step_runs_ms": runs,
            "peak_mem_bytes": self.timer.peak(),
            "masked": count,
        }

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
                    self.log(
                        f"{name:18s} {dtype:4s} train N={s.train_tokens} x {s.train_batch}: "
                        + (
                            f"{e['step_ms']:.1f} ms/step, peak {fmt_bytes(e['peak_mem_bytes'])}"
                            if e["status"] == "ok"
                            else e["status"]
                        )
                    )
        self.res["headline"] = headline(self.res)
        self.save()
        return self.res


def _reduce(runs: list[float], how: str) -> float:
    return statistics.fmean(runs) if how == "mean" else statistics.median(runs)


def _progress(e: dict) -> str:
    if e["status"] != "ok":
        return e["status"].upper() + (f" {e.get('error', '')}" if e["status"] == "error" else "")
    return (
        f"latency {e['latency_ms']:.2f} ms (batch {e['batch']}), peak {fmt_bytes(e['peak_mem_bytes'])}, "
        f"{e['throughput_seq_s']:.2f} seq/s at batch {e['max_batch']}  [{e['elapsed_s']:.1f} s]"
    )


def environment(device: torch.device) -> dict:
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device_type": device.type,
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "argv": sys.argv[1:],
    }
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
    out = {
        "latency_ratio": b["latency_ms"] / a["latency_ms"],
        "faster_pct": faster,
        "speed_phrase": speed,
        "memory_less_pct": None,
        "memory_phrase": "memory n/a",
        "throughput_ratio": None,
    }
    if a.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
        out["memory_less_pct"], out["memory_phrase"] = relative(
            a["peak_mem_bytes"], b["peak_mem_bytes"], "{:.1f}% more memory-efficient", "needs {:.1f}% more memory"
        )
    if a.get("throughput_seq_s") and b.get("throughput_seq_s"):
        out["throughput_ratio"] = a["throughput_seq_s"] / b["throughput_seq_s"]
    return out


def label(name: str) -> str:
    arch, size, var = name.split("-")
    return f"{arch.upper()}-{size} ({ {'mat': 'materialised'}.get(var, var) })"


def headline(res: dict, target: int = 22000) -> list[dict]:
    """Per dtype and size (tiny first): SSAMBA-bi vs SSAST materialised and fused at the length nearest ``target``."""
    rows = []
    sizes = sorted(
        {e["model"].split("-")[1] for e in res["inference"]},
        key=lambda z: (("tiny", "small", "base").index(z) if z in SIZES else 3, z),
    )
    for size in sizes:
        ours = f"ssamba-{size}-bi"
        for dtype in sorted({e["dtype"] for e in res["inference"]}):

            def ok(m):
                return {
                    e["tokens"]: e
                    for e in res["inference"]
                    if e["model"] == m and e["dtype"] == dtype and e["status"] == "ok"
                }

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
                thr = (
                    f", throughput {a['throughput_seq_s']:.1f} vs {b['throughput_seq_s']:.1f} seq/s "
                    f"({c['throughput_ratio']:.2f}x; batch {a['max_batch']} vs {b['max_batch']})"
                    if c["throughput_ratio"]
                    else ""
                )
                line = (
                    f"[{dtype}, {n} tokens, batch {a['batch']}] {label(ours)} is {c['speed_phrase']}{mem} than "
                    f"{label(base)}: latency {a['latency_ms']:.1f} ms vs {b['latency_ms']:.1f} ms "
                    f"({c['latency_ratio']:.2f}x), peak memory {fmt_bytes(a.get('peak_mem_bytes'))} vs "
                    f"{fmt_bytes(b.get('peak_mem_bytes'))}{thr}; scan backend "
                    f"{res.get('models', {}).get(ours, {}).get('backend', '?')}"
                )
                if n != target:
                    stop = [
                        f"; {e['model']} {'out of memory' if e['status'] == 'oom' else e['status']} at {e['tokens']}"
                        for e in res["inference"]
                        if e["model"] in (ours, base) and e["dtype"] == dtype and e["status"] != "ok"
                    ]
                    line += f" [nearest measured to {target}{''.join(stop)}]"
                rows.append({"dtype": dtype, "tokens": n, "ours": ours, "baseline": base, **c, "line": line})
    return rows


def markdown(res: dict) -> str:
    models = res.get("models", {})
    out = [
        f"Device: {res['meta'].get('device')} | torch {res['meta'].get('torch')} | {res['meta'].get('date')} | "
        f"protocol {res['meta'].get('settings', {}).get('protocol')}",
        "",
        "| model | dtype | backend | tokens | batch | latency ms | peak memory | max batch | seq/s | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in res["inference"]:
        be = models.get(e["model"], {}).get("backend", "")
        if e["status"] == "ok":
            out.append(
                f"| {e['model']} | {e['dtype']} | {be} | {e['tokens']} | {e['batch']} | {e['latency_ms']:.2f} | "
                f"{fmt_bytes(e['peak_mem_bytes'])} | {e['max_batch']} | {e['throughput_seq_s']:.2f} | ok |"
            )
        else:
            out.append(f"| {e['model']} | {e['dtype']} | {be} | {e['tokens']} | | | | | | {e['status']} |")
    if res["train"]:
        out += [
            "",
            "| model | dtype | tokens x batch | train step ms | peak memory | status |",
            "|---|---|---|---:|---:|---|",
        ]
        for e in res["train"]:
            ok = e["status"] == "ok"
            out.append(
                f"| {e['model']} | {e['dtype']} | {e['tokens']} x {e.get('batch', '')} | "
                f"{e['step_ms']:.1f} | {fmt_bytes(e['peak_mem_bytes'])} | ok |"
                if ok
                else f"| {e['model']} | {e['dtype']} | {e['tokens']} | | | {e['status']} |"
            )
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
    metrics = [
        ("latency_ms", 1.0, "latency (ms)"),
        ("peak_mem_bytes", 1 / MiB, "peak memory (MiB)"),
        ("throughput_seq_s", 1.0, "throughput (sequences/s)"),
    ]
    series = sorted({(e["model"], e["dtype"]) for e in res["inference"]})
    names = sorted({m for m, _ in series})
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for key, scale, ylabel in metrics:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        drawn = False
        for m, d in series:
            pts = [
                (e["tokens"], e[key] * scale)
                for e in res["inference"]
                if e["model"] == m and e["dtype"] == d and e["status"] == "ok" and e.get(key)
            ]
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
    for h in res["headline"] or [
        {"line": "no headline: it needs ssamba-<size>-bi and ssast-<size>-mat/fused measured at a common length"}
    ]:
        print("HEADLINE " + h["line"])
    print(PAPER_CLAIM, flush=True)
