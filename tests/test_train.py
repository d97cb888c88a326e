"""The training loop through the two jobs: repeatable, resumable, fails loudly, skips bad clips."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from ssamba.base.errors import AudioError, ConfigError
from ssamba.config import apply_overrides
from ssamba.config.presets import preset
from ssamba.data.manifest import read_manifest
from ssamba.model.checkpoints import load_checkpoint, read_checkpoint
from ssamba.train.jobs import run_finetune, run_pretrain
from ssamba.train.loop import NonFiniteLossError


def _cfg(manifest, **over):
    base = {"data.manifest": str(manifest), "finetune.manifest": str(manifest), "model.drop_path": "0.0"}
    base.update(over)
    return apply_overrides(preset("smoke"), base)


def _quiet(*_):
    pass


def test_pretrain_is_repeatable_on_cpu(small_demo, tmp_path):
    cfg = _cfg(small_demo, **{"model.drop_path": "0.1"})
    a = run_pretrain(cfg, tmp_path / "a", log=_quiet)
    b = run_pretrain(cfg, tmp_path / "b", log=_quiet)
    assert a.steps == b.steps == 6
    assert a.last_eval == b.last_eval
    wa = read_checkpoint(a.best_path)["state_dict"]
    wb = read_checkpoint(b.best_path)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for key in ("pretrain/acc", "pretrain/nce", "pretrain/mse", "pretrain/loss", "pretrain/train_loss"):
        assert key in a.last_eval and a.last_eval[key] == a.last_eval[key]


def test_resume_continues_where_it_stopped(small_demo, tmp_path):
    straight = run_pretrain(
        _cfg(small_demo, **{"pretrain.max_steps": "8", "pretrain.plateau_every": "2"}),
        tmp_path / "straight",
        log=_quiet,
    )
    lines = []
    run_pretrain(
        _cfg(small_demo, **{"pretrain.max_steps": "4", "pretrain.plateau_every": "2"}), tmp_path / "resumed", log=_quiet
    )
    resumed = run_pretrain(
        _cfg(small_demo, **{"pretrain.max_steps": "8", "pretrain.plateau_every": "2"}),
        tmp_path / "resumed",
        log=lines.append,
    )
    assert any("resumed from" in line and "step 4" in line for line in lines)
    assert resumed.steps == 8
    assert resumed.last_eval["pretrain/acc"] == pytest.approx(straight.last_eval["pretrain/acc"])
    assert resumed.last_eval["pretrain/loss"] == pytest.approx(straight.last_eval["pretrain/loss"], rel=1e-5)


def test_finetune_from_pretraining_at_another_stride(small_demo, tmp_path):
    pre = run_pretrain(_cfg(small_demo), tmp_path / "pre", log=_quiet)
    cfg = _cfg(small_demo, **{"finetune.fstride": "10", "finetune.tstride": "10", "finetune.target_length": "100"})
    lines = []
    ft = run_finetune(cfg, tmp_path / "ft", init=pre.best_path, log=lines.append)
    assert any("grid (8, 8) -> (12, 9)" in line for line in lines)
    for key in ("ft/demo/acc", "ft/demo/map", "ft/demo/test_acc", "ft/demo/best_acc"):
        assert key in ft.last_eval
    model, payload = load_checkpoint(ft.best_path)
    assert model.grid == (12, 9) and payload["label_vocab"] == read_manifest(small_demo).label_vocab
    # the pretrained patch conv carried over unchanged (weights equal before training? compare with lr 0)
    frozen = run_finetune(
        replace(cfg, finetune=replace(cfg.finetune, lr=0.0)), tmp_path / "ft0", init=pre.best_path, log=_quiet
    )
    w_pre = read_checkpoint(pre.best_path)["state_dict"]["v.patch_embed.proj.weight"]
    w_ft = read_checkpoint(frozen.best_path)["state_dict"]["v.patch_embed.proj.weight"]
    assert torch.equal(w_pre, w_ft)


def test_non_finite_loss_names_step_and_batch(small_demo, tmp_path):
    cfg = _cfg(small_demo, **{"pretrain.lr": "1e30", "pretrain.warmup_steps": "0", "pretrain.max_steps": "50"})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step \d+ \(epoch \d+, batch \d+"):
        run_pretrain(cfg, tmp_path / "nan", log=_quiet)


def _with_broken_clip(small_demo, tmp_path):
    m = read_manifest(small_demo)
    root = tmp_path / "copy"
    shutil.copytree(m.root, root)
    victim = root / m.df["path"][m.df["split"] == "train"].iloc[0]
    victim.write_bytes(b"RIFF....WAVEjunk")
    m.meta["root"] = str(root)
    out = tmp_path / "broken.parquet"
    m.write(out)
    return out, victim


def test_broken_clip_is_skipped_and_counted(small_demo, tmp_path):
    path, victim = _with_broken_clip(small_demo, tmp_path)
    cfg = _cfg(path, **{"data.cache_dir": str(tmp_path / "fc"), "pretrain.max_steps": "12"})
    lines = []
    res = run_pretrain(cfg, tmp_path / "run", log=lines.append)
    assert res.last_eval["pretrain/skipped_clips"] == 1
    assert str(victim.resolve()) in res.skipped.skipped
    assert any("1 bad clips skipped" in line for line in lines)


def test_strict_mode_stops_at_the_broken_clip(small_demo, tmp_path):
    path, victim = _with_broken_clip(small_demo, tmp_path)
    cfg = _cfg(path, **{"data.strict": "true", "data.use_cache": "false", "pretrain.max_steps": "12"})
    with pytest.raises(AudioError, match=victim.name):
        run_pretrain(cfg, tmp_path / "run", log=_quiet)


def test_mask_count_too_large_for_the_grid(small_demo, tmp_path):
    with pytest.raises(ConfigError, match="mask_count 63 is too large"):
        run_pretrain(_cfg(small_demo, **{"pretrain.mask_count": "63"}), tmp_path / "x", log=_quiet)


def test_gradient_accumulation_matches_the_larger_batch(small_demo, tmp_path):
    """Two micro-batches of 4 accumulate to the same step as one batch of 8 (same clips, same order)."""
    common = {
        "finetune.max_steps": "1",
        "finetune.lr": "1e-3",
        "finetune.noise": "false",
        "finetune.freqm": "0",
        "finetune.timem": "0",
        "finetune.mixup": "0.0",
    }
    a = run_finetune(_cfg(small_demo, **common, **{"finetune.batch_size": "8"}), tmp_path / "a", log=_quiet)
    b = run_finetune(
        _cfg(small_demo, **common, **{"finetune.batch_size": "4", "finetune.grad_accum": "2"}),
        tmp_path / "b",
        log=_quiet,
    )
    c = run_finetune(_cfg(small_demo, **common, **{"finetune.batch_size": "4"}), tmp_path / "c", log=_quiet)
    wa, wb, wc = (read_checkpoint(r.best_path)["state_dict"] for r in (a, b, c))
    diff_ab = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    diff_ac = max(float((wa[k] - wc[k]).abs().max()) for k in wa)
    assert a.steps == b.steps == 1 and a.samples == b.samples == 8
    assert diff_ab < 1e-5 < diff_ac  # accumulation reproduces batch 8; one micro-batch alone does not


def test_loader_workers_auto_resolves_by_device():
    from ssamba.base.errors import ConfigError
    from ssamba.config import GPU_LOADER_WORKERS, DataConfig
    from ssamba.config.presets import preset
    from ssamba.train.jobs import resolve_runtime

    assert DataConfig().num_workers == -1
    assert DataConfig().resolved_num_workers("cpu") == 0
    assert DataConfig().resolved_num_workers("cuda") == GPU_LOADER_WORKERS > 0
    assert DataConfig(num_workers=3).resolved_num_workers("cuda") == 3  # a set value is kept
    with pytest.raises(ConfigError, match="data.num_workers must be >= 0, or -1 for auto"):
        DataConfig(num_workers=-2)
    lines = []
    cfg = resolve_runtime(preset("smoke"), torch.device("cpu"), log=lines.append)
    assert cfg.data.num_workers == 0 and lines == ["data.num_workers auto -> 0 loader processes (cpu)"]


def test_checkpoint_config_holds_the_statistics_used(small_demo, tmp_path):
    """The stored config is the config that ran: the stage's mean/std are the manifest's (or computed) ones
    when data.stats_from_manifest is on, the configured ones when it is off."""
    from ssamba.config import AUDIOSET_MEAN
    from ssamba.train.data import resolve_stats

    m = read_manifest(small_demo)
    cfg = _cfg(small_demo, **{"pretrain.max_steps": "2"})
    want_mean, want_std, _ = resolve_stats(
        m.split("train"), cfg.frontend, cfg.pretrain.clip_input(), True, None, log=_quiet
    )
    assert want_mean != pytest.approx(AUDIOSET_MEAN)  # the demo corpus is not AudioSet
    stored = read_checkpoint(run_pretrain(cfg, tmp_path / "pre", log=_quiet).best_path)
    assert stored["config"]["pretrain.mean"] == pytest.approx(want_mean)
    assert stored["config"]["pretrain.std"] == pytest.approx(want_std)
    assert stored["frontend"]["mean"] == stored["config"]["pretrain.mean"]
    assert stored["frontend"]["target_length"] == cfg.pretrain.target_length
    off = _cfg(small_demo, **{"pretrain.max_steps": "2", "data.stats_from_manifest": "false", "pretrain.mean": "-3.5"})
    stored = read_checkpoint(run_pretrain(off, tmp_path / "off", log=_quiet).best_path)
    assert stored["config"]["pretrain.mean"] == -3.5


def test_stage_settings_are_declared_once_and_name_their_stage():
    from ssamba.base.errors import ConfigError
    from ssamba.config import ExperimentConfig, to_flat
    from ssamba.sweep.worker import injected_nan_step

    keys = set(to_flat(ExperimentConfig()))
    assert not {
        k for k in keys if k.startswith(("augment.", "frontend.target_length", "frontend.mean", "frontend.std"))
    }
    assert not {k for k in keys if "fault" in k}  # test hooks are not settings
    for key, value, match in (
        ("pretrain.std", "0", "pretrain.std must be > 0"),
        ("finetune.mixup", "2", "finetune.mixup is a probability"),
        ("pretrain.target_length", "8", "pretrain.target_length must be >= 16"),
    ):
        with pytest.raises(ConfigError, match=match):
            apply_overrides(preset("smoke"), {key: value})
    clip = apply_overrides(preset("paper-tiny"), {"finetune.freqm": "7"}).finetune.clip_input()
    assert (clip.target_length, clip.freqm, clip.for_evaluation().freqm) == (512, 7, 0)
    assert injected_nan_step("nan", {"SSAMBA_TEST_NAN_AT_STEP": "nan:2"}) == 2
    assert injected_nan_step("ok", {"SSAMBA_TEST_NAN_AT_STEP": "nan:2"}) == 0
    assert injected_nan_step("nan", {}) == 0


def test_settled_statistics_are_used_as_they_are(small_demo, tmp_path):
    """A sweep settles each stage's statistics before Ray (ssamba.sweep.records) and logs them: the stage then
    runs with exactly those, reading or computing none again."""
    cfg = _cfg(small_demo, **{"pretrain.max_steps": "1", "pretrain.mean": "-1.5", "pretrain.std": "2.5"})
    seen = {}
    for settled in (False, True):
        run_pretrain(
            cfg,
            tmp_path / str(settled),
            log=_quiet,
            stats_settled=settled,
            on_start=lambda flat, s=settled: seen.setdefault(s, (flat["pretrain.mean"], flat["pretrain.std"])),
        )
    assert seen[True] == (-1.5, 2.5)
    assert seen[False] != (-1.5, 2.5)  # unsettled: the manifest's (or computed) statistics win
