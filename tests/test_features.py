"""Feature cache: exact round trip, reuse, invalidation by setting and by file change, failures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ssamba.config import FrontendConfig
from ssamba.data.audio import file_fbank
from ssamba.data.features import FeatureCache, compute_stats
from ssamba.data.manifest import Manifest
from tests.conftest import write_tone


def _toy(tmp_path, n=4, bad=False):
    rows = []
    for i in range(n):
        write_tone(
            tmp_path / "audio" / f"t{i}.wav", seconds=0.5 + 0.1 * i, freq=300 + 100 * i, sr=16000 if i % 2 else 22050
        )
        rows.append({"path": f"t{i}.wav", "labels": ["x"]})
    if bad:
        (tmp_path / "audio" / "bad.wav").write_text("garbage")
        rows.append({"path": "bad.wav", "labels": ["x"]})
        rows.append({"path": "missing.wav", "labels": ["x"]})
    return Manifest.from_rows(rows, dataset="toy", root=tmp_path / "audio")


def test_cache_round_trip_is_exact_and_reused(tmp_path):
    m = _toy(tmp_path)
    cache = FeatureCache(FrontendConfig(), root=tmp_path / "cache")
    feats, rep = cache.build(m, progress=False)
    assert rep.computed == 4 and rep.reused == 0 and not rep.failed
    for p in m.abs_paths():
        got = feats.get(str(p.resolve()))
        assert got.dtype == np.float32
        assert torch.equal(torch.from_numpy(got.copy()), file_fbank(p))
    _, rep2 = cache.build(m, progress=False)
    assert rep2.computed == 0 and rep2.reused == 4


def test_changed_setting_never_serves_stale_features(tmp_path):
    m = _toy(tmp_path, n=2)
    a = FeatureCache(FrontendConfig(), root=tmp_path / "cache")
    b = FeatureCache(FrontendConfig(num_mel_bins=64), root=tmp_path / "cache")
    assert a.folder != b.folder  # (pad length and statistics are the stage's, applied on read: not in the key)
    fb, _ = b.build(m, progress=False)
    assert fb.get(str(m.abs_paths()[0].resolve())).shape[1] == 64
    for field in FrontendConfig.CACHE_FIELDS:
        value = getattr(FrontendConfig(), field)
        if isinstance(value, bool):
            changed = not value
        elif isinstance(value, (int, float)):
            changed = value + 1
        elif field == "downmix":
            changed = "first"
        else:
            changed = "hamming"
        if field == "dither":
            continue  # dither must stay 0 (rejected by the config)
        assert FrontendConfig(**{field: changed}).fbank_key() != FrontendConfig().fbank_key(), field


def test_changed_file_is_recomputed(tmp_path):
    m = _toy(tmp_path, n=2)
    cache = FeatureCache(FrontendConfig(), root=tmp_path / "cache")
    cache.build(m, progress=False)
    target = m.abs_paths()[0]
    write_tone(target, seconds=2.0, sr=16000)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    feats, rep = cache.build(m, progress=False)
    assert rep.computed == 1
    assert feats.get(str(target.resolve())).shape == (198, 128)


def test_failures_are_recorded_and_reported(tmp_path):
    m = _toy(tmp_path, n=2, bad=True)
    cache = FeatureCache(FrontendConfig(), root=tmp_path / "cache")
    feats, rep = cache.build(m, progress=False)
    assert len(rep.failed) == 2
    assert any("bad.wav" in k and "cannot be decoded" in v for k, v in rep.failed.items())
    assert any("missing.wav" in k and "not found" in v for k, v in rep.failed.items())
    _, rep2 = cache.build(m, progress=False)  # failures are remembered, not recomputed
    assert rep2.computed == 0 and len(rep2.failed) == 2


def test_half_written_shard_is_never_served(tmp_path):
    m = _toy(tmp_path, n=2)
    cache = FeatureCache(FrontendConfig(), root=tmp_path / "cache")
    cache.build(m, progress=False)
    shard = next(cache.folder.glob("shard-*.arrow"))
    (cache.folder / ("shard-99999999999999999999-dead.arrow")).write_bytes(shard.read_bytes()[:200])
    (cache.folder / ".shard-x.arrow.tmp").write_bytes(b"partial")
    feats = cache.open()
    assert len(feats) == 2


def test_parallel_build_matches(tmp_path):
    m = _toy(tmp_path, n=4)
    feats, rep = FeatureCache(FrontendConfig(), root=tmp_path / "c1").build(m, workers=2, progress=False)
    assert rep.computed == 4
    p = str(m.abs_paths()[3].resolve())
    assert np.array_equal(feats.get(p), file_fbank(p).numpy())


def test_stats_are_mean_and_std_over_frames(tmp_path):
    m = _toy(tmp_path, n=3, bad=True)
    mean, std, n_clips, n_frames, failed = compute_stats(m, cache_root=tmp_path / "cache", progress=False)
    allf = torch.cat([file_fbank(p) for p in m.abs_paths()[:3]]).double()
    assert n_clips == 3 and n_frames == allf.shape[0] and len(failed) == 2
    assert mean == pytest.approx(float(allf.mean()), rel=1e-9)
    assert std == pytest.approx(float(allf.std(unbiased=False)), rel=1e-6)
