"""The statistics of an ablation table: mean ± sample std over seeds, and the paired difference of two rows
over their shared seeds with a Student-t interval (:mod:`ablations.table` states the conventions). Pure."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    """Mean ± sample std of one column over the seeds of one row (``std`` is None when n < 2)."""

    mean: float | None
    std: float | None
    n: int
    seeds: tuple[str, ...] = ()
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class Diff:
    """Row minus its reference row over paired seeds, with a t-interval (None when n_pairs < 2)."""

    mean: float | None
    low: float | None
    high: float | None
    n_pairs: int
    vs: str  # the reference row's label
    note: str = ""  # "reference" | "no paired seeds" | "1 pair, no CI" | "no reference row" | "ambiguous ..."


def t_quantile(q: float, df: int) -> float:
    """Student-t quantile: scipy.stats.t when installed, else a table (df <= 30) or Cornish-Fisher."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    try:
        from scipy.stats import t
    except ImportError:
        return _t_quantile_fallback(q, df)
    return float(t.ppf(q, df))


_T975 = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
)


def _t_quantile_fallback(q: float, df: int) -> float:
    if abs(q - 0.975) < 1e-12 and df <= len(_T975):
        return _T975[df - 1]
    z = statistics.NormalDist().inv_cdf(q)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def describe(values: dict[str, float]) -> Stat:
    """Seed -> value  ->  mean, sample std (None below two seeds) and n."""
    seeds = tuple(sorted(values, key=natural_key))
    vals = tuple(float(values[s]) for s in seeds)
    if not vals:
        return Stat(None, None, 0)
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return Stat(statistics.fmean(vals), std, len(vals), seeds, vals)


def paired_difference(row: dict[str, float], ref: dict[str, float], vs: str, confidence: float = 0.95) -> Diff:
    """Mean of per-seed differences ``row[s] - ref[s]`` over shared seeds, with a t-interval (n-1 dof)."""
    seeds = sorted(set(row) & set(ref), key=natural_key)
    d = [row[s] - ref[s] for s in seeds]
    if not d:
        return Diff(None, None, None, 0, vs, "no paired seeds")
    mean = statistics.fmean(d)
    if len(d) == 1:
        return Diff(mean, None, None, 1, vs, "1 pair, no CI")
    half = t_quantile(0.5 + confidence / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Diff(mean, mean - half, mean + half, len(d), vs)


def natural_key(s: str) -> tuple:
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)
