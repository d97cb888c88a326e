"""Importers against the real shared datasets and small synthetic layouts built in tmp_path."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ssamba.base.errors import ConfigError, ManifestError, SSAMBAError
from ssamba.data.importers import (
    AUDIO_EXTENSIONS,
    IMPORTERS,
    import_audioset_csv,
    import_esc10,
    import_esc50,
    import_folders,
    import_fsdd,
    import_speech_commands,
    import_ssast_json,
    is_audio_file,
    speaker_disjoint_split,
)
from ssamba.data.manifest import Manifest, read_manifest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ESC10 = DATA / "esc10"
FSDD = DATA / "fsdd"
SC_MINI = DATA / "speech_commands_v0.01_mini"

needs_esc10 = pytest.mark.skipif(not ESC10.is_dir(), reason=f"shared ESC-10 copy not found at {ESC10}")
needs_fsdd = pytest.mark.skipif(not FSDD.is_dir(), reason=f"shared FSDD copy not found at {FSDD}")
needs_sc = pytest.mark.skipif(not SC_MINI.is_dir(), reason=f"shared Speech Commands mini copy not found at {SC_MINI}")

SR = 16000


# ----------------------------------------------------------------------------------- helpers
def write_wav(path: Path, seconds: float = 0.1, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    fmt = {".flac": "FLAC", ".ogg": "OGG"}.get(path.suffix.lower(), "WAV")
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format=fmt)
    return path


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not audio at all" * 10)
    return path


def write_label_csv(path: Path, rows: list[tuple[int, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "mid", "display_name"])
        for r in rows:
            w.writerow(r)
    return path


def round_trip(m: Manifest, tmp_path: Path, name: str = "m.parquet") -> Manifest:
    back = read_manifest(m.write(tmp_path / name))
    assert back.meta["dataset"] == m.meta["dataset"]
    assert back.meta["root"] == m.meta["root"]
    assert back.label_vocab == m.label_vocab
    assert back.meta["notes"] == m.meta["notes"]
    assert len(back) == len(m)
    assert back.df["path"].tolist() == m.df["path"].tolist()
    assert back.df["labels"].tolist() == m.df["labels"].tolist()
    assert _nullable(back.df["split"]) == _nullable(m.df["split"])
    assert back.df["duration"].tolist() == pytest.approx(m.df["duration"].tolist())
    return back


def _nullable(col) -> list:
    """Column values with every missing marker (None / NaN) as None."""
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in col]


def assert_paths_relative_and_exist(m: Manifest) -> None:
    assert m.root is not None and m.root.is_absolute()
    for p in m.df["path"]:
        assert not Path(p).is_absolute(), p
        assert m.resolve(p).is_file(), p


# ----------------------------------------------------------------------------------- registry
def test_registry_and_extensions():
    assert set(IMPORTERS) == {"esc50", "esc10", "speech_commands", "fsdd", "ssast_json", "audioset_csv", "folders"}
    assert {".wav", ".flac", ".ogg"} <= AUDIO_EXTENSIONS
    assert is_audio_file("a/B.WAV") and is_audio_file("x.Flac") and is_audio_file("y.OGG")
    assert is_audio_file("z.aiff")  # from soundfile.available_formats()
    assert not is_audio_file("notes.txt") and not is_audio_file("clip.raw")


@pytest.mark.parametrize("name", sorted(IMPORTERS))
def test_missing_root_names_it(name, tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(ManifestError) as err:
        IMPORTERS[name](missing, progress=False)
    assert str(missing) in str(err.value)
    assert isinstance(err.value, SSAMBAError)


@pytest.mark.parametrize("name", ["speech_commands", "fsdd", "folders", "esc50", "esc10"])
def test_empty_layout_raises_naming_root_and_layout(name, tmp_path):
    root = tmp_path / "empty"
    (root / "sub").mkdir(parents=True)
    (root / "README.txt").write_text("no audio here")
    with pytest.raises(ManifestError) as err:
        IMPORTERS[name](root, progress=False)
    msg = str(err.value)
    assert str(root) in msg
    assert "expect" in msg  # names the layout it expected


# ----------------------------------------------------------------------------------- ESC-10 (real)
@needs_esc10
def test_esc10_real_folder_layout(tmp_path):
    m = IMPORTERS["esc10"](ESC10, progress=False)
    df = m.df
    assert m.meta["dataset"] == "esc10"
    assert m.meta["notes"]["layout"] == "folder"
    assert m.meta["root"] == str(ESC10.resolve())
    assert len(m) == 400
    labels = Counter(l[0] for l in df["labels"])
    assert len(labels) == 10 and set(labels.values()) == {40}
    # vocabulary ordered by the NNN prefix, computed here from the folder names
    folders = sorted((int(d.name.split(" - ")[0]), d.name.split(" - ", 1)[1]) for d in ESC10.iterdir() if d.is_dir())
    assert m.label_vocab == [name for _, name in folders]
    assert m.label_vocab[0] == "Dog bark"
    assert Counter(df["fold"]) == {1: 80, 2: 80, 3: 80, 4: 80, 5: 80}
    # fold, source and take come from the file name; clips of one source share a fold
    for p, fold, src, take, labs in zip(df["path"], df["fold"], df["source"], df["take"], df["labels"]):
        folder, fname = p.split("/")
        assert folder.split(" - ", 1)[1] == labs[0]
        assert fname == f"{fold}-{src}-{take}.ogg"
    assert (df.groupby("source")["fold"].nunique() == 1).all()
    assert df["split"].isna().all()
    assert (df["sample_rate"] == 16000).all()
    assert df["duration"].between(3.0, 8.0).all()
    assert_paths_relative_and_exist(m)
    back = round_trip(m, tmp_path)
    assert back.df["fold"].tolist() == df["fold"].tolist()
    assert back.df["source"].tolist() == df["source"].tolist()

    m50 = import_esc50(ESC10, progress=False)
    assert m50.meta["dataset"] == "esc50" and len(m50) == 400


# ----------------------------------------------------------------------------------- ESC-50 csv layout
def _esc50_tree(root: Path) -> list[dict]:
    # target order deliberately differs from alphabetical order of category
    classes = [(0, "dog", True), (1, "rooster", True), (2, "airplane", False), (3, "crying_baby", True)]
    recs = []
    for target, cat, esc10 in classes:
        for fold in (1, 2):
            src = f"{100 + target * 10 + fold}"
            name = f"{fold}-{src}-A-{target}.wav"
            write_wav(root / "audio" / name, seconds=0.05 * (1 + target))
            recs.append(
                {
                    "filename": name,
                    "fold": fold,
                    "target": target,
                    "category": cat,
                    "esc10": str(esc10),
                    "src_file": src,
                    "take": "A",
                }
            )
    (root / "meta").mkdir(parents=True, exist_ok=True)
    # a row whose file was not downloaded
    recs.append(
        {
            "filename": "3-999-A-0.wav",
            "fold": 3,
            "target": 0,
            "category": "dog",
            "esc10": "True",
            "src_file": "999",
            "take": "A",
        }
    )
    with open(root / "meta" / "esc50.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writeheader()
        w.writerows(recs)
    return recs


def test_esc50_csv_layout(tmp_path, caplog):
    root = tmp_path / "ESC-50-master"
    _esc50_tree(root)
    with caplog.at_level(logging.WARNING):
        m = import_esc50(root, progress=False)
    assert m.meta["dataset"] == "esc50" and m.meta["notes"]["layout"] == "csv"
    assert len(m) == 8
    assert m.label_vocab == ["dog", "rooster", "airplane", "crying_baby"]  # by target
    df = m.df
    row = df[df["path"] == "audio/2-132-A-3.wav"].iloc[0]
    assert row["labels"] == ["crying_baby"] and row["fold"] == 2 and row["source"] == "132"
    assert bool(row["esc10"]) is True and row["take"] == "A" and row["target"] == 3
    assert row["duration"] == pytest.approx(0.2) and row["sample_rate"] == SR
    assert df["split"].isna().all()
    miss = m.meta["notes"]["missing_from_disk"]
    assert miss["count"] == 1 and miss["items"] == ["audio/3-999-A-0.wav"]
    assert "missing on disk" in caplog.text
    assert_paths_relative_and_exist(m)

    m10 = import_esc10(root, progress=False)
    assert m10.meta["dataset"] == "esc10"
    assert len(m10) == 6
    assert m10.label_vocab == ["dog", "rooster", "crying_baby"]
    assert all(m10.df["esc10"])
    assert "airplane" not in {l[0] for l in m10.df["labels"]}
    back = round_trip(m10, tmp_path)
    assert back.df["esc10"].tolist() == [True] * 6


def test_esc_folder_layout_synthetic(tmp_path):
    # an old ESC-50 style folder layout: 11 classes, numbered out of alphabetical order
    for i in range(11):
        num = 101 + 100 * (i % 5) + i
        write_wav(tmp_path / f"{num} - Class {chr(ord('K') - i)}" / f"{i % 5 + 1}-{1000 + i}-A.ogg")
    m = import_esc50(tmp_path, progress=False)
    nums = sorted((101 + 100 * (i % 5) + i, f"Class {chr(ord('K') - i)}") for i in range(11))
    assert m.label_vocab == [name for _, name in nums]
    assert sorted(m.df["source"]) == [str(1000 + i) for i in range(11)]
    with pytest.raises(ManifestError, match="ESC-10 flag"):
        import_esc10(tmp_path, progress=False)
    write_wav(tmp_path / "101 - Class K" / "badname.ogg")
    with pytest.raises(ManifestError, match="badname"):
        import_esc50(tmp_path, progress=False)


def test_esc_unrecognised_layout(tmp_path):
    write_wav(tmp_path / "clips" / "a.wav")
    with pytest.raises(ManifestError, match="esc50.csv"):
        import_esc50(tmp_path, progress=False)


# ----------------------------------------------------------------------------------- Speech Commands (real)
def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@needs_sc
def test_speech_commands_real(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        m = IMPORTERS["speech_commands"](SC_MINI, progress=False)
    df = m.df
    assert m.meta["dataset"] == "speech_commands"
    assert len(m) == 300
    words = Counter(l[0] for l in df["labels"])
    assert len(words) == 30 and set(words.values()) == {10}
    assert m.label_vocab == sorted(words)

    # expected split counts, computed independently from the list files and the directory listing
    on_disk = {
        f"{d.name}/{f.name}"
        for d in SC_MINI.iterdir()
        if d.is_dir() and not d.name.startswith("_")
        for f in d.iterdir()
        if f.suffix == ".wav"
    }
    val = set(_read_lines(SC_MINI / "validation_list.txt"))
    test = set(_read_lines(SC_MINI / "testing_list.txt"))
    expected = {"validation": len(on_disk & val), "test": len(on_disk & test)}
    expected["train"] = len(on_disk) - expected["validation"] - expected["test"]
    assert dict(Counter(df["split"])) == expected
    assert 0 < expected["validation"] < 300 and 0 < expected["test"] < 300
    for p, s in zip(df["path"], df["split"]):
        assert s == ("test" if p in test else "validation" if p in val else "train")

    # speaker = hash before _nohash_
    for p, spk in zip(df["path"], df["speaker"]):
        assert Path(p).name.startswith(spk + "_nohash_")
    # the official lists keep each speaker in one split
    assert (df.groupby("speaker")["split"].nunique() == 1).all()

    missing = m.meta["notes"]["missing_from_lists"]
    assert missing["count"] == len(val - on_disk) + len(test - on_disk)
    assert 0 < len(missing["items"]) <= 20 and all(x not in on_disk for x in missing["items"])
    assert str(missing["count"]) in caplog.text
    assert (df["sample_rate"] == 16000).all() and (df["duration"] <= 1.0 + 1e-9).all()
    assert_paths_relative_and_exist(m)
    round_trip(m, tmp_path)


def _sc_tree(root: Path) -> None:
    for word in ("yes", "no"):
        for spk in ("aaaa1111", "bbbb2222", "cccc3333"):
            for n in (0, 1):
                write_wav(root / word / f"{spk}_nohash_{n}.wav")
    write_wav(root / "_background_noise_" / "white_noise.wav", seconds=0.5)
    write_wav(root / "_background_noise_" / "running_tap.wav", seconds=0.3)
    (root / "_background_noise_" / "README.md").write_text("noise")
    (root / "validation_list.txt").write_text("yes/bbbb2222_nohash_0.wav\nno/bbbb2222_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/cccc3333_nohash_0.wav\nyes/gone0000_nohash_0.wav\n")


def test_speech_commands_background_noise(tmp_path, caplog):
    root = tmp_path / "sc"
    _sc_tree(root)
    with caplog.at_level(logging.WARNING):
        m = import_speech_commands(root, progress=False)
    df = m.df
    assert len(m) == 14
    bg = df[df["split"] == "background_noise"]
    assert sorted(bg["path"]) == ["_background_noise_/running_tap.wav", "_background_noise_/white_noise.wav"]
    assert all(l == [] for l in bg["labels"]) and bg["speaker"].isna().all()
    assert m.label_vocab == ["no", "yes"]
    assert "_background_noise_" not in m.label_vocab
    counts = Counter(df["split"])
    assert counts == {"train": 9, "validation": 2, "test": 1, "background_noise": 2}
    assert m.meta["notes"]["missing_from_lists"] == {
        "count": 1,
        "items": ["yes/gone0000_nohash_0.wav"],
        "truncated": False,
    }
    assert "not on disk" in caplog.text
    round_trip(m, tmp_path)

    no_bg = import_speech_commands(root, progress=False, include_background=False)
    assert len(no_bg) == 12 and "background_noise" not in set(no_bg.df["split"])

    split = speaker_disjoint_split(m, seed=3)
    assert Counter(split.df["split"])["background_noise"] == 2
    spk = split.df.dropna(subset=["speaker"])
    assert (spk.groupby("speaker")["split"].nunique() == 1).all()
    assert set(spk["split"]) == {"train", "validation", "test"}


# ----------------------------------------------------------------------------------- FSDD (real)
@needs_fsdd
def test_fsdd_real(tmp_path):
    m = IMPORTERS["fsdd"](FSDD, progress=False)
    df = m.df
    assert m.meta["dataset"] == "fsdd"
    assert len(m) == 3000
    assert df["speaker"].nunique() == 6
    assert m.label_vocab == [str(d) for d in range(10)]
    assert Counter(l[0] for l in df["labels"]) == {str(d): 300 for d in range(10)}
    assert Counter(df["split"]) == {"train": 2700, "test": 300}
    assert (df.loc[df["split"] == "test", "index"] <= 4).all()
    assert (df.loc[df["split"] == "train", "index"] > 4).all()
    for p, labs, spk, idx in zip(df["path"], df["labels"], df["speaker"], df["index"]):
        assert p == f"recordings/{labs[0]}_{spk}_{idx}.flac"
    assert (df["sample_rate"] == 8000).all() and (df["duration"] > 0).all()
    assert_paths_relative_and_exist(m)
    back = round_trip(m, tmp_path)
    assert back.df["index"].tolist() == df["index"].tolist()

    # ROOT may point at recordings/ directly
    direct = import_fsdd(FSDD / "recordings", progress=False)
    assert direct.meta["root"] == str((FSDD / "recordings").resolve())
    assert sorted(direct.df["path"]) == sorted(p.split("/", 1)[1] for p in df["path"])


def test_fsdd_unreadable_file_listed(tmp_path, caplog):
    root = tmp_path / "fsdd"
    for spk in ("ann", "bob"):
        for idx in (0, 7):
            write_wav(root / "recordings" / f"3_{spk}_{idx}.wav", sr=8000)
    write_garbage(root / "recordings" / "4_ann_9.wav")
    with caplog.at_level(logging.WARNING):
        m = import_fsdd(root, progress=False)
    assert len(m) == 4
    assert "recordings/4_ann_9.wav" not in set(m.df["path"])
    unread = m.meta["notes"]["unreadable"]
    assert unread["count"] == 1
    assert unread["items"][0]["path"] == "recordings/4_ann_9.wav" and unread["items"][0]["error"]
    assert "1 of 5 audio files could not be opened" in caplog.text
    assert Counter(m.df["split"]) == {"test": 2, "train": 2}
    back = round_trip(m, tmp_path)
    assert back.meta["notes"]["unreadable"]["items"][0]["path"] == "recordings/4_ann_9.wav"


def test_all_unreadable_raises(tmp_path):
    write_garbage(tmp_path / "cls" / "a.wav")
    with pytest.raises(ManifestError, match="unreadable"):
        import_folders(tmp_path, progress=False)


# ----------------------------------------------------------------------------------- speaker-disjoint split
@needs_fsdd
def test_speaker_disjoint_split_fsdd():
    m = import_fsdd(FSDD, progress=False)
    a = speaker_disjoint_split(m, (0.8, 0.1, 0.1), seed=0)
    df = a.df
    assert (df.groupby("speaker")["split"].nunique() == 1).all()
    per_split = df.groupby("split")["speaker"].nunique().to_dict()
    assert per_split == {"train": 4, "validation": 1, "test": 1}
    assert a.meta["notes"]["speaker_split"]["speakers"] == per_split
    assert df["original_split"].tolist() == m.df["split"].tolist()
    assert Counter(df["split"])["test"] == 500  # one speaker, 500 clips
    # deterministic by seed; other seeds give other assignments
    b = speaker_disjoint_split(m, (0.8, 0.1, 0.1), seed=0)
    assert b.df["split"].tolist() == df["split"].tolist()
    others = {tuple(speaker_disjoint_split(m, seed=s).df.groupby("split")["speaker"].first()) for s in range(1, 6)}
    assert len(others | {tuple(df.groupby("split")["speaker"].first())}) > 1
    # input untouched, twice-applied keeps the dataset's own split
    assert "original_split" not in m.df.columns
    c = speaker_disjoint_split(a, seed=7)
    assert c.df["original_split"].tolist() == m.df["split"].tolist()
    # zero fraction -> no speaker for that split
    d = speaker_disjoint_split(m, (0.5, 0.0, 0.5), seed=1)
    assert set(d.df["split"]) == {"train", "test"}


@needs_sc
def test_speaker_disjoint_split_speech_commands():
    """Real speakers of unequal sizes (1 to 21 clips): the fractions are met in clips, not in speakers."""
    m = import_speech_commands(SC_MINI, progress=False)
    a = speaker_disjoint_split(m, seed=11)
    df = a.df
    assert (df.groupby("speaker")["split"].nunique() == 1).all()
    assert df.groupby("split")["speaker"].nunique().sum() == m.df["speaker"].nunique()
    clips = Counter(df["split"])
    assert abs(clips["validation"] - 30) <= 3 and abs(clips["test"] - 30) <= 3, clips  # 10% of 300 clips
    info = a.meta["notes"]["speaker_split"]
    assert info["unit"] == "clips" and info["clips"] == dict(clips)
    assert info["clip_share"]["validation"] == pytest.approx(clips["validation"] / 300, abs=1e-6)
    assert a.df["split"].tolist() == speaker_disjoint_split(m, seed=11).df["split"].tolist()


def _uneven_speakers() -> Manifest:
    """Ten speakers of 100 clips and ninety of one clip (1,090 clips): a tenth of the speakers can hold
    anything from 10 to 1,000 clips."""
    rows = []
    for s in range(100):
        for i in range(100 if s < 10 else 1):
            rows.append({"path": f"c/{s:03d}_{i:03d}.wav", "labels": ["c"], "speaker": f"spk{s:03d}", "split": None})
    return Manifest.from_rows(rows, dataset="synthetic")


def test_speaker_split_fractions_are_shares_of_clips():
    m = _uneven_speakers()
    seen = set()
    for seed in range(5):
        a = speaker_disjoint_split(m, (0.8, 0.1, 0.1), seed=seed)
        df = a.df
        assert (df.groupby("speaker")["split"].nunique() == 1).all()  # whole speakers
        share = df["split"].value_counts(normalize=True)
        assert share["train"] == pytest.approx(0.8, abs=0.01), (seed, share.to_dict())
        assert share["validation"] == pytest.approx(0.1, abs=0.01) and share["test"] == pytest.approx(0.1, abs=0.01)
        info = a.meta["notes"]["speaker_split"]
        assert info["clip_share"] == {k: pytest.approx(v, abs=1e-6) for k, v in share.items()}
        assert info["speakers"] == df.groupby("split")["speaker"].nunique().to_dict()
        assert sum(info["clips"].values()) == 1090
        assert speaker_disjoint_split(m, (0.8, 0.1, 0.1), seed=seed).df["split"].tolist() == df["split"].tolist()
        seen.add(tuple(df["split"]))
    assert len(seen) > 1  # the seed decides which speakers go where
    # fewer speakers than the shares would need: every non-zero split still gets one speaker
    few = Manifest.from_rows(
        [{"path": f"{s}_{i}.wav", "labels": ["c"], "speaker": s} for s in "abc" for i in range(50 if s == "a" else 2)],
        dataset="synthetic",
    )
    got = speaker_disjoint_split(few, (0.9, 0.05, 0.05), seed=0).meta["notes"]["speaker_split"]["speakers"]
    assert got == {"train": 1, "validation": 1, "test": 1}


def test_speaker_split_errors(tmp_path):
    root = tmp_path / "f"
    write_wav(root / "dog" / "a.wav")
    write_wav(root / "cat" / "b.wav")
    m = import_folders(root, progress=False)
    with pytest.raises(ManifestError) as err:
        speaker_disjoint_split(m)
    assert "fsdd" in str(err.value) and "speech_commands" in str(err.value)
    with pytest.raises(ConfigError, match="sum"):
        speaker_disjoint_split(m, (0.5, 0.5, 0.5))


# ----------------------------------------------------------------------------------- SSAST JSON
def _ontology(path: Path) -> Path:
    # index order deliberately differs from the alphabetical order of the mids
    return write_label_csv(
        path, [(0, "/m/09x0r", "Speech"), (1, "/m/05zppz", "Male speech, man speaking"), (2, "/m/04rlf", "Music")]
    )


def test_ssast_json(tmp_path, caplog):
    root = tmp_path / "ssast"
    _ontology(root / "class_labels_indices.csv")
    write_wav(root / "audio" / "a.wav")
    write_wav(root / "audio" / "sub" / "b.flac", seconds=0.2)
    outside = write_wav(tmp_path / "elsewhere" / "c.wav")
    data = {
        "data": [
            {"wav": "audio/a.wav", "labels": "/m/09x0r,/m/05zppz"},
            {"wav": "./audio/sub/b.flac", "labels": "/m/04rlf"},
            {"wav": str(root / "audio" / "a2.wav"), "labels": "/m/04rlf"},  # absolute, absent
            {"wav": str(outside), "labels": "/m/09x0r"},  # absolute, outside the json folder
            {"wav": "audio/gone.wav", "labels": "/m/09x0r"},
        ]
    }
    jpath = root / "train_data.json"
    jpath.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        m = IMPORTERS["ssast_json"](jpath, progress=False, split="train")
    assert m.meta["dataset"] == "ssast_json"
    assert m.meta["root"] == str(root.resolve())
    assert m.label_vocab == ["/m/09x0r", "/m/05zppz", "/m/04rlf"]
    rows = {p: labs for p, labs in zip(m.df["path"], m.df["labels"])}
    assert rows["audio/a.wav"] == ["/m/09x0r", "/m/05zppz"]
    assert rows["audio/sub/b.flac"] == ["/m/04rlf"]
    assert rows[str(outside.resolve())] == ["/m/09x0r"]
    assert len(m) == 3 and set(m.df["split"]) == {"train"}
    missing = m.meta["notes"]["missing"]
    assert missing["count"] == 2 and set(missing["items"]) == {str(root / "audio" / "a2.wav"), "audio/gone.wav"}
    assert "missing on disk" in caplog.text
    assert m.meta["notes"]["display_names"]["/m/04rlf"] == "Music"
    assert all(m.resolve(p).is_file() for p in m.df["path"])
    round_trip(m, tmp_path)

    # explicit label csv elsewhere
    other = _ontology(tmp_path / "labels" / "my_labels.csv")
    (root / "class_labels_indices.csv").unlink()
    m2 = import_ssast_json(jpath, label_csv=other, progress=False)
    assert m2.df["split"].isna().all() and len(m2) == 3
    with pytest.raises(ManifestError, match="class_labels_indices.csv"):
        import_ssast_json(jpath, progress=False)


def test_ssast_json_unknown_mid(tmp_path):
    _ontology(tmp_path / "class_labels_indices.csv")
    write_wav(tmp_path / "a.wav")
    (tmp_path / "d.json").write_text(
        json.dumps({"data": [{"wav": "a.wav", "labels": "/m/09x0r"}, {"wav": "a.wav", "labels": "/m/09x0r, /m/nope"}]})
    )
    with pytest.raises(ManifestError) as err:
        import_ssast_json(tmp_path / "d.json", progress=False)
    assert "/m/nope" in str(err.value) and "entry 1" in str(err.value)


def test_ssast_json_malformed(tmp_path):
    _ontology(tmp_path / "class_labels_indices.csv")
    (tmp_path / "d.json").write_text(json.dumps([{"wav": "a.wav"}]))
    with pytest.raises(ManifestError, match="'data'"):
        import_ssast_json(tmp_path / "d.json", progress=False)
    (tmp_path / "e.json").write_text(json.dumps({"data": [{"wav": "gone.wav", "labels": "/m/04rlf"}]}))
    with pytest.raises(ManifestError, match="no audio found"):
        import_ssast_json(tmp_path / "e.json", progress=False)


# ----------------------------------------------------------------------------------- AudioSet CSV
AUDIOSET_CSV = """\
# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=6, num_segs=6, num_unique_labels=3, num_positive_labels=8
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/05zppz"
-0RWZT-miFs, 420.000, 430.000, "/m/04rlf"
0FMdORf5iGs, 30.000, 40.000, "/m/09x0r"
a_b-cdefghi, 10.000, 20.000, "/m/04rlf,/m/09x0r"
zzzzzzzzzzz, 0.000, 10.000, "/m/04rlf"
yyyyyyyyyyy, 0.000, 10.000, "/m/05zppz"
"""


def test_audioset_csv(tmp_path, caplog):
    root = tmp_path / "audioset"
    _ontology(root / "class_labels_indices.csv")
    (root / "balanced_train_segments.csv").write_text(AUDIOSET_CSV)
    audio = root / "balanced_train_segments"
    write_wav(audio / "--PJHxphWEs.wav")  # {YTID}.wav
    write_wav(audio / "-0RWZT-miFs_420.000.flac")  # {YTID}_{start}
    write_wav(audio / "part2" / "Y0FMdORf5iGs.wav")  # Y{YTID}, nested folder
    write_wav(audio / "a_b-cdefghi_10.wav")  # {YTID}_{start} with an integer start
    write_wav(audio / "unrelated.wav")
    with caplog.at_level(logging.WARNING):
        m = IMPORTERS["audioset_csv"](root / "balanced_train_segments.csv", progress=False, split="train")
    assert m.meta["dataset"] == "audioset_csv"
    assert m.meta["root"] == str(audio.resolve())  # default: folder named like the csv
    df = m.df.set_index("ytid")
    assert sorted(df.index) == sorted(["--PJHxphWEs", "-0RWZT-miFs", "0FMdORf5iGs", "a_b-cdefghi"])
    assert df.loc["--PJHxphWEs", "labels"] == ["/m/09x0r", "/m/05zppz"]
    assert df.loc["--PJHxphWEs", "path"] == "--PJHxphWEs.wav"
    assert df.loc["-0RWZT-miFs", "start_seconds"] == 420.0 and df.loc["-0RWZT-miFs", "end_seconds"] == 430.0
    assert df.loc["0FMdORf5iGs", "path"] == "part2/Y0FMdORf5iGs.wav"
    assert df.loc["a_b-cdefghi", "labels"] == ["/m/04rlf", "/m/09x0r"]
    assert set(m.df["split"]) == {"train"}
    assert m.label_vocab == ["/m/09x0r", "/m/05zppz", "/m/04rlf"]
    notes = m.meta["notes"]
    assert notes["csv_rows"] == 6
    assert notes["missing_audio"]["count"] == 2
    assert set(notes["missing_audio"]["items"]) == {"zzzzzzzzzzz", "yyyyyyyyyyy"}
    assert "of 6 CSV rows have no audio" in caplog.text
    round_trip(m, tmp_path)

    # explicit audio_dir / label_csv
    lab = _ontology(tmp_path / "x" / "labels.csv")
    m2 = import_audioset_csv(
        root / "balanced_train_segments.csv", audio_dir=audio / "part2", label_csv=lab, progress=False
    )
    assert m2.df["path"].tolist() == ["Y0FMdORf5iGs.wav"] and m2.df["split"].isna().all()


def test_audioset_csv_errors(tmp_path):
    _ontology(tmp_path / "class_labels_indices.csv")
    (tmp_path / "segs.csv").write_text('# c\nAAAAAAAAAAA, 0.000, 10.000, "/m/09x0r,/m/unknown"\n')
    write_wav(tmp_path / "audio" / "AAAAAAAAAAA.wav")
    with pytest.raises(ManifestError) as err:
        import_audioset_csv(tmp_path / "segs.csv", progress=False)
    assert "/m/unknown" in str(err.value) and "AAAAAAAAAAA" in str(err.value)
    (tmp_path / "none.csv").write_text('# c\nBBBBBBBBBBB, 0.000, 10.000, "/m/09x0r"\n')
    with pytest.raises(ManifestError, match="none of the 1 rows"):
        import_audioset_csv(tmp_path / "none.csv", progress=False)


# ----------------------------------------------------------------------------------- keyword-spotting layout
KWS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def _kws_tree(root: Path) -> None:
    """The 12-class layout of the Speech Commands test sets: ten word folders, ``_silence_`` (numbered clips,
    no speaker) and ``_unknown_`` (``{word}_{hash}_nohash_{n}``), no list files."""
    for w, word in enumerate(KWS_WORDS):
        for spk in ("aaaa1111", "bbbb2222", f"w{w:03d}cccc"):
            write_wav(root / word / f"{spk}_nohash_0.wav", seconds=0.02)
    for i in range(6):
        write_wav(root / "_silence_" / f"{i}.wav", seconds=0.02)
    for word, spk in (("bed", "aaaa1111"), ("cat", "dddd4444"), ("wow", "eeee5555"), ("bed", "dddd4444")):
        write_wav(root / "_unknown_" / f"{word}_{spk}_nohash_1.wav", seconds=0.02)


def test_speech_commands_keyword_spotting_layout(tmp_path, caplog):
    root = tmp_path / "kws"
    _kws_tree(root)
    write_wav(root / "_background_noise_" / "white_noise.wav", seconds=0.3)
    write_wav(root / "_scratch_" / "x.wav", seconds=0.02)
    (root / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        m = import_speech_commands(root, progress=False)
    assert len(m.label_vocab) == 12 and set(m.label_vocab) == {*KWS_WORDS, "_silence_", "_unknown_"}
    df = m.df[m.df["split"] != "background_noise"]
    assert len(df) == 30 + 6 + 4 and Counter(l[0] for l in df["labels"])["_silence_"] == 6
    unknown = df[df["labels"].map(lambda l: l == ["_unknown_"])]
    assert sorted(unknown["speaker"]) == ["aaaa1111", "dddd4444", "dddd4444", "eeee5555"]  # the hash, not word_hash
    assert unknown["utterance"].tolist() == [1, 1, 1, 1]
    assert df.loc[df["labels"].map(lambda l: l == ["_silence_"]), "speaker"].isna().all()
    notes = m.meta["notes"]
    assert notes["layout"] == "keyword_spotting"
    assert notes["layout_description"] == "keyword spotting: 10 word folders plus _silence_ and _unknown_ as classes"
    assert set(notes["not_classes"]) == {"_background_noise_", "_scratch_", "empty"}
    assert "background noise" in notes["not_classes"]["_background_noise_"]
    assert "not a word" in notes["not_classes"]["_scratch_"] and "_scratch_/x.wav" not in set(m.df["path"])
    assert notes["not_classes"]["empty"] == "no audio files directly inside"
    # no lists: the split is empty, and the warning names the command-line flag, not a Python function
    assert m.df.loc[m.df["split"] != "background_noise", "split"].isna().all()
    assert "--speaker-split" in caplog.text and "speaker_disjoint_split" not in caplog.text
    round_trip(m, tmp_path)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = import_speech_commands(root, progress=False, expect_resplit=True)
    assert "--speaker-split" not in caplog.text and again.meta["notes"]["no_split_lists"] is True

    # the _silence_ clips have no speaker: they are split clip by clip, the speakers whole
    split = speaker_disjoint_split(m, (0.6, 0.2, 0.2), seed=0)
    sdf = split.df
    spk = sdf.dropna(subset=["speaker"])
    assert (spk.groupby("speaker")["split"].nunique() == 1).all()
    assert set(sdf.loc[sdf["labels"].map(lambda l: l == ["_silence_"]), "split"]) <= {"train", "validation", "test"}
    info = split.meta["notes"]["speaker_split"]
    assert info["clips_without_speaker"] == 6 and info["kept"] == {"background_noise": 1}
    assert sum(info["clips"].values()) == 40
    assert info["speakers"] == spk[spk["split"] != "background_noise"].groupby("split")["speaker"].nunique().to_dict()
    round_trip(split, tmp_path, "split.parquet")  # original_split: strings and nulls


def test_speech_commands_original_layout_says_so(tmp_path):
    root = tmp_path / "sc"
    _sc_tree(root)
    m = import_speech_commands(root, progress=False)
    assert m.meta["notes"]["layout"] == "words" and "_silence_" not in m.label_vocab
    assert m.meta["notes"]["layout_description"] == "one folder per word (2 words)"
    assert m.meta["notes"]["not_classes"] == {
        "_background_noise_": "2 audio files of background noise: kept as unlabelled rows with split 'background_noise'"
    }
    no_bg = import_speech_commands(root, progress=False, include_background=False)
    assert "left out" in no_bg.meta["notes"]["not_classes"]["_background_noise_"]


def test_cli_prepare_keyword_spotting_with_speaker_split(tmp_path, capsys, caplog):
    from ssamba.data.__main__ import main

    root = tmp_path / "kws"
    _kws_tree(root)
    write_wav(root / "_background_noise_" / "white_noise.wav", seconds=0.3)
    out = tmp_path / "kws.parquet"
    argv = ["prepare", "speech_commands", str(root), "--out", str(out), "--quiet"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--speaker-split", "0.6,0.2,0.2", "--seed", "3"]) == 0
    printed = capsys.readouterr()
    assert "split column is left empty" not in caplog.text + printed.err  # no misleading warning
    assert "--speaker-split" not in caplog.text + printed.err
    text = printed.out
    assert "40 clips" not in text and "41 clips, 12 classes" in text
    assert "layout: keyword spotting: 10 word folders plus _silence_ and _unknown_ as classes" in text
    assert "not a class: _background_noise_/ (1 audio file of background noise" in text
    assert "fractions are shares of clips" in text
    m = read_manifest(out)
    info = m.meta["notes"]["speaker_split"]
    for name in ("train", "validation", "test"):  # each split's clips, share and speakers, as stored
        n, share, spk = info["clips"][name], info["clip_share"][name], info["speakers"][name]
        assert Counter(m.df["split"])[name] == n
        assert f"{name:<10} {n:>7} clips {100 * share:5.1f}%" in text
        assert f"{spk} speaker" in text.split(f"{name:<10}")[1].splitlines()[0]
    assert "6 clips without a speaker (_silence_) split clip by clip" in text
    assert "background_noise: 1 clip kept in this split" in text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0  # without --speaker-split: no split, and the advice names the flag
    assert "--speaker-split" in caplog.text and "speaker_disjoint_split" not in caplog.text
    assert "no train/validation/test split" in capsys.readouterr().out

    assert main([*argv, "--speaker-split", "0.8,0.1"]) == 2
    assert "--speaker-split '0.8,0.1'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- folder per class
def test_folders_without_split_level(tmp_path, caplog):
    root = tmp_path / "f"
    write_wav(root / "dog" / "a.wav")
    write_wav(root / "dog" / "deep" / "er" / "b.FLAC", seconds=0.2)
    write_wav(root / "cat" / "c.ogg", seconds=0.3)
    write_wav(root / "stray.wav")
    (root / "cat" / "notes.txt").write_text("not audio")
    write_wav(root / ".hidden" / "h.wav")
    write_garbage(root / "cat" / "broken.wav")
    with caplog.at_level(logging.WARNING):
        m = IMPORTERS["folders"](root, progress=False)
    assert m.meta["dataset"] == "folders" and m.meta["notes"]["split_level"] is False
    got = dict(zip(m.df["path"], m.df["labels"]))
    assert got == {"dog/a.wav": ["dog"], "dog/deep/er/b.FLAC": ["dog"], "cat/c.ogg": ["cat"]}
    assert m.label_vocab == ["cat", "dog"]
    assert m.df["split"].isna().all()
    dur = dict(zip(m.df["path"], m.df["duration"]))
    assert dur["cat/c.ogg"] == pytest.approx(0.3) and dur["dog/deep/er/b.FLAC"] == pytest.approx(0.2)
    assert m.meta["notes"]["outside_class_folders"]["items"] == ["stray.wav"]
    assert m.meta["notes"]["unreadable"]["items"][0]["path"] == "cat/broken.wav"
    assert "outside any class folder" in caplog.text and "could not be opened" in caplog.text
    round_trip(m, tmp_path)


def test_folders_with_split_level(tmp_path):
    root = tmp_path / "f"
    for split_dir in ("train", "valid", "test"):
        for cls in ("dog", "cat"):
            write_wav(root / split_dir / cls / f"{split_dir}_{cls}.wav")
    write_wav(root / "train" / "bird" / "x" / "y.wav")
    m = import_folders(root, progress=False)
    assert m.meta["notes"]["split_level"] is True
    assert Counter(m.df["split"]) == {"train": 3, "validation": 2, "test": 2}
    assert m.label_vocab == ["bird", "cat", "dog"]
    row = m.df[m.df["path"] == "valid/cat/valid_cat.wav"].iloc[0]
    assert row["labels"] == ["cat"] and row["split"] == "validation"
    round_trip(m, tmp_path)

    write_wav(root / "horse" / "h.wav")  # a class folder beside split folders is ambiguous
    with pytest.raises(ManifestError, match="mixes split folders"):
        import_folders(root, progress=False)


def test_progress_bar_runs(tmp_path, capsys):
    write_wav(tmp_path / "dog" / "a.wav")
    m = import_folders(tmp_path, progress=True)
    assert len(m) == 1
    assert "reading headers" in capsys.readouterr().err


def test_cli_layouts_are_the_importers():
    """The CLI's layout choices (kept import-free for a fast --help) are exactly the registered importers."""
    from ssamba.data.__main__ import LAYOUTS
    from ssamba.data.importers import IMPORTERS

    assert LAYOUTS == tuple(IMPORTERS)


