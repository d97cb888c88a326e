"""Scan benchmarks: the CPU reference scan against a naive per-token loop (``python -m ssamba.bench.scan``),
and on a GPU mamba-ssm's scan against the chunked scan at several chunk lengths (``--chunked``) and,
forward + backward, against the training scan at several sequence-segment counts (``--train``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional

import torch

from ssamba.bench.timing import median_ms
from ssamba.ops.backends import mamba_scan
from ssamba.ops.chunk_scan import TILE, chunk_scan, plan_chunk_len
from ssamba.ops.scan import selective_scan_naive, selective_scan_ref


def _make_inputs(b: int, d: int, L: int, N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * 0.5
    A = -torch.exp(torch.randn(d, N, generator=g) * 0.5)
    B = torch.randn(b, N, L, generator=g)
    C = torch.randn(b, N, L, generator=g)
    D = torch.randn(d, generator=g)
    z = torch.randn(b, d, L, generator=g)
    bias = torch.randn(d, generator=g) * 0.1
    return [u, delta, A, B, C, D, z, bias]


def _bench(fn, inputs, reps: int, warmup: int = 1) -> float:
    """Median ms of one forward + backward of ``fn`` on fresh-gradient copies of ``inputs``."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves, delta_softplus=True).sum().backward()

    return median_ms(step, warmup, reps, torch.device("cpu"))


def main(argv: Optional[list[str]] = None) -> None:  # pragma: no cover - benchmark entry point
    """Print forward+backward milliseconds (median) of naive vs ref on two Mamba-like shapes.

    Inputs: u, delta, z (b, d, L); A (d, N); B, C (b, N, L); D, delta_bias (d,); softplus on.
    """
    ap = argparse.ArgumentParser(prog="python -m ssamba.bench.scan", description=main.__doc__)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--chunked", action="store_true", help="GPU: mamba-ssm's scan vs the chunked scan instead")
    ap.add_argument("--general", action="store_true", help="--chunked: also the general (unpipelined) kernel")
    ap.add_argument("--train", action="store_true", help="GPU: forward + backward, mamba-ssm vs the training scan")
    ap.add_argument("--skip-naive-large", action="store_true", help="the naive loop takes ~40 s there")
    args = ap.parse_args(argv)
    if args.chunked:
        benchmark(kernels=("general", "pipelined") if args.general else ("pipelined",))
        return
    if args.train:
        train_benchmark()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    # (b, d, L, N, naive warm-up, naive runs, ref runs)
    for b, d, L, N, nw, nr, rr in ((16, 128, 65, 16, 1, 7, 21), (8, 384, 513, 16, 0, 3, 7)):
        inputs = _make_inputs(b, d, L, N)
        t_ref = _bench(selective_scan_ref, inputs, rr)
        if L > 100 and args.skip_naive_large:
            print(f"b={b:3d} d={d:4d} L={L:4d} N={N:3d}  fwd+bwd median  ref {t_ref:8.1f} ms")
            continue
        t_naive = _bench(selective_scan_naive, inputs, nr, warmup=nw)
        print(
            f"b={b:3d} d={d:4d} L={L:4d} N={N:3d}  fwd+bwd median  naive {t_naive:9.1f} ms   "
            f"ref {t_ref:8.1f} ms   speed-up x{t_naive / t_ref:.1f}"
        )


