"""The sweep plan (ssamba.sweep.plan): the command line -> a frozen plan of resolved trial specs, without Ray."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from ssamba.base.errors import ConfigError
from ssamba.config import GPU_LOADER_WORKERS, to_flat
from ssamba.sweep.driver import build_parser
from ssamba.sweep.factors import DIRECTION, MASKING, NORM
from ssamba.sweep.plan import Resources, make_plan


def plan_of(factor, *argv, **kw):
    args = build_parser(factor).parse_args(list(argv))
    return make_plan(factor, args, sweep_id="test-sweep", mlflow_uri="sqlite:////tmp/none.db", **kw)


def test_grid_plan_resolves_every_cell(tmp_path):
    plan = plan_of(NORM, "--smoke-test", "--seeds", "0,3", "--storage", str(tmp_path), "--set", "finetune.lr=0.004")
    assert plan.preset == "smoke" and plan.seeds == (0, 3) and list(plan.tasks) == ["demo"]
    assert [(c.arm, c.seed) for c in plan.cells] == [("layernorm", 0), ("layernorm", 3), ("rmsnorm", 0), ("rmsnorm", 3)]
    assert plan.n_trials == 4 and not plan.searching
    for c in plan.cells:
        assert c.config.model.norm == c.arm and c.config.seed == c.seed
        assert c.config.finetune.lr == 0.004  # --set reaches every trial
        assert c.tasks[0].config.finetune.task == "demo"
        assert c.result_file == plan.sweep_dir / "trials" / c.key / "result.json"
        assert c.params()["model.norm"] == c.arm  # the params are the resolved config
    assert plan.sweep_dir == (tmp_path / "norm-smoke").resolve()
    assert len({c.key for c in plan.cells}) == 4
    # same pretraining config and seed -> same key, whatever the arm of another factor would say
    assert len({c.pretrain_key for c in plan.cells}) == 4


def test_plan_is_frozen_and_travels_through_pickle(tmp_path):
    plan = plan_of(DIRECTION, "--smoke-test", "--storage", str(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.preset = "demo"
    again = pickle.loads(pickle.dumps(plan))  # Ray ships it to every trial
    assert again.cells == plan.cells and again.trial({"cell": 1}) == plan.cells[1]


def test_arms_are_scaled_to_the_preset(tmp_path):
    plan = plan_of(MASKING, "--smoke-test", "--storage", str(tmp_path))
    assert {c.arm: c.config.pretrain.mask_count for c in plan.cells} == {"250": 31, "300": 38, "400": 50}


def test_tuned_values_are_resolved_per_trial(tmp_path):
    plan = plan_of(
        NORM,
        "--smoke-test",
        "--storage",
        str(tmp_path),
        "--tune",
        "finetune.lr=loguniform:1e-4:1e-2",
        "--tune-samples",
        "3",
    )
    assert plan.searching and plan.n_trials == 2 * 3 and plan.metric == "ft/demo/best_acc"  # validation, never test
    t = plan.trial({"cell": 1, "finetune.lr": 0.003})
    assert t.arm == "rmsnorm" and t.tuned == {"finetune.lr": 0.003}
    assert t.config.finetune.lr == 0.003 and t.tasks[0].config.finetune.lr == 0.003
    assert t.key != plan.cells[1].key  # another trial of the same cell
    assert t.key == plan.trial({"cell": 1, "finetune.lr": 0.003}).key  # ... and stable (resume finds its run)
    with pytest.raises(ConfigError, match="not tuned keys"):
        plan.trial({"cell": 0, "finetune.epochs": 3})


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--arms", "layernorm,groupnorm"], "unknown arms"),
        (["--set", "model.nrom=rmsnorm"], "model.nrom"),
        (["--tune", "finetune.lr=gauss:1:2"], "distribution must be one of"),
        (["--tune", "finetune.lr=loguniform:0:1"], "0 < LOW <= HIGH"),
        (["--tune", "finetune.lrr=uniform:0:1"], "finetune.lrr"),
        (["--tasks", "fsdd"], "needs a manifest"),
        (["--tasks", "fsdd=/no/such.parquet"], "does not exist"),
        (["--seeds", "0"], "must be positive"),
        (["--seeds", "x"], "expected a count"),
        (["--tune-samples", "0", "--tune", "finetune.lr=uniform:0:1"], "--tune-samples"),
        (["--workers-per-trial", "0"], "--workers-per-trial"),
    ],
)
def test_bad_options_fail_before_anything_starts(tmp_path, argv, match):
    with pytest.raises(ConfigError, match=match):
        plan_of(NORM, "--smoke-test", "--storage", str(tmp_path), *argv)


def test_paper_preset_needs_tasks_and_applies_recipes(tmp_path, small_demo):
    with pytest.raises(ConfigError, match="fine-tunes on real data"):
        plan_of(NORM, "--preset", "paper-tiny", "--storage", str(tmp_path))
    plan = plan_of(NORM, "--preset", "paper-tiny", "--storage", str(tmp_path), "--tasks", f"esc50={small_demo}")
    assert plan.seeds == (0, 1, 2)
    task = plan.cells[0].tasks[0]
    assert task.config.finetune.target_length == 512 and task.config.finetune.manifest == str(small_demo)
    # the task's own values are params of the trial, under tasks.<name>.
    assert plan.cells[0].params()["tasks.esc50.manifest"] == str(small_demo)
    assert "tasks.esc50.target_length" not in plan.cells[0].params()  # same as the trial's own value


def test_gpu_trials_log_the_resolved_loader_workers(tmp_path):
    """A GPU trial's params carry the loader processes it runs with, not the -1 of 'auto'."""
    gpu = plan_of(NORM, "--smoke-test", "--storage", str(tmp_path), "--gpus-per-trial", "0.5")
    cpu = plan_of(NORM, "--smoke-test", "--storage", str(tmp_path))
    assert to_flat(gpu.cells[0].config)["data.num_workers"] == GPU_LOADER_WORKERS
    assert cpu.cells[0].config.data.num_workers == 0
    assert gpu.cells[0].resources.use_gpu and gpu.cells[0].resources.device_share == 0.5