# ----------------------------------------------------------------------------------- speaker pattern (folders)
def _digit_folders(root: Path) -> None:
    for digit in ("0", "1"):
        for spk, n in (("george", 4), ("jackson", 3), ("lucas", 2), ("nicolas", 1)):
            for i in range(n):
                write_wav(root / digit / f"{digit}_{spk}_{i}.wav", seconds=0.02)


def test_folders_speaker_pattern(tmp_path):
    root = tmp_path / "digits"
    _digit_folders(root)
    m = import_folders(root, progress=False, speaker_pattern=r"^\d+_([a-z]+)_")
    assert dict(zip(m.df["path"], m.df["speaker"]))["1/1_lucas_1.wav"] == "lucas"
    assert m.df.groupby("speaker").size().to_dict() == {"george": 8, "jackson": 6, "lucas": 4, "nicolas": 2}
    assert m.meta["notes"]["speaker_pattern"] == r"^\d+_([a-z]+)_"
    round_trip(m, tmp_path)
    # a named group wins over the first group
    named = import_folders(root, progress=False, speaker_pattern=r"^(\d)_(?P<speaker>[a-z]+)_")
    assert set(named.df["speaker"]) == {"george", "jackson", "lucas", "nicolas"}
    split = speaker_disjoint_split(m, (0.5, 0.25, 0.25), seed=0)
    assert (split.df.groupby("speaker")["split"].nunique() == 1).all()
    assert set(split.df["split"]) == {"train", "validation", "test"}

    with pytest.raises(ManifestError, match=r"speaker pattern '\^\\d\+_' has no group") as err:
        import_folders(root, progress=False, speaker_pattern=r"^\d+_")
    assert "(?P<speaker>" in str(err.value)
    with pytest.raises(ManifestError, match="not a regular expression"):
        import_folders(root, progress=False, speaker_pattern="([a-z]+")
    write_wav(root / "1" / "take7.wav", seconds=0.02)
    with pytest.raises(ManifestError) as err:
        import_folders(root, progress=False, speaker_pattern=r"^\d+_([a-z]+)_")
    assert "'1/take7.wav'" in str(err.value) and "1 of 21 files do not match" in str(err.value)


def test_cli_folders_speaker_pattern_and_split(tmp_path, capsys):
    from ssamba.data.__main__ import main

    root = tmp_path / "digits"
    _digit_folders(root)
    out = tmp_path / "d.parquet"
    argv = ["prepare", "folders", str(root), "--out", str(out), "--quiet"]
    assert main([*argv, "--speaker-split", "0.5,0.25,0.25"]) == 2  # no speakers without a pattern
    assert "no speaker" in capsys.readouterr().err
    assert main([*argv, "--speaker-pattern", r"^\d+_([a-z]+)_", "--speaker-split", "0.5,0.25,0.25"]) == 0
    text = capsys.readouterr().out
    assert r"speakers from the file names by pattern '^\d+_([a-z]+)_'" in text
    m = read_manifest(out)
    assert (m.df.groupby("speaker")["split"].nunique() == 1).all()
    assert "fractions are shares of clips" in text and "speakers: 4" in text
    assert main(["prepare", "fsdd", str(root), "--out", str(out), "--speaker-pattern", "(x)"]) == 2
    assert "--speaker-pattern applies to the folders layout only" in capsys.readouterr().err
