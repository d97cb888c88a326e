"""The procedural demo corpus: labelled sound events generated from a seed, no download needed.

``make_demo_corpus()`` writes a small audio-classification data set, 16-bit PCM WAV files
(16 kHz, mono, 1 s) plus a ``manifest.parquet`` (dataset ``demo``), so that the pipeline
(features, pretraining, fine-tuning, sweeps) runs end to end on a laptop with no data.

The sounds are :mod:`ssamba.data.synth`'s (eight classes of sound events, ten voices stored as the
manifest's ``speaker`` column).

Determinism: clip ``i`` of class ``c`` uses its own stream ``default_rng([1, seed, c, i])`` and
the split of a class uses ``default_rng([2, seed, c])``; the same seed gives byte-identical
files whatever the generation order, a different seed gives different audio.

Caching: the default folder is ``cache_dir("demo", "v{VERSION}-seed{seed}-n{clips}-d{dur}-sr{sr}")``.
A corpus is built in a temporary sibling folder, stamped with a ``DONE`` file (written last,
holding the generation parameters) and then renamed into place, so an interrupted build is
never reused and concurrent builders of the same folder do not break each other.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from ssamba.base.errors import ConfigError
from ssamba.base.paths import cache_dir
from ssamba.data.manifest import Manifest
from ssamba.data.synth import CLASSES, N_VOICES, VERSION, synth_clip, voice_name

# 8 classes x 60 clips = 480 one-second clips (~15 MB), about 1 s to generate on one core.
DEFAULT_CLIPS_PER_CLASS = 60
SPLIT_FRACTIONS = {"validation": 0.15, "test": 0.15}  # the rest is train

MANIFEST_NAME = "manifest.parquet"
DONE_NAME = "DONE"
AUDIO_DIR = "audio"
_TMP_TAG = ".tmp-"
_TRASH_TAG = ".trash-"

_STREAM_SPLIT = 2


# ------------------------------------------------------------------------------ splits
def _split_of_class(seed: int, class_idx: int, n: int) -> list[str]:
    """~70/15/15 train/validation/test of ``n`` clips, a seeded permutation per class."""
    n_val = int(round(SPLIT_FRACTIONS["validation"] * n))
    n_test = int(round(SPLIT_FRACTIONS["test"] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    order = np.random.default_rng([_STREAM_SPLIT, seed, class_idx]).permutation(n)
    out = ["train"] * n
    for j, idx in enumerate(order):
        if j < n_test:
            out[idx] = "test"
        elif j < n_test + n_val:
            out[idx] = "validation"
    return out


# ------------------------------------------------------------------------------ the corpus
def _params(seed: int, clips_per_class: int, duration_s: float, sample_rate: int) -> dict:
    return {
        "version": VERSION,
        "seed": int(seed),
        "clips_per_class": int(clips_per_class),
        "duration_s": float(duration_s),
        "sample_rate": int(sample_rate),
        "classes": list(CLASSES),
        "n_voices": N_VOICES,
    }


def default_out_dir(
    seed: int = 0, clips_per_class: int = DEFAULT_CLIPS_PER_CLASS, duration_s: float = 1.0, sample_rate: int = 16000
) -> Path:
    """The cache folder of a corpus (its name holds every generation parameter; not created)."""
    return cache_dir("demo") / f"v{VERSION}-seed{seed}-n{clips_per_class}-d{duration_s:.10g}-sr{sample_rate}"


def is_complete(folder: str | os.PathLike, params: dict | None = None) -> bool:
    """True when ``folder`` holds a finished corpus: a ``DONE`` stamp (matching ``params`` if given)
    and the manifest."""
    folder = Path(folder)
    try:
        stamp = json.loads((folder / DONE_NAME).read_text())
    except (OSError, ValueError):
        return False
    if params is not None and stamp.get("params") != params:
        return False
    return (folder / MANIFEST_NAME).is_file()


def _looks_like_corpus(folder: Path) -> bool:
    """Only demo-corpus entries (or nothing) in ``folder``: safe to replace."""
    try:
        names = {p.name for p in folder.iterdir()}
    except FileNotFoundError:
        return True
    allowed = {AUDIO_DIR, MANIFEST_NAME, DONE_NAME}
    return all(n in allowed or n.startswith(MANIFEST_NAME + ".") for n in names)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_path(target: Path, pid: int) -> Path:
    """The private build folder of process ``pid`` for ``target`` (a hidden sibling)."""
    return target.parent / f".{target.name}{_TMP_TAG}{socket.gethostname()}-{pid}-{uuid.uuid4().hex[:12]}"


def _remove_stale_tmp(target: Path) -> None:
    """Delete leftovers of builds of ``target`` killed on this host (their process is gone), and
    folders that a replacing builder moved aside but did not get to delete."""
    host = socket.gethostname()
    tmp_prefix = f".{target.name}{_TMP_TAG}"
    trash_prefix = f".{target.name}{_TRASH_TAG}"
    for p in target.parent.iterdir():
        if p.name.startswith(trash_prefix):
            shutil.rmtree(p, ignore_errors=True)
            continue
        if not p.name.startswith(tmp_prefix):
            continue
        # name: .<target>.tmp-<host>-<pid>-<hex>; the host name may itself contain '-'
        parts = p.name[len(tmp_prefix) :].split("-")
        if len(parts) < 3 or "-".join(parts[:-2]) != host or not parts[-2].isdigit():
            continue
        pid = int(parts[-2])
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _build(tmp: Path, target: Path, params: dict, progress: bool) -> None:
    seed, n = params["seed"], params["clips_per_class"]
    sr, dur = params["sample_rate"], params["duration_s"]
    rows = []
    total = len(CLASSES) * n
    with tqdm(total=total, desc=f"demo corpus ({total} clips)", unit="clip", disable=not progress, leave=False) as bar:
        for c, name in enumerate(CLASSES):
            (tmp / AUDIO_DIR / name).mkdir(parents=True, exist_ok=True)
            splits = _split_of_class(seed, c, n)
            for i in range(n):
                pcm, v, _ = synth_clip(c, i, seed=seed, duration_s=dur, sample_rate=sr)
                rel = f"{AUDIO_DIR}/{name}/{name}_{i:04d}.wav"
                sf.write(str(tmp / rel), pcm, sr, subtype="PCM_16", format="WAV")
                rows.append(
                    {
                        "path": rel,
                        "labels": [name],
                        "split": splits[i],
                        "speaker": voice_name(v),
                        "duration": len(pcm) / sr,
                        "sample_rate": sr,
                    }
                )
                bar.update(1)
    manifest = Manifest.from_rows(
        rows,
        dataset="demo",
        root=target,
        label_vocab=list(CLASSES),
        notes={"generator": "ssamba.data.demo", "params": params},
    )
    manifest.write(tmp / MANIFEST_NAME)
    (tmp / DONE_NAME).write_text(json.dumps({"params": params, "n_clips": len(rows)}, indent=1) + "\n")


def _publish(tmp: Path, target: Path, params: dict, force: bool) -> None:
    """Rename the finished ``tmp`` to ``target``; never clobbers a foreign folder."""
    for _ in range(10):
        try:
            os.rename(tmp, target)  # atomic; succeeds when target is absent (or an empty folder)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
        # the target exists: a racing builder finished first, or an old / other-parameter corpus
        if not force and is_complete(target, params):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if not _looks_like_corpus(target):
            raise ConfigError(
                f"demo corpus folder {target} already holds files that are not a demo corpus "
                f"({sorted(p.name for p in target.iterdir())[:5]}). Fix: pass an empty or new --out folder."
            )
        trash = target.parent / f".{target.name}{_TRASH_TAG}{uuid.uuid4().hex}"
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            continue  # someone else moved it meanwhile: retry the rename
        shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not move the demo corpus into {target} (kept changing under concurrent builders)")


def make_demo_corpus(
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    clips_per_class: int = DEFAULT_CLIPS_PER_CLASS,
    duration_s: float = 1.0,
    sample_rate: int = 16000,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the demo corpus and return the path of its ``manifest.parquet``.

    ``out_dir`` defaults to a cache folder named by every generation parameter. A folder that
    already holds a complete corpus of these parameters is reused at once (``force=True``
    regenerates it). Generation goes to a temporary sibling folder renamed into place at the end.
    """
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"demo seed must be a non-negative integer, got {seed!r}")
    if int(clips_per_class) != clips_per_class or clips_per_class < 1:
        raise ConfigError(f"demo clips_per_class must be an integer >= 1, got {clips_per_class!r}")
    if not 0.1 <= duration_s <= 60.0:
        raise ConfigError(f"demo duration_s must be in [0.1, 60] seconds, got {duration_s!r}")
    if not 4000 <= sample_rate <= 192000:
        raise ConfigError(f"demo sample_rate must be in [4000, 192000] Hz, got {sample_rate!r}")
    params = _params(int(seed), int(clips_per_class), float(duration_s), int(sample_rate))
    target = Path(out_dir) if out_dir is not None else default_out_dir(seed, clips_per_class, duration_s, sample_rate)
    target = target.expanduser().resolve()
    if not force and is_complete(target, params):
        return target / MANIFEST_NAME
    if target.exists() and not target.is_dir():
        raise ConfigError(f"demo corpus folder {target} is a file. Fix: pass a folder path as --out.")
    if target.is_dir() and not _looks_like_corpus(target):
        raise ConfigError(
            f"demo corpus folder {target} already holds files that are not a demo corpus "
            f"({sorted(p.name for p in target.iterdir())[:5]}). Fix: pass an empty or new --out folder."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = _tmp_path(target, os.getpid())
    tmp.mkdir()
    try:
        _build(tmp, target, params, progress)
        _publish(tmp, target, params, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target / MANIFEST_NAME


# ------------------------------------------------------------------------------ CLI
def count_table(manifest_df: pd.DataFrame) -> pd.DataFrame:
    """Clips per class (rows, in vocabulary order) and split (columns), with totals."""
    df = manifest_df.assign(label=manifest_df["labels"].map(lambda labs: labs[0] if len(labs) else ""))
    table = pd.crosstab(df["label"], df["split"], margins=True, margins_name="total")
    cols = [c for c in ("train", "validation", "test") if c in table.columns]
    cols += [c for c in table.columns if c not in cols and c != "total"] + ["total"]
    rows = [c for c in CLASSES if c in table.index] + [r for r in table.index if r not in CLASSES]
    return table.loc[rows, cols]


def main(argv: Sequence[str] | None = None) -> int:
    from ssamba.data.manifest import read_manifest

    parser = argparse.ArgumentParser(
        prog="python -m ssamba.data demo",
        description="Build (or reuse) the procedural demo corpus and print its manifest path and counts.",
    )
    parser.add_argument("--out", default=None, help="corpus folder (default: a cache folder named by the parameters)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--clips-per-class",
        type=int,
        default=DEFAULT_CLIPS_PER_CLASS,
        help=f"clips of each of the {len(CLASSES)} classes (default {DEFAULT_CLIPS_PER_CLASS})",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete corpus exists")
    args = parser.parse_args(argv)
    path = make_demo_corpus(args.out, seed=args.seed, clips_per_class=args.clips_per_class, force=args.force)
    manifest = read_manifest(path)
    print(path)
    print(count_table(manifest.df).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
