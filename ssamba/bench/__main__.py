"""``python -m ssamba.bench``: the benchmarks' one command line (encoder sweep by default; ``--ladder``,
``--train-ladder`` and ``--pretrain`` for the others). Each benchmark's own module says what it measures."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from ssamba.bench.encoder import (
    ALL_MODELS,
    DEFAULT_TOKENS,
    QUICK_TOKENS,
    SIZES,
    Bench,
    Settings,
    build_model,
    headline,
    model_config,
    parse_tokens,
    report,
)
from ssamba.config import SCAN_BACKENDS


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ssamba.bench", description="SSAMBA vs SSAST efficiency benchmarks")
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
    add(
        "--ladder",
        action="store_true",
        help="time SSAMBA-tiny bi at each speed-up step vs fused SSAST-tiny and the memory-bound floor "
        "(default tokens 16384,22000; first --dtypes entry)",
    )
    add("--ladder-batch", type=int, default=64, help="throughput batch of --ladder (default 64)")
    add(
        "--pretrain",
        action="store_true",
        help="pretraining throughput through the real data path (paper-tiny, 512 tokens, bf16) and GPU idle time",
    )
    add("--pretrain-manifest", default="", help="manifest for --pretrain (default: the demo corpus)")
    add("--pretrain-batch", type=int, help="batch of --pretrain (default: the preset's)")
    add("--num-workers", type=int, default=8, help="loader processes of --pretrain")
    add(
        "--train-ladder",
        action="store_true",
        help="training step (pretraining MSPM and speechcommands fine-tuning) at each speed-up step vs SSAST "
        "fused of the same size: samples/s, peak memory (--models, --dtypes, --train-batches)",
    )
    add("--geometries", default="pretrain,finetune", help="--train-ladder geometries (pretrain, finetune)")
    add("--train-batches", default="32,max", help="--train-ladder batches: numbers and/or 'max' (largest that fits)")
    add("--levels", default="all", choices=["all", "last"], help="--train-ladder: every speed-up step or the last")
    add("--profile", action="store_true", help="--train-ladder: top kernels of one profiled step per model")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.train_ladder:
        from ssamba.bench.training import run_train_ladder

        if not torch.cuda.is_available():
            p.error("--train-ladder needs a CUDA device")
        names = (
            [f"ssamba-{s}-{v}" for s in SIZES for v in ("bi", "uni")] + [f"ssast-{s}-fused" for s in SIZES]
            if a.models == "all"
            else [model_config(m)[0] for m in a.models.split(",") if m.strip()]
        )
        return run_train_ladder(
            names,
            [g.strip() for g in a.geometries.split(",") if g.strip()],
            [d.strip() for d in a.dtypes.split(",") if d.strip()],
            [b.strip() for b in a.train_batches.split(",") if b.strip()],
            a.levels,
            a.warmup if a.warmup is not None else 3,
            a.repeats or 10,
            profile=a.profile,
            out=out,
        )
    if a.pretrain:
        from ssamba.bench.pretraining import run_pretrain_bench

        if not torch.cuda.is_available():
            p.error("--pretrain needs a CUDA device")
        return run_pretrain_bench(
            manifest=a.pretrain_manifest, batch_size=a.pretrain_batch, num_workers=a.num_workers, out=out
        )
    if a.ladder:
        from ssamba.bench.ladder import run_ladder

        if not torch.cuda.is_available():
            p.error("--ladder needs a CUDA device")
        return run_ladder(
            parse_tokens(a.tokens) if a.tokens else [16384, 22000],
            a.dtypes.split(",")[0].strip(),
            a.ladder_batch,
            a.repeats or 20,
            out,
            "cuda" if a.scan_backend == "auto" else a.scan_backend,
        )
    if a.replot:
        path = out / ("results_paper.json" if a.paper_protocol else "results.json")
        res = json.loads(path.read_text())
        res["headline"] = headline(res)
        report(res, out, a.paper_protocol)
        return res
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible (use --device cpu)")
    models = ALL_MODELS if a.models == "all" else [model_config(m)[0] for m in a.models.split(",") if m.strip()]
    s = Settings(
        device=a.device,
        dtypes=tuple(d.strip() for d in a.dtypes.split(",") if d.strip()),
        tokens=tuple(parse_tokens(a.tokens) if a.tokens else (QUICK_TOKENS if a.quick else DEFAULT_TOKENS)),
        warmup=1 if a.quick else 3,
        repeats=3 if a.quick else 10,
        max_batch=a.max_batch,
        throughput=not a.no_throughput,
        train=not a.no_train,
        train_tokens=-(-a.train_tokens // 8) * 8,
        train_batch=a.train_batch,
        scan_backend=a.scan_backend,
        graphs=a.graphs,
    )
    if a.paper_protocol:
        s = replace(
            s,
            dtypes=("fp32",),
            warmup=0,
            repeats=5,
            reduce="mean",
            batch=2,
            throughput=False,
            train=False,
            protocol="paper",
        )
    s = replace(
        s, warmup=s.warmup if a.warmup is None else a.warmup, repeats=s.repeats if a.repeats is None else a.repeats
    )
    bad = [d for d in s.dtypes if d not in ("fp32", "bf16", "fp16")]
    if bad:
        p.error(f"--dtypes: unknown {bad} (fp32, bf16, fp16)")
    bench = Bench(models, s, out, lambda n_, t, d, tr: build_model(n_, t, d, tr, s.scan_backend), resume=a.resume)
    bench.log(
        f"device {bench.res['meta']['device']}, torch {torch.__version__}, {len(models)} models x "
        f"{list(s.dtypes)}, tokens {list(s.tokens)}, protocol {s.protocol} -> {bench.path}"
    )
    res = bench.run()
    report(res, out, a.paper_protocol)
    return res


if __name__ == "__main__":
    main()
