"""Command line of the data layer: ``python -m ssamba.data {prepare,stats,cache,demo,bench} ...``.

prepare LAYOUT ROOT --out FILE.parquet   import a published layout into a manifest
stats FILE.parquet                       compute fbank mean/std and store them in the manifest
cache FILE.parquet                       precompute the fbank cache of every clip
demo [--out DIR]                         build the procedural demo corpus
bench FILE.parquet                       clips/s: decode + fbank on the fly vs the feature cache
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from ssamba.base.errors import ConfigError, SSAMBAError
from ssamba.config import FrontendConfig, apply_overrides, parse_set_args

LAYOUTS = ("esc50", "esc10", "speech_commands", "fsdd", "ssast_json", "audioset_csv", "folders")


def _frontend(args) -> FrontendConfig:
    """``--set frontend.num_mel_bins=64`` (the ``frontend.`` prefix is optional here)."""
    overrides = {k.removeprefix("frontend."): v for k, v in parse_set_args(args.set).items()}
    return apply_overrides(FrontendConfig(), overrides)


# notes that _describe writes out in words (the others are shown as counts)
_NOTES_IN_WORDS = ("layout", "layout_description", "not_classes", "speaker_split", "speaker_pattern", "no_split_lists")


def _describe(manifest) -> str:
    from ssamba.data.importers import describe_speaker_split

    df = manifest.df
    notes = manifest.meta.get("notes") or {}
    lines = [f"{len(df)} clips, {len(manifest.label_vocab)} classes, dataset {manifest.meta.get('dataset')!r}"]
    if "layout_description" in notes:
        lines.append(f"layout: {notes['layout_description']}")
    for folder, why in (notes.get("not_classes") or {}).items():
        lines.append(f"not a class: {folder}/ ({why})")
    if "speaker_pattern" in notes:
        lines.append(f"speakers from the file names by pattern '{notes['speaker_pattern']}'")
    split_lines = describe_speaker_split(manifest)
    if split_lines:
        lines.extend(split_lines)
    else:
        if df["split"].notna().any():
            lines.append("splits: " + ", ".join(f"{k}={v}" for k, v in sorted(Counter(df["split"].dropna()).items())))
        if not df["split"].isin(("train", "validation", "test")).any() and df["fold"].isna().all():
            lines.append(
                "no train/validation/test split: the layout gives none, and fine-tuning selects on 'validation'; "
                "--speaker-split TRAIN,VAL,TEST makes one"
            )
    if df["fold"].notna().any():
        lines.append("folds: " + ", ".join(f"{int(k)}={v}" for k, v in sorted(Counter(df["fold"].dropna()).items())))
    if df["speaker"].notna().any():
        lines.append(f"speakers: {df['speaker'].nunique()}")
    for key, value in notes.items():
        if key in _NOTES_IN_WORDS:
            continue
        if isinstance(value, dict) and "count" in value:
            n = value["count"]
        elif isinstance(value, (list, dict)):
            n = len(value)
        else:
            n = value
        lines.append(f"note {key}: {n}")
    return "\n".join(lines)


def _fractions(text: str) -> tuple[float, float, float]:
    """``--speaker-split 0.8,0.1,0.1`` -> (0.8, 0.1, 0.1), or a ConfigError naming the flag."""
    try:
        fractions = tuple(float(x) for x in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or any(not 0 <= f <= 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"--speaker-split {text!r}: expected three shares of clips TRAIN,VAL,TEST between 0 and 1 that sum "
            f"to 1. Fix: e.g. --speaker-split 0.8,0.1,0.1"
        )
    return fractions


def cmd_prepare(args) -> int:
    from ssamba.data.importers import IMPORTERS, speaker_disjoint_split

    fractions = _fractions(args.speaker_split) if args.speaker_split else None
    options = {}
    if args.speaker_pattern:
        if args.layout != "folders":
            raise ConfigError(
                f"--speaker-pattern applies to the folders layout only; {args.layout} reads speakers its own way "
                f"(or has none). Fix: drop --speaker-pattern, or import with `prepare folders`."
            )
        options["speaker_pattern"] = args.speaker_pattern
    if args.layout == "speech_commands" and fractions is not None:
        options["expect_resplit"] = True  # no advice to re-split: that is what happens next
    manifest = IMPORTERS[args.layout](args.root, progress=not args.quiet, **options)
    if fractions is not None:
        manifest = speaker_disjoint_split(manifest, fractions, seed=args.seed)
    if args.stats:
        manifest = _with_stats(manifest, _frontend(args), args)
    out = manifest.write(args.out)
    print(_describe(manifest))
    print(f"wrote {out}")
    return 0


def _with_stats(manifest, fe, args):
    from ssamba.data.features import compute_stats

    part = manifest
    if args.split:
        part = manifest.split(args.split)
    mean, std, n_clips, n_frames, failed = compute_stats(part, fe, workers=args.workers, progress=not args.quiet)
    if failed:
        print(f"{len(failed)} clips could not be decoded and were left out of the statistics:", file=sys.stderr)
        for msg in list(failed.values())[:10]:
            print(f"  {msg}", file=sys.stderr)
    print(
        f"mean {mean:.7f}  std {std:.7f}  ({n_clips} clips, {n_frames} frames"
        f"{', split ' + args.split if args.split else ''}); use --set pretrain.mean=... "
        f"pretrain.std=... (or finetune.*) or let training read them from the manifest"
    )
    return manifest.with_stats(mean, std, fe.fbank_key(), n_clips, n_frames)


def cmd_stats(args) -> int:
    from ssamba.data.manifest import read_manifest

    manifest = read_manifest(args.manifest)
    manifest = _with_stats(manifest, _frontend(args), args)
    if not args.no_write:
        manifest.write(args.manifest)
        print(f"stored in {args.manifest}")
    return 0


def cmd_cache(args) -> int:
    from ssamba.data.features import FeatureCache
    from ssamba.data.manifest import read_manifest

    manifest = read_manifest(args.manifest)
    _, report = FeatureCache(_frontend(args)).build(manifest, workers=args.workers, progress=not args.quiet)
    print(f"{report.computed} computed, {report.reused} reused, {len(report.failed)} failed in {report.seconds:.1f} s")
    for msg in list(report.failed.values())[:10]:
        print(f"  {msg}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from ssamba.data import demo

    argv = []
    if args.out:
        argv += ["--out", args.out]
    argv += ["--seed", str(args.seed)]
    if args.clips_per_class:
        argv += ["--clips-per-class", str(args.clips_per_class)]
    if args.force:
        argv.append("--force")
    return demo.main(argv) or 0


def cmd_bench(args) -> int:
    from ssamba.bench.data import run_bench

    run_bench(args.manifest, limit=args.limit, workers=args.workers, frontend=_frontend(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ssamba.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, workers=True):
        sp.add_argument(
            "--set",
            action="append",
            metavar="frontend.KEY=VALUE",
            help="front-end override, e.g. --set frontend.num_mel_bins=128 (repeatable)",
        )
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        if workers:
            sp.add_argument("--workers", type=int, default=0, help="processes for fbank computation (0: in-process)")

    sp = sub.add_parser("prepare", help="import a published dataset layout into a manifest")
    sp.add_argument("layout", choices=LAYOUTS)
    sp.add_argument("root", help="dataset folder (ssast_json / audioset_csv: the JSON / CSV file)")
    sp.add_argument("--out", required=True, help="manifest file to write (.parquet)")
    sp.add_argument(
        "--speaker-split",
        metavar="TRAIN,VAL,TEST",
        help="re-split speaker-disjointly: shares of clips, e.g. 0.8,0.1,0.1; whole speakers are assigned (shuffled "
        "by --seed), so the shares come as close as the speakers' sizes allow (the sizes obtained are printed)",
    )
    sp.add_argument(
        "--speaker-pattern",
        metavar="REGEX",
        help="folders layout: the speaker in each file name, as the regex's group 'speaker' or its first group, "
        "e.g. '^[0-9]+_([a-z]+)_' for 7_george_12.wav (searched in the name, not the folders)",
    )
    sp.add_argument("--seed", type=int, default=0, help="shuffles the speakers of --speaker-split (default 0)")
    sp.add_argument("--stats", action="store_true", help="also compute fbank statistics")
    sp.add_argument("--split", help="compute statistics on this split only (e.g. train)")
    common(sp)
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("stats", help="compute fbank mean/std and store them in the manifest")
    sp.add_argument("manifest")
    sp.add_argument("--split", help="statistics of one split only (e.g. train)")
    sp.add_argument("--no-write", action="store_true", help="print only")
    common(sp)
    sp.set_defaults(func=cmd_stats)

    sp = sub.add_parser("cache", help="precompute the fbank cache of every clip")
    sp.add_argument("manifest")
    common(sp)
    sp.set_defaults(func=cmd_cache)

    sp = sub.add_parser("demo", help="build the procedural demo corpus")
    sp.add_argument("--out")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--clips-per-class", type=int)
    sp.add_argument("--force", action="store_true")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("bench", help="clips/s of decode + fbank on the fly vs the feature cache")
    sp.add_argument("manifest")
    sp.add_argument("--limit", type=int, default=400, help="clips to time (default 400)")
    common(sp)
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SSAMBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
