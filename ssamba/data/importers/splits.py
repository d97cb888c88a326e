"""Speaker-disjoint splits: whole speakers go to train / validation / test."""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np

from ssamba.base.errors import ConfigError, ManifestError
from ssamba.data.importers.speech import BACKGROUND_SPLIT
from ssamba.data.manifest import Manifest

SPEAKER_IMPORTERS = ("fsdd", "speech_commands")
"""Importers whose manifests fill the ``speaker`` column."""


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
        for spk in shuffled[start : start + c]:
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