def test_resources_fit_the_cluster():
    cpu = Resources(workers=1).fit(total_cpus=16, total_gpus=0, largest_node_cpus=16)
    assert cpu.concurrent == 16 and cpu.cpus_per_worker == 0.99  # (16 - 0.16) / 16, down to 0.01
    two = Resources(workers=2, concurrent=2).fit(total_cpus=8, total_gpus=0, largest_node_cpus=4)
    assert two.cpus_per_worker == 1.99  # (8 - 0.02) / 4
    small_nodes = Resources(workers=1).fit(total_cpus=2, total_gpus=0, largest_node_cpus=1)
    assert small_nodes.concurrent == 2 and small_nodes.cpus_per_worker == 0.98  # fits beside both drivers
    gpu = Resources(workers=1, gpus=0.25).fit(total_cpus=16, total_gpus=1, largest_node_cpus=16)
    assert gpu.concurrent == 4 and gpu.per_worker() == {"CPU": 3.99, "GPU": 0.25}
    given = Resources(workers=1, cpus_per_worker=2.0).fit(total_cpus=16, total_gpus=0, largest_node_cpus=16)
    assert given.cpus_per_worker == 2.0
    with pytest.raises(ConfigError, match="has 1 GPUs"):
        Resources(gpus=2).fit(total_cpus=16, total_gpus=1, largest_node_cpus=16)


