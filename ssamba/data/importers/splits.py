"""Speaker-disjoint splits: whole speakers go to train / validation / test, by shares of clips."""

from __future__ import annotations

import bisect
import json
from typing import Iterable

import numpy as np
import pandas as pd

from ssamba.base.errors import ConfigError, ManifestError
from ssamba.data.importers.speech import BACKGROUND_SPLIT, SILENCE_LABEL
from ssamba.data.manifest import Manifest

SPEAKER_IMPORTERS = ("fsdd", "speech_commands", "folders (with a speaker pattern)")
"""Importers whose manifests fill the ``speaker`` column."""

SPLIT_NAMES = ("train", "validation", "test")


def _fill(sizes: list[int], free: list[int], target: float, keep_back: int) -> list[int]:
    """Groups taken from ``free`` (indices into ``sizes``, in the seeded order; removed from it) whose clips
    come close to ``target``, leaving at least ``keep_back`` groups in ``free``.

    Moves, each made only when it brings the clip count strictly closer to the target (so this ends): take a
    free group, give a taken one back, swap a taken group for the free group of the best size. A split that
    took nothing gets the smallest free group."""
    taken: list[int] = []
    have = 0
    changed = True
    while changed:
        changed = False
        for g in list(free):
            if len(free) > keep_back and abs(have + sizes[g] - target) < abs(have - target):
                have += sizes[g]
                free.remove(g)
                taken.append(g)
                changed = True
        for g in list(taken):
            if len(taken) > 1 and abs(have - sizes[g] - target) < abs(have - target):
                have -= sizes[g]
                taken.remove(g)
                free.append(g)
                changed = True
        free.sort()  # back in the seeded order
        if changed or not taken or not free:
            continue
        by_size = sorted((sizes[h], h) for h in free)
        keys = [sz for sz, _ in by_size]
        for g in taken:  # one swap, the first that helps, then the cheaper moves again
            want = sizes[g] + (target - have)
            i = bisect.bisect_left(keys, want)
            near = [by_size[j] for j in (i - 1, i) if 0 <= j < len(by_size)]
            size, h = min(near, key=lambda x: (abs(x[0] - want), x[1]))
            if abs(have - sizes[g] + size - target) < abs(have - target):
                have += size - sizes[g]
                taken[taken.index(g)] = h
                free[free.index(h)] = g
                free.sort()
                changed = True
                break
    if not taken and len(free) > keep_back:
        g = min(free, key=lambda j: sizes[j])  # the first of the smallest, in the seeded order
        free.remove(g)
        taken.append(g)
    return taken


def _assign(sizes: list[int], fractions: tuple[float, float, float]) -> list[int]:
    """The split index of each group (its clip count in ``sizes``, groups in the seeded order).

    The split with the largest fraction takes what is left; each other split with a non-zero fraction
    (smallest first) is filled by :func:`_fill` towards its share of the clips, keeping back one group for
    every split still to fill, so that each split with a non-zero fraction gets a group when there are
    enough."""
    total = sum(sizes)
    rest = max(range(3), key=lambda i: (fractions[i], -i))
    fill = sorted((i for i in range(3) if i != rest and fractions[i] > 0), key=lambda i: (fractions[i], i))
    where = [rest] * len(sizes)
    free = list(range(len(sizes)))
    for k, split in enumerate(fill):
        for g in _fill(sizes, free, fractions[split] * total, keep_back=len(fill) - k):
            where[g] = split
    return where


