"""Training speed, one speed-up step at a time, against SSAST of the same size on the same card.

``python -m ssamba.bench --train-ladder`` times a full training step (forward, backward, AdamW step) at
two geometries of the presets:

- ``pretrain``: the official MSPM step (two passes, random masks of 400 of 512 patches; 128 x 1024
  fbank at stride 16), ``AudioModel.pretrain_losses``;
- ``finetune``: classification at the speechcommands recipe (128 x 128 fbank at stride 10: 144 patches,
  35 classes, BCE loss).

SSAMBA models are timed at each cumulative step of the mixer; SSAST (fused attention) once:

0. reference path: one conv and one scan call per direction (mamba-ssm), flipped copies;
1. fast mixer: directions side by side as channels of one conv and one scan call (mamba-ssm's scan),
   batch-major layout, gate after the direction sum;
2. + the training scan (:mod:`ssamba.ops.train_scan`): one thread per channel, checkpointed states;
3. + the direction sum and gate as one Triton kernel, and one for its backward;
4. + the residual add and norm as one kernel in training too (drop-path applied before it);
5. + the whole step (forward, backward, AdamW) captured once in a CUDA graph and replayed.

Each point: median step time over ``repeats`` after ``warmup`` steps (CUDA events), samples/s, peak
``max_memory_allocated``; at ``--train-batches 32,max`` also the largest batch that fits (doubling, then
bisection on out-of-memory). ``--profile`` adds the top kernels of one profiled step per model (last step).
Results go to ``train_ladder.json`` / ``train_ladder.md`` under ``--out``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssamba.bench.encoder import environment, fmt_bytes, model_config
from ssamba.bench.ladder import copy_bandwidth, floor_bytes
from ssamba.bench.timing import free_memory, is_oom, median_ms

GEOMETRIES = {
    # name: (frames, fstride, tstride, task)
    "pretrain": (1024, 16, 16, "pretrain"),
    "finetune": (128, 10, 10, "classify"),
}
LEVELS = [  # (label, set_speedups switches, whole step replayed from a CUDA graph)
    (
        "reference path (per-direction conv + scan, flips)",
        dict(fuse_directions=False, train_scan=False, fused_gate=False, fused_norm=False),
        False,
    ),
    (
        "+ fast mixer (directions as channels, batch-major; mamba-ssm scan)",
        dict(fuse_directions=True, train_scan=False, fused_gate=False, fused_norm=False),
        False,
    ),
    (
        "+ training scan (thread per channel, checkpointed states)",
        dict(fuse_directions=True, train_scan=True, fused_gate=False, fused_norm=False),
        False,
    ),
    (
        "+ direction sum + gate in one Triton kernel each way",
        dict(fuse_directions=True, train_scan=True, fused_gate=True, fused_norm=False),
        False,
    ),
    (
        "+ fused add-norm in training (drop-path before it)",
        dict(fuse_directions=True, train_scan=True, fused_gate=True, fused_norm=True),
        False,
    ),
    (
        "+ whole step replayed from a CUDA graph",
        dict(fuse_directions=True, train_scan=True, fused_gate=True, fused_norm=True),
        True,
    ),
]
MASKED = 400
CLASSES = 35


@dataclass
class Point:
    model: str
    geometry: str
    dtype: str
    level: int | None
    step: str
    batch: int
    step_ms: float | None = None
    samples_s: float | None = None
    peak_mem_bytes: int | None = None
    max_batch: bool = False
    graphed: bool = False
    error: str = ""


def build(name: str, geometry: str, device: torch.device):
    from dataclasses import replace

    from ssamba.model.audio_model import AudioModel, Geometry

    frames, fs, ts, task = GEOMETRIES[geometry]
    _, cfg = model_config(name, "auto")
    cfg = replace(cfg, fstride=fs, tstride=ts)
    with torch.device(device):
        model = AudioModel(
            cfg,
            Geometry(128, frames),
            num_classes=CLASSES if task == "classify" else 0,
            pretrain_heads=task == "pretrain",
        )
    return model.train()


def make_step(model, geometry: str, batch: int, dtype: str, device: torch.device, graphed: bool = False):
    """One training step closure on fixed random inputs (masks and labels drawn once); with ``graphed``
    the whole step (forward, backward, AdamW) is captured once in a CUDA graph and replayed."""
    from ssamba.model.masking import make_masks

    frames, _, _, task = GEOMETRIES[geometry]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=5e-8, capturable=graphed)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, frames, 128, device=device, generator=g)
    if task == "pretrain":
        f, t = model.grid
        rng = np.random.default_rng(0)
        count = min(MASKED, f * t // 2)
        m_d, m_g = (make_masks("random", batch, f, t, count, rng).to(device) for _ in range(2))

        def loss_fn():
            return model.pretrain_losses(x, m_d, m_g)["loss"]
    else:
        y = (torch.rand(batch, CLASSES, device=device, generator=g) < 0.05).float()

        def loss_fn():
            return torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)

    def step():
        opt.zero_grad(set_to_none=not graphed)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=not graphed):
            loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    if not graphed:
        return step
    from ssamba.model.layers import DropPath

    if any(isinstance(m, DropPath) and m.p > 0 for m in model.modules()):
        # its per-sample draws fail under capture and leave the CUDA context unusable for the rest of the run
        raise RuntimeError("not captured: drop-path draws random numbers per step (measure with drop_path=0)")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: gradients and optimizer state exist
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def measure(
    model, geometry: str, batch: int, dtype: str, device, warmup: int, repeats: int, graphed: bool = False
) -> dict:

    step = None
    try:
        step = make_step(model, geometry, batch, dtype, device, graphed)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, warmup, repeats)
        return {"step_ms": ms, "samples_s": batch * 1e3 / ms, "peak_mem_bytes": torch.cuda.max_memory_allocated()}
    except Exception as exc:  # noqa: BLE001 - out of memory is a result; anything else is reported
        if not is_oom(exc):
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        return {"error": "OOM"}
    finally:
        step = None  # noqa: F841
        model.zero_grad(set_to_none=True)
        free_memory(device)


def largest_batch(model, geometry: str, dtype: str, device, start: int, cap: int, graphed: bool = False) -> int:
    """The largest batch whose step runs (doubling from ``start``, then bisection), at most ``cap``."""
    return search_batch(lambda b: "error" not in measure(model, geometry, b, dtype, device, 1, 1, graphed), start, cap)


def search_batch(ok, start: int, cap: int) -> int:
    """The largest ``b <= cap`` with ``ok(b)`` (assumed monotone), to within ~6%: doubling from ``start``, then
    bisection; 0 when even batch 1 fails."""
    if not ok(start):
        lo, hi = 0, start
    else:
        lo = start
        while lo * 2 <= cap and ok(lo * 2):
            lo *= 2
        hi = min(cap + 1, lo * 2)
    while hi - lo > max(1, lo // 16):  # within ~6%
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def top_kernels(step, n: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append({"kernel": e.key[:90], "calls": e.count, "total_us": t})
    rows.sort(key=lambda r: -r["total_us"])
    total = sum(r["total_us"] for r in rows)
    return [{"kernel": "(all kernels)", "calls": sum(r["calls"] for r in rows), "total_us": total}] + rows[:n]


def matmul_flops(cfg, tokens: int, batch: int) -> float:
    """Matmul FLOPs of one forward of a Mamba encoder (projections only) for ``tokens`` patches (+ cls)."""
    d, di, n, rk = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
    g = 2 if cfg.bimamba else 1
    per_token = 2 * (g * d * di + d * di + g * di * (rk + 2 * n) + g * rk * di + di * d)
    return float(per_token * cfg.depth * (tokens + 1) * batch)


def matmul_peak(device: torch.device, dtype: str, size: int = 8192, repeats: int = 10) -> float:
    """Measured FLOP/s of a ``size``-cubed matrix product on random data in ``dtype``."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    ms = median_ms(lambda: a @ b, 2, repeats)
    a = b = None  # noqa: F841 - free the operands (the closure reads these names)
    torch.cuda.empty_cache()
    return 2 * size**3 / (ms / 1e3)


