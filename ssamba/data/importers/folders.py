"""Folder per class: ``ROOT/{class}/**`` or ``ROOT/{split}/{class}/**``, label = the class folder."""

from __future__ import annotations

import os
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


def import_folders(root: str | os.PathLike, *, progress: bool = True, follow_symlinks: bool = False) -> Manifest:
    """Folder per class: ``ROOT/{class}/**/<audio>``, label = the top folder name.

    When the top level is made of split folders (``train``, ``validation``/``valid``/``val``,
    ``test``), the layout is ``ROOT/{split}/{class}/**`` and ``split`` is filled (``valid`` and
    ``val`` become ``validation``). Audio lying outside any class folder is listed in
    ``notes["outside_class_folders"]``.
    """
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
    notes: dict[str, Any] = {"split_level": bool(split_dirs)}
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
