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
  :class:`~ssamba.base.errors.ManifestError` naming the root and the layout expected.

Listings in ``notes`` have the shape ``{"count": int, "items": [...], "truncated": bool}``;
``items`` holds at most :data:`MAX_LISTED` entries (``count`` is always the full number).

:func:`speaker_disjoint_split` reassigns whole speakers to train / validation / test, by shares of
clips; :func:`describe_speaker_split` says what it made.

Modules: :mod:`.common` (helpers every importer shares), :mod:`.esc` (ESC-50 / ESC-10),
:mod:`.speech` (Speech Commands, FSDD), :mod:`.audioset` (SSAST JSON, AudioSet CSV),
:mod:`.folders` (folder per class), :mod:`.splits` (speaker-disjoint split).
"""

from __future__ import annotations

from typing import Callable

from ssamba.data.importers.audioset import import_audioset_csv, import_ssast_json, read_class_labels
from ssamba.data.importers.common import (
    AUDIO_EXTENSIONS,
    EXAMPLES_LISTED,
    MAX_LISTED,
    is_audio_file,
)
from ssamba.data.importers.esc import detect_esc_layout, import_esc10, import_esc50
from ssamba.data.importers.folders import SPLIT_DIR_NAMES, import_folders, speaker_regex
from ssamba.data.importers.speech import (
    BACKGROUND_DIR,
    BACKGROUND_SPLIT,
    FSDD_TEST_MAX_INDEX,
    KWS_CLASS_DIRS,
    LAYOUT_KWS,
    LAYOUT_WORDS,
    SILENCE_LABEL,
    UNKNOWN_LABEL,
    import_fsdd,
    import_speech_commands,
)
from ssamba.data.importers.splits import SPEAKER_IMPORTERS, describe_speaker_split, speaker_disjoint_split
from ssamba.data.manifest import Manifest

IMPORTERS: dict[str, Callable[..., Manifest]] = {
    "esc50": import_esc50,
    "esc10": import_esc10,
    "speech_commands": import_speech_commands,
    "fsdd": import_fsdd,
    "ssast_json": import_ssast_json,
    "audioset_csv": import_audioset_csv,
    "folders": import_folders,
}
"""Importer of each layout name: ``IMPORTERS[name](root, progress=True, **options) -> Manifest``."""

__all__ = [
    "AUDIO_EXTENSIONS",
    "BACKGROUND_DIR",
    "BACKGROUND_SPLIT",
    "EXAMPLES_LISTED",
    "FSDD_TEST_MAX_INDEX",
    "IMPORTERS",
    "KWS_CLASS_DIRS",
    "LAYOUT_KWS",
    "LAYOUT_WORDS",
    "MAX_LISTED",
    "SILENCE_LABEL",
    "SPEAKER_IMPORTERS",
    "SPLIT_DIR_NAMES",
    "UNKNOWN_LABEL",
    "describe_speaker_split",
    "detect_esc_layout",
    "import_audioset_csv",
    "import_esc10",
    "import_esc50",
    "import_folders",
    "import_fsdd",
    "import_speech_commands",
    "import_ssast_json",
    "is_audio_file",
    "read_class_labels",
    "speaker_disjoint_split",
    "speaker_regex",
]
