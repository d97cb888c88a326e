"""Feature cache: each clip's fbank computed once per front-end setting, in Arrow IPC shards.

Layout: ``<cache root>/<FrontendConfig.fbank_key()>/shard-<time>-<uuid>.arrow``. The folder name
hashes every parameter that changes the fbank, so a changed setting never reads stale features.
Each row identifies its clip by absolute path, byte size and modification time: an audio file that
changed since is recomputed. Shards are written to a temporary name and renamed, so a killed build
never leaves a half-written shard (only complete ``shard-*.arrow`` files are read, and an unreadable
one is skipped); the temporary file of a killed writer is removed by a later build once it is an
hour old. Concurrent builders each write their own shards (the newest entry of a clip wins), so no
lock is needed.

Rows hold the un-padded, un-normalised fbank ``(T, F)`` as float32 bytes; a clip that failed to
decode is stored with its error (and retried only when the file changes).
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ssamba.base.errors import AudioError
from ssamba.base.files import atomic_path
from ssamba.base.paths import cache_dir
from ssamba.config import FrontendConfig
from ssamba.data.audio import file_fbank
from ssamba.data.manifest import Manifest

SHARD_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("n_frames", pa.int32()),
        ("n_bins", pa.int32()),
        ("fbank", pa.large_binary()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
    ]
)
ROWS_PER_SHARD = 1024
STALE_TMP_S = 3600.0  # a shard's temporary file this old belongs to a killed writer


def _file_id(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _compute(args: tuple[str, FrontendConfig]) -> dict:
    """Worker: one clip -> a shard row (fbank bytes, or the error)."""
    path, cfg = args
    size, mtime = _file_id(Path(path))
    row = {
        "path": path,
        "size": size,
        "mtime_ns": mtime,
        "n_frames": 0,
        "n_bins": cfg.num_mel_bins,
        "fbank": None,
        "error_kind": None,
        "error": None,
    }
    try:
        fb = file_fbank(path, cfg)
        row["n_frames"] = int(fb.shape[0])
        row["fbank"] = fb.numpy().astype(np.float32, copy=False).tobytes()
    except AudioError as exc:
        row["error_kind"], row["error"] = exc.reason, exc.message
    return row


def _worker_init() -> None:
    torch.set_num_threads(1)


@dataclass
class BuildReport:
    """What a cache build did: clips computed or reused, and those that fail to decode (path -> message)."""

    computed: int = 0
    reused: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class CachedFeatures:
    """Read side: ``get(abs_path) -> (T, F) float32 numpy view`` (zero-copy from memory-mapped shards)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._tables: list[tuple] = []  # (data buffer, offsets, n_frames, n_bins) per shard
        self._index: dict[str, tuple[int, int]] = {}  # path -> (table, row)
        self._ids: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns)
        self._errors: dict[str, tuple[str, str]] = {}
        for shard in sorted(folder.glob("shard-*.arrow")):
            try:
                table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
            except (pa.ArrowInvalid, OSError):
                continue  # a foreign or damaged file: never served
            t = len(self._tables)
            col = table.column("fbank").combine_chunks()
            self._tables.append(
                (
                    col.buffers()[2] or b"",
                    np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset :],
                    table.column("n_frames").to_numpy(),
                    table.column("n_bins").to_numpy(),
                )
            )
            cols = table.select(["path", "size", "mtime_ns", "error_kind", "error"]).to_pydict()
            for r, p in enumerate(cols["path"]):
                self._ids[p] = (cols["size"][r], cols["mtime_ns"][r])
                if cols["error_kind"][r] is None:
                    self._index[p] = (t, r)
                    self._errors.pop(p, None)
                else:
                    self._errors[p] = (cols["error_kind"][r], cols["error"][r])
                    self._index.pop(p, None)

    def __len__(self) -> int:
        return len(self._index)

    def is_fresh(self, path: str) -> bool:
        """True when the cache holds an entry (features or error) for the file as it is now."""
        ident = self._ids.get(path)
        return ident is not None and ident == _file_id(Path(path))

    def __contains__(self, path: str) -> bool:
        return path in self._index and self.is_fresh(path)

    def error(self, path: str) -> tuple[str, str] | None:
        """``(kind, message)`` of a clip that failed to decode, else None."""
        return self._errors.get(path) if self.is_fresh(path) else None

    def get(self, path: str) -> np.ndarray:
        """The cached fbank ``(T, F)``; KeyError if absent or stale; AudioError if it failed to decode."""
        err = self.error(path)
        if err is not None:
            raise AudioError(path, err[0], err[1])
        if path not in self:
            raise KeyError(f"{path} is not in the feature cache {self.folder} (or changed since)")
        t, r = self._index[path]
        data, offsets, frames, bins = self._tables[t]
        n = int(frames[r]) * int(bins[r])
        arr = np.frombuffer(data, dtype=np.float32, count=n, offset=int(offsets[r]))
        return arr.reshape(int(frames[r]), int(bins[r]))


