"""The manifest: one Parquet schema for every dataset (read, write, validate).

A manifest is a table with one row per clip:

=============  =====================  ==========================================================
column         type                   meaning
=============  =====================  ==========================================================
path           string                 audio file; relative paths resolve against ``root``
labels         list<string>           class names (empty list for unlabelled clips)
split          string, nullable       ``train`` / ``validation`` / ``test`` (or any name)
fold           int32, nullable        cross-validation fold (ESC-50: 1..5)
speaker        string, nullable       speaker / source id when the layout tells it
duration       float64, nullable      seconds
sample_rate    int32, nullable        Hz, as stored in the file
=============  =====================  ==========================================================

Any other column is kept as it is. File-level metadata (JSON under the Parquet key ``ssamba``)
holds ``dataset``, ``root`` (absolute), ``label_vocab`` (the ordered class list that defines
label indices), ``stats`` (fbank mean/std with the front-end key they were computed for) and
free-form ``notes`` (for example files that a list named but that were missing on disk).
:func:`union_manifests` joins the rows of some splits of several manifests into one (absolute paths).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ssamba.base.errors import ManifestError
from ssamba.base.files import atomic_path

SCHEMA_VERSION = 1
META_KEY = b"ssamba"

REQUIRED_COLUMNS = ("path", "labels")
OPTIONAL_COLUMNS = ("split", "fold", "speaker", "duration", "sample_rate")
ARROW_TYPES: dict[str, pa.DataType] = {
    "path": pa.string(),
    "labels": pa.list_(pa.string()),
    "split": pa.string(),
    "fold": pa.int32(),
    "speaker": pa.string(),
    "duration": pa.float64(),
    "sample_rate": pa.int32(),
}
SPLITS = ("train", "validation", "test")


@dataclass
class Manifest:
    """A manifest table (pandas) plus its metadata.

    ``df`` always has the seven schema columns (missing optional values are ``None``/NaN);
    ``meta`` holds ``dataset``, ``root``, ``label_vocab``, ``stats`` and ``notes``.
    """

    df: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_rows(
        cls,
        rows: Iterable[dict[str, Any]],
        *,
        dataset: str,
        root: str | os.PathLike | None = None,
        label_vocab: list[str] | None = None,
        notes: dict[str, Any] | None = None,
    ) -> "Manifest":
        """Build a manifest from dicts with at least ``path`` and ``labels``.

        ``label_vocab`` defaults to the sorted set of labels seen.
        """
        df = pd.DataFrame(list(rows))
        if df.empty:
            df = pd.DataFrame({c: [] for c in ARROW_TYPES})
        for col in ARROW_TYPES:
            if col not in df.columns:
                df[col] = None
        df["labels"] = df["labels"].map(_as_label_list)
        if label_vocab is None:
            label_vocab = sorted({lab for labs in df["labels"] for lab in labs})
        cols = list(ARROW_TYPES) + [c for c in df.columns if c not in ARROW_TYPES]
        meta = {
            "schema_version": SCHEMA_VERSION,
            "dataset": dataset,
            "root": str(Path(root).resolve()) if root is not None else None,
            "label_vocab": list(label_vocab),
            "stats": None,
            "notes": notes or {},
        }
        return cls(df[cols].reset_index(drop=True), meta)

    # ----------------------------------------------------------------------------- accessors
    def __len__(self) -> int:
        return len(self.df)

    @property
    def label_vocab(self) -> list[str]:
        return list(self.meta.get("label_vocab") or [])

    @property
    def root(self) -> Path | None:
        r = self.meta.get("root")
        return Path(r) if r else None

    @property
    def stats(self) -> dict[str, Any] | None:
        return self.meta.get("stats")

    def resolve(self, path: str) -> Path:
        """Absolute path of a manifest ``path`` entry (relative entries resolve against ``root``)."""
        p = Path(path)
        if p.is_absolute() or self.root is None:
            return p
        return self.root / p

    def abs_paths(self) -> list[Path]:
        return [self.resolve(p) for p in self.df["path"]]

    def subset(self, mask) -> "Manifest":
        """Rows selected by a boolean mask or index list, same metadata."""
        df = self.df[mask] if not isinstance(mask, list) else self.df.iloc[mask]
        return Manifest(df.reset_index(drop=True), json.loads(json.dumps(self.meta)))

    def split(self, name: str) -> "Manifest":
        """Rows of one split; an unknown split name is an error listing the ones present."""
        present = sorted(s for s in self.df["split"].dropna().unique())
        if name not in present:
            raise ManifestError(
                f"split {name!r} not in manifest (dataset {self.meta.get('dataset')!r}); "
                f"splits present: {present}. Fix: pick one of these, or re-run prepare with "
                f"--speaker-split / a split option."
            )
        return self.subset(self.df["split"] == name)

    def with_stats(self, mean: float, std: float, frontend_key: str, n_clips: int, n_frames: int) -> "Manifest":
        meta = json.loads(json.dumps(self.meta))
        meta["stats"] = {
            "mean": float(mean),
            "std": float(std),
            "frontend_key": frontend_key,
            "n_clips": int(n_clips),
            "n_frames": int(n_frames),
        }
        return Manifest(self.df, meta)

    # ----------------------------------------------------------------------------- validation
    def validate(self, *, check_files: bool = False) -> None:
        """Raise :class:`ManifestError` naming every problem found (not only the first).

        Checks: required columns; non-empty paths; no duplicate paths; every label in
        ``label_vocab``; split values are strings; optionally that every file exists.
        """
        problems: list[str] = []
        for col in REQUIRED_COLUMNS:
            if col not in self.df.columns:
                problems.append(f"missing required column {col!r}")
        if problems:
            raise ManifestError("; ".join(problems) + ". Fix: write the manifest with ssamba.data.")
        paths = self.df["path"]
        empty = [i for i, p in enumerate(paths) if not isinstance(p, str) or not p]
        if empty:
            problems.append(f"{len(empty)} rows with an empty path (rows {empty[:5]})")
        dup = paths[paths.duplicated(keep=False)]
        if len(dup):
            shown = sorted(set(dup))[:5]
            problems.append(
                f"{len(dup)} rows share a path with another row, e.g. {shown}; "
                f"fix: drop duplicates (Manifest.drop_duplicates())"
            )
        vocab = set(self.label_vocab)
        unknown: dict[str, int] = {}
        for labs in self.df["labels"]:
            for lab in labs:
                if lab not in vocab:
                    unknown[lab] = unknown.get(lab, 0) + 1
        if unknown:
            shown = dict(list(sorted(unknown.items()))[:10])
            problems.append(
                f"labels not in label_vocab {self.label_vocab[:10]}{'...' if len(vocab) > 10 else ''}: "
                f"{shown}; fix: add them to the vocabulary or correct the rows"
            )
        if check_files:
            missing = [str(p) for p in self.abs_paths() if not p.is_file()]
            if missing:
                problems.append(
                    f"{len(missing)} files do not exist, e.g. {missing[:3]}; fix: check the "
                    f"manifest root ({self.root}) or re-run `python -m ssamba.data prepare`"
                )
        if problems:
            raise ManifestError(f"manifest of dataset {self.meta.get('dataset')!r} is invalid: " + "; ".join(problems))

    def drop_duplicates(self) -> "Manifest":
        """Keep the first row of each path."""
        return Manifest(self.df.drop_duplicates("path").reset_index(drop=True), dict(self.meta))

    # ----------------------------------------------------------------------------- I/O
    def to_arrow(self) -> pa.Table:
        df = self.df
        arrays, names = [], []
        for col in df.columns:
            values = df[col].tolist()
            typ = ARROW_TYPES.get(col)
            if typ is not None:
                values = [None if _is_missing(v) else v for v in values]
                if col in ("fold", "sample_rate"):
                    values = [None if v is None else int(v) for v in values]
                arrays.append(pa.array(values, type=typ))
            else:  # a missing value is null whatever pandas made of it (NaN in a column of strings)
                arrays.append(pa.array([None if _is_missing(v) else v for v in values]))
            names.append(col)
        table = pa.Table.from_arrays(arrays, names=names)
        return table.replace_schema_metadata({META_KEY: json.dumps(self.meta).encode()})

    def write(self, path: str | os.PathLike) -> Path:
        """Validate, then write atomically (temp file + rename) to ``path``."""
        self.validate()
        path = Path(path)
        with atomic_path(path) as tmp:
            pq.write_table(self.to_arrow(), tmp)
        return path


def union_manifests(
    parts: Mapping[str, Manifest], splits: Sequence[str] | None = ("train",), *, dataset: str = "union"
) -> Manifest:
    """The rows of ``splits`` of several manifests as one (``None``: every row), e.g. a pretraining set made
    of the training splits of every fine-tuning task. ``parts`` maps a name to each manifest.

    Nothing is copied: every ``path`` becomes absolute (``root`` is None). A row keeps its ``split``,
    ``fold``, ``duration`` and ``sample_rate``; its labels and speaker are prefixed with its part's name
    (``fsdd/3``, ``fsdd/george``) so that classes and speakers of different sets stay apart, and the column
    ``source`` names the part. Other columns are dropped (the parts' schemas differ). ``notes["union_of"]``
    lists each part's dataset, root and row count. A file in two parts is a :class:`ManifestError`
    naming it and both parts; a part without any of the splits is one too."""
    rows: list[dict[str, Any]] = []
    vocab: list[str] = []
    sources: dict[str, str] = {}
    notes: dict[str, Any] = {}
    for name, m in parts.items():
        df = m.df
        if splits is not None:
            df = df[df["split"].isin(list(splits))]
            if df.empty:
                present = sorted(m.df["split"].dropna().unique())
                raise ManifestError(
                    f"union: part {name!r} (dataset {m.meta.get('dataset')!r}) has no rows of splits {list(splits)} "
                    f"(splits present: {present}). Fix: give it those splits (prepare ... --speaker-split) or "
                    f"choose other splits"
                )
        vocab.extend(f"{name}/{lab}" for lab in m.label_vocab)
        for rec, path in zip(df.to_dict("records"), df["path"]):
            full = str(m.resolve(path).absolute())
            if full in sources:
                raise ManifestError(
                    f"union: {full} is in both {sources[full]!r} and {name!r}. Fix: leave the file out of one "
                    f"of them (a clip must not be counted twice)"
                )
            sources[full] = name
            speaker = rec.get("speaker")
            rows.append(
                {
                    "path": full,
                    "labels": [f"{name}/{lab}" for lab in _as_label_list(rec.get("labels"))],
                    "split": None if _is_missing(rec.get("split")) else rec["split"],
                    "fold": None if _is_missing(rec.get("fold")) else int(rec["fold"]),
                    "speaker": None if _is_missing(speaker) else f"{name}/{speaker}",
                    "duration": None if _is_missing(rec.get("duration")) else float(rec["duration"]),
                    "sample_rate": None if _is_missing(rec.get("sample_rate")) else int(rec["sample_rate"]),
                    "source": name,
                }
            )
        notes[name] = {"dataset": m.meta.get("dataset"), "root": m.meta.get("root"), "rows": len(df)}
    union = Manifest.from_rows(
        rows, dataset=dataset, label_vocab=vocab, notes={"union_of": notes, "splits": list(splits or [])}
    )
    union.validate()
    return union


def read_manifest(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> Manifest:
    """Read and validate a manifest; ``root`` overrides the stored root (a moved dataset)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"manifest {path} does not exist. Fix: create it with "
            f"`python -m ssamba.data prepare <layout> ROOT --out {path}`."
        )
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise ManifestError(f"manifest {path} is not a readable Parquet file ({exc}).") from exc
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks required columns {missing} (has {table.column_names}). "
            f"Fix: build it with `python -m ssamba.data prepare`."
        )
    df = table.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}.get)
    for col in ARROW_TYPES:
        if col not in df.columns:
            df[col] = None
    df["labels"] = df["labels"].map(_as_label_list)
    meta.setdefault("schema_version", SCHEMA_VERSION)
    meta.setdefault("dataset", path.stem)
    meta.setdefault("root", None)
    meta.setdefault("stats", None)
    meta.setdefault("notes", {})
    if not meta.get("label_vocab"):
        meta["label_vocab"] = sorted({lab for labs in df["labels"] for lab in labs})
    if root is not None:
        meta["root"] = str(Path(root).resolve())
    elif meta.get("root") is None:
        meta["root"] = str(path.parent.resolve())
    manifest = Manifest(df, meta)
    try:
        manifest.validate()
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    return manifest


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v)) if not isinstance(v, (list, tuple)) else False
    except (TypeError, ValueError):
        return False


def _as_label_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    try:
        return [str(x) for x in list(v)]
    except TypeError:
        return [] if _is_missing(v) else [str(v)]
