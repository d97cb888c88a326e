"""Shared fixtures: the real datasets in ../shared/data and small synthetic audio files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Ray reads this when it is first imported (ray_constants.ENABLE_RAY_CLUSTER): set here, before any test
# module imports Ray, every Ray a test starts in this process stays on 127.0.0.1. (A fixture that set it
# just before its own `import ray` came too late once another test module had imported Ray first.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def write_tone(
    path: Path,
    seconds: float = 1.0,
    sr: int = 16000,
    freq: float = 440.0,
    channels: int = 1,
    subtype: str = "PCM_16",
    seed: int = 0,
) -> Path:
    """A sine tone plus a little noise, written with soundfile (format from the suffix)."""
    import soundfile as sf  # imported here: the GPU machines have no soundfile, and GPU tests need none

    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    data = np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype)
    return path


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """A private SSAMBA_CACHE for the whole session (demo corpus, feature cache)."""
    import os

    folder = tmp_path_factory.mktemp("ssamba-cache")
    old = os.environ.get("SSAMBA_CACHE")
    os.environ["SSAMBA_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("SSAMBA_CACHE", None)
    else:
        os.environ["SSAMBA_CACHE"] = old


@pytest.fixture(scope="session")
def small_demo(cache_env) -> Path:
    """A small demo corpus (8 classes x 12 clips) -> its manifest path."""
    from ssamba.data.demo import make_demo_corpus

    return make_demo_corpus(cache_env / "demo-small", seed=0, clips_per_class=12, progress=False)