def train_floor(cfg, geometry: str, batch: int, dtype: str, bandwidth: float, peak: float) -> dict:
    """The floors of a training step: bytes the unfused operations must move over the measured bandwidth,
    and the matmul FLOPs over the measured peak. A step is one forward per MSPM pass plus a backward that
    reads the saved activations and writes their gradients (taken as 2x the forward's bytes) and does 2x
    the forward's matmul FLOPs."""
    from ssamba.model.layers import grid_shape

    frames, fs, ts, task = GEOMETRIES[geometry]
    f, t = grid_shape(128, frames, cfg.patch_size, fs, ts)
    tokens, passes = f * t, 2 if task == "pretrain" else 1
    nbytes = 3 * passes * floor_bytes(cfg, tokens, batch, dtype)
    flops = 3 * passes * matmul_flops(cfg, tokens, batch)
    return {
        "floor_bytes": nbytes,
        "floor_flops": flops,
        "floor_bytes_ms": nbytes / bandwidth * 1e3,
        "floor_flops_ms": flops / peak * 1e3,
    }


def run_train_ladder(
    models: list[str],
    geometries: list[str],
    dtypes: list[str],
    batches: list[str],
    levels: str = "all",
    warmup: int = 3,
    repeats: int = 10,
    max_cap: int = 2048,
    profile: bool = False,
    out: Path | None = None,
) -> dict:
    from ssamba.model.encoder import set_speedups

    device = torch.device("cuda")
    from ssamba.ops.backends import add_norm_fn, conv_fn, resolve_backend
    from ssamba.ops.scan import causal_conv1d_ref

    backend = resolve_backend("auto")
    res = {
        "meta": environment(device)
        | {"scan_backend": backend, "causal_conv1d": conv_fn(backend) is not causal_conv1d_ref},
        "points": [],
        "profiles": [],
    }

    bw = copy_bandwidth(device)
    peaks = {dt: matmul_peak(device, dt) for dt in dtypes}
    res["meta"] |= {"copy_bandwidth_bytes_s": bw, "matmul_peak_flops": peaks}
    print(
        f"[train] copy bandwidth {bw / 1e12:.2f} TB/s; matmul peak "
        + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in peaks.items()),
        flush=True,
    )
    print(
        f"[train] scan backend {backend} (mamba-ssm {'found' if backend == 'cuda' else 'missing'}), "
        f"causal-conv1d {'found' if res['meta']['causal_conv1d'] else 'missing (cuDNN conv)'}",
        flush=True,
    )
    print(
        f"[train] {res['meta']['device']}: models {models}, geometries {geometries}, dtypes {dtypes}, "
        f"batches {batches}",
        flush=True,
    )

    def save():
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_ladder.json").write_text(json.dumps(res, indent=1))

    for geometry in geometries:
        for name in models:
            model = build(name, geometry, device)
            ssamba = name.startswith("ssamba")
            steps = (
                list(enumerate(LEVELS))
                if ssamba
                else [
                    (None, ("SSAST, fused attention", {}, False)),
                    (None, ("SSAST, fused attention, CUDA graph", {}, True)),
                ]
            )
            if levels == "last":
                steps = [s for s in steps if not s[1][2]][-1:] + [s for s in steps if s[1][2]][-1:]
            for dtype in dtypes:
                for level, (label, switches, graphed) in steps:
                    if switches.get("fused_norm") and add_norm_fn() is None:
                        switches = {**switches, "fused_norm": False}
                        label += " [no fused add-norm: mamba-ssm missing]"
                    if switches:
                        try:
                            set_speedups(model, **switches)
                        except RuntimeError as exc:  # e.g. fused add-norm without mamba-ssm's Triton norm
                            res["points"].append(
                                Point(name, geometry, dtype, level, label, 0, error=str(exc)[:120]).__dict__
                            )
                            print(f"[train] {geometry} {name} {dtype} {level}. {label}: {exc}", flush=True)
                            continue
                    for spec in batches:
                        if spec == "max":
                            b = largest_batch(model, geometry, dtype, device, 32, max_cap, graphed)
                        else:
                            b = int(spec)
                        p = Point(name, geometry, dtype, level, label, b, max_batch=spec == "max", graphed=graphed)
                        for k, v in measure(model, geometry, b, dtype, device, warmup, repeats, graphed).items():
                            setattr(p, k, v)
                        row = p.__dict__
                        if ssamba and b:
                            row |= train_floor(model.cfg, geometry, b, dtype, bw, peaks[dtype])
                        res["points"].append(row)
                        save()
                        print(
                            f"[train] {geometry} {name} {dtype} {'' if level is None else f'{level}. '}{label} "
                            f"batch {b}{' (max)' if p.max_batch else ''}: "
                            + (
                                p.error
                                or f"{p.step_ms:.1f} ms, {p.samples_s:.0f} samples/s, "
                                f"peak {fmt_bytes(p.peak_mem_bytes)}"
                            ),
                            flush=True,
                        )
                if profile:
                    step = make_step(model, geometry, 32, dtype, device)
                    try:
                        res["profiles"].append(
                            {
                                "model": name,
                                "geometry": geometry,
                                "dtype": dtype,
                                "batch": 32,
                                "kernels": top_kernels(step),
                            }
                        )
                    finally:
                        step = None
                        model.zero_grad(set_to_none=True)
                    save()
            del model
            torch.cuda.empty_cache()
    table = train_markdown(res)
    print(table, flush=True)
    if out is not None:
        save()
        (out / "train_ladder.md").write_text(table)
    return res


