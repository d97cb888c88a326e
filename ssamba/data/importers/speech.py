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
    "ROOT/testing_list.txt (optional ROOT/_background_noise_/*.wav), or the 12-class keyword-spotting "
    "layout: word folders plus ROOT/_silence_ and ROOT/_unknown_"
)
_NOHASH = "_nohash_"
BACKGROUND_DIR = "_background_noise_"
BACKGROUND_SPLIT = "background_noise"
SILENCE_LABEL = "_silence_"
UNKNOWN_LABEL = "_unknown_"
KWS_CLASS_DIRS = (SILENCE_LABEL, UNKNOWN_LABEL)
"""Folders that are classes in the keyword-spotting layout (test set v0.01 / v0.02: ten words plus these)."""

LAYOUT_WORDS = "words"
LAYOUT_KWS = "keyword_spotting"


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [line.strip().replace("\\", "/") for line in fh if line.strip()]


def _speaker_and_utterance(stem: str) -> tuple[str | None, int | None]:
    """``{hash}_nohash_{n}`` (word folders) or ``{word}_{hash}_nohash_{n}`` (``_unknown_``) -> (hash, n)."""
    if _NOHASH not in stem:
        return None, None
    head, _, tail = stem.partition(_NOHASH)
    speaker = head.rsplit("_", 1)[-1]
    return speaker or None, int(tail) if tail.isdigit() else None


def _class_folders(root: Path, include_background: bool) -> tuple[list[Path], dict[str, str]]:
    """The class folders under ``root`` and, for every other folder, why it is not a class."""
    classes: list[Path] = []
    not_classes: dict[str, str] = {}
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        n_audio = len(audio_in(d))
        files = f"{n_audio} audio file{'' if n_audio == 1 else 's'}"
        if d.name == BACKGROUND_DIR:
            not_classes[d.name] = (
                f"{files} of background noise: kept as unlabelled rows with split {BACKGROUND_SPLIT!r}"
                if include_background
                else f"{files} of background noise: left out (include_background=False)"
            )
        elif not n_audio:
            not_classes[d.name] = "no audio files directly inside"
        elif d.name.startswith("_") and d.name not in KWS_CLASS_DIRS:
            not_classes[d.name] = (
                f"{files} left out: a folder whose name starts with '_' is not a word, and only "
                f"{' and '.join(KWS_CLASS_DIRS)} are classes of the keyword-spotting layout"
            )
        else:
            classes.append(d)
    return classes, not_classes


def import_speech_commands(
    root: str | os.PathLike,
    *,
    progress: bool = True,
    include_background: bool = True,
    expect_resplit: bool = False,
) -> Manifest:
    """Google Speech Commands v0.01 / v0.02, and its 12-class keyword-spotting layout.

    labels = [word] (the folder); ``speaker`` = the hash before ``_nohash_``; ``utterance`` = the
    trailing number; split = ``validation`` / ``test`` when the file is named in
    ``validation_list.txt`` / ``testing_list.txt``, else ``train`` (None for every clip when both
    lists are absent: a warning says so unless ``expect_resplit``, for a caller that re-splits by
    speaker next). List entries absent on disk are counted in ``notes["missing_from_lists"]`` with a
    few examples. ``_background_noise_`` files become rows with split ``background_noise`` and no
    labels (``include_background=False`` leaves them out).

    Two layouts are recognised, and ``notes["layout"]`` says which: ``words`` (one folder per word,
    the dataset as published) and ``keyword_spotting`` (word folders plus ``_silence_`` and/or
    ``_unknown_``, as in the 12-class test sets), whose ``_silence_`` and ``_unknown_`` folders are
    classes like the words. ``_unknown_`` clips are named ``{word}_{hash}_nohash_{n}``: the speaker is
    the hash. ``_silence_`` clips have no speaker. Every folder that is not a class is listed in
    ``notes["not_classes"]`` with the reason.
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

    classes, not_classes = _class_folders(root, include_background)
    special = [d.name for d in classes if d.name in KWS_CLASS_DIRS]
    n_words = len(classes) - len(special)
    notes["layout"] = LAYOUT_KWS if special else LAYOUT_WORDS
    notes["layout_description"] = (
        f"keyword spotting: {n_words} word folders plus {' and '.join(special)} as classes"
        if special
        else f"one folder per word ({n_words} words)"
    )
    if not_classes:
        notes["not_classes"] = not_classes

    rows: list[dict[str, Any]] = []
    words: list[str] = []
    for d in classes:
        words.append(d.name)
        for f in audio_in(d):
            rel = rel_path(f, root)
            speaker, utterance = _speaker_and_utterance(f.stem)
            if not have_lists:
                split = None
            elif rel in test_set:
                split = "test"
            elif rel in val_set:
                split = "validation"
            else:
                split = "train"
            rows.append({"path": rel, "labels": [d.name], "split": split, "speaker": speaker, "utterance": utterance})
    if not rows:
        raise ManifestError(
            f"speech_commands: no word folders with audio found under {str(root)!r}; the layout "
            f"expected is {_SC_EXPECTED}. Fix: point at the extracted dataset root."
        )
    if not have_lists:
        notes["no_split_lists"] = True
        if not expect_resplit:
            log.warning(
                "speech_commands: %s has neither validation_list.txt nor testing_list.txt, so the split "
                "column is left empty. Fix: re-split by speaker with `python -m ssamba.data prepare "
                "speech_commands ROOT --out FILE --speaker-split 0.8,0.1,0.1`",
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
