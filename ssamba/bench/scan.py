"""Scan benchmarks: the CPU reference scan against a naive per-token loop (``python -m ssamba.bench.scan``),
and on a GPU mamba-ssm's scan against the chunked scan at several chunk lengths (``--chunked``).
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
    ap.add_argument("--skip-naive-large", action="store_true", help="the naive loop takes ~40 s there")
    args = ap.parse_args(argv)
    if args.chunked:
        benchmark(kernels=("general", "pipelined") if args.general else ("pipelined",))
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


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
