"""Helpers every importer shares: audio file detection, root checks, header reading, notes, errors.

An importer collects row dicts (``path`` relative to the root, ``labels``, ``split`` and any
layout-specific columns) and hands them to :func:`build_manifest`, which reads the headers, sets
unreadable files aside in ``notes["unreadable"]`` and refuses an empty result.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import soundfile as sf
from tqdm.auto import tqdm

from ssamba.base.errors import ManifestError
from ssamba.data.manifest import Manifest

# One logger for the whole package (the name the single-module version had), so that callers
# filtering on "ssamba.data.importers" see every importer's warnings.
log = logging.getLogger("ssamba.data.importers")

MAX_LISTED = 10_000
"""Most entries a ``notes`` listing stores (its ``count`` is always complete)."""

EXAMPLES_LISTED = 20
"""Entries kept for listings that are only examples (Speech Commands list entries not on disk)."""

# Formats soundfile can decode, as file extensions. RAW is left out: header-less files cannot be
# opened without being told their sample rate and encoding, so a ``.raw`` file is never a clip.
_BASE_EXTENSIONS = {".wav", ".flac", ".ogg"}
_ALIASES = {".aif", ".aifc", ".oga", ".opus", ".sph"}
AUDIO_EXTENSIONS: frozenset[str] = frozenset(
    _BASE_EXTENSIONS | _ALIASES | {"." + fmt.lower() for fmt in sf.available_formats() if fmt.upper() != "RAW"}
)


def is_audio_file(path: str | os.PathLike) -> bool:
    """True when the file name ends with an audio extension (case-insensitive)."""
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


# ================================================================================= paths
def existing_dir(root: str | os.PathLike, layout: str, expected: str) -> Path:
    """``root`` resolved, or a :class:`ManifestError` naming the layout when it is not a folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise ManifestError(
            f"{layout} root {str(path)!r} does not exist; the {layout} importer expects {expected}. "
            f"Fix: pass the folder that holds the extracted dataset."
        )
    if not path.is_dir():
        raise ManifestError(
            f"{layout} root {str(path)!r} is not a folder; the {layout} importer expects {expected}. "
            f"Fix: pass the dataset folder, not a file inside it."
        )
    return path.resolve()


def existing_file(path: str | os.PathLike, layout: str, what: str) -> Path:
    """``path`` resolved, or a :class:`ManifestError` when it is missing or not a file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ManifestError(f"{layout}: {what} {str(p)!r} does not exist. Fix: pass the path of an existing {what}.")
    if not p.is_file():
        raise ManifestError(f"{layout}: {what} {str(p)!r} is not a file. Fix: pass the {what} itself.")
    return p.resolve()


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators; absolute when it lies outside root."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def walk_audio(folder: Path, *, follow_symlinks: bool = False) -> list[Path]:
    """Every audio file under ``folder`` (recursive, hidden entries skipped), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=follow_symlinks):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_audio_file(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def audio_in(folder: Path) -> list[Path]:
    """Audio files directly inside ``folder`` (not recursive), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_audio_file(p))


# ================================================================================= notes
def listing(items: list[Any], limit: int = MAX_LISTED) -> dict[str, Any]:
    """A ``notes`` listing: ``{"count", "items" (at most ``limit``), "truncated"}``."""
    return {"count": len(items), "items": list(items[:limit]), "truncated": len(items) > limit}


def note_listing(
    notes: dict[str, Any], dataset: str, key: str, items: list[Any], what: str, limit: int = MAX_LISTED
) -> None:
    """Store ``items`` as ``notes[key]`` and log a warning with their count and a few examples."""
    notes[key] = listing(items, limit)
    shown = ", ".join(str(x) for x in items[:3])
    log.warning("%s: %d %s (listed in meta['notes'][%r]), e.g. %s", dataset, len(items), what, key, shown)


# ================================================================================= headers -> manifest
def probe_headers(rows: list[dict[str, Any]], root: Path, *, progress: bool, desc: str):
    """Fill ``duration``/``sample_rate`` from headers; split off the rows soundfile cannot open."""
    kept: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    for row in tqdm(rows, desc=desc, unit="file", disable=not progress, leave=False):
        p = Path(row["path"])
        full = p if p.is_absolute() else root / p
        try:
            info = sf.info(str(full))
        except Exception as exc:  # libsndfile raises LibsndfileError/RuntimeError/OSError/TypeError
            unreadable.append({"path": row["path"], "error": f"{type(exc).__name__}: {exc}".strip()})
            continue
        row["duration"] = float(info.duration)
        row["sample_rate"] = int(info.samplerate)
        kept.append(row)
    return kept, unreadable


def build_manifest(
    rows: list[dict[str, Any]],
    *,
    root: Path,
    dataset: str,
    expected: str,
    label_vocab: list[str] | None,
    notes: dict[str, Any],
    progress: bool,
) -> Manifest:
    """Probe headers, record unreadable files, refuse an empty result, build and validate."""
    if not rows:
        raise ManifestError(
            f"{dataset}: no audio found under {str(root)!r}; the {dataset} layout expects {expected}. "
            f"Fix: point the importer at the dataset root, or pick the importer matching its layout."
        )
    rows = sorted(rows, key=lambda r: r["path"])
    kept, unreadable = probe_headers(rows, root, progress=progress, desc=f"{dataset}: reading headers")
    if unreadable:
        notes["unreadable"] = listing(unreadable)
        shown = ", ".join(u["path"] for u in unreadable[:3])
        log.warning(
            "%s: %d of %d audio files could not be opened by soundfile and were left out "
            "(listed in meta['notes']['unreadable']), e.g. %s",
            dataset,
            len(unreadable),
            len(rows),
            shown,
        )
    if not kept:
        raise ManifestError(
            f"{dataset}: all {len(rows)} audio files under {str(root)!r} are unreadable by soundfile "
            f"(e.g. {unreadable[0]['path']}: {unreadable[0]['error']}). Fix: check that the files are "
            f"complete and in a format libsndfile decodes."
        )
    manifest = Manifest.from_rows(kept, dataset=dataset, root=root, label_vocab=label_vocab, notes=notes)
    manifest.validate()
    return manifest


def duplicates(items: list[str]) -> list[str]:
    """The entries that occur more than once in ``items``, sorted."""
    return sorted(item for item, n in Counter(items).items() if n > 1)
