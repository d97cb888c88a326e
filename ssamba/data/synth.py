"""The demo corpus's sound synthesis: one labelled clip from (class, index, seed), a pure function.

The eight classes differ in spectro-temporal *structure*, not in loudness or a fixed frequency:

=============  ===========================================================================
class          event
=============  ===========================================================================
tone           steady harmonic tone (attack / sustain / release)
chirp_up       harmonic tone whose pitch glides up by a factor 1.6 - 3.5
chirp_down     the same glide downwards (the same frequency range, so the same mean spectrum)
am_tone        harmonic tone with a 4 - 14 Hz amplitude tremolo
vibrato        harmonic tone with a 4 - 9 Hz frequency vibrato of 4 - 10 %
noise_band     band-passed noise burst (centre 600 - 4000 Hz, 0.3 - 1.2 octaves wide)
clicks         train of resonant clicks at 6 - 30 per second, with timing jitter
pluck          struck string: sharp attack, exponential decay, upper partials die first
=============  ===========================================================================

Every clip draws its own pitch (ranges overlap between the tonal classes, so a mean spectrum
alone cannot tell them apart), event onset and length, timbre (number and weights of harmonics,
envelope), gain and background noise (coloured noise, spectral slope 1/f^0.5..1.5, at 10 - 30 dB SNR).
Each clip is also rendered by one of ten *voices* (timbre presets: harmonic count and tilt,
odd/even balance, a formant, attack/release times, a pitch offset), stored as the manifest's
``speaker`` column (``voice00`` .. ``voice09``) so that speaker-disjoint splits can be exercised.

Determinism: clip ``i`` of class ``c`` uses its own stream ``default_rng([1, seed, c, i])``, so the same seed
gives byte-identical audio whatever the generation order, and a different seed gives different audio.
(:mod:`ssamba.data.demo` writes the clips, their splits and the manifest.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# Bumped whenever the generator changes the audio it writes for given parameters (cache key).
VERSION = 1

CLASSES = ("tone", "chirp_up", "chirp_down", "am_tone", "vibrato", "noise_band", "clicks", "pluck")
N_VOICES = 10
# Pitch ranges (Hz, before the voice's offset of up to +-4 semitones): they overlap, so that the
# mean spectrum says something about the class but cannot separate the tonal classes alone.
PITCH_HZ = {
    "tone": (100.0, 320.0),
    "chirp": (140.0, 450.0),  # the low end of the glide (x1.6 - 3.5), the same for up and down
    "am_tone": (220.0, 600.0),
    "vibrato": (350.0, 1000.0),
    "pluck": (160.0, 1200.0),
    "noise_band": (600.0, 4000.0),  # band centre
}
SNR_DB = (10.0, 30.0)  # background noise level, relative to the event's mean power
NOISE_ALPHA = (0.5, 1.5)  # background noise spectrum ~ 1/f^alpha (pink-ish: between white and brown)

_STREAM_CLIP = 1
_VOICE_SEED = 0x55A3BA  # the voice presets are part of the generator (fixed for a VERSION)


# ------------------------------------------------------------------------------ voices
@dataclass(frozen=True)
class Voice:
    """A timbre preset ("speaker"): how a generator renders any class."""

    n_harm: int  # number of harmonics (before the Nyquist limit)
    tilt: float  # harmonic k has weight k**-tilt
    even_gain: float  # extra factor on even harmonics (hollow, clarinet-like when small)
    formant_hz: float  # centre of a resonance boosting nearby harmonics / noise
    formant_db: float  # its gain
    formant_oct: float  # its width (octaves, Gaussian in log-frequency)
    attack_s: float
    release_s: float
    pitch_semitones: float  # offset of every pitch this voice produces


def _make_voices() -> tuple[Voice, ...]:
    rng = np.random.default_rng(_VOICE_SEED)
    voices = []
    for _ in range(N_VOICES):
        voices.append(
            Voice(
                n_harm=int(rng.integers(3, 13)),
                tilt=float(rng.uniform(0.4, 1.8)),
                even_gain=float(rng.uniform(0.15, 1.0)),
                formant_hz=float(np.exp(rng.uniform(np.log(600.0), np.log(3500.0)))),
                formant_db=float(rng.uniform(0.0, 14.0)),
                formant_oct=float(rng.uniform(0.3, 1.0)),
                attack_s=float(rng.uniform(0.005, 0.06)),
                release_s=float(rng.uniform(0.02, 0.2)),
                pitch_semitones=float(rng.uniform(-4.0, 4.0)),
            )
        )
    return tuple(voices)


VOICES = _make_voices()


def voice_name(v: int) -> str:
    return f"voice{v:02d}"


# ------------------------------------------------------------------------------ synthesis helpers
def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _formant_gain(freqs: np.ndarray, voice: Voice) -> np.ndarray:
    """Linear gain of the voice's resonance at ``freqs`` (Hz)."""
    octs = np.log2(np.maximum(freqs, 1.0) / voice.formant_hz)
    return 10.0 ** (voice.formant_db / 20.0 * np.exp(-0.5 * (octs / voice.formant_oct) ** 2))


