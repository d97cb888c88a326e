"""Datasets: labels, padding, normalisation, seeded augmentation, bad clips skipped or strict."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader

from ssamba.base.errors import AudioError, ManifestError
from ssamba.config import ClipInput, FrontendConfig
from ssamba.data.audio import file_fbank, normalize, pad_or_crop
from ssamba.data.dataset import ClipDataset, SkipLog, collate
from ssamba.data.features import FeatureCache
from ssamba.data.manifest import Manifest
from tests.conftest import write_tone

FE = FrontendConfig()
CLIP = ClipInput(target_length=128, mean=-6.0, std=3.0)


def _toy(tmp_path, bad=True):
    rows = []
    for i in range(6):
        write_tone(tmp_path / f"c{i}.wav", seconds=0.6 + 0.2 * i, freq=200 * (i + 1))
        rows.append({"path": f"c{i}.wav", "labels": ["a"] if i % 2 else ["b", "c"]})
    if bad:
        (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00")
        rows.insert(2, {"path": "broken.wav", "labels": ["a"]})
    return Manifest.from_rows(rows, dataset="toy", root=tmp_path)


def test_items_are_padded_normalised_and_labelled(tmp_path):
    m = _toy(tmp_path, bad=False)
    ds = ClipDataset(m, FE, CLIP)
    item = ds[1]
    ref = normalize(pad_or_crop(file_fbank(tmp_path / "c1.wav"), 128), -6.0, 3.0)
    assert torch.equal(item["fbank"], ref)
    assert ds.label_vocab == ["a", "b", "c"]
    assert item["label"].tolist() == [1.0, 0.0, 0.0] and ds[0]["label"].tolist() == [0.0, 1.0, 1.0]
    cached, _ = FeatureCache(FE, root=tmp_path / "cache").build(m, progress=False)
    assert torch.equal(ClipDataset(m, FE, CLIP, cache=cached)[1]["fbank"], ref)


def test_unknown_label_is_an_error(tmp_path):
    m = _toy(tmp_path, bad=False)
    with pytest.raises(ManifestError, match="label 'b'"):
        ClipDataset(m, FE, CLIP, label_vocab=["a"])


def test_augmentation_is_repeatable_per_seed_epoch_index(tmp_path):
    m = _toy(tmp_path, bad=False)
    aug = replace(CLIP, freqm=24, timem=40, mixup=0.5, noise=True)
    a = ClipDataset(m, FE, aug, train=True, seed=1)
    b = ClipDataset(m, FE, aug, train=True, seed=1)
    for i in range(len(a)):
        assert torch.equal(a[i]["fbank"], b[i]["fbank"]) and torch.equal(a[i]["label"], b[i]["label"])
    a.set_epoch(1)
    assert not all(torch.equal(a[i]["fbank"], b[i]["fbank"]) for i in range(len(a)))
    # with mixup some labels are mixed, and mixed labels still sum to the two clips' label mass
    labels = [ClipDataset(m, FE, aug, train=True, seed=s)[0]["label"] for s in range(20)]
    assert any(0 < float(l.max()) < 1 for l in labels)


def test_bad_clip_is_skipped_and_reported(tmp_path):
    m = _toy(tmp_path)
    ds = ClipDataset(m, FE, CLIP)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=0)
    log = SkipLog()
    seen = 0
    for batch in loader:
        log.add(batch["skipped"])
        seen += batch["fbank"].shape[0]
        assert batch["fbank"].shape[1:] == (128, 128)
    assert seen == 6 and len(log) == 1
    assert "broken.wav" in log.summary()


def test_bad_clip_in_worker_processes_is_reported(tmp_path):
    m = _toy(tmp_path)
    loader = DataLoader(ClipDataset(m, FE, CLIP), batch_size=3, collate_fn=collate, num_workers=2)
    skipped = [s for batch in loader for s in batch["skipped"]]
    assert len(skipped) == 1 and skipped[0][0].endswith("broken.wav")


def test_strict_mode_fails_at_the_bad_clip(tmp_path):
    m = _toy(tmp_path)
    ds = ClipDataset(m, FE, CLIP, strict=True)
    with pytest.raises(AudioError, match="broken.wav.*strict"):
        for i in range(len(ds)):
            ds[i]


def test_cached_failure_is_skipped(tmp_path):
    m = _toy(tmp_path)
    cached, rep = FeatureCache(FE, root=tmp_path / "cache").build(m, progress=False)
    assert len(rep.failed) == 1
    batch = collate([ClipDataset(m, FE, CLIP, cache=cached)[i] for i in range(len(m))])
    assert batch["fbank"].shape[0] == 6 and len(batch["skipped"]) == 1


def test_persistent_loader_processes_draw_each_epochs_augmentation(tmp_path):
    """Loader processes that live across epochs never see ``dataset.set_epoch``: the sampler carries the
    epoch, so 2 persistent workers give exactly the batches of an in-process loader, epoch by epoch."""
    from ssamba.train.loop import EpochSampler

    m = _toy(tmp_path, bad=False)
    aug = replace(CLIP, freqm=8, timem=16, mixup=0.0, noise=True)

    def batches(workers: int) -> list[torch.Tensor]:
        ds = ClipDataset(m, FE, aug, train=True, seed=3)
        sampler = EpochSampler(len(ds), seed=3, with_epoch=True)
        loader = DataLoader(
            ds, batch_size=3, sampler=sampler, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0
        )
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)  # as the training loop does; persistent processes hold their own copy
            out += [b["fbank"] for b in loader]
        return out

    inproc, persistent = batches(0), batches(2)
    assert len(inproc) == len(persistent) == 4
    for a, b in zip(inproc, persistent):
        assert torch.equal(a, b)
    ds = ClipDataset(m, FE, aug, train=True, seed=3)
    assert not torch.equal(ds[(1, 0)]["fbank"], ds[(1, 1)]["fbank"])  # each epoch draws anew
