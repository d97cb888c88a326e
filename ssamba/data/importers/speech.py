"""Spoken-word layouts with speakers: Google Speech Commands (v0.01 / v0.02) and FSDD."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ssamba.base.errors import ManifestError
from ssamba.data.importers.common import (
    EXAMPLES_LISTED,
    audio_in,
    build_manifest,
    existing_dir,
    log,
    note_listing,
    rel_path,
)
from ssamba.data.manifest import Manifest

# ================================================================================= Speech Commands
_SC_EXPECTED = (
    "ROOT/{word}/{speakerhash}_nohash_{n}.wav with ROOT/validation_list.txt and "
    "ROOT/testing_list.txt (optional ROOT/_background_noise_/*.wav)"
)
_NOHASH = "_nohash_"
BACKGROUND_DIR = "_background_noise_"
BACKGROUND_SPLIT = "background_noise"


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [line.strip().replace("\\", "/") for line in fh if line.strip()]


def import_speech_commands(
    root: str | os.PathLike, *, progress: bool = True, include_background: bool = True
) -> Manifest:
    """Google Speech Commands v0.01 / v0.02.

    labels = [word] (the folder); ``speaker`` = the hash before ``_nohash_``; ``utterance`` = the
    trailing number; split = ``validation`` / ``test`` when the file is named in
    ``validation_list.txt`` / ``testing_list.txt``, else ``train`` (None for every clip when both
    lists are absent). List entries absent on disk are counted in
    ``notes["missing_from_lists"]`` with a few examples. ``_background_noise_`` files become rows
    with split ``background_noise`` and no labels (``include_background=False`` leaves them out).
    """
    root = existing_dir(root, "speech_commands", _SC_EXPECTED)
    val_list = _read_list(root / "validation_list.txt")
    test_list = _read_list(root / "testing_list.txt")
    have_lists = (root / "validation_list.txt").is_file() or (root / "testing_list.txt").is_file()
    val_set, test_set = set(val_list), set(test_list)
    notes: dict[str, Any] = {}
    both = sorted(val_set & test_set)
    if both:
        note_listing(
            notes,
            "speech_commands",
            "listed_in_both",
            both,
            "files are named in both validation and testing lists; they were put in test",
        )

    rows: list[dict[str, Any]] = []
    words: list[str] = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith((".", "_")):
            continue
        files = audio_in(d)
        if not files:
            continue
        words.append(d.name)
        for f in files:
            rel = rel_path(f, root)
            speaker, utterance = None, None
            if _NOHASH in f.stem:
                speaker, _, tail = f.stem.partition(_NOHASH)
                utterance = int(tail) if tail.isdigit() else None
            if not have_lists:
                split = None
            elif rel in test_set:
                split = "test"
            elif rel in val_set:
                split = "validation"
            else:
                split = "train"
            rows.append(
                {"path": rel, "labels": [d.name], "split": split, "speaker": speaker or None, "utterance": utterance}
            )
    if not rows:
        raise ManifestError(
            f"speech_commands: no word folders with audio found under {str(root)!r}; the layout "
            f"expected is {_SC_EXPECTED}. Fix: point at the extracted dataset root."
        )
    if not have_lists:
        notes["no_split_lists"] = True
        log.warning(
            "speech_commands: %s has neither validation_list.txt nor testing_list.txt; "
            "split left empty (use speaker_disjoint_split for held-out speakers)",
            root,
        )

    on_disk = {r["path"] for r in rows}
    missing = [p for p in val_list + test_list if p not in on_disk]
    if missing:
        note_listing(
            notes,
            "speech_commands",
            "missing_from_lists",
            missing,
            "entries of validation_list.txt/testing_list.txt are not on disk",
            EXAMPLES_LISTED,
        )

    if include_background:
        for f in audio_in(root / BACKGROUND_DIR):
            rows.append(
                {"path": rel_path(f, root), "labels": [], "split": BACKGROUND_SPLIT, "speaker": None, "utterance": None}
            )
    return build_manifest(
        rows,
        root=root,
        dataset="speech_commands",
        expected=_SC_EXPECTED,
        label_vocab=words,
        notes=notes,
        progress=progress,
    )


# ================================================================================= Free Spoken Digit Dataset
_FSDD_EXPECTED = "ROOT/recordings/{digit}_{speaker}_{index}.wav (or .flac)"
_FSDD_FILE = re.compile(r"^(\d)_(.+)_(\d+)$")
FSDD_TEST_MAX_INDEX = 4


def import_fsdd(root: str | os.PathLike, *, progress: bool = True) -> Manifest:
    """Free Spoken Digit Dataset: ``ROOT/recordings/{digit}_{speaker}_{index}.{wav,flac}``.

    ROOT may also be the ``recordings`` folder itself. labels = [digit], ``speaker``, ``index``
    column; split = ``test`` for index <= 4, else ``train`` (the dataset's own convention).
    """
    base = existing_dir(root, "fsdd", _FSDD_EXPECTED)
    rec = base / "recordings" if (base / "recordings").is_dir() else base
    rows: list[dict[str, Any]] = []
    for f in audio_in(rec):
        m = _FSDD_FILE.match(f.stem)
        if not m:
            raise ManifestError(
                f"fsdd: file {rel_path(f, base)!r} does not follow {{digit}}_{{speaker}}_{{index}}, so its "
                f"label is unknown. Fix: rename it or move it out of {rec}."
            )
        index = int(m.group(3))
        rows.append(
            {
                "path": rel_path(f, base),
                "labels": [m.group(1)],
                "split": "test" if index <= FSDD_TEST_MAX_INDEX else "train",
                "speaker": m.group(2),
                "index": index,
            }
        )
    vocab = sorted({r["labels"][0] for r in rows}, key=int)
    return build_manifest(
        rows, root=base, dataset="fsdd", expected=_FSDD_EXPECTED, label_vocab=vocab, notes={}, progress=progress
    )