def benchmark(
    shapes: list[tuple[int, int]] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 20,
    kernels: tuple[str, ...] = ("pipelined",),
) -> list[dict]:
    """Time mamba-ssm's ``selective_scan_fn`` against :func:`chunk_scan` (several chunk lengths) on
    random inputs shaped like the fast mixer's (``(1, channels, L)``, 2 groups); prints a table."""
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    shapes = shapes or [(768, 22528), (768, 8192), (768, 1024), (768 * 16, 22528), (768 * 64, 22528)]
    mamba = mamba_scan()
    rows = []
    for ch, L in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        u = torch.randn(1, ch, L, device=dev, generator=g).to(dtype)
        delta = (0.5 * torch.randn(1, ch, L, device=dev, generator=g)).to(dtype)
        groups = ch // 384
        BC = torch.randn(1, groups, 2, 16, L, device=dev, generator=g).to(dtype)
        Bm, Cm = BC[:, :, 0], BC[:, :, 1]
        A = -torch.rand(768, 16, device=dev, generator=g) * 8 - 0.1
        D = torch.randn(768, device=dev, generator=g)
        bias = torch.randn(768, device=dev, generator=g) * 0.5 - 3
        rep = ch // 768
        A_r, D_r, bias_r = A.repeat(rep, 1), D.repeat(rep), bias.repeat(rep)

        def timed(fn):
            return median_ms(fn, 3, repeats, dev) * 1e3  # us

        ref = None
        row = {"channels": ch, "length": L, "dtype": str(dtype).split(".")[-1]}
        if mamba is not None:
            ref = mamba(u, delta, A_r, Bm, Cm, D_r, None, bias_r, True)
            row["mamba_us"] = timed(lambda: mamba(u, delta, A_r, Bm, Cm, D_r, None, bias_r, True))
        auto = plan_chunk_len(1, ch, L, sms)
        for kernel in kernels:
            for cl in sorted({auto, 128, 256, 512, 1024, -(-L // TILE) * TILE}):
                fn = functools.partial(
                    chunk_scan,
                    u,
                    delta,
                    A,
                    Bm,
                    Cm,
                    D,
                    bias,
                    True,
                    param_repeat=rep,
                    param_period=768,
                    chunk_len=cl,
                    kernel=kernel,
                )
                y = fn()
                key = f"{kernel[0]}{cl}" + ("*" if cl == auto else "")
                row[f"{key}_us"] = timed(fn)
                if ref is not None:
                    row[f"{key}_maxdiff"] = (y.float() - ref.float()).abs().max().item()
        row["auto_chunk_len"] = auto
        rows.append(row)
        print(
            "[scan] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True,
        )
        del ref, y
        torch.cuda.empty_cache()
    return rows


# (name, batch, channels, groups = parameter sets) at the pretraining length (512 patches + cls)
TRAIN_SHAPES = [
    ("tiny-bi b32", 32, 768, 2),
    ("tiny-uni b32", 32, 384, 1),
    ("tiny-bi b128", 128, 768, 2),
    ("base-bi b16", 16, 3072, 2),
]


def train_benchmark(
    shapes: list[tuple[str, int, int, int]] | None = None,
    length: int = 513,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 10,
    segment_counts: tuple[int, ...] = (1, 2, 4, 8, 16),
) -> list[dict]:
    """Forward + backward of mamba-ssm's ``selective_scan_fn`` against :func:`train_scan` with each of
    ``segment_counts`` sequence segments and the automatic choice, on random inputs shaped like the fast
    mixer's (B/C groups = directions); also the largest difference of ``y`` and of every gradient from
    the one-segment run, relative to its largest value. Prints one line per shape and returns the rows."""
    from ssamba.ops import train_scan as TS

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    mamba = mamba_scan()
    rows = []
    for name, b, ch, sets in shapes or TRAIN_SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        period = ch // sets
        u = torch.randn(b, ch, length, device=dev, generator=g).to(dtype)
        delta = (0.5 * torch.randn(b, ch, length, device=dev, generator=g)).to(dtype)
        BC = torch.randn(b, sets, 2, 16, length, device=dev, generator=g).to(dtype)
        A_log = [torch.log(torch.rand(period, 16, device=dev, generator=g) * 4 + 0.1) for _ in range(sets)]
        D = [torch.randn(period, device=dev, generator=g) for _ in range(sets)]
        bias = [torch.randn(period, device=dev, generator=g) * 0.5 - 3 for _ in range(sets)]
        dy = torch.randn(b, ch, length, device=dev, generator=g).to(dtype)
        leaves = [u, delta, BC, *A_log, *D, *bias]

        def run(fn):
            xs = [t.detach().clone().requires_grad_() for t in leaves]
            y = fn(*xs)
            y.backward(dy)
            return [y.detach()] + [t.grad for t in xs]

        def ts(segs):
            def fn(u, delta, BC, *ps):
                a, d, bi = ps[:sets], ps[sets : 2 * sets], ps[2 * sets :]
                return TS.train_scan(
                    u, delta, tuple(a), BC[:, :, 0], BC[:, :, 1], tuple(d), tuple(bi), True, period, segs
                )

            return fn

        def mamba_fn(u, delta, BC, *ps):
            a, d, bi = ps[:sets], ps[sets : 2 * sets], ps[2 * sets :]
            A = -torch.exp(torch.cat(a))
            return mamba(u, delta, A, BC[:, :, 0], BC[:, :, 1], torch.cat(d), None, torch.cat(bi), True)

        auto = TS.segments(b, ch, length, sms)[1]
        row = {"shape": name, "batch": b, "channels": ch, "length": length, "auto_segments": auto}
        if mamba is not None:
            row["mamba_us"] = median_ms(lambda: run(mamba_fn), 2, repeats, dev) * 1e3
        base = run(ts(1))
        for segs in sorted(set(segment_counts) | {auto}):
            key = f"s{segs}" + ("*" if segs == auto else "")
            row[f"{key}_us"] = median_ms(lambda: run(ts(segs)), 2, repeats, dev) * 1e3
            if segs != 1:
                got = run(ts(segs))
                row[f"{key}_reldiff"] = max(
                    float((x.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30))
                    for x, r in zip(got, base)
                )
        rows.append(row)
        print(
            "[train-scan] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True,
        )
        del base
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
