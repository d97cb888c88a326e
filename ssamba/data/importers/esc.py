"""ESC-50 and ESC-10, in the GitHub layout (``audio/`` + ``meta/esc50.csv``) or the folder layout."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

from ssamba.base.errors import ManifestError
from ssamba.data.importers.common import (
    audio_in,
    build_manifest,
    duplicates,
    existing_dir,
    note_listing,
    rel_path,
    walk_audio,
)
from ssamba.data.manifest import Manifest

_ESC_FOLDER = re.compile(r"^(\d+)\s*-\s*(.+?)\s*$")
_ESC_FILE = re.compile(r"^(\d+)-([^-]+)-(.+)$")
_ESC_EXPECTED = (
    "either ROOT/audio/{fold}-{src}-{take}-{target}.wav with ROOT/meta/esc50.csv (GitHub ESC-50 "
    "layout) or ROOT/{NNN} - {Class name}/{fold}-{freesound id}-{take}.ogg (folder layout)"
)


def detect_esc_layout(root: str | os.PathLike) -> str:
    """``"csv"`` (audio/ + meta/esc50.csv) or ``"folder"`` (``NNN - Class`` folders)."""
    root = existing_dir(root, "esc50", _ESC_EXPECTED)
    if (root / "meta" / "esc50.csv").is_file():
        return "csv"
    if any(d.is_dir() and _ESC_FOLDER.match(d.name) for d in root.iterdir()):
        return "folder"
    raise ManifestError(
        f"esc50: {str(root)!r} matches no ESC layout (found neither meta/esc50.csv nor "
        f"'NNN - Class name' folders); expected {_ESC_EXPECTED}. Fix: point at the extracted "
        f"dataset root."
    )


def _parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", ""):
        return False
    raise ManifestError(
        f"esc50.csv: esc10 value {value!r} is not a boolean. Fix: use True/False as in the published meta/esc50.csv."
    )


def _esc_csv(root: Path, dataset: str, esc10_only: bool, progress: bool) -> Manifest:
    csv_path = root / "meta" / "esc50.csv"
    audio_dir = root / "audio"
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"filename", "fold", "target", "category"}
        missing_cols = need - set(reader.fieldnames or [])
        if missing_cols:
            raise ManifestError(
                f"{dataset}: {csv_path} lacks columns {sorted(missing_cols)} (has {reader.fieldnames}). "
                f"Fix: use the published meta/esc50.csv (filename, fold, target, category, esc10, "
                f"src_file, take)."
            )
        if esc10_only and "esc10" not in (reader.fieldnames or []):
            raise ManifestError(
                f"esc10: {csv_path} has no esc10 column, so the ESC-10 subset cannot be selected. "
                f"Fix: use the published meta/esc50.csv, or import_esc50 for all classes."
            )
        records = list(reader)
    on_disk = {p.name: p for p in audio_in(audio_dir)}
    rows: list[dict[str, Any]] = []
    targets: dict[int, str] = {}
    missing: list[str] = []
    named: set[str] = set()
    for rec in records:
        name = rec["filename"].strip()
        named.add(name)
        esc10 = _parse_bool(rec["esc10"]) if "esc10" in rec else None
        if esc10_only and not esc10:
            continue
        target = int(rec["target"])
        category = rec["category"].strip()
        if targets.setdefault(target, category) != category:
            raise ManifestError(
                f"{dataset}: {csv_path} maps target {target} to both {targets[target]!r} and "
                f"{category!r}. Fix: each target must name one category."
            )
        if name not in on_disk:
            missing.append(f"audio/{name}")
            continue
        row: dict[str, Any] = {
            "path": rel_path(on_disk[name], root),
            "labels": [category],
            "split": None,
            "fold": int(rec["fold"]),
            "target": target,
        }
        if "src_file" in rec:
            row["source"] = rec["src_file"].strip()
        if "take" in rec:
            row["take"] = rec["take"].strip()
        if esc10 is not None:
            row["esc10"] = esc10
        rows.append(row)
    notes: dict[str, Any] = {"layout": "csv"}
    if missing:
        note_listing(notes, dataset, "missing_from_disk", missing, "files named in meta/esc50.csv are missing on disk")
    extra = sorted(f"audio/{n}" for n in on_disk if n not in named)
    if extra:
        note_listing(
            notes, dataset, "not_in_csv", extra, "audio files are not named in meta/esc50.csv and were left out"
        )
    vocab = [targets[t] for t in sorted(targets)]
    return build_manifest(
        rows, root=root, dataset=dataset, expected=_ESC_EXPECTED, label_vocab=vocab, notes=notes, progress=progress
    )


def _esc_folders(root: Path, dataset: str, progress: bool) -> Manifest:
    classes: list[tuple[int, str, Path]] = []
    for d in sorted(root.iterdir()):
        m = _ESC_FOLDER.match(d.name)
        if d.is_dir() and m:
            classes.append((int(m.group(1)), m.group(2), d))
    classes.sort(key=lambda c: (c[0], c[1]))
    names = [c[1] for c in classes]
    dup = duplicates(names)
    if dup:
        raise ManifestError(
            f"{dataset}: class names {dup} appear in more than one 'NNN - Class' folder under {root}. "
            f"Fix: merge or rename the folders so each class has one."
        )
    rows: list[dict[str, Any]] = []
    for _, label, folder in classes:
        for f in walk_audio(folder):
            m = _ESC_FILE.match(f.stem)
            if not m:
                raise ManifestError(
                    f"{dataset}: file {rel_path(f, root)!r} does not follow the folder-layout naming "
                    f"{{fold}}-{{freesound id}}-{{take}}.ogg, so its fold is unknown. Fix: rename it "
                    f"or move it out of the dataset folder."
                )
            rows.append(
                {
                    "path": rel_path(f, root),
                    "labels": [label],
                    "split": None,
                    "fold": int(m.group(1)),
                    "source": m.group(2),
                    "take": m.group(3),
                }
            )
    return build_manifest(
        rows,
        root=root,
        dataset=dataset,
        expected=_ESC_EXPECTED,
        label_vocab=names,
        notes={"layout": "folder"},
        progress=progress,
    )


def import_esc50(root: str | os.PathLike, *, progress: bool = True, esc10_only: bool = False) -> Manifest:
    """ESC-50 in either published layout (detected automatically).

    * GitHub layout: ``ROOT/audio/*.wav`` + ``ROOT/meta/esc50.csv``. labels = [category], ``fold``
      from the csv, extra columns ``source`` (src_file), ``take``, ``target``, ``esc10``; the
      vocabulary is ordered by ``target``. ``esc10_only=True`` keeps the ESC-10 rows.
    * Folder layout: ``ROOT/{NNN} - {Class}/{fold}-{freesound id}-{take}.ogg``; label = class name,
      ``fold`` from the file name, ``source`` = freesound id, ``take`` kept; vocabulary ordered by
      the ``NNN`` prefix.

    ``split`` stays None: the folds are the cross-validation unit.
    """
    dataset = "esc10" if esc10_only else "esc50"
    root = existing_dir(root, dataset, _ESC_EXPECTED)
    layout = detect_esc_layout(root)
    if layout == "csv":
        return _esc_csv(root, dataset, esc10_only, progress)
    manifest = _esc_folders(root, dataset, progress)
    # The ESC-10 folder download holds only its ten classes; the old ESC-50 folder layout has no
    # ESC-10 flag, so the subset cannot be picked from it.
    if esc10_only and len(manifest.label_vocab) > 10:
        raise ManifestError(
            f"esc10: {root} is a folder layout with {len(manifest.label_vocab)} classes, and folder "
            f"layouts carry no ESC-10 flag; the ESC-10 subset cannot be selected. Fix: use the "
            f"ESC-10 download, the GitHub layout with meta/esc50.csv, or import_esc50 for all classes."
        )
    return manifest


def import_esc10(root: str | os.PathLike, *, progress: bool = True) -> Manifest:
    """ESC-10: the ESC-10 folder layout as is, or the ``esc10 == True`` rows of the ESC-50 csv layout."""
    return import_esc50(root, progress=progress, esc10_only=True)