def _harmonic_weights(rng: np.random.Generator, voice: Voice, f_ref: float) -> np.ndarray:
    """Per-clip harmonic amplitudes: the voice's preset with a random jitter in count and weight."""
    n = int(np.clip(voice.n_harm + rng.integers(-2, 3), 1, 16))
    k = np.arange(1, n + 1, dtype=np.float64)
    w = k ** -(voice.tilt + rng.uniform(-0.2, 0.2))
    w[1::2] *= voice.even_gain
    w *= np.exp(rng.normal(0.0, 0.35, n))
    w *= _formant_gain(k * f_ref, voice)
    return w


def _adsr(n: int, sr: int, attack_s: float, release_s: float) -> np.ndarray:
    """Linear attack, flat sustain, exponential-ish (squared) release over ``n`` samples."""
    env = np.ones(n)
    a = min(max(int(attack_s * sr), 1), n // 2)
    r = min(max(int(release_s * sr), 1), n - a)
    env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    env[n - r :] *= np.linspace(1.0, 0.0, r) ** 2
    return env


def _clip_envelope(rng: np.random.Generator, voice: Voice, n: int, sr: int) -> np.ndarray:
    return _adsr(n, sr, voice.attack_s * rng.uniform(0.6, 1.6), voice.release_s * rng.uniform(0.6, 1.6))


def _render_harmonics(
    f_track: np.ndarray,
    weights: np.ndarray,
    rng: np.random.Generator,
    sr: int,
    partial_env: Callable[[int], np.ndarray] | None = None,
    stretch: float = 0.0,
) -> np.ndarray:
    """Sum of harmonics ``k * f_track`` (optionally stretched: k*sqrt(1+B k^2)), dropping any partial
    that would reach 0.45 * sr (no aliasing). ``partial_env(k)`` gives a per-partial envelope."""
    phase = 2.0 * np.pi * np.cumsum(f_track) / sr
    f_max = float(f_track.max())
    out = np.zeros_like(f_track)
    offsets = rng.uniform(0.0, 2.0 * np.pi, len(weights))
    for idx, w in enumerate(weights):
        k = idx + 1
        mult = k * np.sqrt(1.0 + stretch * k * k)
        if mult * f_max >= 0.45 * sr:
            break
        part = np.sin(mult * phase + offsets[idx])
        if partial_env is not None:
            part *= partial_env(k)
        out += w * part
    return out


def _base_pitch(rng: np.random.Generator, voice: Voice, lo: float, hi: float) -> float:
    return _loguniform(rng, lo, hi) * 2.0 ** (voice.pitch_semitones / 12.0)


def _coloured_noise(rng: np.random.Generator, n: int, sr: int, alpha: float) -> np.ndarray:
    """Unit-RMS noise with power spectrum ~ 1/f^alpha (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec *= np.maximum(f, 20.0) ** (-alpha / 2.0)
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


# ------------------------------------------------------------------------------ the eight classes
def _tone(rng, voice, n, sr):
    f0 = _base_pitch(rng, voice, *PITCH_HZ["tone"])
    t = np.arange(n) / sr
    drift = 1.0 + rng.uniform(-0.005, 0.005) * t / max(t[-1], 1e-9)
    x = _render_harmonics(f0 * drift, _harmonic_weights(rng, voice, f0), rng, sr)
    return x * _clip_envelope(rng, voice, n, sr)


def _chirp(rng, voice, n, sr, up: bool):
    f_lo = _base_pitch(rng, voice, *PITCH_HZ["chirp"])
    ratio = _loguniform(rng, 1.6, 3.5)
    u = np.linspace(0.0, 1.0, n)
    if rng.random() < 0.5:  # exponential (constant semitones per second) or linear glide
        f = f_lo * ratio**u
    else:
        f = f_lo * (1.0 + (ratio - 1.0) * u)
    if not up:
        f = f[::-1].copy()
    x = _render_harmonics(f, _harmonic_weights(rng, voice, f_lo * np.sqrt(ratio)), rng, sr)
    return x * _clip_envelope(rng, voice, n, sr)


def _am_tone(rng, voice, n, sr):
    f0 = _base_pitch(rng, voice, *PITCH_HZ["am_tone"])
    x = _render_harmonics(np.full(n, f0), _harmonic_weights(rng, voice, f0), rng, sr)
    rate = rng.uniform(4.0, 14.0)
    depth = rng.uniform(0.75, 1.0)
    t = np.arange(n) / sr
    trem = 1.0 - depth * (0.5 - 0.5 * np.cos(2.0 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    return x * trem * _clip_envelope(rng, voice, n, sr)


def _vibrato(rng, voice, n, sr):
    f0 = _base_pitch(rng, voice, *PITCH_HZ["vibrato"])
    rate = rng.uniform(4.0, 9.0)
    depth = rng.uniform(0.04, 0.10)
    t = np.arange(n) / sr
    f = f0 * (1.0 + depth * np.sin(2.0 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    x = _render_harmonics(f, _harmonic_weights(rng, voice, f0), rng, sr)
    return x * _clip_envelope(rng, voice, n, sr)


def _noise_band(rng, voice, n, sr):
    centre = min(_loguniform(rng, *PITCH_HZ["noise_band"]), 0.35 * sr)
    width = rng.uniform(0.3, 1.2)  # octaves (std of a Gaussian in log-frequency)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    octs = np.log2(np.maximum(f, 1.0) / centre)
    spec *= np.exp(-0.5 * (octs / (width / 2.0)) ** 2) * np.sqrt(_formant_gain(f, voice))
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return x * _clip_envelope(rng, voice, n, sr)


def _clicks(rng, voice, n, sr):
    rate = _loguniform(rng, 6.0, 30.0)
    period = sr / rate
    jitter = rng.uniform(0.0, 0.15)
    pos = []
    p = rng.uniform(0.0, period)
    while p < n:
        pos.append(int(p))
        p += period * (1.0 + jitter * rng.uniform(-1.0, 1.0))
    imp = np.zeros(n)
    if pos:
        imp[np.asarray(pos)] = rng.uniform(0.5, 1.0, len(pos))
    # click: two damped resonances (the voice's formant and a random one), decay 1 - 6 ms
    kl = max(int(0.03 * sr), 8)
    t = np.arange(kl) / sr
    kernel = np.zeros(kl)
    for fc in (min(voice.formant_hz, 0.4 * sr), min(_loguniform(rng, 800.0, 5000.0), 0.4 * sr)):
        kernel += np.exp(-t / rng.uniform(0.001, 0.006)) * np.sin(2 * np.pi * fc * t + rng.uniform(0, 2 * np.pi))
    m = n + kl
    x = np.fft.irfft(np.fft.rfft(imp, m) * np.fft.rfft(kernel, m), m)[:n]
    return x * _adsr(n, sr, 0.002, 0.01)


def _pluck(rng, voice, n, sr):
    f0 = _base_pitch(rng, voice, *PITCH_HZ["pluck"])
    tau = n / sr / rng.uniform(2.5, 5.0)  # fundamental decays by 22 - 43 dB over the event
    damp = rng.uniform(0.2, 0.8)  # how much faster partial k decays: tau / (1 + damp (k - 1))
    t = np.arange(n) / sr
    attack = np.minimum(t / rng.uniform(0.001, 0.004), 1.0)
    w = _harmonic_weights(rng, voice, f0)

    def partial_env(k: int) -> np.ndarray:
        return np.exp(-t * (1.0 + damp * (k - 1)) / tau)

    x = _render_harmonics(np.full(n, f0), w, rng, sr, partial_env, stretch=rng.uniform(0.0, 2e-4))
    return x * attack * _adsr(n, sr, 0.0, 0.01)


_GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "tone": _tone,
    "chirp_up": lambda rng, v, n, sr: _chirp(rng, v, n, sr, True),
    "chirp_down": lambda rng, v, n, sr: _chirp(rng, v, n, sr, False),
    "am_tone": _am_tone,
    "vibrato": _vibrato,
    "noise_band": _noise_band,
    "clicks": _clicks,
    "pluck": _pluck,
}
assert tuple(_GENERATORS) == CLASSES


def synth_clip(
    class_idx: int, i: int, *, seed: int = 0, duration_s: float = 1.0, sample_rate: int = 16000
) -> tuple[np.ndarray, int, dict]:
    """Clip ``i`` of class ``CLASSES[class_idx]``: ``(int16 samples, voice index, info)``.

    A pure function of its arguments (its own random stream), so clips can be made in any order.
    """
    rng = np.random.default_rng([_STREAM_CLIP, seed, class_idx, i])
    v = (i + class_idx) % N_VOICES  # balanced: every voice in every class
    voice = VOICES[v]
    n_clip = int(round(duration_s * sample_rate))
    n_event = max(int(round(rng.uniform(0.35, 0.9) * n_clip)), 16)
    n_event = min(n_event, n_clip)
    onset = int(rng.integers(0, n_clip - n_event + 1))
    event = _GENERATORS[CLASSES[class_idx]](rng, voice, n_event, sample_rate)
    clip = np.zeros(n_clip)
    clip[onset : onset + n_event] = event
    p_signal = float(np.mean(event * event)) + 1e-12
    snr_db = rng.uniform(*SNR_DB)
    alpha = rng.uniform(*NOISE_ALPHA)
    clip += _coloured_noise(rng, n_clip, sample_rate, alpha) * np.sqrt(p_signal / 10.0 ** (snr_db / 10.0))
    gain_db = rng.uniform(-24.0, -3.0)  # peak level (dBFS)
    clip *= 10.0 ** (gain_db / 20.0) / (np.max(np.abs(clip)) + 1e-12)
    pcm = np.clip(np.round(clip * 32767.0), -32768, 32767).astype(np.int16)
    info = {"onset_s": onset / sample_rate, "event_s": n_event / sample_rate, "snr_db": snr_db, "gain_db": gain_db}
    return pcm, v, info