def test_set_paths_are_resolved_and_checked_before_ray(tmp_path, small_demo, monkeypatch):
    """Workers run elsewhere: a relative --set path is made absolute here, and a missing file fails here."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(small_demo, tmp_path / "m.parquet")
    plan = plan_of(
        NORM, "--smoke-test", "--storage", "st", "--set", "data.manifest=m.parquet", "--set", "data.cache_dir=fc"
    )
    assert plan.cells[0].config.data.manifest == str(tmp_path / "m.parquet")
    assert plan.cells[0].config.data.cache_dir == str(tmp_path / "fc")
    with pytest.raises(ConfigError, match=r"data.manifest=nope.parquet: .*nope.parquet does not exist"):
        plan_of(NORM, "--smoke-test", "--storage", "st", "--set", "data.manifest=nope.parquet")


def test_a_task_without_a_validation_split_is_refused_before_ray(tmp_path, small_demo):
    """Selection is made on validation: a task whose manifest has none (and no folds) stops the sweep here."""
    from ssamba.data.manifest import read_manifest
    from ssamba.sweep.records import settle_data

    m = read_manifest(small_demo)
    no_valid = m.subset((m.df["split"] != "validation").to_numpy())
    path = tmp_path / "novalid.parquet"
    no_valid.write(path)
    plan = plan_of(NORM, "--smoke-test", "--storage", str(tmp_path), "--tasks", f"demo={path}")
    with pytest.raises(ConfigError, match=r"task demo: manifest .*novalid.parquet has no 'validation' split"):
        settle_data(plan, log=lambda _: None)
    ok = settle_data(plan_of(NORM, "--smoke-test", "--storage", str(tmp_path), "--tasks", f"demo={small_demo}"),
                     log=lambda _: None)  # fmt: skip
    assert ok.cells[0].files["ft.demo"]["path"] == str(small_demo.resolve())


def test_scratch_arm_fine_tunes_without_pretraining(tmp_path, small_demo):
    """The from-scratch arm: same fine-tuning and seeds, no pretraining; on by default for the paper presets."""
    paper = plan_of(NORM, "--preset", "paper-tiny", "--storage", str(tmp_path), "--tasks", f"esc50={small_demo}")
    assert list(paper.arms) == ["layernorm", "rmsnorm", "scratch"] and paper.scratch
    scratch = [c for c in paper.cells if c.arm == "scratch"]
    assert len(scratch) == 3 and not any(c.pretrained for c in scratch)  # paired seeds 0, 1, 2
    assert {c.seed for c in scratch} == set(paper.seeds)
    assert all(c.pretrained for c in paper.cells if c.arm != "scratch")
    assert scratch[0].tasks[0].config.finetune == paper.cells[0].tasks[0].config.finetune  # same fine-tuning
    assert "scratch" not in plan_of(NORM, "--preset", "paper-tiny", "--no-scratch", "--storage", str(tmp_path),
                                    "--tasks", f"esc50={small_demo}").arms  # fmt: skip
    assert not plan_of(NORM, "--smoke-test", "--storage", str(tmp_path)).scratch  # off for smoke and demo
    smoke = plan_of(NORM, "--smoke-test", "--scratch", "--storage", str(tmp_path))
    assert [c.arm for c in smoke.cells] == ["layernorm", "rmsnorm", "scratch"]


# ------------------------------------------------------------------------------------------------------
# your own data: a pretraining manifest for the sweep, recipes under any preset
# ------------------------------------------------------------------------------------------------------


def test_pretrain_manifest_flag_is_resolved_checked_and_logged(tmp_path, small_demo, monkeypatch, capsys):
    """--pretrain-manifest PATH: the scripts' flag for `--set data.manifest=...`, made absolute and checked here."""
    import shutil

    from ablations.run import main, sweep_argv
    from ssamba.sweep.records import settle_data

    monkeypatch.chdir(tmp_path)
    shutil.copy(small_demo, tmp_path / "mine.parquet")
    small = ["--tasks", f"demo={small_demo}"]  # (the whole demo corpus would take its statistics' time)
    argv = sweep_argv(NORM, ["--smoke-test", "--storage", "st", "--pretrain-manifest", "mine.parquet", *small])
    assert "--pretrain-manifest" not in argv and argv[-2:] == ["--set", f"data.manifest={tmp_path / 'mine.parquet'}"]
    plan = settle_data(plan_of(NORM, *argv), log=lambda _: None)
    for cell in plan.cells:
        assert cell.config.data.manifest == str(tmp_path / "mine.parquet")
        assert cell.params()["data.manifest"] == str(tmp_path / "mine.parquet")  # logged as a data param
        assert cell.files["pretrain"]["path"] == str(tmp_path / "mine.parquet")
    # the same file through --set as well is fine; another one is refused
    same = sweep_argv(NORM, ["--pretrain-manifest=mine.parquet", "--set", "data.manifest=./mine.parquet"])
    assert plan_of(NORM, "--smoke-test", *same).cells[0].config.data.manifest == str(tmp_path / "mine.parquet")
    shutil.copy(small_demo, tmp_path / "other.parquet")
    with pytest.raises(ConfigError, match="--pretrain-manifest mine.parquet and --set data.manifest=other.parquet"):
        sweep_argv(NORM, ["--pretrain-manifest", "mine.parquet", "--set", "data.manifest=other.parquet"])
    # a missing file stops the script before anything starts (no Ray, no MLflow store)
    assert main("norm", ["--smoke-test", "--storage", "st", "--pretrain-manifest", "nope.parquet"]) == 2
    err = capsys.readouterr().err
    assert f"error: --pretrain-manifest nope.parquet: {tmp_path / 'nope.parquet'} does not exist" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "st").exists()
    with pytest.raises(SystemExit):
        sweep_argv(NORM, ["--help"])
    assert "--pretrain-manifest PATH" in capsys.readouterr().out


