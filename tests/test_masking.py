"""Masks for masked patch modelling (docs/model.md section 4.1): cluster (official), random and frame masks."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from ssamba.model.masking import STRATEGIES, check_masks, cluster_mask, frame_mask, make_masks, random_mask

# The official pretraining geometry: 128 x 1024 fbank, 16 x 16 patches, stride 16.
F_GRID, T_GRID = 8, 64
N = F_GRID * T_GRID
M_OFFICIAL = 400
DRAWS = 2000


@contextmanager
def time_limit(seconds: int):
    """Turn a hang (a draw loop that can never finish) into a test failure."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"call did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def draw_many(fn, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([fn(rng) for _ in range(n)])


def band_rates(masks: np.ndarray, f_grid: int, t_grid: int) -> np.ndarray:
    """Fraction of (draw, patch) pairs masked in each frequency band."""
    hits = np.bincount(masks.ravel(), minlength=f_grid * t_grid)
    return hits.reshape(f_grid, t_grid).sum(axis=1) / (masks.shape[0] * t_grid)


def explaining_sizes(mask: np.ndarray, n: int, t_grid: int, sizes=(3, 4, 5, 6)) -> set[int]:
    """Cluster sizes c for which ``mask`` is a union of c x c blocks cut to the kept range.

    The cluster mask is ``U ∩ [0, max(mask)]`` where U is a union of blocks ``s + T'*i + j`` kept
    in ``(0, n)``. So every masked index lies in some block whose in-range part up to
    ``max(mask)`` is entirely masked. Returns every c for which that holds.
    """
    in_mask = np.zeros(n, dtype=bool)
    in_mask[mask] = True
    top = int(mask.max())
    starts = np.arange(n)
    found = set()
    for c in sizes:
        offsets = (t_grid * np.arange(c)[:, None] + np.arange(c)[None, :]).ravel()
        cand = starts[:, None] + offsets[None, :]
        valid = (cand > 0) & (cand < n) & (cand <= top)
        hit = np.zeros_like(valid)
        hit[valid] = in_mask[cand[valid]]
        complete = np.all(hit | ~valid, axis=1) & valid.any(axis=1)
        covered = np.zeros(n, dtype=bool)
        covered[cand[complete][valid[complete]]] = True
        if np.array_equal(covered, in_mask):
            found.add(c)
    return found


@pytest.fixture(scope="module")
def official_cluster() -> np.ndarray:
    """2000 cluster masks at the official geometry and M = 400."""
    return draw_many(lambda rng: cluster_mask(N, T_GRID, M_OFFICIAL, rng), DRAWS, seed=1234)


@pytest.fixture(scope="module")
def cluster_m250() -> np.ndarray:
    return draw_many(lambda rng: cluster_mask(N, T_GRID, 250, rng), DRAWS, seed=4321)


# ----------------------------------------------------------------------------------- counts
def assert_valid_row(row: np.ndarray, n: int, count: int) -> None:
    assert row.shape == (count,)
    assert np.issubdtype(row.dtype, np.integer)
    assert len(np.unique(row)) == count, "indices must be unique"
    assert np.all(np.diff(row) > 0), "indices must be sorted ascending"
    assert row.min() >= 0 and row.max() < n


@pytest.mark.parametrize(
    "f_grid,t_grid,count",
    [
        (8, 64, 400),
        (8, 64, 300),
        (8, 64, 250),
        (8, 64, 1),
        (8, 64, 403),
        (3, 5, 7),
        (1, 512, 300),
        (12, 101, 1000),
    ],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_counts_exact_unique_sorted(strategy, f_grid, t_grid, count):
    n = f_grid * t_grid
    masks = make_masks(strategy, 16, f_grid, t_grid, count, np.random.default_rng(count))
    assert masks.shape == (16, count)
    assert masks.dtype == torch.int64
    for row in masks.numpy():
        assert_valid_row(row, n, count)
    check_masks(masks, n)


def test_cluster_official_draws_valid(official_cluster):
    assert official_cluster.shape == (DRAWS, M_OFFICIAL)
    assert np.all(np.diff(official_cluster, axis=1) > 0)  # sorted and unique
    assert official_cluster.min() >= 1 and official_cluster.max() < N


def test_cluster_never_masks_patch_zero(official_cluster, cluster_m250):
    assert not np.any(official_cluster == 0)
    assert not np.any(cluster_m250 == 0)
    small = draw_many(lambda rng: cluster_mask(N, T_GRID, 20, rng), 3000, seed=5)
    assert not np.any(small == 0)
    # ... although patch 1 (the same first block, one step right) is masked regularly.
    assert np.mean(np.any(official_cluster == 1, axis=1)) > 0.05


# ----------------------------------------------------------------------------------- cluster structure
def test_cluster_single_block_shape():
    """A small count on a large grid is met by one block: its M smallest are the top rows of c x c."""
    t_grid, n, count = 100, 100 * 100, 8
    rng = np.random.default_rng(11)
    sizes = []
    draws = 600
    for _ in range(draws):
        row = cluster_mask(n, t_grid, count, rng)
        s = int(row[0])
        c = 1
        while c < count and row[c] == s + c:
            c += 1  # the first row of the block is a run of c consecutive indices
        block = np.sort((s + t_grid * np.arange(c)[:, None] + np.arange(c)[None, :]).ravel())
        block = block[block < n]
        if np.array_equal(row, block[:count]):
            sizes.append(c)
    # Only a block cut by the grid end (or at index 0) to <= 8 patches needs a second block.
    assert len(sizes) >= 0.95 * draws
    freq = {c: sizes.count(c) / len(sizes) for c in set(sizes)}
    print(f"single-block cluster sizes: {freq}")
    assert set(freq) == {3, 4, 5}
    for c in (3, 4, 5):
        assert 0.25 < freq[c] < 0.42, freq


def test_cluster_is_union_of_blocks_of_one_size():
    rng = np.random.default_rng(21)
    estimated = []
    for _ in range(300):
        mask = cluster_mask(N, T_GRID, 100, rng)
        sizes = explaining_sizes(mask, N, T_GRID)
        assert sizes, "a cluster mask must be a union of c x c blocks"
        # A union of c x c blocks is also one of smaller blocks; the largest fit is the true c.
        assert sizes == set(range(3, max(sizes) + 1))
        estimated.append(max(sizes))
    counts = np.bincount(estimated, minlength=7)[3:]
    print(f"cluster sizes 3/4/5/6 at M=100: {counts.tolist()}")
    assert counts[3] == 0, "cluster size is drawn from {3, 4, 5}"
    assert all(40 < k < 160 for k in counts[:3]), counts


def test_cluster_official_masks_are_block_unions(official_cluster):
    for mask in official_cluster[:40]:
        assert 3 in explaining_sizes(mask, N, T_GRID, sizes=(3,))


def test_block_check_rejects_random_masks():
    """The block-union check has teeth: uniformly random masks fail it."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        assert not explaining_sizes(random_mask(N, 100, rng), N, T_GRID)
        assert not explaining_sizes(random_mask(N, M_OFFICIAL, rng), N, T_GRID)


def test_cluster_blocks_wrap_across_row_end():
    """A block starting near a row end continues in the next row (index arithmetic, no clipping)."""
    rng = np.random.default_rng(8)
    wrapped = 0
    for _ in range(400):
        row = cluster_mask(N, T_GRID, 6, rng)  # one block, cut to its 6 smallest indices
        t_pos = row % T_GRID
        if t_pos[0] >= T_GRID - 2 and np.any(t_pos < 3):
            wrapped += 1
    assert wrapped > 0


# ----------------------------------------------------------------------------------- per-band rates
def test_cluster_band_rates_official(official_cluster, cluster_m250):
    rates = band_rates(official_cluster, F_GRID, T_GRID)
    rates250 = band_rates(cluster_m250, F_GRID, T_GRID)
    print(f"\ncluster per-band masked rate, M=400: {np.round(rates, 3).tolist()}")
    print(f"cluster per-band masked rate, M=250: {np.round(rates250, 3).tolist()}")
    # Exactly M of N patches per draw.
    assert rates.mean() == pytest.approx(M_OFFICIAL / N, abs=1e-12)
    assert rates250.mean() == pytest.approx(250 / N, abs=1e-12)
    # docs/model.md section 4.1: lowest band ~41%, middle bands ~88% at M = 400.
    assert 0.36 <= rates[0] <= 0.46
    assert rates[3] > 0.8 and rates[4] > 0.8
    assert np.all(np.abs(rates[3:7] - 0.88) < 0.04)
    assert rates[0] == rates.min()
    # Blocks grow towards higher bands; truncation to the M smallest thins the top band.
    assert np.all(np.diff(rates[:4]) > 0)
    assert rates[7] < rates[5]
    assert np.all(rates250 < rates)


# ----------------------------------------------------------------------------------- frame mask
@pytest.mark.parametrize("count", [400, 403, 8, 5, 512])
def test_frame_mask_whole_columns(count):
    rng = np.random.default_rng(count)
    full, rem = divmod(count, F_GRID)
    for _ in range(200):
        row = frame_mask(F_GRID, T_GRID, count, rng)
        assert_valid_row(row, N, count)
        band, t = np.divmod(row, T_GRID)
        per_col = np.bincount(t, minlength=T_GRID)
        assert np.sum(per_col == F_GRID) == full
        partial = np.flatnonzero((per_col > 0) & (per_col < F_GRID))
        if rem:
            assert len(partial) == 1 and per_col[partial[0]] == rem
            assert sorted(band[t == partial[0]]) == list(range(rem))  # lowest bands kept
        else:
            assert len(partial) == 0
        for col in np.flatnonzero(per_col == F_GRID):
            assert sorted(band[t == col]) == list(range(F_GRID))


def test_frame_mask_columns_uniform():
    draws = 2000
    cols = np.zeros(T_GRID)
    rng = np.random.default_rng(17)
    for _ in range(draws):
        row = frame_mask(F_GRID, T_GRID, 400, rng)
        cols[np.unique(row % T_GRID)] += 1
    p = 50 / T_GRID
    expected = draws * p
    stat = np.sum((cols - expected) ** 2 / (expected * (1 - p)))
    assert stat < T_GRID - 1 + 6 * np.sqrt(2 * (T_GRID - 1)), stat


# ----------------------------------------------------------------------------------- random mask
def test_random_mask_uniform_over_patches():
    draws, count = 2000, M_OFFICIAL
    masks = draw_many(lambda rng: random_mask(N, count, rng), draws, seed=99)
    hits = np.bincount(masks.ravel(), minlength=N)
    assert hits.sum() == draws * count
    p = count / N
    expected = draws * p
    # Each patch count is binomial(draws, p); the standardised squares sum to about chi2(N - 1).
    stat = np.sum((hits - expected) ** 2 / (expected * (1 - p)))
    df = N - 1
    print(f"random mask chi-square {stat:.1f} (df {df})")
    assert df - 6 * np.sqrt(2 * df) < stat < df + 6 * np.sqrt(2 * df)
    assert hits[0] > 0, "random masks may mask patch 0"
    rates = band_rates(masks, F_GRID, T_GRID)
    assert np.all(np.abs(rates - p) < 0.02)


def test_random_mask_all_patches():
    row = random_mask(N, N, np.random.default_rng(0))
    assert np.array_equal(row, np.arange(N))


# ----------------------------------------------------------------------------------- make_masks
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_make_masks_deterministic(strategy):
    a = make_masks(strategy, 8, F_GRID, T_GRID, 300, np.random.default_rng(7))
    b = make_masks(strategy, 8, F_GRID, T_GRID, 300, np.random.default_rng(7))
    c = make_masks(strategy, 8, F_GRID, T_GRID, 300, np.random.default_rng(8))
    assert a.shape == (8, 300) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Rows of one batch are independent draws.
    assert len({tuple(r) for r in a.tolist()}) == 8


def test_make_masks_advances_generator():
    rng = np.random.default_rng(5)
    first = make_masks("cluster", 2, F_GRID, T_GRID, 300, rng)
    second = make_masks("cluster", 2, F_GRID, T_GRID, 300, rng)
    assert not torch.equal(first, second)


# ----------------------------------------------------------------------------------- invalid input
@pytest.mark.parametrize("count", [0, -1, N - 1, N, N + 1])
def test_cluster_invalid_counts(count):
    """Patch 0 is never masked, so at most N - 2 patches can be drawn (N - 1 would loop forever)."""
    with time_limit(5), pytest.raises(ValueError, match="count"):
        cluster_mask(N, T_GRID, count, np.random.default_rng(0))
    with time_limit(5), pytest.raises(ValueError, match="count"):
        make_masks("cluster", 2, F_GRID, T_GRID, count, np.random.default_rng(0))


def test_cluster_largest_count():
    with time_limit(10):
        row = cluster_mask(N, T_GRID, N - 2, np.random.default_rng(0))
    assert_valid_row(row, N, N - 2)
    assert row[0] >= 1


@pytest.mark.parametrize("strategy", ["random", "frame"])
@pytest.mark.parametrize("count", [0, -3, N + 1])
def test_random_frame_invalid_counts(strategy, count):
    with pytest.raises(ValueError, match="count"):
        make_masks(strategy, 2, F_GRID, T_GRID, count, np.random.default_rng(0))


@pytest.mark.parametrize("strategy", ["", "Cluster", "block", "time"])
def test_unknown_strategy(strategy):
    with pytest.raises(ValueError, match="unknown masking strategy"):
        make_masks(strategy, 2, F_GRID, T_GRID, 100, np.random.default_rng(0))


# ----------------------------------------------------------------------------------- check_masks
def test_check_masks_accepts_valid():
    check_masks(make_masks("cluster", 4, F_GRID, T_GRID, 400, np.random.default_rng(0)), N)
    check_masks(torch.tensor([[0, 511, 7]], dtype=torch.int32), N)  # unsorted but unique is fine
    check_masks(torch.empty(3, 0, dtype=torch.int64), N)


@pytest.mark.parametrize(
    "masks",
    [
        torch.tensor([[0, 5, -1]]),
        torch.tensor([[0, 5, N]]),
        torch.tensor([[N + 100, 1, 2]]),
    ],
)
def test_check_masks_rejects_out_of_range(masks):
    with pytest.raises(ValueError, match="range"):
        check_masks(masks, N)


@pytest.mark.parametrize(
    "masks",
    [
        torch.tensor([[3, 3, 4]]),
        torch.tensor([[9, 1, 9]]),
        torch.tensor([[1, 2, 3], [4, 5, 4]]),
    ],
)
def test_check_masks_rejects_duplicates(masks):
    with pytest.raises(ValueError, match="unique"):
        check_masks(masks, N)


@pytest.mark.parametrize(
    "masks",
    [
        torch.tensor([1, 2, 3]),
        torch.tensor([[[1, 2, 3]]]),
        torch.tensor([[1.0, 2.0, 3.0]]),
        torch.tensor([[1, 2, 3]], dtype=torch.int16),
    ],
)
def test_check_masks_rejects_wrong_shape_or_dtype(masks):
    with pytest.raises(ValueError, match=r"\(B, M\) integer tensor"):
        check_masks(masks, N)


def test_mask_count_checked_once_against_the_grid():
    """One rule (``max_mask_count``) for the config check, the task and the mask functions."""
    import numpy as np

    from ssamba.base.errors import ConfigError
    from ssamba.config import apply_overrides, max_mask_count
    from ssamba.config.presets import preset
    from ssamba.model.masking import cluster_mask, random_mask

    assert max_mask_count("cluster", 64) == 62 and max_mask_count("random", 64) == 64
    rng = np.random.default_rng(0)
    assert len(cluster_mask(64, 8, 62, rng)) == 62 and len(random_mask(64, 64, rng)) == 64
    with pytest.raises(ValueError):
        cluster_mask(64, 8, 63, rng)
    cfg = apply_overrides(preset("demo"), {"pretrain.mask_count": 62})
    cfg.check_pretraining()  # demo: 8 x 8 patches
    bad = apply_overrides(preset("demo"), {"pretrain.mask_count": 63})  # building it is fine (fine-tuning only)
    with pytest.raises(ConfigError, match=r"mask_count 63 is too large for 64 patches .* at most 62"):
        bad.check_pretraining()
    ok = apply_overrides(preset("demo"), {"pretrain.mask_count": 64, "pretrain.mask_strategy": "random"})
    ok.check_pretraining()
