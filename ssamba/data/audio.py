"""Audio front end: decode, downmix, resample to 16 kHz, the official Kaldi fbank, pad/crop, normalise.

Shapes: a waveform is ``(S,)`` float32 mono at ``cfg.sample_rate``; a filterbank is ``(T, F)``
(frames x mel bins, bin 0 lowest), 25 ms frames every 10 ms (1 s -> 98 frames, 10 s -> 998).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.transforms as T

from ssamba.base.errors import AudioError
from ssamba.config import FrontendConfig


def decode(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read any file soundfile can decode (wav, flac, ogg, ...) -> ``((S, C) float32, sample_rate)``.

    Raises :class:`AudioError` naming the file for a missing, unreadable, empty or non-finite file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(
            path,
            "missing",
            "file not found. Fix: check the path, or the manifest's root (read_manifest(..., root=...)).",
        )
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises LibsndfileError / RuntimeError / TypeError
        kind = "empty" if path.stat().st_size == 0 else "unreadable"
        raise AudioError(
            path,
            kind,
            f"cannot be decoded as audio ({type(exc).__name__}: {exc}); the file is "
            f"{path.stat().st_size} bytes. Fix: re-encode it as WAV/FLAC/OGG or remove it from the manifest.",
        ) from None
    if sr <= 0:
        raise AudioError(path, "bad_rate", f"reports sample rate {sr}. Fix: re-encode the file.")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(path, "empty", "contains no samples (zero-length audio). Fix: remove it from the manifest.")
    bad = ~np.isfinite(data)
    if bad.any():
        raise AudioError(
            path,
            "non_finite",
            f"contains {int(bad.sum())} NaN or infinite samples. Fix: re-export the file or remove it.",
        )
    return data, int(sr)


def to_mono(data: np.ndarray, mode: str = "mean") -> np.ndarray:
    """``(S, C) -> (S,)``: the mean of the channels (this project) or channel 0 (the official loader)."""
    if data.ndim == 1:
        return data
    if mode == "first" or data.shape[1] == 1:
        return np.ascontiguousarray(data[:, 0])
    return data.mean(axis=1, dtype=np.float32)


@functools.lru_cache(maxsize=32)
def _resampler(orig: int, new: int, width: int, rolloff: float) -> T.Resample:
    return T.Resample(orig, new, lowpass_filter_width=width, rolloff=rolloff)


def resample(wave: torch.Tensor, orig: int, cfg: FrontendConfig) -> torch.Tensor:
    """Band-limited (windowed sinc) resampling of ``(S,)`` from ``orig`` Hz to ``cfg.sample_rate``."""
    if orig == cfg.sample_rate:
        return wave
    rs = _resampler(orig, cfg.sample_rate, cfg.resample_filter_width, cfg.resample_rolloff)
    with torch.no_grad():
        return rs(wave)


def load_waveform(path: str | os.PathLike, cfg: FrontendConfig = FrontendConfig()) -> torch.Tensor:
    """Decode, downmix and resample a file: ``(S,)`` float32 at ``cfg.sample_rate``."""
    data, sr = decode(path)
    mono = torch.from_numpy(to_mono(data, cfg.downmix))
    return resample(mono, sr, cfg)


def fbank(wave: torch.Tensor, cfg: FrontendConfig = FrontendConfig()) -> torch.Tensor:
    """The official filterbank of a mono waveform ``(S,)`` -> ``(T, F)`` log-mel.

    Subtracts the waveform mean, then calls ``torchaudio.compliance.kaldi.fbank`` with the
    official arguments. A clip shorter than one frame (25 ms) is zero-padded to one frame.
    """
    if wave.ndim != 1:
        raise ValueError(f"fbank expects a mono waveform (S,), got shape {tuple(wave.shape)}")
    wave = wave.float() - wave.float().mean()
    win = int(round(cfg.sample_rate * cfg.frame_length_ms / 1000.0))
    if wave.numel() < win:
        wave = torch.nn.functional.pad(wave, (0, win - wave.numel()))
    return kaldi.fbank(
        wave[None],
        htk_compat=cfg.htk_compat,
        sample_frequency=cfg.sample_rate,
        use_energy=cfg.use_energy,
        window_type=cfg.window_type,
        num_mel_bins=cfg.num_mel_bins,
        dither=cfg.dither,
        frame_shift=cfg.frame_shift_ms,
        frame_length=cfg.frame_length_ms,
    )


def file_fbank(path: str | os.PathLike, cfg: FrontendConfig = FrontendConfig()) -> torch.Tensor:
    """Decode + downmix + resample + fbank of one file: ``(T, F)``, not padded, not normalised."""
    return fbank(load_waveform(path, cfg), cfg)


def pad_or_crop(fb: torch.Tensor, target_length: int) -> torch.Tensor:
    """``(T, F) -> (target_length, F)``: zeros appended at the end (log-mel domain) or frames cut."""
    n = fb.shape[0]
    if n < target_length:
        return torch.nn.functional.pad(fb, (0, 0, 0, target_length - n))
    return fb[:target_length]


def normalize(fb: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The official normalisation ``(x - mean) / (2 * std)`` with dataset statistics."""
    return (fb - mean) / (2.0 * std)