def test_a_pretraining_manifest_without_its_train_split_is_refused_before_ray(tmp_path, small_demo):
    from ssamba.data.manifest import read_manifest
    from ssamba.sweep.records import settle_data

    m = read_manifest(small_demo)
    m.df["split"] = None  # e.g. `prepare folders` without --speaker-split
    path = tmp_path / "nosplit.parquet"
    m.write(path)
    small = ["--tasks", f"demo={small_demo}"]
    plan = plan_of(NORM, "--smoke-test", "--storage", str(tmp_path), "--set", f"data.manifest={path}", *small)
    with pytest.raises(ConfigError, match=r"pretraining: manifest .*nosplit.parquet has no 'train' split") as err:
        settle_data(plan, log=lambda _: None)
    assert "--set data.train_split=" in str(err.value)
    every = plan_of(NORM, "--smoke-test", "--storage", str(tmp_path), "--set", f"data.manifest={path}",
                    "--set", "data.train_split=", *small)  # fmt: skip
    assert settle_data(every, log=lambda _: None).cells[0].files["pretrain"]["path"] == str(path)


def test_recipes_apply_by_task_name_under_the_demo_preset(tmp_path, small_demo, capsys):
    """Under demo a recipe's task settings apply and the preset keeps its budget; the plan says so."""
    from ssamba.config.presets import TASK_RECIPES, preset

    plan = plan_of(NORM, "--storage", str(tmp_path), "--tasks", f"speechcommands={small_demo}", f"mine={small_demo}")
    demo = preset("demo").finetune
    sc, mine = (t.config.finetune for t in plan.cells[0].tasks)
    recipe = TASK_RECIPES["speechcommands"]
    for key in ("loss", "mixup", "freqm", "timem", "noise", "target_length", "metric"):
        assert getattr(sc, key) == recipe[f"finetune.{key}"], key  # the task's settings: the recipe's
    assert (sc.loss, sc.mixup, sc.freqm) == ("bce", 0.6, 48) and (demo.loss, demo.mixup, demo.freqm) == ("ce", 0.0, 0)
    for key in ("epochs", "batch_size", "lr", "fstride", "tstride", "lr_decay_start"):
        assert getattr(sc, key) == getattr(demo, key), key  # the budget: the preset's
    assert sc.batch_size == 32 != recipe["finetune.batch_size"]
    assert mine == dataclasses.replace(demo, task="mine", manifest=str(small_demo.resolve()))  # no recipe
    out = capsys.readouterr().out
    assert plan.notices[0] in out and plan.notices[1] in out
    assert plan.notices[0].startswith("task speechcommands: recipe 'speechcommands' under preset demo")
    assert "loss=bce" in plan.notices[0] and "batch_size=32 [recipe 128]" in plan.notices[0]
    assert "head_lr" not in plan.notices[0]  # equal in both: not worth a word
    assert plan.notices[1].startswith("task mine: no recipe is named 'mine'")
    assert plan_of(NORM, "--storage", str(tmp_path)).notices == ()  # the built-in demo task needs no word


