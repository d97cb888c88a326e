"""A quiet, useful console and the metrics behind it: the loop's progress points (training loss, the lr the
optimiser used, samples/s, ETA) at the console's cadence, logged to MLflow once per step each; worker lines
written once under Ray Train's print patch; Train's per-report dumps silenced. No Ray cluster started."""

from __future__ import annotations

import builtins
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ssamba.config import ModelConfig
from ssamba.sweep.tracking import Tracker
from ssamba.sweep.worker import RunLog, StageReporter, console_log, quiet_train_reports
from ssamba.train.loop import LoopSettings, duration, fit
from ssamba.train.schedules import Schedule


class _Clips(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(3, generator=g)
        return {"fbank": x, "y": x.sum(), "index": torch.tensor(i)}


class _Model(torch.nn.Module):
    """A linear model with what a checkpoint records of an AudioModel."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.cfg, self.geom, self.num_classes = ModelConfig(), SimpleNamespace(input_fdim=1, input_tdim=1), 0

    def forward(self, x):
        return self.lin(x).squeeze(-1)


class _Task:
    prefix, metric = "toy", "acc"

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def schedule(self, optimizer):
        return Schedule(optimizer, warmup_steps=4)  # lr 0.025, 0.05, 0.075, then 0.1

    def loss(self, model, batch, step, micro):
        loss = ((model(batch["fbank"]) - batch["y"]) ** 2).mean()
        return loss, {"loss": loss.detach()}

    def evaluate(self, model, loader, device, autocast):
        return {"loss": 1.0, "acc": 0.5}


def _fit(tmp_path, report, lines, max_steps=12):
    loader = DataLoader(_Clips(), batch_size=8)  # 8 steps per epoch
    settings = LoopSettings(epochs=5, max_steps=max_steps, eval_every=10, log_every=5)
    return fit(_Model(), _Task(), loader, loader, settings, device=torch.device("cpu"), out_dir=tmp_path / "out",
               report=report, log=lines.append)  # fmt: skip


class _Recorder:
    def __init__(self):
        self.points, self.evals = [], []

    def __call__(self, metrics, _ckpt):
        self.evals.append(dict(metrics))

    def progress(self, metrics, step):
        self.points.append((step, dict(metrics)))


def test_progress_points_at_the_console_cadence_with_the_lr_used(tmp_path):
    rec, lines = _Recorder(), []
    res = _fit(tmp_path, rec, lines)
    assert res.steps == 12
    assert [s for s, _ in rec.points] == [1, 5, 10]  # the first step, then every log_every
    lrs = [p["toy/lr"] for _, p in rec.points]
    assert lrs == pytest.approx([0.025, 0.1, 0.1])  # what the optimiser used for that step (warm-up included)
    assert all(p["toy/train_loss"] > 0 and p["toy/samples_per_s"] > 0 for _, p in rec.points)
    # an evaluation at a point's step repeats that point; the final one covers the steps since
    assert [e["toy/step"] for e in rec.evals] == [10, 12]
    assert all("toy/samples_per_s" not in e for e in rec.evals)  # a measurement: evaluations stay repeatable
    assert rec.evals[0]["toy/train_loss"] == rec.points[2][1]["toy/train_loss"]
    assert rec.evals[1]["toy/train_loss"] != rec.evals[0]["toy/train_loss"]
    progress = [line for line in lines if "samples/s, ETA" in line]
    assert len(progress) == 3 and progress[0].startswith("[toy] step 1/12 loss ")
    assert "lr 2.50e-02" in progress[0] and "lr 1.00e-01" in progress[1]


def test_a_stage_logs_each_metric_once_per_step_in_mlflow(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracker.experiment("progress")
    run_id, _ = tracker.get_or_create_run(exp, key_tags={"k": "1"}, name="t")
    reported = []
    _fit(tmp_path, StageReporter(RunLog(tracker, run_id), "toy", "acc", reported.append), [])
    assert [s for s, _ in tracker.metric_history(run_id, "toy/train_loss")] == [1, 5, 10, 12]
    assert [s for s, _ in tracker.metric_history(run_id, "toy/lr")] == [1, 5, 10, 12]
    assert [v for _, v in tracker.metric_history(run_id, "toy/lr")] == pytest.approx([0.025, 0.1, 0.1, 0.1])
    assert [s for s, _ in tracker.metric_history(run_id, "toy/acc")] == [10, 12]
    # to Ray (Tune's table): the same leading columns for every stage
    assert [list(r)[:5] for r in reported] == [["stage", "step", "loss", "score", "samples_per_s"]] * 2
    assert reported[-1]["stage"] == "toy" and reported[-1]["score"] == 0.5 and reported[-1]["step"] == 12

    # a restarted stage (a new reporter, the run already holding these steps) logs nothing twice
    again = StageReporter(RunLog(tracker, run_id), "toy", "acc", None)
    again.progress({"toy/train_loss": 9.0, "toy/lr": 0.1}, 10)
    again({"toy/step": 12, "toy/acc": 0.9}, None)
    again.progress({"toy/train_loss": 1.0, "toy/lr": 0.1}, 15)
    assert [s for s, _ in tracker.metric_history(run_id, "toy/train_loss")] == [1, 5, 10, 12, 15]
    assert [v for _, v in tracker.metric_history(run_id, "toy/acc")] == [0.5, 0.5]


def test_worker_lines_are_written_once_under_ray_trains_print_patch(capsys, monkeypatch):
    """Ray Train replaces ``print`` in its workers with one that writes the line (the stream is not the
    process's own) and logs it through the root logger, whose console handler writes it again."""
    from ray.train.v2._internal.logging.patch_print import redirected_print

    root, handler = logging.getLogger(), logging.StreamHandler(sys.stdout)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # as Ray Train configures a worker's root logger
    monkeypatch.setattr(builtins, "print", redirected_print)
    try:
        print("[250-s0] through print")
        console_log("[250-s0] ")("through console_log")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    out = capsys.readouterr().out
    assert out.count("through print") == 2  # the problem
    assert out.count("through console_log") == 1


def test_ray_trains_report_dumps_are_silenced():
    from ray.train.v2._internal.execution import context

    logger = logging.getLogger(context.__file__)
    assert "Reporting training result" in open(context.__file__).read()  # the line this silences
    previous = logger.level
    try:
        quiet_train_reports()
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(previous)


def test_durations_read_as_time():
    assert [duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]


def test_every_trials_progress_line_reaches_the_console():
    """Ray folds worker lines that match once their words with digits are dropped into one "[repeated Nx
    across cluster]" line: two trials' progress lines at the same step would show as one. Lines with a
    trial's prefix are exempt (the sweep sets Ray's allow pattern before Ray is imported)."""
    from ray._private.ray_logging import LogDeduplicator

    from ssamba.sweep.driver import TRIAL_LINES

    lines = {
        1: "[250-s0-c070ac] [pretrain] step 20/120 loss 6.9656 lr 1.00e-03 (47.8 samples/s, ETA 1m07s)",
        2: "[300-s0-13e7ac] [pretrain] step 20/120 loss 7.1212 lr 1.00e-03 (45.1 samples/s, ETA 1m10s)",
    }

    def shown(allow):
        dedup = LogDeduplicator(60, allow, None, _timesource=lambda: 0.0)
        out = []
        for pid, line in lines.items():
            for batch in dedup.deduplicate({"ip": "127.0.0.1", "pid": pid, "lines": [line]}):
                out += batch["lines"]
        return out

    assert shown(None) == [lines[1]]  # Ray's default: the second trial's line is folded away
    assert shown(TRIAL_LINES) == [lines[1], lines[2]]


def test_the_sigterm_that_stops_a_finished_trial_prints_no_traceback():
    """Ray's SIGTERM handler raises SystemExit; landing in a weakref callback, Python printed "Exception ignored
    in ..." and its traceback on the console. Other exceptions there are still printed."""
    import subprocess
    import textwrap

    code = textwrap.dedent(
        """
        import sys, weakref
        from ssamba.sweep.worker import quiet_actor_exit
        if sys.argv[1] == "quiet":
            quiet_actor_exit()
        class Obj:
            pass
        def stopped(_):
            raise SystemExit(1)  # what Ray's sigterm_handler raises
        def broken(_):
            raise ValueError("a real bug")
        a, b = Obj(), Obj()
        refs = [weakref.ref(a, stopped), weakref.ref(b, broken)]
        del a, b
        print("alive")
        """
    )
    runs = {
        m: subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True) for m in ("quiet", "raw")
    }
    assert runs["raw"].stdout == runs["quiet"].stdout == "alive\n"
    assert "SystemExit" in runs["raw"].stderr and "ValueError" in runs["raw"].stderr  # the problem
    assert "SystemExit" not in runs["quiet"].stderr and "ValueError: a real bug" in runs["quiet"].stderr
