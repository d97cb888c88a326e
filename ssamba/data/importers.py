"""Importers: published dataset layouts -> :class:`~ssamba.data.manifest.Manifest`.

Every importer is a function ``import_<name>(root, *, progress=True, **options) -> Manifest``
registered in :data:`IMPORTERS`, so that a caller can write ``IMPORTERS[name](root, progress=True,
**opts)``. The manifests they return share these conventions:

* ``path`` entries are relative to the manifest ``root`` (stored absolute) and use ``/``;
* ``dataset`` is the layout name (the :data:`IMPORTERS` key, ``esc10`` for ESC-10);
* ``duration`` and ``sample_rate`` come from the file header (``soundfile.info``);
* a file that soundfile cannot open is left out of the rows and listed, with the error, in
  ``meta["notes"]["unreadable"]``; a warning with the count is logged (printed to stderr when
  logging is not configured);
* files a list or table names but that are absent on disk are counted and listed in ``notes``
  (never fatal, never silently dropped);
* a root that does not exist, or a layout in which no audio is found, raises
  :class:`~ssamba.errors.ManifestError` naming the root and the layout expected.

Listings in ``notes`` have the shape ``{"count": int, "items": [...], "truncated": bool}``;
``items`` holds at most :data:`MAX_LISTED` entries (``count`` is always the full number).

:func:`speaker_disjoint_split` reassigns whole speakers to train / validation / test.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from ssamba.data.manifest import Manifest
from ssamba.errors import ConfigError, ManifestError

log = logging.getLogger(__name__)

MAX_LISTED = 10_000
"""Most entries a ``notes`` listing stores (its ``count`` is always complete)."""

EXAMPLES_LISTED = 20
"""Entries kept for listings that are only examples (Speech Commands list entries not on disk)."""

# Formats soundfile can decode, as file extensions. RAW is left out: header-less files cannot be
# opened without being told their sample rate and encoding, so a ``.raw`` file is never a clip.
_BASE_EXTENSIONS = {".wav", ".flac", ".ogg"}
_ALIASES = {".aif", ".aifc", ".oga", ".opus", ".sph"}
AUDIO_EXTENSIONS: frozenset[str] = frozenset(
    _BASE_EXTENSIONS
    | _ALIASES
    | {"." + fmt.lower() for fmt in sf.available_formats() if fmt.upper() != "RAW"}
)

SPLIT_DIR_NAMES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}

SPEAKER_IMPORTERS = ("fsdd", "speech_commands")


def is_audio_file(path: str | os.PathLike) -> bool:
    """True when the file name ends with an audio extension (case-insensitive)."""
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


# ================================================================================= shared helpers
def _listing(items: list[Any], limit: int = MAX_LISTED) -> dict[str, Any]:
    return {"count": len(items), "items": list(items[:limit]), "truncated": len(items) > limit}


def _existing_dir(root: str | os.PathLike, layout: str, expected: str) -> Path:
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


def _existing_file(path: str | os.PathLike, layout: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ManifestError(
            f"{layout}: {what} {str(p)!r} does not exist. Fix: pass the path of an existing {what}."
        )
    if not p.is_file():
        raise ManifestError(f"{layout}: {what} {str(p)!r} is not a file. Fix: pass the {what} itself.")
    return p.resolve()


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators; absolute when it lies outside root."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _walk_audio(folder: Path, *, follow_symlinks: bool = False) -> list[Path]:
    """Every audio file under ``folder`` (recursive, hidden entries skipped), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=follow_symlinks):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_audio_file(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _audio_in(folder: Path) -> list[Path]:
    """Audio files directly inside ``folder`` (not recursive), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_audio_file(p))


def _probe(rows: list[dict[str, Any]], root: Path, *, progress: bool, desc: str):
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


def _finish(
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
    kept, unreadable = _probe(rows, root, progress=progress, desc=f"{dataset}: reading headers")
    if unreadable:
        notes["unreadable"] = _listing(unreadable)
        shown = ", ".join(u["path"] for u in unreadable[:3])
        log.warning(
            "%s: %d of %d audio files could not be opened by soundfile and were left out "
            "(listed in meta['notes']['unreadable']), e.g. %s",
            dataset, len(unreadable), len(rows), shown,
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


def _warn_listing(dataset: str, what: str, key: str, items: list[Any]) -> None:
    shown = ", ".join(str(x) for x in items[:3])
    log.warning("%s: %d %s (listed in meta['notes'][%r]), e.g. %s", dataset, len(items), what, key, shown)


# ================================================================================= ESC-50 / ESC-10
_ESC_FOLDER = re.compile(r"^(\d+)\s*-\s*(.+?)\s*$")
_ESC_FILE = re.compile(r"^(\d+)-([^-]+)-(.+)$")
_ESC_EXPECTED = (
    "either ROOT/audio/{fold}-{src}-{take}-{target}.wav with ROOT/meta/esc50.csv (GitHub ESC-50 "
    "layout) or ROOT/{NNN} - {Class name}/{fold}-{freesound id}-{take}.ogg (folder layout)"
)


def detect_esc_layout(root: str | os.PathLike) -> str:
    """``"csv"`` (audio/ + meta/esc50.csv) or ``"folder"`` (``NNN - Class`` folders)."""
    root = _existing_dir(root, "esc50", _ESC_EXPECTED)
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
        f"esc50.csv: esc10 value {value!r} is not a boolean. Fix: use True/False as in the "
        f"published meta/esc50.csv."
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
    on_disk = {p.name: p for p in _audio_in(audio_dir)}
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
            "path": _rel(on_disk[name], root),
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
        notes["missing_from_disk"] = _listing(missing)
        _warn_listing(dataset, "files named in meta/esc50.csv are missing on disk", "missing_from_disk", missing)
    extra = sorted(f"audio/{n}" for n in on_disk if n not in named)
    if extra:
        notes["not_in_csv"] = _listing(extra)
        _warn_listing(dataset, "audio files are not named in meta/esc50.csv and were left out", "not_in_csv", extra)
    vocab = [targets[t] for t in sorted(targets)]
    return _finish(rows, root=root, dataset=dataset, expected=_ESC_EXPECTED, label_vocab=vocab,
                   notes=notes, progress=progress)


def _esc_folders(root: Path, dataset: str, progress: bool) -> Manifest:
    classes: list[tuple[int, str, Path]] = []
    for d in sorted(root.iterdir()):
        m = _ESC_FOLDER.match(d.name)
        if d.is_dir() and m:
            classes.append((int(m.group(1)), m.group(2), d))
    classes.sort(key=lambda c: (c[0], c[1]))
    names = [c[1] for c in classes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(
            f"{dataset}: class names {dup} appear in more than one 'NNN - Class' folder under {root}. "
            f"Fix: merge or rename the folders so each class has one."
        )
    rows: list[dict[str, Any]] = []
    for _, label, folder in classes:
        for f in _walk_audio(folder):
            m = _ESC_FILE.match(f.stem)
            if not m:
                raise ManifestError(
                    f"{dataset}: file {_rel(f, root)!r} does not follow the folder-layout naming "
                    f"{{fold}}-{{freesound id}}-{{take}}.ogg, so its fold is unknown. Fix: rename it "
                    f"or move it out of the dataset folder."
                )
            rows.append({
                "path": _rel(f, root),
                "labels": [label],
                "split": None,
                "fold": int(m.group(1)),
                "source": m.group(2),
                "take": m.group(3),
            })
    return _finish(rows, root=root, dataset=dataset, expected=_ESC_EXPECTED, label_vocab=names,
                   notes={"layout": "folder"}, progress=progress)


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
    root = _existing_dir(root, dataset, _ESC_EXPECTED)
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
    root = _existing_dir(root, "speech_commands", _SC_EXPECTED)
    val_list = _read_list(root / "validation_list.txt")
    test_list = _read_list(root / "testing_list.txt")
    have_lists = (root / "validation_list.txt").is_file() or (root / "testing_list.txt").is_file()
    val_set, test_set = set(val_list), set(test_list)
    notes: dict[str, Any] = {}
    both = sorted(val_set & test_set)
    if both:
        notes["listed_in_both"] = _listing(both)
        _warn_listing("speech_commands", "files are named in both validation and testing lists; "
                      "they were put in test", "listed_in_both", both)

    rows: list[dict[str, Any]] = []
    words: list[str] = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith((".", "_")):
            continue
        files = _audio_in(d)
        if not files:
            continue
        words.append(d.name)
        for f in files:
            rel = _rel(f, root)
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
            rows.append({"path": rel, "labels": [d.name], "split": split, "speaker": speaker or None,
                         "utterance": utterance})
    if not rows:
        raise ManifestError(
            f"speech_commands: no word folders with audio found under {str(root)!r}; the layout "
            f"expected is {_SC_EXPECTED}. Fix: point at the extracted dataset root."
        )
    if not have_lists:
        notes["no_split_lists"] = True
        log.warning("speech_commands: %s has neither validation_list.txt nor testing_list.txt; "
                    "split left empty (use speaker_disjoint_split for held-out speakers)", root)

    on_disk = {r["path"] for r in rows}
    missing = [p for p in val_list + test_list if p not in on_disk]
    if missing:
        notes["missing_from_lists"] = _listing(missing, EXAMPLES_LISTED)
        _warn_listing("speech_commands", "entries of validation_list.txt/testing_list.txt are not on "
                      "disk", "missing_from_lists", missing)

    if include_background:
        for f in _audio_in(root / BACKGROUND_DIR):
            rows.append({"path": _rel(f, root), "labels": [], "split": BACKGROUND_SPLIT,
                         "speaker": None, "utterance": None})
    return _finish(rows, root=root, dataset="speech_commands", expected=_SC_EXPECTED,
                   label_vocab=words, notes=notes, progress=progress)


# ================================================================================= FSDD
_FSDD_EXPECTED = "ROOT/recordings/{digit}_{speaker}_{index}.wav (or .flac)"
_FSDD_FILE = re.compile(r"^(\d)_(.+)_(\d+)$")
FSDD_TEST_MAX_INDEX = 4


def import_fsdd(root: str | os.PathLike, *, progress: bool = True) -> Manifest:
    """Free Spoken Digit Dataset: ``ROOT/recordings/{digit}_{speaker}_{index}.{wav,flac}``.

    ROOT may also be the ``recordings`` folder itself. labels = [digit], ``speaker``, ``index``
    column; split = ``test`` for index <= 4, else ``train`` (the dataset's own convention).
    """
    base = _existing_dir(root, "fsdd", _FSDD_EXPECTED)
    rec = base / "recordings" if (base / "recordings").is_dir() else base
    rows: list[dict[str, Any]] = []
    for f in _audio_in(rec):
        m = _FSDD_FILE.match(f.stem)
        if not m:
            raise ManifestError(
                f"fsdd: file {_rel(f, base)!r} does not follow {{digit}}_{{speaker}}_{{index}}, so its "
                f"label is unknown. Fix: rename it or move it out of {rec}."
            )
        index = int(m.group(3))
        rows.append({
            "path": _rel(f, base),
            "labels": [m.group(1)],
            "split": "test" if index <= FSDD_TEST_MAX_INDEX else "train",
            "speaker": m.group(2),
            "index": index,
        })
    vocab = sorted({r["labels"][0] for r in rows}, key=int)
    return _finish(rows, root=base, dataset="fsdd", expected=_FSDD_EXPECTED, label_vocab=vocab,
                   notes={}, progress=progress)


# ================================================================================= label csv (AudioSet ontology)
def read_class_labels(label_csv: str | os.PathLike, layout: str) -> tuple[list[str], dict[str, str]]:
    """Read ``class_labels_indices.csv`` (index, mid, display_name) -> (mids by index, mid -> name)."""
    path = _existing_file(label_csv, layout, "label csv (class_labels_indices.csv)")
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
    dup = sorted({m for m in mids if mids.count(m) > 1})
    if dup:
        raise ManifestError(f"{layout}: label csv {path} lists mids {dup} more than once. Fix: keep one row per mid.")
    return mids, {m: n for _, m, n in entries}


def _split_mids(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        parts = str(value if value is not None else "").split(",")
    return [p.strip() for p in parts if p.strip()]


# ================================================================================= SSAST JSON
_SSAST_EXPECTED = (
    'a JSON file {"data": [{"wav": path, "labels": "/m/a,/m/b"}, ...]} with class_labels_indices.csv'
)


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
    json_path = _existing_file(json_path, "ssast_json", "data JSON")
    root = json_path.parent
    label_csv = Path(label_csv) if label_csv is not None else root / "class_labels_indices.csv"
    vocab, names = read_class_labels(label_csv, "ssast_json")
    known = set(vocab)
    try:
        with open(json_path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"ssast_json: {json_path} is not valid JSON ({exc}). Fix: expected {_SSAST_EXPECTED}.") from None
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
        unknown = [m for m in mids if m not in known]
        if unknown:
            raise ManifestError(
                f"ssast_json: entry {i} ({entry['wav']!r}) of {json_path} has mids {unknown} that are "
                f"not in the label csv {label_csv}. Fix: use the label csv this JSON was made for, or "
                f"correct the entry."
            )
        wav = Path(entry["wav"]).expanduser()
        full = wav if wav.is_absolute() else root / wav
        if not full.is_file():
            missing.append(str(entry["wav"]))
            continue
        rows.append({"path": _rel(full.resolve(), root), "labels": mids, "split": split})
    notes: dict[str, Any] = {"source": str(json_path), "label_csv": str(Path(label_csv).resolve()),
                             "display_names": names}
    if missing:
        notes["missing"] = _listing(missing)
        _warn_listing("ssast_json", "files named in the JSON are missing on disk", "missing", missing)
    if not rows:
        raise ManifestError(
            f"ssast_json: no audio found for {json_path} ({len(doc['data'])} entries, "
            f"{len(missing)} missing on disk, root {str(root)!r}); expected {_SSAST_EXPECTED}. "
            f"Fix: check that the wav paths resolve against the JSON's folder."
        )
    return _finish(rows, root=root, dataset="ssast_json", expected=_SSAST_EXPECTED, label_vocab=vocab,
                   notes=notes, progress=progress)


# ================================================================================= AudioSet CSV
_AUDIOSET_EXPECTED = (
    "a segments CSV (YTID, start_seconds, end_seconds, \"positive_labels\") and an audio folder "
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
    csv_path = _existing_file(csv_path, "audioset_csv", "segments CSV")
    if audio_dir is None:
        audio_dir = _default_audio_dir(csv_path)
    root = _existing_dir(audio_dir, "audioset_csv", _AUDIOSET_EXPECTED)
    label_csv = Path(label_csv) if label_csv is not None else csv_path.parent / "class_labels_indices.csv"
    vocab, names = read_class_labels(label_csv, "audioset_csv")
    known = set(vocab)

    by_stem: dict[str, Path] = {}
    for f in _walk_audio(root):
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
                    f"expected YTID, start_seconds, end_seconds, \"positive_labels\". Fix: use the "
                    f"published segments CSV format."
                )
            n_rows += 1
            ytid, start, end = rec[0].strip(), rec[1].strip(), rec[2].strip()
            mids = _split_mids(",".join(rec[3:]))
            unknown = [m for m in mids if m not in known]
            if unknown:
                raise ManifestError(
                    f"audioset_csv: row {ytid!r} (data row {lineno}) of {csv_path} has mids {unknown} "
                    f"that are not in the label csv {label_csv}. Fix: use the matching "
                    f"class_labels_indices.csv, or correct the row."
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
            rel = _rel(found, root)
            if rel in seen:
                raise ManifestError(
                    f"audioset_csv: file {rel!r} matches more than one row of {csv_path} (YTID "
                    f"{ytid!r}). Fix: name clips {{YTID}}_{{start}} when a video has several segments."
                )
            seen.add(rel)
            rows.append({"path": rel, "labels": mids, "split": split, "ytid": ytid,
                         "start_seconds": start_s, "end_seconds": end_s})
    notes: dict[str, Any] = {"source": str(csv_path), "label_csv": str(Path(label_csv).resolve()),
                             "display_names": names, "csv_rows": n_rows}
    if missing:
        notes["missing_audio"] = _listing(missing)
        _warn_listing("audioset_csv", f"of {n_rows} CSV rows have no audio file in {root}",
                      "missing_audio", missing)
    if not rows:
        raise ManifestError(
            f"audioset_csv: none of the {n_rows} rows of {csv_path} has audio in {str(root)!r}; "
            f"expected {_AUDIOSET_EXPECTED}. Fix: pass audio_dir= pointing at the downloaded clips."
        )
    return _finish(rows, root=root, dataset="audioset_csv", expected=_AUDIOSET_EXPECTED,
                   label_vocab=vocab, notes=notes, progress=progress)


# ================================================================================= folder per class
_FOLDERS_EXPECTED = "ROOT/{class}/**/*.wav (or ROOT/{train,validation,test}/{class}/**/*.wav)"


def import_folders(root: str | os.PathLike, *, progress: bool = True, follow_symlinks: bool = False) -> Manifest:
    """Folder per class: ``ROOT/{class}/**/<audio>``, label = the top folder name.

    When the top level is made of split folders (``train``, ``validation``/``valid``/``val``,
    ``test``), the layout is ``ROOT/{split}/{class}/**`` and ``split`` is filled (``valid`` and
    ``val`` become ``validation``). Audio lying outside any class folder is listed in
    ``notes["outside_class_folders"]``.
    """
    root = _existing_dir(root, "folders", _FOLDERS_EXPECTED)
    top = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in top if d.name.lower() in SPLIT_DIR_NAMES]
    if split_dirs and len(split_dirs) != len(top):
        others = [d.name for d in top if d not in split_dirs]
        raise ManifestError(
            f"folders: {root} mixes split folders {[d.name for d in split_dirs]} with other folders "
            f"{others}; expected either all class folders or all split folders ({_FOLDERS_EXPECTED}). "
            f"Fix: move the class folders under a split folder, or rename the split-named folder."
        )
    outside: list[str] = [_rel(f, root) for f in _audio_in(root)]
    rows: list[dict[str, Any]] = []

    def add_classes(base: Path, split: str | None) -> None:
        outside.extend(_rel(f, root) for f in _audio_in(base) if base != root)
        for cls in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for f in _walk_audio(cls, follow_symlinks=follow_symlinks):
                rows.append({"path": _rel(f, root), "labels": [cls.name], "split": split})

    if split_dirs:
        for d in split_dirs:
            add_classes(d, SPLIT_DIR_NAMES[d.name.lower()])
    else:
        add_classes(root, None)
    notes: dict[str, Any] = {"split_level": bool(split_dirs)}
    if outside:
        notes["outside_class_folders"] = _listing(sorted(outside))
        _warn_listing("folders", "audio files lie outside any class folder and were left out",
                      "outside_class_folders", sorted(outside))
    vocab = sorted({r["labels"][0] for r in rows})
    return _finish(rows, root=root, dataset="folders", expected=_FOLDERS_EXPECTED, label_vocab=vocab,
                   notes=notes, progress=progress)


# ================================================================================= registry
IMPORTERS: dict[str, Callable[..., Manifest]] = {
    "esc50": import_esc50,
    "esc10": import_esc10,
    "speech_commands": import_speech_commands,
    "fsdd": import_fsdd,
    "ssast_json": import_ssast_json,
    "audioset_csv": import_audioset_csv,
    "folders": import_folders,
}


# ================================================================================= speaker-disjoint split
def _speaker_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Speakers per split: largest remainder, then at least one for every non-zero fraction."""
    raw = [f * n for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    nonzero = [i for i in range(3) if fractions[i] > 0]
    if n >= len(nonzero):
        for i in nonzero:
            if counts[i] == 0:
                donor = max(nonzero, key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def speaker_disjoint_split(
    manifest: Manifest,
    fractions: Iterable[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    keep_splits: Iterable[str] = (BACKGROUND_SPLIT,),
) -> Manifest:
    """Reassign whole speakers to ``train`` / ``validation`` / ``test``.

    ``fractions`` are fractions of *speakers* (not clips); speakers are shuffled with ``seed``
    (deterministic) and cut by largest remainder, giving at least one speaker to every non-zero
    fraction when there are enough speakers. Rows whose split is in ``keep_splits`` (Speech
    Commands background noise) keep it and need no speaker; any other row without a speaker is an
    error. The previous split is kept in ``original_split`` (an existing ``original_split`` column
    is left as it is, so applying the function twice still remembers the dataset's own split).
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 or not np.isfinite(f) for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(
            f"speaker_disjoint_split: fractions must be three non-negative numbers (train, validation, "
            f"test) summing to 1; got {list(fr)}. "
            f"Fix: e.g. (0.8, 0.1, 0.1)."
        )
    df = manifest.df.copy()
    keep = set(keep_splits)
    kept_mask = df["split"].isin(keep).to_numpy() if keep else np.zeros(len(df), bool)
    speakers = df["speaker"]
    no_speaker = speakers.isna().to_numpy() | (speakers.astype(str).str.len() == 0).to_numpy()
    bad = no_speaker & ~kept_mask
    if bad.any():
        shown = df.loc[bad, "path"].head(3).tolist()
        raise ManifestError(
            f"speaker_disjoint_split: {int(bad.sum())} of {len(df)} rows of dataset "
            f"{manifest.meta.get('dataset')!r} have no speaker (e.g. {shown}); a speaker-disjoint split "
            f"needs one on every row. Fix: import with an importer that provides speakers "
            f"({', '.join(SPEAKER_IMPORTERS)}) or fill the speaker column yourself."
        )
    active = ~kept_mask
    unique = sorted(set(speakers[active].astype(str)))
    if not unique:
        raise ManifestError(
            f"speaker_disjoint_split: dataset {manifest.meta.get('dataset')!r} has no rows with a "
            f"speaker to split. Fix: import with {', '.join(SPEAKER_IMPORTERS)}."
        )
    perm = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in perm]
    counts = _speaker_counts(len(unique), fr)
    assignment: dict[str, str] = {}
    start = 0
    for name, c in zip(("train", "validation", "test"), counts):
        for spk in shuffled[start:start + c]:
            assignment[spk] = name
        start += c
    if "original_split" not in df.columns:
        df["original_split"] = df["split"]
    new_split = df["split"].copy()
    new_split[active] = speakers[active].astype(str).map(assignment)
    df["split"] = new_split
    meta = json.loads(json.dumps(manifest.meta))
    meta.setdefault("notes", {})["speaker_split"] = {
        "fractions": list(fr),
        "seed": int(seed),
        "speakers": dict(zip(("train", "validation", "test"), (int(c) for c in counts))),
        "kept_splits": sorted(keep),
    }
    return Manifest(df.reset_index(drop=True), meta)