def test_set_arms_and_tuned_values_win_over_a_recipe(tmp_path, small_demo):
    from ssamba.sweep.factors import Factor

    lr = Factor("lr", {"slow": {"finetune.lr": 1e-5}, "fast": {"finetune.lr": 1e-3}}, reference="slow")
    plan = plan_of(lr, "--preset", "paper-tiny", "--no-scratch", "--seeds", "1", "--storage", str(tmp_path),
                   "--tasks", f"esc50={small_demo}", "--set", "finetune.epochs=2",
                   "--tune", "finetune.head_lr=uniform:2:4")  # fmt: skip
    assert "--set wins for epochs=2" in plan.notices[0]
    slow, fast = (c.tasks[0].config.finetune for c in plan.cells)
    assert (slow.lr, fast.lr) == (1e-5, 1e-3)  # the arm, not the recipe's 1e-4
    assert slow.epochs == fast.epochs == 2 and slow.target_length == 512  # --set, and the rest of the recipe
    tuned = plan.trial({"cell": 1, "finetune.head_lr": 3.5}).tasks[0].config.finetune
    assert tuned.head_lr == 3.5 and tuned.lr == 1e-3  # Optuna's value reaches the task


def test_each_sweep_has_its_own_tune_experiment_and_an_old_one_is_kept(tmp_path):
    """Tune stages a driver's files under ``<session>/artifacts/<second>/<experiment name>``: two sweeps on one
    Ray started in the same second must not share a name, or one ``--resume`` restores the other's trials."""
    from ssamba.sweep.driver import tune_folder

    a = make_plan(
        NORM,
        build_parser(NORM).parse_args(["--smoke-test", "--storage", str(tmp_path)]),
        sweep_id="s-a",
        mlflow_uri="sqlite:////tmp/none.db",
    )
    b = make_plan(
        DIRECTION,
        build_parser(DIRECTION).parse_args(["--smoke-test", "--storage", str(tmp_path)]),
        sweep_id="s-b",
        mlflow_uri="sqlite:////tmp/none.db",
    )
    assert tune_folder(a) == a.sweep_dir / "tune-s-a" and tune_folder(b) == b.sweep_dir / "tune-s-b"
    assert tune_folder(a).name != tune_folder(b).name  # the staging folder is named by this
    (a.sweep_dir / "tune").mkdir(parents=True)  # a sweep begun before the name carried its id
    assert tune_folder(a) == a.sweep_dir / "tune"


def test_recipe_notice_never_prints_an_empty_budget():
    from ssamba.config import to_flat
    from ssamba.config.presets import get_preset
    from ssamba.sweep.plan import recipe_notice

    p = get_preset("demo")
    epochs = to_flat(p.config)["finetune.epochs"]
    same = recipe_notice("esc10", p, {"finetune.lr": 0.1}, {"finetune.epochs": epochs}, {})
    assert "()" not in same and "budget is the preset's" in same
    other = recipe_notice("esc10", p, {"finetune.lr": 0.1}, {"finetune.epochs": epochs + 7}, {})
    assert f"keeps its budget (epochs={epochs} [recipe {epochs + 7}])" in other
