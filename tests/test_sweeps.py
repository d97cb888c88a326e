"""The four sweep scripts end to end (smoke preset) through a real local Ray and a real MLflow store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray(cache_env):
    """A local Ray on 127.0.0.1 for this module, shut down afterwards (never `ray stop`)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    nodes = ray.nodes()
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    yield ray
    ray.shutdown()


def _store(uri):
    from ssamba.sweep.tracking import Tracker

    t = Tracker(uri)
    return t, t.runs_frame(t.sweep_experiments())


@pytest.mark.parametrize("factor_name,n_arms", [("MASKING", 3), ("DIRECTION", 2), ("NORM", 2), ("MASKING_STRATEGY", 3)])
def test_smoke_sweep_end_to_end(local_ray, tmp_path, factor_name, n_arms, capsys):
    from ablations.run import main
    from ssamba.sweep import factors

    factor = getattr(factors, factor_name)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(factor.name, ["--smoke-test", "--quiet", "--storage", str(tmp_path / "store"), "--mlflow-uri", uri])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"## Ablation: {factor.name}" in out  # the table is printed
    _, runs = _store(uri)
    parents = runs[runs["tags.sweep.role"] == "parent"]
    trials = runs[runs["tags.sweep.role"] == "trial"]
    assert len(parents) == 1 and parents["status"].iloc[0] == "FINISHED"
    sweep_id = parents["tags.sweep.id"].iloc[0]
    assert json.loads(parents["tags.sweep.arms"].iloc[0]) == list(factor.arms)
    assert len(trials) == n_arms  # smoke: one seed
    assert set(trials["tags.ablation.arm"]) == set(factor.arms)
    assert (trials["tags.sweep.id"] == sweep_id).all()
    assert (trials["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]).all()
    assert (trials["status"] == "FINISHED").all() and (trials["tags.trial.status"] == "finished").all()
    for col in (
        "tags.ablation.factor",
        "tags.seed",
        "tags.git.commit",
        "params.model.norm",
        "params.pretrain.mask_count",
        "params.finetune.lr",
        "params.seed",
        "metrics.ft/demo/final",
        "metrics.pretrain/acc",
        "metrics.cost/device_hours",
        "metrics.cost/wall_s",
        "metrics.cost/samples_per_s",
    ):
        assert col in trials.columns and trials[col].notna().all(), col
    assert (trials["tags.ablation.factor"] == factor.name).all()
    # each arm's defining config value is what the arm says
    for _, r in trials.iterrows():
        for key, value in factor.arms[r["tags.ablation.arm"]].items():
            if key == "pretrain.mask_count":
                continue  # scaled to the smoke grid
            assert r[f"params.{key}"] == str(value), (key, r[f"params.{key}"])
    if factor.name == "masking":  # 250/300/400 of 512 scaled to 64 patches
        counts = dict(zip(trials["tags.ablation.arm"], trials["params.pretrain.mask_count"].astype(int)))
        assert counts == {"250": 31, "300": 38, "400": 50}
    # read at a glance: the experiment opens on its runs and says what it is; the parent compares the arms
    t, _ = _store(uri)
    exp = t.client.get_experiment(parents["experiment_id"].iloc[0])
    assert (
        exp.tags["mlflow.experimentKind"] == "custom_model_development"
        and factor.name in exp.tags["mlflow.note.content"]
    )
    parent = parents.iloc[0]
    for arm, final in zip(trials["tags.ablation.arm"], trials["metrics.ft/demo/final"]):
        assert parent[f"metrics.arm/{arm}/n"] == 1 and parent[f"metrics.arm/{arm}/ft/demo/final"] == final
        assert f"| {arm} | 1 |" in parent["tags.mlflow.note.content"]
    # pretraining points at the console's cadence (the first step, then the evaluations of this 6-step
    # smoke run), with the warm-up lr the first step used (smoke: lr 1e-3, 2 warm-up steps)
    run_id = trials["run_id"].iloc[0]
    assert [s for s, _ in t.metric_history(run_id, "pretrain/train_loss")] == [1, 3, 6]
    assert t.metric_history(run_id, "pretrain/lr") == [(1, 0.0005), (3, 0.001), (6, 0.001)]
    assert f"mlflow ui --backend-store-uri {uri}" in out and "/runs?workflowType=machine_learning" in out


@pytest.mark.timeout(600)
def test_logged_params_are_what_ran(local_ray, tmp_path, small_demo):
    """A manifest whose statistics differ from every preset: the trial's params carry the statistics the
    stages used (the same values the checkpoints store) and each stage's data file with its hash."""
    from ablations.run import main
    from ssamba.config import FrontendConfig
    from ssamba.data.manifest import read_manifest
    from ssamba.model.checkpoints import read_checkpoint
    from ssamba.sweep.records import file_facts

    path = tmp_path / "odd.parquet"
    m = read_manifest(small_demo)
    m.with_stats(-1.2345, 2.5, FrontendConfig().fbank_key(), len(m), 1).write(path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tmp_path / "store"
    rc = main("norm", ["--smoke-test", "--quiet", "--arms", "layernorm", "--storage", str(store), "--mlflow-uri", uri,
                       "--set", f"data.manifest={path}", "--tasks", f"demo={path}"])  # fmt: skip
    assert rc == 0
    _, runs = _store(uri)
    trial = runs[runs["tags.sweep.role"] == "trial"].iloc[0]
    assert float(trial["params.pretrain.mean"]) == -1.2345 and float(trial["params.pretrain.std"]) == 2.5
    assert float(trial["params.tasks.demo.mean"]) == -1.2345  # the task's own value, logged under its name
    facts = file_facts(path)
    for stage in ("pretrain", "ft.demo"):
        assert trial[f"params.files.{stage}.path"] == facts["path"]
        assert trial[f"params.files.{stage}.sha256"] == facts["sha256"]
    (pre,) = store.glob("norm-smoke/pretrain/*/best.pt")
    assert read_checkpoint(pre)["config"]["pretrain.mean"] == -1.2345  # the checkpoint says the same
    (ft,) = store.glob("norm-smoke/trials/*/ft-demo/best.pt")
    assert read_checkpoint(ft)["config"]["finetune.mean"] == -1.2345


@pytest.mark.timeout(600)
def test_scratch_arm_end_to_end(local_ray, tmp_path, capsys):
    """--scratch: the no-pretraining arm runs the same fine-tuning with the same seed, logs no pretraining,
    and the printed table has its paired difference."""
    from ablations.run import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main("norm", ["--smoke-test", "--quiet", "--arms", "layernorm", "--scratch", "--storage",
                       str(tmp_path / "store"), "--mlflow-uri", uri])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    _, runs = _store(uri)
    parent = runs[runs["tags.sweep.role"] == "parent"].iloc[0]
    assert parent["tags.sweep.scratch_arm"] == "scratch"
    trials = runs[runs["tags.sweep.role"] == "trial"].set_index("tags.ablation.arm")
    assert set(trials.index) == {"layernorm", "scratch"} and (trials["tags.trial.status"] == "finished").all()
    assert trials.loc["scratch", "tags.pretrain.key"] == "none"
    assert (
        pd_isna(trials.loc["scratch"].get("metrics.pretrain/acc"))
        and trials.loc["layernorm", "metrics.pretrain/acc"] >= 0
    )
    assert trials.loc["scratch", "metrics.ft/demo/final"] >= 0
    assert "Δ demo vs scratch" in out


def pd_isna(v) -> bool:
    import math

    return v is None or (isinstance(v, float) and math.isnan(v))


def test_two_sweeps_share_a_pretraining_store(local_ray, tmp_path, capsys):
    """--pretrain-store: the norm sweep's layernorm arm and the direction sweep's bidirectional arm are one
    pretraining config; the second sweep reuses what the first computed (tagged in MLflow, no cost twice) and a
    sweep's own store (no flag) is used otherwise."""
    from ablations.run import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tmp_path / "pretrain"
    common = ["--smoke-test", "--quiet", "--storage", str(tmp_path / "store"), "--mlflow-uri", uri]
    assert main("norm", [*common, "--arms", "layernorm", "--pretrain-store", str(store)]) == 0
    assert main("direction", [*common, "--arms", "bidirectional", "--pretrain-store", str(store)]) == 0
    capsys.readouterr()
    _, runs = _store(uri)
    trials = runs[runs["tags.sweep.role"] == "trial"].set_index("tags.ablation.arm")
    assert (trials["tags.trial.status"] == "finished").all()
    key = trials.loc["layernorm", "tags.pretrain.key"]
    assert trials.loc["bidirectional", "tags.pretrain.key"] == key and (store / key / "DONE").is_file()
    assert trials.loc["layernorm", "tags.pretrain.reused"] == "false"
    assert trials.loc["bidirectional", "tags.pretrain.reused"] == "true"
    assert trials.loc["bidirectional", "metrics.pretrain/acc"] == trials.loc["layernorm", "metrics.pretrain/acc"]
    assert not list((tmp_path / "store").glob("*/pretrain/*/DONE"))  # nothing in the sweeps' own stores