class FeatureCache:
    """Write side: compute what is missing for a manifest, then open it for reading."""

    def __init__(self, cfg: FrontendConfig = FrontendConfig(), root: str | os.PathLike | None = None):
        self.cfg = cfg
        base = Path(root) if root is not None else cache_dir("features")
        self.folder = base / cfg.fbank_key()

    def open(self) -> CachedFeatures:
        self.folder.mkdir(parents=True, exist_ok=True)
        return CachedFeatures(self.folder)

    def build(
        self, manifest: Manifest, *, workers: int = 0, progress: bool = True
    ) -> tuple[CachedFeatures, BuildReport]:
        """Compute the fbank of every clip not already cached (or changed); returns the reader.

        ``workers`` > 0 computes in that many processes. Clips that fail to decode are recorded
        (with their error) and reported in ``BuildReport.failed``; the build itself never stops.
        """
        t0 = time.perf_counter()
        cached = self.open()
        self._remove_stale_tmp()
        paths = list(dict.fromkeys(str(p.resolve()) for p in manifest.abs_paths()))
        todo = [p for p in paths if not cached.is_fresh(p)]
        report = BuildReport(reused=len(paths) - len(todo))
        if todo:
            rows: list[dict] = []
            bar = tqdm(total=len(todo), desc=f"fbank cache {self.folder.name}", unit="clip", disable=not progress)
            jobs = [(p, self.cfg) for p in todo]
            if workers > 0:
                ctx = get_context("spawn")
                with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                    for row in pool.map(_compute, jobs, chunksize=16):
                        self._collect(row, rows, report, bar)
            else:
                for job in jobs:
                    self._collect(_compute(job), rows, report, bar)
            if rows:
                self._write_shard(rows)
            bar.close()
            cached = self.open()
        for p in paths:
            err = cached.error(p)
            if err is not None:
                report.failed[p] = f"{p}: {err[1]}"
        report.seconds = time.perf_counter() - t0
        return cached, report

    def _collect(self, row: dict, rows: list[dict], report: BuildReport, bar) -> None:
        rows.append(row)
        report.computed += 1
        bar.update(1)
        if len(rows) >= ROWS_PER_SHARD:
            self._write_shard(rows)
            rows.clear()

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for tmp in self.folder.glob(".shard-*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
            except FileNotFoundError:
                pass

    def _write_shard(self, rows: list[dict]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.arrow"
        final = self.folder / name
        with atomic_path(final, hidden=True) as tmp:  # .shard-*.tmp until complete
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
                writer.write_table(table)
        return final


def compute_stats(
    manifest: Manifest,
    cfg: FrontendConfig = FrontendConfig(),
    *,
    cache_root=None,
    workers: int = 0,
    progress: bool = True,
) -> tuple[float, float, int, int, dict[str, str]]:
    """Dataset statistics of the fbank: mean and std over every frame and bin of every clip.

    Padding is not counted (only real frames). Returns ``(mean, std, n_clips, n_frames, failed)``;
    clips that failed to decode are left out and returned in ``failed``.
    """
    cached, report = FeatureCache(cfg, cache_root).build(manifest, workers=workers, progress=progress)
    total = 0.0
    total_sq = 0.0
    count = 0
    n_clips = 0
    n_frames = 0
    for p in manifest.abs_paths():
        key = str(p.resolve())
        if key not in cached:
            continue
        fb = cached.get(key).astype(np.float64)
        total += fb.sum()
        total_sq += np.square(fb).sum()
        count += fb.size
        n_clips += 1
        n_frames += fb.shape[0]
    if count == 0:
        raise AudioError(
            manifest.meta.get("root") or "manifest",
            "empty",
            f"no clip of the manifest could be decoded ({len(report.failed)} failed), so no statistics. "
            f"Fix: check the files listed by `python -m ssamba.data stats`.",
        )
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return float(mean), float(np.sqrt(var)), n_clips, n_frames, report.failed
