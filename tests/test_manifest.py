"""Manifest schema: round trips, validation errors, root resolution."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from ssamba.base.errors import ManifestError
from ssamba.data.manifest import Manifest, read_manifest
from tests.conftest import write_tone


def _manifest(tmp_path, **kw):
    for name in ("a.wav", "b.wav", "sub/c.wav"):
        write_tone(tmp_path / "root" / name, seconds=0.2)
    rows = [
        {
            "path": "a.wav",
            "labels": ["dog"],
            "split": "train",
            "fold": 1,
            "speaker": "s1",
            "duration": 0.2,
            "sample_rate": 16000,
            "extra": "x",
        },
        {
            "path": "b.wav",
            "labels": ["cat", "dog"],
            "split": "test",
            "fold": 2,
            "speaker": None,
            "duration": 0.2,
            "sample_rate": 16000,
            "extra": "y",
        },
        {
            "path": "sub/c.wav",
            "labels": [],
            "split": None,
            "fold": None,
            "speaker": "s2",
            "duration": None,
            "sample_rate": None,
            "extra": "z",
        },
    ]
    return Manifest.from_rows(rows, dataset="toy", root=tmp_path / "root", **kw)


def test_round_trip_keeps_columns_types_and_metadata(tmp_path):
    m = _manifest(tmp_path, notes={"missing": ["q.wav"]})
    out = m.write(tmp_path / "m.parquet")
    schema = pq.read_schema(out)
    assert str(schema.field("labels").type) == "list<element: string>"
    assert str(schema.field("fold").type) == "int32"
    back = read_manifest(out)
    assert list(back.df["path"]) == ["a.wav", "b.wav", "sub/c.wav"]
    assert [list(x) for x in back.df["labels"]] == [["dog"], ["cat", "dog"], []]
    assert list(back.df["extra"]) == ["x", "y", "z"]
    assert back.df["fold"].iloc[0] == 1 and pd.isna(back.df["fold"].iloc[2]) and pd.isna(back.df["split"].iloc[2])
    assert back.label_vocab == ["cat", "dog"]
    assert back.meta["notes"] == {"missing": ["q.wav"]}
    assert back.resolve("sub/c.wav") == (tmp_path / "root" / "sub" / "c.wav").resolve()
    back.validate(check_files=True)
    moved = read_manifest(out, root=tmp_path / "elsewhere")
    assert moved.resolve("a.wav") == (tmp_path / "elsewhere" / "a.wav").resolve()
    with pytest.raises(ManifestError, match="do not exist"):
        moved.validate(check_files=True)


def test_stats_round_trip(tmp_path):
    m = _manifest(tmp_path).with_stats(-5.0, 4.0, "abc", 3, 60)
    back = read_manifest(m.write(tmp_path / "m.parquet"))
    assert back.stats == {"mean": -5.0, "std": 4.0, "frontend_key": "abc", "n_clips": 3, "n_frames": 60}


def test_duplicate_rows_are_an_error_naming_the_path(tmp_path):
    m = _manifest(tmp_path)
    import pandas as pd

    dup = Manifest(pd.concat([m.df, m.df.iloc[[0]]], ignore_index=True), m.meta)
    with pytest.raises(ManifestError, match="a.wav.*drop_duplicates"):
        dup.write(tmp_path / "d.parquet")
    assert len(dup.drop_duplicates()) == 3


def test_unknown_labels_are_an_error(tmp_path):
    m = _manifest(tmp_path, label_vocab=["dog"])
    with pytest.raises(ManifestError, match="'cat'"):
        m.validate()


def test_split_selection(tmp_path):
    m = _manifest(tmp_path)
    assert list(m.split("train").df["path"]) == ["a.wav"]
    with pytest.raises(ManifestError, match="splits present: \\['test', 'train'\\]"):
        m.split("validation")


def test_reading_bad_manifests(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "none.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(junk)
    import pyarrow as pa

    pq.write_table(pa.table({"file": ["a.wav"]}), tmp_path / "nolabels.parquet")
    with pytest.raises(ManifestError, match="lacks required columns"):
        read_manifest(tmp_path / "nolabels.parquet")