def speaker_disjoint_split(
    manifest: Manifest,
    fractions: Iterable[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    keep_splits: Iterable[str] = (BACKGROUND_SPLIT,),
    clip_labels: Iterable[str] = (SILENCE_LABEL,),
) -> Manifest:
    """Reassign whole speakers to ``train`` / ``validation`` / ``test``.

    ``fractions`` are shares of **clips**: speakers are shuffled with ``seed`` (deterministic) and
    assigned whole, so the shares come as close as the speakers' sizes allow (one split per speaker;
    every split with a non-zero fraction gets at least one speaker when there are enough). Rows whose
    split is in ``keep_splits`` (Speech Commands background noise) keep it and need no speaker. Rows
    with no speaker whose only label is in ``clip_labels`` (Speech Commands ``_silence_``) are split
    clip by clip, each clip a group of its own; any other row without a speaker is an error. The
    previous split is kept in ``original_split`` (an existing ``original_split`` column is left as it
    is, so applying the function twice still remembers the dataset's own split).

    ``meta["notes"]["speaker_split"]`` records the fractions asked, the seed, and per split the
    speakers, the clips and the share of clips obtained.
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
    per_clip = set(clip_labels)
    clip_rows = no_speaker & ~kept_mask & df["labels"].map(lambda ls: len(ls) == 1 and ls[0] in per_clip).to_numpy()
    bad = no_speaker & ~kept_mask & ~clip_rows
    if bad.any():
        shown = df.loc[bad, "path"].head(3).tolist()
        raise ManifestError(
            f"speaker_disjoint_split: {int(bad.sum())} of {len(df)} rows of dataset "
            f"{manifest.meta.get('dataset')!r} have no speaker (e.g. {shown}); a speaker-disjoint split "
            f"needs one on every row. Fix: import with an importer that provides speakers "
            f"({', '.join(SPEAKER_IMPORTERS)}) or fill the speaker column yourself."
        )
    active = ~kept_mask
    spk_rows = active & ~clip_rows
    # groups: each speaker (sorted, then shuffled by the seed), and each speaker-less clip of clip_labels
    keys = np.array(
        [f"\x1fclip:{p}" if c else str(s) for p, s, c in zip(df["path"], speakers, clip_rows)], dtype=object
    )
    sizes = df.loc[active].groupby(keys[active]).size()
    if sizes.empty:
        raise ManifestError(
            f"speaker_disjoint_split: dataset {manifest.meta.get('dataset')!r} has no rows with a "
            f"speaker to split. Fix: import with {', '.join(SPEAKER_IMPORTERS)}."
        )
    names = sorted(sizes.index)
    order = np.random.default_rng(seed).permutation(len(names))
    groups = [(names[i], int(sizes[names[i]])) for i in order]
    assignment = {key: SPLIT_NAMES[s] for (key, _), s in zip(groups, _assign([n for _, n in groups], fr))}

    if "original_split" not in df.columns:
        df["original_split"] = df["split"]
    # a plain object array: pandas 3.0 (3.0.6 on the GPU machines) cannot put a list into a masked string column
    values = df["split"].to_numpy(dtype=object, copy=True)
    values[np.asarray(active, dtype=bool)] = [assignment[k] for k in keys[active]]
    new_split = pd.Series(values, index=df.index, name="split")
    df["split"] = new_split
    total = int(active.sum())
    clips = {s: int(((new_split == s) & active).sum()) for s in SPLIT_NAMES}
    meta = json.loads(json.dumps(manifest.meta))
    meta.setdefault("notes", {})["speaker_split"] = {
        "fractions": list(fr),
        "unit": "clips",
        "seed": int(seed),
        "speakers": {s: int(speakers[spk_rows & (new_split == s).to_numpy()].nunique()) for s in SPLIT_NAMES},
        "clips": clips,
        "clip_share": {s: round(clips[s] / total, 6) for s in SPLIT_NAMES},
        "clips_without_speaker": int(clip_rows.sum()),
        "clip_labels": sorted(per_clip),
        "kept_splits": sorted(keep),
        "kept": {k: int(v) for k, v in sorted(df.loc[kept_mask, "split"].value_counts().items())},
    }
    return Manifest(df.reset_index(drop=True), meta)


def describe_speaker_split(manifest: Manifest) -> list[str]:
    """Lines that say what :func:`speaker_disjoint_split` made: per split, clips (share asked and got) and
    speakers."""
    info = (manifest.meta.get("notes") or {}).get("speaker_split")
    if not info:
        return []
    lines = [
        f"speaker-disjoint split, seed {info['seed']}: fractions are shares of clips, as close as whole speakers allow"
    ]
    for name, asked in zip(SPLIT_NAMES, info["fractions"]):
        lines.append(
            f"  {name:<10} {info['clips'][name]:>7} clips {100 * info['clip_share'][name]:5.1f}% "
            f"(asked {100 * asked:.1f}%), {info['speakers'][name]} speaker{'' if info['speakers'][name] == 1 else 's'}"
        )
    for name, n in (info.get("kept") or {}).items():
        lines.append(f"  {name}: {n} clip{'' if n == 1 else 's'} kept in this split (no speaker needed)")
    if info.get("clips_without_speaker"):
        labels = ", ".join(info.get("clip_labels") or [])
        lines.append(f"  {info['clips_without_speaker']} clips without a speaker ({labels}) split clip by clip")
    return lines