def train_markdown(res: dict) -> str:

    m = res["meta"]
    head = f"Training step, {m.get('device', '?')}"
    if m.get("copy_bandwidth_bytes_s"):
        head += f"; copy bandwidth {m['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s, matmul peak " + ", ".join(
            f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in m.get("matmul_peak_flops", {}).items()
        )
    lines = [
        head,
        "",
        "| geometry | model | dtype | step | batch | ms/step | samples/s | x SSAST (eager / graphed) | peak mem "
        "| floor ms (bytes / FLOPs) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ssast = {}
    for p in res["points"]:
        if p["model"].startswith("ssast") and p.get("samples_s"):
            size = p["model"].split("-")[1]
            ssast[(p["geometry"], size, p["dtype"], p["max_batch"] or p["batch"], p.get("graphed", False))] = p[
                "samples_s"
            ]
    for p in res["points"]:
        size = p["model"].split("-")[1]
        key = (p["geometry"], size, p["dtype"], p["max_batch"] or p["batch"])
        rel = ""
        if p.get("samples_s") and not p["model"].startswith("ssast"):
            rel = " / ".join(
                f"{p['samples_s'] / ssast[key + (g,)]:.2f}" if ssast.get(key + (g,)) else "-" for g in (False, True)
            )
        step = ("" if p["level"] is None else f"{p['level']}. ") + p["step"]
        b = f"{p['batch']}" + (" (max)" if p["max_batch"] else "")
        floor = f"{p['floor_bytes_ms']:.1f} / {p['floor_flops_ms']:.1f}" if p.get("floor_bytes_ms") is not None else ""
        if p.get("error"):
            lines.append(f"| {p['geometry']} | {p['model']} | {p['dtype']} | {step} | {b} | {p['error']} | | | | |")
        else:
            lines.append(
                f"| {p['geometry']} | {p['model']} | {p['dtype']} | {step} | {b} | {p['step_ms']:.1f} | "
                f"{p['samples_s']:.0f} | {rel} | {fmt_bytes(p['peak_mem_bytes'])} | {floor} |"
            )
    for prof in res.get("profiles", []):
        lines += [
            "",
            f"Top kernels, {prof['model']} {prof['geometry']} {prof['dtype']} batch {prof['batch']} "
            "(one profiled step):",
            "",
            "| kernel | calls | total us |",
            "|---|---:|---:|",
        ]
        lines += [f"| `{k['kernel']}` | {k['calls']} | {k['total_us']:.0f} |" for k in prof["kernels"]]
    return "\n".join(lines) + "\n"
