"""Direct runs (``python -m ssamba.pretrain`` / ``ssamba.finetune``): the thread decision, the other runs
found in /proc, progress that reaches a pipe while the run goes on, and the MLflow record of a run in the
sweep's names."""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssamba.base import names as N
from ssamba.train.threads import MAX_DEFAULT_THREADS, OtherRun, choose_threads, other_runs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the thread decision (pure)
def test_default_threads_are_the_cores_shared_with_the_other_runs():
    alone = choose_threads(None, 2)
    assert (alone.threads, alone.source, alone.warning) == (2, "default", None)
    assert choose_threads(None, 1).threads == 1
    assert choose_threads(None, 64).threads == MAX_DEFAULT_THREADS == 16
    two = choose_threads(None, 8, [OtherRun(11, "python -m ssamba.finetune --threads 4", 4)])
    assert two.threads == 4 and two.warning is None  # 4 + 4 on 8 cores: nothing to warn about
    crowded = choose_threads(None, 2, [OtherRun(11, "python -m ssamba.finetune", None)] * 3)
    assert crowded.threads == 1  # never 0


def test_explicit_threads_win_and_oversubscription_is_named():
    omp = choose_threads(None, 8, omp=3)
    assert (omp.threads, omp.source, omp.warning) == (3, "OMP_NUM_THREADS", None)
    flag = choose_threads(2, 8, omp=3)
    assert (flag.threads, flag.source) == (2, "--threads")

    over = choose_threads(4, 2)
    assert over.threads == 4  # what was asked is kept, with a warning that says what to do
    assert over.warning == (
        "4 torch threads (--threads) but this process may run on 2 cores only: threads that outnumber the "
        "cores slow every run down many times over. Fix: --threads 2 or fewer"
    )
    omp_over = choose_threads(None, 2, omp=6)
    assert omp_over.threads == 6 and "6 torch threads (OMP_NUM_THREADS)" in omp_over.warning

    # two fine-tunes side by side: the first at 2 threads, the second (default) at 1: 3 threads on 2 cores
    other = OtherRun(4242, "python -m ssamba.finetune --threads 2", 2)
    both = choose_threads(None, 2, [other])
    assert both.threads == 1
    assert "want at least 3 threads on 2 cores" in both.warning
    assert "pid 4242 (python -m ssamba.finetune --threads 2, 2 threads)" in both.warning
    assert both.warning.endswith("Fix: give each run --threads so that they add up to 2 (e.g. --threads 1)")
    assert choose_threads(1, 2, [OtherRun(4242, "python -m ssamba.finetune --threads 1", 1)]).warning is None

    many = choose_threads(None, 2, [OtherRun(p, "python -m ssamba.pretrain", 1) for p in range(1, 7)])
    assert many.warning.endswith("Fix: run at most 2 at once, with --threads 1 each") and "; 2 more" in many.warning

    unknown = choose_threads(None, 4, [OtherRun(7, "python sweeps/norm.py", None)])
    assert unknown.threads == 2
    assert "pid 7 (python sweeps/norm.py, threads unknown)" in unknown.warning
    assert "thread counts are unknown" in unknown.warning and "add up to 4" in unknown.warning


# ------------------------------------------------------------------------------ other runs on the machine
def _fake_process(proc: Path, pid: int, ppid: int, argv: list[str], comm: str = "python") -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0\n")


def test_other_runs_are_read_from_proc(tmp_path):
    proc = tmp_path / "proc"
    _fake_process(proc, 100, 1, ["/usr/bin/python3", "-m", "ssamba.finetune", "--threads", "2"])
    _fake_process(proc, 101, 100, ["/usr/bin/python3", "-m", "ssamba.finetune", "--threads", "2"])  # its loader
    _fake_process(proc, 102, 1, ["python", "sweeps/masking.py", "--smoke-test"], comm="py (x) y")
    _fake_process(proc, 103, 1, ["python", "-m", "pytest", "tests/test_x.py"])  # not a training run
    _fake_process(proc, 104, 1, ["python", "-m", "ssamba.pretrain", "--threads=3"])
    _fake_process(proc, 200, 1, ["python", "-m", "ssamba.pretrain"])  # this process
    (proc / "105").mkdir()  # a process that ended while we read
    (proc / "self").mkdir()
    found = other_runs(proc, me=200)
    assert found == [
        OtherRun(100, "python3 -m ssamba.finetune --threads 2", 2),
        OtherRun(102, "python sweeps/masking.py --smoke-test", None),
        OtherRun(104, "python -m ssamba.pretrain --threads=3", 3),
    ]
    assert other_runs(tmp_path / "no-proc") == []  # macOS, Windows: nothing found, nothing fails


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="needs /proc (Linux)")
def test_a_real_direct_run_process_is_found():
    code = "import time; time.sleep(120)"
    p = subprocess.Popen([sys.executable, "-c", code, "-m", "ssamba.finetune", "--threads", "3"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            mine = [o for o in other_runs() if o.pid == p.pid]
            if mine:
                break
            time.sleep(0.1)
        assert mine and mine[0].threads == 3 and "-m ssamba.finetune --threads 3" in mine[0].command
    finally:
        p.kill()
        p.wait(timeout=30)


# ------------------------------------------------------------------------------ the command lines
def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "MLFLOW_TRACKING_URI")}
    env.update({"PYTHONPATH": str(ROOT), "SSAMBA_CACHE": str(cache)})
    return env


