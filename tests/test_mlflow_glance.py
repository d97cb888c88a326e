"""MLflow read at a glance: the experiment opens on its runs and says what it is, a parent run compares its
arms without opening the children, the final hint names the right command, ``--resume`` of a finished sweep
says so without starting Ray. A real sqlite store, no Ray."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ssamba.base import names as N
from ssamba.sweep import driver
from ssamba.sweep.driver import build_parser, ui_hint
from ssamba.sweep.factors import MASKING
from ssamba.sweep.parent_run import arm_summary, log_arm_summary, open_records
from ssamba.sweep.plan import make_plan
from ssamba.sweep.tracking import Tracker


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('glance') / 'mlflow.db'}"


@pytest.fixture
def make(tmp_path, store_uri, request):
    def _plan(*extra, sweep_id="masking-smoke-1"):
        argv = ["--smoke-test", "--storage", str(tmp_path / "store"), "--experiment", request.node.name, *extra]
        args = build_parser(MASKING).parse_args(argv)
        plan = make_plan(MASKING, args, sweep_id=sweep_id, git_commit="abc123", mlflow_uri=store_uri)
        return plan, Tracker(store_uri)

    return _plan


def test_experiment_is_tagged_to_open_on_its_runs_and_described(make):
    plan, tracker = make()
    plan = open_records(plan, tracker, "local", resume=False)
    exp = tracker.client.get_experiment(plan.experiment_id)
    assert exp.tags[N.EXPERIMENT_KIND] == "custom_model_development"  # MLflow's "Machine learning" kind
    assert exp.tags[N.EXPERIMENT_MARK] == "1" and exp.tags[N.FACTOR] == "masking"
    note = exp.tags[N.NOTE]
    assert "the number of masked patches" in note and "250, 300, 400" in note and "arm/<arm>/" in note
    parent = tracker.client.get_run(plan.parent_run_id)
    assert plan.sweep_id in parent.data.tags[N.NOTE] and "`ft/demo/best_acc`" in parent.data.tags[N.NOTE]
    assert "abc123" in parent.data.tags[N.NOTE]


def test_an_existing_experiment_gets_the_tags_it_lacks_and_keeps_its_description(make):
    plan, tracker = make()
    exp_id = tracker.client.create_experiment(plan.experiment, tags={N.NOTE: "my own words"})
    plan = open_records(plan, tracker, "local", resume=False)
    assert plan.experiment_id == exp_id
    tags = tracker.client.get_experiment(exp_id).tags
    assert tags[N.NOTE] == "my own words"
    assert tags[N.EXPERIMENT_KIND] == "custom_model_development" and tags[N.EXPERIMENT_MARK] == "1"


def _trial(arm, seed, val, test, **more):
    return (arm, str(seed), {"ft/demo/best_acc": val, "ft/demo/final": test, **more})


def test_arm_summary_means_over_seeds_with_the_best_validation_sample_per_seed(make):
    plan, _ = make()
    trials = [
        _trial("250", 0, 0.5, 0.4),
        _trial("250", 1, 0.7, 0.6),
        _trial("400", 0, 0.2, 0.9),  # an Optuna sample with a worse validation score: not this seed's pick
        _trial("400", 0, 0.6, 0.3),
    ]
    s = arm_summary(trials, plan)
    assert list(s) == ["250", "400"]  # "300" has no finished trial
    assert s["250"] == {"n": 2.0, "ft/demo/best_acc": pytest.approx(0.6), "ft/demo/final": pytest.approx(0.5)}
    assert s["400"] == {"n": 1.0, "ft/demo/best_acc": 0.6, "ft/demo/final": 0.3}


def test_parent_run_carries_each_arms_summary(make):
    plan, tracker = make("--seeds", "2")
    plan = open_records(plan, tracker, "local", resume=False)
    values = {("250", 0): (0.5, 0.4), ("250", 1): (0.7, 0.6), ("300", 0): (0.1, 0.2), ("400", 0): (0.9, 0.8)}
    for (arm, seed), (val, test) in values.items():
        run_id, _ = tracker.get_or_create_run(
            plan.experiment_id,
            key_tags={N.SWEEP_ID: plan.sweep_id, N.TRIAL_KEY: f"{arm}-{seed}"},
            name=f"{arm}-s{seed}",
            tags={N.ROLE: N.TRIAL, N.ARM: arm, N.SEED: str(seed), N.TRIAL_STATUS: "finished"},
        )
        tracker.log_metrics(run_id, {"ft/demo/best_acc": val, "ft/demo/final": test}, step=6)
        tracker.finish(run_id, "FINISHED")
    failed, _ = tracker.get_or_create_run(
        plan.experiment_id,
        key_tags={N.SWEEP_ID: plan.sweep_id, N.TRIAL_KEY: "300-1"},
        name="300-s1",
        tags={N.ROLE: N.TRIAL, N.ARM: "300", N.SEED: "1", N.TRIAL_STATUS: "failed"},
    )
    tracker.log_metrics(failed, {"ft/demo/best_acc": 0.99, "ft/demo/final": 0.99}, step=6)
    tracker.finish(failed, "FAILED")  # not counted

    log_arm_summary(plan, tracker)
    log_arm_summary(plan, tracker)  # again (a resumed sweep's end): no second point at the same step
    metrics = tracker.client.get_run(plan.parent_run_id).data.metrics
    assert metrics["arm/250/ft/demo/best_acc"] == pytest.approx(0.6)
    assert metrics["arm/250/ft/demo/final"] == pytest.approx(0.5)
    assert metrics["arm/250/n"] == 2 and metrics["arm/300/n"] == 1 and metrics["arm/400/n"] == 1
    assert metrics["arm/300/ft/demo/final"] == pytest.approx(0.2)
    assert tracker.metric_history(plan.parent_run_id, "arm/250/n") == [(4, 2.0)]  # step = finished trials
    note = tracker.client.get_run(plan.parent_run_id).data.tags[N.NOTE]
    assert "| 250 | 2 | 0.6000 | 0.5000 |" in note and "| 400 | 1 | 0.9000 | 0.8000 |" in note
    # the run table's view: one row per sweep, a column per arm and metric
    df = tracker.runs_frame([plan.experiment_id])
    parent = df[df["tags.sweep.role"] == "parent"].iloc[0]
    assert parent["metrics.arm/400/ft/demo/final"] == pytest.approx(0.8)


def test_final_hint_for_sqlite_and_for_a_server(tmp_path):
    db = tmp_path / "mlflow.db"
    hint = ui_hint(f"sqlite:///{db}", "3", "ssamba-norm", "norm-smoke-1")
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in hint  # absolute: works from any folder
    assert "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning" in hint
    server = ui_hint("http://mlflow:s3cret@head:5000", "7", "ssamba-norm", "norm-smoke-1")
    assert "mlflow ui" not in server and "--backend-store-uri" not in server
    assert server.startswith("MLflow: open http://mlflow:***@head:5000/#/experiments/7/runs?workflowType=")
    assert "s3cret" not in server


def test_resume_of_a_finished_sweep_says_so_and_starts_no_ray(make, tmp_path, monkeypatch, capsys):
    plan, tracker = make(sweep_id="masking-smoke-20260101-000000-0001")
    plan = open_records(plan, tracker, "local", resume=False)
    tracker.set_tags(plan.parent_run_id, {N.SWEEP_STATUS: "finished", N.SWEEP_TRIALS: "3", N.SWEEP_FAILED: "0"})
    tracker.finish(plan.parent_run_id, "FINISHED")
    assert json.loads((plan.sweep_dir / "sweep.json").read_text())["sweep_id"] == plan.sweep_id

    def no_ray(**_):
        raise AssertionError("Ray started for a finished sweep")

    monkeypatch.setattr(driver, "start_ray", no_ray)
    argv = ["--smoke-test", "--resume", "--storage", str(tmp_path / "store"), "--mlflow-uri", tracker.uri,
            "--experiment", plan.experiment]  # fmt: skip
    logged = []
    rc = driver.run_sweep_cli(MASKING, argv, summarize=lambda uri, sweep, log: logged.append(log) or f"TABLE {sweep}")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"nothing to resume: sweep {plan.sweep_id} finished" in out and "3 trials" in out
    assert f"TABLE {plan.sweep_id}" in out and "mlflow ui --backend-store-uri" in out
    assert tracker.client.get_run(plan.parent_run_id).info.status == "FINISHED"  # left as it was
    assert logged == [False]  # the table is printed, not logged again on the finished run

    # an interrupted sweep is not finished: --resume goes on (to Ray)
    tracker.set_tags(plan.parent_run_id, {N.SWEEP_STATUS: "interrupted"})
    tracker.finish(plan.parent_run_id, "KILLED")
    assert driver.finished_before(plan, tracker) is None


def test_trial_names_say_arm_and_seed():
    names = driver.TrialNames([("250", 0), ("250", 1), ("scratch", 0)], searching=False)
    assert [names(SimpleNamespace(config={"cell": i}, trial_id="x")) for i in range(3)] == [
        "250-s0",
        "250-s1",
        "scratch-s0",
    ]
    tuned = driver.TrialNames([("250", 0)], searching=True)
    assert tuned(SimpleNamespace(config={"cell": 0, "finetune.lr": 1e-4}, trial_id="ab12_00003")) == "250-s0-ab12_00003"


def test_scrubbing_survives_the_environment_changing_in_another_thread(monkeypatch):
    """MLflow's telemetry sets and unsets a variable from its own thread; reading the environment while it did
    raised KeyError in a trial (a stray traceback and a retried trial). Here the variable is gone between its
    name and its value, every time."""
    import os
    from collections.abc import MutableMapping

    from ssamba.sweep import tracking

    class Racing(MutableMapping):
        def __init__(self, data):
            self.data = data

        def __iter__(self):
            yield "_MLFLOW_TELEMETRY_SESSION_ID"  # listed, then unset by the other thread
            yield from self.data

        def __getitem__(self, key):
            return self.data[key]

        def __len__(self):
            return len(self.data) + 1

        def __setitem__(self, key, value):
            self.data[key] = value

        def __delitem__(self, key):
            del self.data[key]

    monkeypatch.setattr(os, "environ", Racing({"SSAMBA_TEST_TOKEN": "tok-0123456789", "HOME": "/root"}))
    assert tracking.scrub("postgresql://u:pw@h/db?t=tok-0123456789") == "postgresql://u:***@h/db?t=***"
    assert tracking.environ_snapshot() == {"SSAMBA_TEST_TOKEN": "tok-0123456789", "HOME": "/root"}
