"""Data-path benchmark: clips/s for decode + fbank on the fly against reading the feature cache."""

from __future__ import annotations

import os
import tempfile
import time

import torch

from ssamba.config import ClipInput, FrontendConfig
from ssamba.data.dataset import ClipDataset
from ssamba.data.features import FeatureCache
from ssamba.data.manifest import read_manifest


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:10.1f}"


def run_bench(
    manifest_path,
    *,
    limit: int = 400,
    workers: int = 0,
    frontend: FrontendConfig = FrontendConfig(),
    clip: ClipInput = ClipInput(),
) -> dict:
    """Time the three ways a clip reaches training; prints a table and returns the figures (clips/s)."""
    manifest = read_manifest(manifest_path)
    if limit and len(manifest) > limit:
        manifest = manifest.subset(list(range(limit)))
    n = len(manifest)
    threads = torch.get_num_threads()
    results: dict[str, float] = {}
    fe = frontend
    with tempfile.TemporaryDirectory(prefix="ssamba-bench-") as tmp:
        ds = ClipDataset(manifest, fe, clip)
        t0 = time.perf_counter()
        bad = sum(1 for i in range(n) if not isinstance(ds[i], dict))
        results["on_the_fly"] = n / (time.perf_counter() - t0)

        cache = FeatureCache(fe, root=tmp)
        feats, report = cache.build(manifest, workers=workers, progress=False)
        results["cache_build"] = n / report.seconds

        t0 = time.perf_counter()
        feats = cache.open()
        open_s = time.perf_counter() - t0
        ds_cached = ClipDataset(manifest, fe, clip, cache=feats)
        t0 = time.perf_counter()
        for _ in range(3):
            for i in range(n):
                ds_cached[i]
        results["cache_read"] = 3 * n / (time.perf_counter() - t0)
        paths = ds_cached.paths
        t0 = time.perf_counter()
        for _ in range(3):
            for p in paths:
                feats.get(p)
        results["cache_raw_get"] = 3 * n / (time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in cache.folder.iterdir())
    dur = float(manifest.df["duration"].fillna(0).mean())
    print(
        f"data bench: {n} clips of {manifest.meta.get('dataset')!r} (mean {dur:.2f} s), "
        f"{os.cpu_count()} CPUs, torch threads {threads}, target_length {clip.target_length}"
    )
    print("| path | clips/s |")
    print("|---|---:|")
    print(f"| decode + resample + fbank + pad + normalise (1 process) | {_rate(1, 1 / results['on_the_fly'])} |")
    print(
        f"| cache build ({workers or 1} process{'es' if workers > 1 else ''}) | {_rate(1, 1 / results['cache_build'])} |"
    )
    print(f"| cached fbank + pad + normalise (dataset item) | {_rate(1, 1 / results['cache_read'])} |")
    print(f"| cached fbank, raw zero-copy get | {_rate(1, 1 / results['cache_raw_get'])} |")
    print(f"cache: {size / 2**20:.1f} MiB for {n} clips, opened in {open_s * 1e3:.1f} ms; {bad} bad clips")
    return results