def test_progress_reaches_a_pipe_while_the_run_goes_on(tmp_path, small_demo, cache_env):
    """stdout is a pipe, which Python block-buffers (8 KiB) unless told otherwise: the first progress line
    must come through on its own while the run is still training (a run of thousands of steps, stopped
    once it has), not in a full buffer's worth of output."""
    cmd = [sys.executable, "-m", "ssamba.finetune", "--preset", "smoke", "--manifest", str(small_demo)]
    cmd += ["--threads", "1", "--set", "finetune.epochs=1000", "--set", "finetune.max_steps=100000"]
    cmd += ["--out", str(tmp_path / "ft")]
    with open(tmp_path / "stderr.txt", "wb") as err:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(cache_env), stdout=subprocess.PIPE, stderr=err)
    data = b""
    try:
        fd, deadline = p.stdout.fileno(), time.monotonic() + 400
        while b"\n[ft/demo] step " not in b"\n" + data:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 1 << 16) if ready else b""
            if not chunk:  # timed out, or the run ended
                break
            data += chunk
        text = data.decode(errors="replace")
        assert "\n[ft/demo] step " in "\n" + text, f"no progress line; stdout so far: {text!r}"
        assert p.poll() is None  # still training: the line came through as it was printed
        assert len(data) < 4096, f"{len(data)} bytes at once: block-buffered"
        assert text.startswith("torch threads: 1 (--threads; ")
    finally:
        p.kill()
        p.wait(timeout=60)
        p.stdout.close()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # no MLflow without the flag


@pytest.fixture
def keep_threads():
    """In-process CLI calls set torch's thread count and $OMP_NUM_THREADS: put both back."""
    import torch

    n, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(n)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


