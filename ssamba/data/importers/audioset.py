"""AudioSet-ontology layouts: SSAST/AST data JSON and AudioSet segments CSV, with the label csv."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from ssamba.base.errors import ManifestError
from ssamba.data.importers.common import (
    build_manifest,
    duplicates,
    existing_dir,
    existing_file,
    note_listing,
    rel_path,
    walk_audio,
)
from ssamba.data.manifest import Manifest


# ================================================================================= label csv (AudioSet ontology)
def read_class_labels(label_csv: str | os.PathLike, layout: str) -> tuple[list[str], dict[str, str]]:
    """Read ``class_labels_indices.csv`` (index, mid, display_name) -> (mids by index, mid -> name)."""
    path = existing_file(label_csv, layout, "label csv (class_labels_indices.csv)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, skipinitialspace=True)
        cols = set(reader.fieldnames or [])
        if not {"index", "mid"} <= cols:
            raise ManifestError(
                f"{layout}: label csv {path} must have columns index, mid, display_name "
                f"(has {reader.fieldnames}). Fix: use AudioSet's class_labels_indices.csv format."
            )
        entries = []
        for i, rec in enumerate(reader):
            try:
                idx = int(rec["index"])
            except (TypeError, ValueError):
                raise ManifestError(
                    f"{layout}: label csv {path} row {i + 2} has index {rec['index']!r}, not an integer. "
                    f"Fix: number the classes 0..N-1."
                ) from None
            entries.append((idx, rec["mid"].strip(), (rec.get("display_name") or "").strip()))
    if not entries:
        raise ManifestError(f"{layout}: label csv {path} has no classes. Fix: pass a filled class_labels_indices.csv.")
    entries.sort()
    mids = [m for _, m, _ in entries]
    dup = duplicates(mids)
    if dup:
        raise ManifestError(f"{layout}: label csv {path} lists mids {dup} more than once. Fix: keep one row per mid.")
    return mids, {m: n for _, m, n in entries}


def _load_labels(
    label_csv: str | os.PathLike | None, default_dir: Path, layout: str
) -> tuple[Path, list[str], dict[str, str]]:
    """The label csv path (default: ``class_labels_indices.csv`` in ``default_dir``), its mids and names."""
    path = Path(label_csv) if label_csv is not None else default_dir / "class_labels_indices.csv"
    vocab, names = read_class_labels(path, layout)
    return path, vocab, names


def _label_notes(source: Path, label_csv: Path, names: dict[str, str]) -> dict[str, Any]:
    return {"source": str(source), "label_csv": str(label_csv.resolve()), "display_names": names}


def _split_mids(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        parts = str(value if value is not None else "").split(",")
    return [p.strip() for p in parts if p.strip()]


def _check_mids(mids: list[str], known: set[str], label_csv: Path, where: str, fix: str) -> None:
    """Refuse mids that the label csv does not list; ``where`` names the offending entry."""
    unknown = [m for m in mids if m not in known]
    if unknown:
        raise ManifestError(f"{where} has mids {unknown} that are not in the label csv {label_csv}. Fix: {fix}")


# ================================================================================= SSAST JSON
_SSAST_EXPECTED = 'a JSON file {"data": [{"wav": path, "labels": "/m/a,/m/b"}, ...]} with class_labels_indices.csv'


def import_ssast_json(
    json_path: str | os.PathLike,
    *,
    label_csv: str | os.PathLike | None = None,
    split: str | None = None,
    progress: bool = True,
) -> Manifest:
    """SSAST/AST-style data JSON.

    ``wav`` paths are relative to the JSON's folder (which becomes the manifest root) or absolute
    (kept absolute when outside it). labels are the machine ids of the comma-separated ``labels``
    string; the vocabulary is every mid of ``label_csv`` (default: ``class_labels_indices.csv``
    next to the JSON) ordered by its ``index``. A mid missing from the csv is an error; files
    absent on disk are listed in ``notes["missing"]``. ``split`` is written on every row.
    """
    json_path = existing_file(json_path, "ssast_json", "data JSON")
    root = json_path.parent
    label_csv, vocab, names = _load_labels(label_csv, root, "ssast_json")
    known = set(vocab)
    try:
        with open(json_path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"ssast_json: {json_path} is not valid JSON ({exc}). Fix: expected {_SSAST_EXPECTED}."
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ManifestError(
            f"ssast_json: {json_path} has no top-level list 'data' (found "
            f"{type(doc).__name__}{' with keys ' + str(sorted(doc)) if isinstance(doc, dict) else ''}). "
            f"Fix: expected {_SSAST_EXPECTED}."
        )
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    for i, entry in enumerate(doc["data"]):
        if not isinstance(entry, dict) or not entry.get("wav"):
            raise ManifestError(
                f"ssast_json: entry {i} of {json_path} has no 'wav' path ({entry!r}). Fix: every "
                f"entry needs a 'wav' and a 'labels' field."
            )
        mids = _split_mids(entry.get("labels", ""))
        _check_mids(
            mids,
            known,
            label_csv,
            f"ssast_json: entry {i} ({entry['wav']!r}) of {json_path}",
            "use the label csv this JSON was made for, or correct the entry.",
        )
        wav = Path(entry["wav"]).expanduser()
        full = wav if wav.is_absolute() else root / wav
        if not full.is_file():
            missing.append(str(entry["wav"]))
            continue
        rows.append({"path": rel_path(full.resolve(), root), "labels": mids, "split": split})
    notes = _label_notes(json_path, label_csv, names)
    if missing:
        note_listing(notes, "ssast_json", "missing", missing, "files named in the JSON are missing on disk")
    if not rows:
        raise ManifestError(
            f"ssast_json: no audio found for {json_path} ({len(doc['data'])} entries, "
            f"{len(missing)} missing on disk, root {str(root)!r}); expected {_SSAST_EXPECTED}. "
            f"Fix: check that the wav paths resolve against the JSON's folder."
        )
    return build_manifest(
        rows,
        root=root,
        dataset="ssast_json",
        expected=_SSAST_EXPECTED,
        label_vocab=vocab,
        notes=notes,
        progress=progress,
    )


# ================================================================================= AudioSet CSV
_AUDIOSET_EXPECTED = (
    'a segments CSV (YTID, start_seconds, end_seconds, "positive_labels") and an audio folder '
    "with files named {YTID}.wav, {YTID}_{start}.wav or Y{YTID}.wav (any audio extension)"
)


def _number_forms(value: str) -> list[str]:
    """Spellings of a seconds value that downloaders use in file names."""
    raw = value.strip()
    forms = [raw]
    try:
        x = float(raw)
    except ValueError:
        return forms
    forms += [f"{x:.3f}", f"{x:.2f}", f"{x:.1f}", repr(x)]
    if x == int(x):
        forms.append(str(int(x)))
    forms.append(str(int(round(x * 1000))))  # milliseconds
    return list(dict.fromkeys(forms))


def _default_audio_dir(csv_path: Path) -> Path:
    for cand in (csv_path.parent / csv_path.stem, csv_path.parent / "audio"):
        if cand.is_dir():
            return cand
    return csv_path.parent


def import_audioset_csv(
    csv_path: str | os.PathLike,
    *,
    audio_dir: str | os.PathLike | None = None,
    label_csv: str | os.PathLike | None = None,
    split: str | None = None,
    progress: bool = True,
) -> Manifest:
    """AudioSet segments CSV plus a folder of (partially) downloaded clips.

    ``audio_dir`` (the manifest root) defaults to the folder named like the CSV without its
    extension, else ``audio/``, else the CSV's own folder, all next to the CSV. A row's file is
    found (recursively, any audio extension) as ``{YTID}``, ``Y{YTID}``, ``{YTID}_{start}`` or
    ``{YTID}_{start}_{end}``. Rows with no file are counted and listed (their YTIDs) in
    ``notes["missing_audio"]``. Columns ``ytid``, ``start_seconds``, ``end_seconds`` are kept.
    ``label_csv`` defaults to ``class_labels_indices.csv`` next to the CSV.
    """
    csv_path = existing_file(csv_path, "audioset_csv", "segments CSV")
    if audio_dir is None:
        audio_dir = _default_audio_dir(csv_path)
    root = existing_dir(audio_dir, "audioset_csv", _AUDIOSET_EXPECTED)
    label_csv, vocab, names = _load_labels(label_csv, csv_path.parent, "audioset_csv")
    known = set(vocab)

    by_stem: dict[str, Path] = {}
    for f in walk_audio(root):
        by_stem.setdefault(f.stem, f)

    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    seen: set[str] = set()
    n_rows = 0
    with open(csv_path, newline="", encoding="utf-8") as fh:
        lines = (line for line in fh if line.strip() and not line.lstrip().startswith("#"))
        for lineno, rec in enumerate(csv.reader(lines, skipinitialspace=True), start=1):
            if len(rec) < 4:
                raise ManifestError(
                    f"audioset_csv: data row {lineno} of {csv_path} has {len(rec)} fields ({rec!r}); "
                    f'expected YTID, start_seconds, end_seconds, "positive_labels". Fix: use the '
                    f"published segments CSV format."
                )
            n_rows += 1
            ytid, start, end = rec[0].strip(), rec[1].strip(), rec[2].strip()
            mids = _split_mids(",".join(rec[3:]))
            _check_mids(
                mids,
                known,
                label_csv,
                f"audioset_csv: row {ytid!r} (data row {lineno}) of {csv_path}",
                "use the matching class_labels_indices.csv, or correct the row.",
            )
            try:
                start_s, end_s = float(start), float(end)
            except ValueError:
                raise ManifestError(
                    f"audioset_csv: row {ytid!r} (data row {lineno}) of {csv_path} has non-numeric "
                    f"start/end {start!r}/{end!r}. Fix: seconds must be numbers."
                ) from None
            candidates = [ytid, "Y" + ytid]
            for s in _number_forms(start):
                candidates.append(f"{ytid}_{s}")
                candidates.append(f"Y{ytid}_{s}")
                candidates += [f"{ytid}_{s}_{e}" for e in _number_forms(end)]
            found = next((by_stem[c] for c in candidates if c in by_stem), None)
            if found is None:
                missing.append(ytid)
                continue
            rel = rel_path(found, root)
            if rel in seen:
                raise ManifestError(
                    f"audioset_csv: file {rel!r} matches more than one row of {csv_path} (YTID "
                    f"{ytid!r}). Fix: name clips {{YTID}}_{{start}} when a video has several segments."
                )
            seen.add(rel)
            rows.append(
                {
                    "path": rel,
                    "labels": mids,
                    "split": split,
                    "ytid": ytid,
                    "start_seconds": start_s,
                    "end_seconds": end_s,
                }
            )
    notes = {**_label_notes(csv_path, label_csv, names), "csv_rows": n_rows}
    if missing:
        note_listing(
            notes, "audioset_csv", "missing_audio", missing, f"of {n_rows} CSV rows have no audio file in {root}"
        )
    if not rows:
        raise ManifestError(
            f"audioset_csv: none of the {n_rows} rows of {csv_path} has audio in {str(root)!r}; "
            f"expected {_AUDIOSET_EXPECTED}. Fix: pass audio_dir= pointing at the downloaded clips."
        )
    return build_manifest(
        rows,
        root=root,
        dataset="audioset_csv",
        expected=_AUDIOSET_EXPECTED,
        label_vocab=vocab,
        notes=notes,
        progress=progress,
    )
