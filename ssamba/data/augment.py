"""Training-time augmentations of the recipes: SpecAugment, waveform mixup, noise-and-roll.

Order in a training read (as the official loader): mixup on waveforms -> fbank -> pad/crop ->
SpecAugment (masked values are 0, before normalisation) -> normalise -> noise-and-roll.
Every function draws from an explicit ``numpy.random.Generator`` so a seeded run repeats exactly.
"""

from __future__ import annotations

import numpy as np
import torch


def spec_augment(fb: torch.Tensor, freqm: int, timem: int, rng: np.random.Generator) -> torch.Tensor:
    """One frequency mask of width ``U{0..freqm-1}`` and one time mask of width ``U{0..timem-1}``.

    ``fb``: ``(T, F)``. Masked cells become 0; a mask starts uniformly where it fits.
    Returns a new tensor.
    """
    out = fb.clone()
    n_t, n_f = out.shape
    if freqm > 0:
        w = int(rng.integers(0, min(freqm, n_f + 1)))
        start = int(rng.integers(0, n_f - w + 1))
        out[:, start : start + w] = 0.0
    if timem > 0:
        w = int(rng.integers(0, min(timem, n_t + 1)))
        start = int(rng.integers(0, n_t - w + 1))
        out[start : start + w, :] = 0.0
    return out


def sample_mixup_lambda(rng: np.random.Generator, alpha: float = 10.0) -> float:
    """lambda ~ Beta(alpha, alpha) (the recipes use Beta(10, 10))."""
    return float(rng.beta(alpha, alpha))


def mix_waveforms(w1: torch.Tensor, w2: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * w1 + (1 - lam) * w2`` (``w2`` zero-padded or cut to ``w1``'s length), mean removed."""
    n = w1.shape[0]
    if w2.shape[0] < n:
        w2 = torch.nn.functional.pad(w2, (0, n - w2.shape[0]))
    else:
        w2 = w2[:n]
    mix = lam * w1 + (1.0 - lam) * w2
    return mix - mix.mean()


def mix_labels(y1: torch.Tensor, y2: torch.Tensor, lam: float) -> torch.Tensor:
    """Labels mixed like the waveforms."""
    return lam * y1 + (1.0 - lam) * y2


def noise_and_roll(fb: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Add ``rand(T, F) * U(0, 1) / 10`` then roll the time axis by a shift in ``[-10, 10)``.

    ``fb``: ``(T, F)``, applied after normalisation (as the official loader).
    """
    scale = float(rng.random()) / 10.0
    noise = torch.from_numpy(rng.random(tuple(fb.shape), dtype=np.float32))
    out = fb + noise * scale
    shift = int(rng.integers(-10, 10))
    return torch.roll(out, shifts=shift, dims=0)