def test_direct_finetune_is_recorded_in_the_sweep_layout(tmp_path, small_demo, cache_env, keep_threads, capsys):
    import torch

    from ssamba.config import to_flat
    from ssamba.config.presets import preset
    from ssamba.finetune import main
    from ssamba.sweep.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = tmp_path / "ft"
    argv = ["--preset", "smoke", "--manifest", str(small_demo), "--set", "finetune.max_steps=2"]
    argv += ["--out", str(out), "--threads", "1", "--mlflow-uri", uri, "--experiment", "direct-test"]
    assert main(argv) == 0
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    printed = capsys.readouterr().out
    assert f"python -m ssamba.sweep.tracking ui --backend-store-uri {uri}" in printed

    tr = Tracker(uri)
    exp = tr.client.get_experiment_by_name("direct-test")
    runs = tr.runs_frame([exp.experiment_id])  # what ablations.summarize reads
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["run_name"] == "ft"
    assert run[N.column("tags", N.ROLE)] == N.DIRECT and run[N.column("tags", N.TRIAL_STATUS)] == "finished"
    assert run[N.column("tags", N.SEED)] == "0" and run[N.column("tags", N.GIT_COMMIT)]
    assert run[N.column("tags", N.DIRECT_OUT)] == str(out.resolve())

    # params: every dotted config key, with the values the stage ran with (those its checkpoint stores)
    stored = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["config"]
    expected = to_flat(preset("smoke"))
    assert {f"params.{k}" for k in expected} <= set(runs.columns)
    assert run["params.finetune.lr"] == str(expected["finetune.lr"]) == str(stored["finetune.lr"])
    assert run["params.finetune.mean"] == str(stored["finetune.mean"]) != str(expected["finetune.mean"])
    assert run["params.files.ft.demo.sha256"] == hashlib.sha256(Path(small_demo).read_bytes()).hexdigest()
    assert run["params.files.ft.demo.path"] == str(Path(small_demo).resolve())

    # metrics: the sweep's names, the headline number, the per-evaluation values at their step, cost
    final = run[N.column("metrics", N.ft_final("demo"))]
    assert final == run["metrics.ft/demo/test_acc"] and 0.0 <= final <= 1.0
    assert "metrics.ft/demo/best_acc" in runs.columns
    assert [s for s, _ in tr.metric_history(run["run_id"], "ft/demo/acc")] == [2]
    assert run[N.column("metrics", N.COST_WALL)] > 0 and run["metrics.cost/ft_demo_wall_s"] > 0
    assert run[N.column("metrics", N.COST_DEVICE_HOURS)] > 0
    arts = {a.path for a in tr.client.list_artifacts(run["run_id"])}
    assert "config.json" in arts

    # a rerun into the same folder resumes there and continues the same run, logging nothing twice
    assert main(argv) == 0
    again = tr.runs_frame([exp.experiment_id])
    assert list(again["run_id"]) == [run["run_id"]] and again.iloc[0]["status"] == "FINISHED"
    assert [s for s, _ in tr.metric_history(run["run_id"], "ft/demo/acc")] == [2]
    assert [s for s, _ in tr.metric_history(run["run_id"], N.ft_final("demo"))] == [2]

    # a run that fails on its inputs is FAILED with the error, its config as given in the params
    bad = tmp_path / "missing.parquet"
    failed_argv = ["--preset", "smoke", "--manifest", str(bad), "--out", str(tmp_path / "bad")]
    assert main([*failed_argv, "--threads", "1", "--mlflow-uri", uri, "--experiment", "direct-test"]) == 2
    assert str(bad) in capsys.readouterr().err
    runs = tr.runs_frame([exp.experiment_id])
    failed = runs[runs["run_name"] == "bad"].iloc[0]
    assert failed["status"] == "FAILED" and failed[N.column("tags", N.TRIAL_STATUS)] == "failed"
    assert str(bad) in failed[N.column("tags", N.TRIAL_ERROR)]
    assert failed["params.finetune.manifest"] == str(bad)


def test_direct_pretraining_then_fine_tuning_from_it(tmp_path, small_demo, cache_env, keep_threads):
    """Pretraining metrics at every evaluation step under ``pretrain/``; the fine-tuning from its checkpoint
    records that checkpoint as ``files.init.*``; both in one experiment, apart by their names and prefixes."""
    from ssamba.finetune import main as finetune
    from ssamba.pretrain import main as pretrain
    from ssamba.sweep.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    common = ["--preset", "smoke", "--threads", "1", "--mlflow-uri", uri]
    assert pretrain([*common, "--manifest", str(small_demo), "--out", str(tmp_path / "pre")]) == 0
    best = tmp_path / "pre" / "best.pt"
    ft_argv = ["--manifest", str(small_demo), "--set", "finetune.max_steps=1", "--init", str(best)]
    assert finetune([*common, *ft_argv, "--out", str(tmp_path / "ft")]) == 0

    tr = Tracker(uri)
    exp = tr.client.get_experiment_by_name(N.DIRECT_EXPERIMENT)
    runs = tr.runs_frame([exp.experiment_id]).set_index("run_name")
    pre, ft = runs.loc["pre"], runs.loc["ft"]
    assert [s for s, _ in tr.metric_history(pre["run_id"], "pretrain/loss")] == [3, 6]  # plateau_every=3, 6 steps
    assert pre["metrics.cost/pretrain_wall_s"] > 0 and pre[N.column("metrics", N.COST_SAMPLES)] > 0
    assert pre["params.files.pretrain.path"] == str(Path(small_demo).resolve())
    pre_metrics = tr.client.get_run(pre["run_id"]).data.metrics
    assert pre_metrics and all(k.startswith((f"{N.PRETRAIN}/", N.COST_PREFIX)) for k in pre_metrics), pre_metrics
    assert ft["params.files.init.sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert ft["params.files.init.path"] == str(best.resolve())
    assert ft[N.column("metrics", N.ft_final("demo"))] == ft["metrics.ft/demo/test_acc"]
    assert (pre["status"], ft["status"]) == ("FINISHED", "FINISHED")
