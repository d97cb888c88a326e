"""The front end: the official fbank call, decoding, resampling, downmix, bad files, augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from ssamba.base.errors import AudioError
from ssamba.config import FrontendConfig
from ssamba.data.audio import decode, fbank, file_fbank, load_waveform, normalize, pad_or_crop
from ssamba.data.augment import mix_labels, mix_waveforms, noise_and_roll, sample_mixup_lambda, spec_augment
from tests.conftest import write_tone


def official_fbank(path) -> torch.Tensor:
    """docs/model.md sections 1.1-1.2 written out literally: read, resample to 16 kHz, subtract mean, kaldi fbank."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = torch.from_numpy(data.mean(axis=1))
    if sr != 16000:
        wave = AF.resample(wave, sr, 16000)
    wave = wave - wave.mean()
    return kaldi.fbank(
        wave[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )


def _kaldi_official(wave: torch.Tensor) -> torch.Tensor:
    wave = wave - wave.mean()
    return kaldi.fbank(
        wave[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )


def test_fbank_equals_official_call_16k_wav(shared_data):
    path = shared_data / "speech_commands_v0.01_mini/yes/439c84f4_nohash_1.wav"
    ours = file_fbank(path)
    ref = official_fbank(path)
    assert ours.shape == ref.shape == (98, 128)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_fbank_equals_official_call_16k_ogg(shared_data):
    path = next((shared_data / "esc10").glob("*/*.ogg"))
    assert torch.equal(file_fbank(path), official_fbank(path))


def test_fbank_of_resampled_file(shared_data):
    """8 kHz FLAC: the fbank is the official call on our resampled waveform, bit for bit, and the
    resampling agrees with torchaudio.functional.resample up to float rounding (3e-8 in the waveform)."""
    path = shared_data / "fsdd/recordings/0_george_0.flac"
    wave = load_waveform(path)
    ours = file_fbank(path)
    assert torch.equal(ours, _kaldi_official(wave))
    ref = official_fbank(path)
    diff = (ours - ref).abs()
    print(f"max |ours - functional resample| = {diff.max():.2e} (log-mel), mean {diff.mean():.2e}")
    assert diff.max() < 1e-2 and diff.mean() < 1e-4


@pytest.mark.parametrize("seconds,frames", [(1.0, 98), (5.0, 498), (10.0, 998)])
def test_frame_counts(tmp_path, seconds, frames):
    path = write_tone(tmp_path / "a.wav", seconds=seconds)
    assert file_fbank(path).shape == (frames, 128)


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 32000, 44100, 48000])
def test_unusual_rates_are_resampled(tmp_path, sr):
    path = write_tone(tmp_path / f"t{sr}.wav", seconds=1.0, sr=sr, freq=1000.0)
    wave = load_waveform(path)
    assert wave.shape[0] == 16000
    fb = fbank(wave)
    assert fb.shape == (98, 128)
    # the tone's energy peaks in the same mel bin whatever the original rate
    ref = fbank(load_waveform(write_tone(tmp_path / "ref.wav", seconds=1.0, sr=16000, freq=1000.0)))
    assert fb.mean(0).argmax() == ref.mean(0).argmax()


def test_stereo_is_averaged_or_first_channel(tmp_path):
    path = write_tone(tmp_path / "st.wav", channels=2, subtype="FLOAT")
    data, _ = sf.read(str(path), dtype="float32")
    assert torch.allclose(load_waveform(path), torch.from_numpy(data.mean(axis=1)))
    first = load_waveform(path, FrontendConfig(downmix="first"))
    assert torch.allclose(first, torch.from_numpy(data[:, 0]))


def test_silent_and_very_short_clips_are_handled(tmp_path):
    sil = tmp_path / "silent.wav"
    sf.write(str(sil), np.zeros(16000, np.float32), 16000)
    fb = file_fbank(sil)
    assert fb.shape == (98, 128) and torch.isfinite(fb).all()
    short = tmp_path / "short.wav"
    sf.write(str(short), np.full(100, 0.1, np.float32), 16000)  # 6 ms: less than one frame
    fb = file_fbank(short)
    assert fb.shape == (1, 128) and torch.isfinite(fb).all()


