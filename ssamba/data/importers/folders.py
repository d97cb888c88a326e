"""Folder per class: ``ROOT/{class}/**`` or ``ROOT/{split}/{class}/**``, label = the class folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ssamba.base.errors import ManifestError
from ssamba.data.importers.common import audio_in, build_manifest, existing_dir, note_listing, rel_path, walk_audio
from ssamba.data.manifest import Manifest

SPLIT_DIR_NAMES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}
_FOLDERS_EXPECTED = "ROOT/{class}/**/*.wav (or ROOT/{train,validation,test}/{class}/**/*.wav)"


def speaker_regex(pattern: str) -> re.Pattern:
    """``pattern`` compiled, or a :class:`ManifestError` when it is not a regex or has no group to read."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ManifestError(
            f"folders: speaker pattern '{pattern}' is not a regular expression ({exc}). "
            f"Fix: e.g. '^[0-9]+_([a-z]+)_' for files named 7_george_12.wav."
        ) from None
    if not regex.groups:
        raise ManifestError(
            f"folders: speaker pattern '{pattern}' has no group, so it cannot say which part of a file name is "
            f"the speaker. Fix: put the speaker part in parentheses, e.g. '^[0-9]+_([a-z]+)_', or name it: "
            f"'(?P<speaker>[a-z]+)'."
        )
    return regex


def speaker_of(regex: re.Pattern, name: str) -> str | None:
    """The speaker in file name ``name``: group ``speaker`` if the pattern names one, else its first group."""
    m = regex.search(name)
    if m is None:
        return None
    return m.group("speaker" if "speaker" in regex.groupindex else 1) or None


def import_folders(
    root: str | os.PathLike,
    *,
    progress: bool = True,
    follow_symlinks: bool = False,
    speaker_pattern: str | None = None,
) -> Manifest:
    """Folder per class: ``ROOT/{class}/**/<audio>``, label = the top folder name.

    When the top level is made of split folders (``train``, ``validation``/``valid``/``val``,
    ``test``), the layout is ``ROOT/{split}/{class}/**`` and ``split`` is filled (``valid`` and
    ``val`` become ``validation``). Audio lying outside any class folder is listed in
    ``notes["outside_class_folders"]``.

    ``speaker_pattern``: a regular expression searched (``re.search``) in each file's name (the name
    only, extension included, no folders); its group ``speaker``, or else its first group, fills the
    ``speaker`` column, so that :func:`~ssamba.data.importers.speaker_disjoint_split` can hold
    speakers out. A file it does not match, or a pattern without a group, is a :class:`ManifestError`
    naming the file (or the pattern).
    """
    regex = speaker_regex(speaker_pattern) if speaker_pattern else None
    root = existing_dir(root, "folders", _FOLDERS_EXPECTED)
    top = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in top if d.name.lower() in SPLIT_DIR_NAMES]
    if split_dirs and len(split_dirs) != len(top):
        others = [d.name for d in top if d not in split_dirs]
        raise ManifestError(
            f"folders: {root} mixes split folders {[d.name for d in split_dirs]} with other folders "
            f"{others}; expected either all class folders or all split folders ({_FOLDERS_EXPECTED}). "
            f"Fix: move the class folders under a split folder, or rename the split-named folder."
        )
    outside: list[str] = [rel_path(f, root) for f in audio_in(root)]
    rows: list[dict[str, Any]] = []

    def add_classes(base: Path, split: str | None) -> None:
        outside.extend(rel_path(f, root) for f in audio_in(base) if base != root)
        for cls in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for f in walk_audio(cls, follow_symlinks=follow_symlinks):
                rows.append({"path": rel_path(f, root), "labels": [cls.name], "split": split})

    if split_dirs:
        for d in split_dirs:
            add_classes(d, SPLIT_DIR_NAMES[d.name.lower()])
    else:
        add_classes(root, None)
    if regex is not None:
        unmatched = []
        for row in rows:
            row["speaker"] = speaker_of(regex, Path(row["path"]).name)
            if row["speaker"] is None:
                unmatched.append(row["path"])
        if unmatched:
            also = f", also e.g. {unmatched[1]!r}" if len(unmatched) > 1 else ""
            raise ManifestError(
                f"folders: speaker pattern '{speaker_pattern}' finds no speaker in the name of {unmatched[0]!r} "
                f"({len(unmatched)} of {len(rows)} files do not match{also}). "
                f"Fix: change the pattern so that its group matches every file name (it is searched in the "
                f"name only, extension included), or move the files without a speaker out of {root}."
            )
    notes: dict[str, Any] = {"split_level": bool(split_dirs)}
    if regex is not None:
        notes["speaker_pattern"] = speaker_pattern
    if outside:
        note_listing(
            notes,
            "folders",
            "outside_class_folders",
            sorted(outside),
            "audio files lie outside any class folder and were left out",
        )
    vocab = sorted({r["labels"][0] for r in rows})
    return build_manifest(
        rows,
        root=root,
        dataset="folders",
        expected=_FOLDERS_EXPECTED,
        label_vocab=vocab,
        notes=notes,
        progress=progress,
    )
