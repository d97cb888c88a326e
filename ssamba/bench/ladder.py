"""The encoder speed-ups one at a time, and the memory-bound floor they are judged against.

``python -m ssamba.bench --ladder`` times SSAMBA-tiny (bidirectional) at each cumulative step of
the fast path, on one card in one process, next to fused-attention SSAST-tiny (eager and graphed):

0. reference path: one conv and one scan per direction, the backward direction on flipped copies,
   the odd layer of each pair on a flipped sequence;
1. both directions in one conv + one scan call, channel-first projections, the gate fused with the
   sum of the directions, pairs without flips (``Mamba._forward_fast``);
2. the length padded to the scan kernel's chunk (its even-length path);
3. the whole forward replayed from a CUDA graph;
4. residual add + norm in one Triton kernel (graphed; and, for comparison, eager);
5. the chunked inference scan (:mod:`ssamba.ops.chunk_scan`): each sequence split across thread
   blocks instead of mamba-ssm's one block per channel (graphed; without step 2's padding, which it
   does not need; and eager).

Latency is batch 1 (median), throughput is at a fixed batch (``--ladder-batch``), memory is the peak at
batch 1. The *floor* is the time to move the bytes the unfused operations must read and write
(:func:`floor_bytes`) at the copy bandwidth measured on the card (:func:`copy_bandwidth`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ssamba.bench.encoder import build_model, environment, fmt_bytes, frames, model_config
from ssamba.bench.timing import autocast, is_oom, median_ms
from ssamba.config import ModelConfig

_OFF = dict(chunk_scan=False)
LEVELS = [
    (
        "reference path (per-direction scans, flips)",
        dict(fuse_directions=False, pad=False, fused_norm=False, **_OFF),
        False,
    ),
    (
        "+ directions in one scan, channel-first, no flips",
        dict(fuse_directions=True, pad=False, fused_norm=False, **_OFF),
        False,
    ),
    ("+ length padded to the scan chunk", dict(fuse_directions=True, pad=True, fused_norm=False, **_OFF), False),
    ("+ CUDA graph", dict(fuse_directions=True, pad=True, fused_norm=False, **_OFF), True),
    ("+ fused add-norm (Triton), graphed", dict(fuse_directions=True, pad=True, fused_norm=True, **_OFF), True),
    ("(fused add-norm, eager)", dict(fuse_directions=True, pad=True, fused_norm=True, **_OFF), False),
    (
        "+ chunked scan (sequence across blocks), graphed",
        dict(fuse_directions=True, pad=True, fused_norm=True, chunk_scan=True),
        True,
    ),
    (
        "(chunked scan, unpadded), graphed",
        dict(fuse_directions=True, pad=False, fused_norm=True, chunk_scan=True),
        True,
    ),
    ("(chunked scan, eager)", dict(fuse_directions=True, pad=True, fused_norm=True, chunk_scan=True), False),
]


def floor_bytes(cfg: ModelConfig, tokens: int, batch: int = 1, dtype: str = "bf16") -> int:
    """Bytes the unfused operations of a Mamba encoder forward must read and write (each op reads its
    inputs once and writes its outputs once; weights once), for ``tokens`` patches (+ cls) x ``batch``.

    Per token and layer, with ``e`` bytes per activation, ``r`` per residual, ``G`` directions:
    add+norm ``D(2e+2r)``, in_proj ``(D+2di)e``, conv ``2G di e``, x_proj ``G(di+R+2N)e``,
    dt_proj ``G(R+di)e``, scan ``G(3di+2N)e``, combine+gate ``(G+2)di e``, out_proj ``(di+D)e``.
    """
    e = 4 if dtype == "fp32" else 2
    r = 4 if cfg.residual_in_fp32 else e
    d, di, n, rk = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
    g = 2 if cfg.bimamba else 1
    per = (
        d * (2 * e + 2 * r)
        + (d + 2 * di) * e
        + 2 * g * di * e
        + g * (di + rk + 2 * n) * e
        + g * (rk + di) * e
        + g * (3 * di + 2 * n) * e
        + (g + 2) * di * e
        + (di + d) * e
    )
    weights_per_layer = d * 2 * di + g * (di * 4 + di * (rk + 2 * n) + rk * di + 2 * di + di * n + di) + di * d + 2 * d
    length = tokens + 1
    final = d * (2 * e + 2 * r) + 2 * d * e
    return int(batch * length * (cfg.depth * per + final) + cfg.depth * weights_per_layer * e)


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written over the median time)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def _measure(model, tokens: int, batch: int, dtype: str, graphed: bool, device, repeats: int) -> dict:
    from ssamba.ops.graphs import GraphedInference

    out: dict = {}
    for b, key in ((1, "latency_ms"), (batch, "batch_ms")):
        x = torch.randn(b, frames(tokens), 128, device=device)
        try:
            if graphed:
                run = GraphedInference(model.encode, autocast=dtype)
                fn = lambda: run(x)  # noqa: E731
            else:

                def fn():
                    with torch.no_grad(), autocast(device, dtype):
                        model.encode(x)

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out[key] = median_ms(fn, 3, repeats)
            if b == 1:
                out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        except Exception as exc:  # noqa: BLE001 - an out-of-memory point is recorded, not fatal
            if not is_oom(exc):
                raise
            out[key] = None
        finally:
            fn = run = None  # noqa: F841 - free the graph's memory before the next point
            torch.cuda.empty_cache()
    out["throughput_seq_s"] = batch * 1e3 / out["batch_ms"] if out.get("batch_ms") else None
    out["batch"] = batch
    return out


def run_ladder(
    tokens: list[int],
    dtype: str = "bf16",
    batch: int = 64,
    repeats: int = 20,
    out: Path | None = None,
    scan_backend: str = "cuda",
) -> dict:
    from ssamba.model.encoder import set_speedups

    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    res = {"meta": environment(device) | {"copy_bandwidth_bytes_s": bw, "dtype": dtype, "batch": batch}, "rows": []}
    print(
        f"[ladder] {res['meta']['device']}: copy bandwidth {bw / 1e12:.2f} TB/s; {dtype}; throughput at batch {batch}",
        flush=True,
    )
    _, cfg = model_config("ssamba-tiny-bi", scan_backend)
    for n in tokens:
        floor_1 = floor_bytes(cfg, n, 1, dtype) / bw * 1e3
        model = build_model("ssamba-tiny-bi", n, device, False, scan_backend)
        for i, (name, switches, graphed) in enumerate(LEVELS):
            set_speedups(model, **switches)
            row = {
                "tokens": n,
                "model": "ssamba-tiny-bi",
                "level": i,
                "step": name,
                "graphed": graphed,
                "floor_ms": floor_1,
                **_measure(model, n, batch, dtype, graphed, device, repeats),
            }
            res["rows"].append(row)
            print(f"[ladder] N={n} {i}. {name}: {_fmt(row)}", flush=True)
        del model
        ssast = build_model("ssast-tiny-fused", n, device, False)
        for graphed in (False, True):
            row = {
                "tokens": n,
                "model": "ssast-tiny-fused",
                "level": None,
                "step": "SSAST-tiny fused attention" + (", CUDA graph" if graphed else ""),
                "graphed": graphed,
                "floor_ms": None,
                **_measure(ssast, n, batch, dtype, graphed, device, repeats),
            }
            res["rows"].append(row)
            print(f"[ladder] N={n} {row['step']}: {_fmt(row)}", flush=True)
        del ssast
        torch.cuda.empty_cache()
    table = ladder_markdown(res)
    print(table, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ladder.json").write_text(json.dumps(res, indent=1))
        (out / "ladder.md").write_text(table)
    return res


def _fmt(row: dict) -> str:
    lat = f"{row['latency_ms']:.2f} ms" if row.get("latency_ms") else "OOM"
    thr = f"{row['throughput_seq_s']:.1f} seq/s" if row.get("throughput_seq_s") else "OOM"
    return f"batch 1 {lat}, batch {row['batch']} {thr}"


def ladder_markdown(res: dict) -> str:

    m = res["meta"]
    lines = [
        f"Encoder speed-ups, {m.get('device', '?')}, {m['dtype']}, copy bandwidth "
        f"{m['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s",
        "",
        f"| tokens | step | batch 1 latency (ms) | x floor | peak mem (batch 1) | seq/s at batch {m['batch']} |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lat = r.get("latency_ms")
        ratio = f"{lat / r['floor_ms']:.1f}" if lat and r.get("floor_ms") else ""
        lines.append(
            f"| {r['tokens']} | {r['step']} | {lat:.2f} |" if lat else f"| {r['tokens']} | {r['step']} | OOM |"
        )
        lines[-1] += (
            f" {ratio} | {fmt_bytes(r.get('peak_mem_bytes'))} | {r['throughput_seq_s']:.1f} |"
            if r.get("throughput_seq_s")
            else f" {ratio} | {fmt_bytes(r.get('peak_mem_bytes'))} | OOM |"
        )
    floors = sorted({(r["tokens"], r["floor_ms"]) for r in res["rows"] if r.get("floor_ms")})
    lines.append("")
    lines += [f"Memory-bound floor of SSAMBA-tiny bi at {n} tokens, batch 1: {f:.2f} ms" for n, f in floors]
    return "\n".join(lines) + "\n"