def _bad_files(tmp_path):
    out = {}
    out["missing"] = tmp_path / "nope.wav"
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    out["empty"] = empty
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    out["unreadable"] = text
    zero = tmp_path / "zero.wav"
    sf.write(str(zero), np.zeros((0,), np.float32), 16000)
    out["zero_length"] = zero
    nan = tmp_path / "nan.wav"
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(str(nan), x, 16000, subtype="FLOAT")
    out["non_finite"] = nan
    inf = tmp_path / "inf.wav"
    x = np.zeros(16000, np.float32)
    x[5] = np.inf
    sf.write(str(inf), x, 16000, subtype="FLOAT")
    out["infinite"] = inf
    return out


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("missing", "missing"),
        ("empty", "empty"),
        ("unreadable", "unreadable"),
        ("zero_length", "empty"),
        ("non_finite", "non_finite"),
        ("infinite", "non_finite"),
    ],
)
def test_bad_files_raise_naming_the_file_and_fix(tmp_path, kind, reason):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(AudioError) as info:
        file_fbank(path)
    assert info.value.reason == reason
    assert str(path) in str(info.value)
    assert "Fix:" in str(info.value)


def test_truncated_file(tmp_path):
    """A file cut mid-stream: either decoded up to the cut or an error naming it, never garbage."""
    full = write_tone(tmp_path / "full.flac", seconds=2.0, subtype="PCM_16")
    raw = full.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(raw[: len(raw) // 2])
    try:
        data, sr = decode(cut)
    except AudioError as exc:
        assert str(cut) in str(exc)
    else:
        assert sr == 16000 and 0 < data.shape[0] <= 32000 and np.isfinite(data).all()
    wav = write_tone(tmp_path / "full.wav", seconds=2.0)
    raw = wav.read_bytes()
    cutw = tmp_path / "cut.wav"
    cutw.write_bytes(raw[: 44 + 1000])  # header + 500 samples of 32000
    try:
        data, _ = decode(cutw)
        assert data.shape[0] <= 500
    except AudioError as exc:
        assert str(cutw) in str(exc)


def test_pad_crop_normalize():
    fb = torch.randn(50, 128)
    padded = pad_or_crop(fb, 64)
    assert padded.shape == (64, 128) and torch.equal(padded[:50], fb) and (padded[50:] == 0).all()
    assert torch.equal(pad_or_crop(fb, 20), fb[:20])
    x = torch.full((2, 2), 3.0)
    assert torch.allclose(normalize(x, 1.0, 0.5), torch.full((2, 2), 2.0))


def test_spec_augment_masks_one_band_and_one_span():
    fb = torch.ones(100, 128)
    rng = np.random.default_rng(0)
    seen_f, seen_t = set(), set()
    for _ in range(50):
        out = spec_augment(fb, freqm=24, timem=40, rng=rng)
        zero_cols = (out == 0).all(dim=0).nonzero().flatten()
        zero_rows = (out == 0).all(dim=1).nonzero().flatten()
        assert len(zero_cols) < 24 and len(zero_rows) < 40
        if len(zero_cols):
            assert (zero_cols.diff() == 1).all()  # one contiguous band
        seen_f.add(len(zero_cols))
        seen_t.add(len(zero_rows))
    assert len(seen_f) > 5 and len(seen_t) > 5
    assert torch.equal(fb, torch.ones(100, 128))  # input untouched


def test_noise_and_roll_and_mixup_are_seeded():
    fb = torch.arange(20 * 4, dtype=torch.float32).reshape(20, 4)
    a = noise_and_roll(fb, np.random.default_rng(3))
    b = noise_and_roll(fb, np.random.default_rng(3))
    assert torch.equal(a, b)
    # noise in [0, 0.1), then a roll along time: sorting rows by first column recovers fb
    rows = a[a[:, 0].argsort()]
    assert ((rows - fb) >= 0).all() and ((rows - fb) < 0.1).all()
    lams = [sample_mixup_lambda(np.random.default_rng(i)) for i in range(200)]
    assert 0.4 < np.mean(lams) < 0.6 and 0.05 < np.std(lams) < 0.2  # Beta(10,10): mean .5, std .109
    w = mix_waveforms(torch.ones(10), torch.zeros(4), 0.7)
    assert w.shape == (10,) and abs(float(w.mean())) < 1e-6
    assert torch.allclose(mix_labels(torch.tensor([1.0, 0]), torch.tensor([0, 1.0]), 0.7), torch.tensor([0.7, 0.3]))
