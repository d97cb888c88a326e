"""A sweep's driver killed part-way and resumed; a sweep submitted as a Ray job to a `ray start` cluster.

Both start their own Ray processes on 127.0.0.1 and stop exactly those (by process id), never
with `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from _processes import MARK, kill_marked

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env(cache_env, ray_tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "SSAMBA_CACHE": str(cache_env),
            "RAY_TMPDIR": str(ray_tmp),
            "PYTHONUNBUFFERED": "1",
            MARK: str(ray_tmp),
            "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )  # `python` of a job
    env.pop("RAY_ADDRESS", None)
    return env


def _trials(uri):
    from ssamba.sweep.tracking import Tracker

    t = Tracker(uri)
    df = t.runs_frame(t.sweep_experiments())
    if df.empty:
        return t, df, df
    return t, df[df["tags.sweep.role"] == "parent"], df[df["tags.sweep.role"] == "trial"]


@pytest.fixture
def ray_tmp():
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    yield folder
    kill_marked(str(folder))
    time.sleep(1)
    kill_marked(str(folder))
    shutil.rmtree(folder, ignore_errors=True)


def test_killed_sweep_resumes_without_rerunning_or_duplicating(cache_env, tmp_path, ray_tmp):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        PY,
        str(ROOT / "sweeps" / "masking.py"),
        "--smoke-test",
        "--quiet",
        "--storage",
        str(tmp_path / "store"),
        "--mlflow-uri",
        uri,
        "--max-concurrent",
        "1",
    ]
    env = _env(cache_env, ray_tmp)
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results = tmp_path / "store" / "masking-smoke" / "trials"
    deadline = time.time() + 300
    first: Path | None = None
    while time.time() < deadline and proc.poll() is None:
        done = sorted(results.glob("*/result.json")) if results.is_dir() else []
        if done:
            _, _, trials = _trials(uri)
            if len(trials) and (trials["tags.trial.status"] == "finished").any():
                first = done[0]
                break
        time.sleep(1)
    assert first is not None, "no trial finished in time"
    driver = psutil.Process(proc.pid)
    tree = tuple(driver.children(recursive=True))  # its local Ray: gcs, raylet, agents, workers
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep
    proc.wait(timeout=30)
    kill_marked(str(ray_tmp), tree)  # and its local Ray with it
    time.sleep(1)
    kill_marked(str(ray_tmp), tree)
    t0 = time.time()
    _, parents, trials = _trials(uri)
    finished_before = trials[trials["tags.trial.status"] == "finished"]
    assert 1 <= len(finished_before) < 3
    mtime = first.stat().st_mtime_ns

    out = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"resume completed the sweep in {time.time() - t0:.1f} s")
    t, parents, trials = _trials(uri)
    assert len(parents) == 1  # the resumed sweep continues its parent run
    assert len(trials) == 3 and set(trials["tags.ablation.arm"]) == {"250", "300", "400"}
    assert (trials["tags.trial.status"] == "finished").all() and (trials["status"] == "FINISHED").all()
    assert trials["tags.trial.key"].is_unique
    assert first.stat().st_mtime_ns == mtime  # the finished trial was not rerun
    for run_id in finished_before["run_id"]:
        assert len(t.metric_history(run_id, "ft/demo/final")) == 1  # and not logged twice
    assert "## Ablation: masking" in out.stdout
    assert parents["metrics.arm/400/n"].iloc[0] == 1  # the arms' summary, once the sweep is whole

    again = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to resume" in again.stdout and "Ray not started" in again.stdout
    assert "Started a local Ray instance" not in again.stdout + again.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_ray_job_submit_to_a_ray_start_cluster(cache_env, tmp_path, ray_tmp):
    env = _env(cache_env, ray_tmp)
    env["RAY_AUTH_MODE"] = "disabled"
    ray_bin = str(Path(PY).parent / "ray")
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--num-cpus",
            "2",
            "--dashboard-agent-listen-port",
            str(agent),
            "--temp-dir",
            str(ray_tmp),
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        submit = [
            ray_bin,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "sweeps/norm.py",
            "--smoke-test",
            "--quiet",
            "--storage",
            "job_results",  # relative: inside Ray's temporary copy of the working directory (warned about)
            "--mlflow-uri",
            uri,
        ]
        for _ in range(20):  # the dashboard agent takes a few seconds to accept jobs after `ray start`
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "## Ablation: norm" in job.stdout
        assert "warning: --storage resolves to" in job.stdout and "_ray_pkg_" in job.stdout
        _, parents, trials = _trials(uri)
        assert len(parents) == 1 and parents["tags.sweep.ray"].iloc[0] == "cluster"
        assert len(trials) == 2 and (trials["tags.trial.status"] == "finished").all()
        # the job ran in Ray's copy of ROOT, without .git: its commit is the editable install's when that install
        # holds the same code (a clone installed with `pip install -e .`, then submitted), else unknown
        from ssamba.sweep.provenance import installed_source, same_code

        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        source = installed_source()
        expected = head if head and source is not None and same_code(ROOT, source) else "unknown"
        assert (parents["tags.git.commit"] == expected).all() and (trials["tags.git.commit"] == expected).all()
    finally:
        killed = kill_marked(str(ray_tmp))
        time.sleep(1)
        killed += kill_marked(str(ray_tmp))  # anything restarted while the first pass ran
        print(f"stopped {killed} Ray processes of the test cluster")


def _ray_logs_mention(folder: Path, text: str) -> list[str]:
    hits = []
    for log in folder.rglob("logs/*"):
        try:
            if log.is_file() and text in log.read_text(errors="replace"):
                hits.append(log.name)
        except OSError:
            pass
    return hits


@pytest.mark.timeout(600)
def test_sweep_talks_only_to_its_own_ray(cache_env, tmp_path, ray_tmp):
    """With an unrelated Ray up on the same machine, a local sweep never discovers it: Ray Train's clean-up
    (the state API inside its actors) is pointed at the sweep's own dashboard, not at "the latest cluster"."""
    other_tmp, own_tmp = ray_tmp / "other", ray_tmp / "own"
    other_tmp.mkdir()
    own_tmp.mkdir()
    env = _env(cache_env, ray_tmp)
    env["RAY_AUTH_MODE"] = "disabled"
    ray_bin = str(Path(PY).parent / "ray")
    gcs, dash = _free_port(), _free_port()
    start = subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host",
         "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "1", "--temp-dir", str(other_tmp),
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    other = {p.pid for p in psutil.process_iter(["cmdline"]) if str(other_tmp) in " ".join(p.info["cmdline"] or [])}
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        cmd = [PY, str(ROOT / "sweeps" / "norm.py"), "--smoke-test", "--arms", "layernorm", "--storage",
               str(tmp_path / "store"), "--mlflow-uri", uri]  # fmt: skip
        run = subprocess.run(cmd, env={**env, "RAY_TMPDIR": str(own_tmp)}, cwd=tmp_path, capture_output=True,
                             text=True, timeout=500)  # fmt: skip
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        assert "Found multiple active Ray instances" not in out
        # a quiet console: each project line once, no Ray Train report dumps, no traceback, the arm in Tune's table
        mine = [line.split(")", 1)[-1].strip() for line in out.splitlines() if "[layernorm-s0-" in line]
        steps = [m for m in mine if "] step " in m]  # progress and evaluation lines: one per stage and step
        assert steps and len(steps) == len(set(steps)), [m for m in steps if steps.count(m) > 1][:3]
        assert any("pretraining done:" in m for m in mine) and any("samples/s, ETA" in m for m in mine)
        assert "Reporting training result" not in out and "TrainingReport(" not in out
        assert "Traceback" not in out
        assert "layernorm-s0 " in out and "run_trial_" not in out
        assert _ray_logs_mention(own_tmp, "Found multiple active Ray instances") == []
        _, parents, trials = _trials(uri)
        assert parents["tags.sweep.ray"].iloc[0] == "local" and (trials["tags.trial.status"] == "finished").all()
        alive = [pid for pid in other if psutil.pid_exists(pid)]
        assert alive, "the other Ray must still be up: nothing of the sweep stopped it"
    finally:
        kill_marked(str(ray_tmp))
        time.sleep(1)
        kill_marked(str(ray_tmp))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_marks_the_sweep_interrupted_and_resume_finishes_it(cache_env, tmp_path, ray_tmp, sig):
    """Ctrl-C or SIGTERM mid-trial: the parent run and the unfinished trial runs are KILLED and say
    ``interrupted`` (nothing stays RUNNING, nothing claims success), the summary counts them apart, and
    --resume completes the sweep in the same runs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [PY, str(ROOT / "sweeps" / "masking.py"), "--smoke-test", "--quiet", "--storage", str(tmp_path / "store"),
           "--mlflow-uri", uri, "--max-concurrent", "1"]  # fmt: skip
    env = _env(cache_env, ray_tmp)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline, running = time.time() + 300, False
    opened = tmp_path / "store" / "masking-smoke" / "sweep.json"  # written once the store and parent run exist
    while time.time() < deadline and proc.poll() is None and not running:
        time.sleep(1)
        if not opened.is_file():
            continue  # (opening the store from here while the sweep creates it would race it)
        _, _, trials = _trials(uri)
        if len(trials):
            done = (trials["tags.trial.status"] == "finished").sum()
            running = done >= 1 and (trials["status"] == "RUNNING").any()
    assert running, "no trial was running after a finished one" + (proc.stdout.read()[-3000:] if proc.poll() else "")
    proc.send_signal(sig)  # to the driver only, as `kill -INT` / `kill -TERM`
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "--resume" in out
    kill_marked(str(ray_tmp))
    t, parents, trials = _trials(uri)
    assert parents["status"].iloc[0] == "KILLED" and parents["tags.sweep.status"].iloc[0] == "interrupted"
    assert not (trials["status"] == "RUNNING").any()
    stopped = trials[trials["tags.trial.status"] != "finished"]
    assert len(stopped) >= 1 and (stopped["status"] == "KILLED").all()
    assert (stopped["tags.trial.status"] == "interrupted").all()
    from ablations.table import summarize

    table = summarize(t.runs_frame(t.sweep_experiments()))[0]
    assert sum(r.counts.get("interrupted", 0) for r in table.rows) == len(stopped)

    out = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, parents, trials = _trials(uri)
    assert len(parents) == 1 and parents["status"].iloc[0] == "FINISHED"
    assert parents["tags.sweep.status"].iloc[0] == "finished"
    assert len(trials) == 3 and (trials["status"] == "FINISHED").all()
    assert (trials["tags.trial.status"] == "finished").all() and trials["tags.trial.key"].is_unique
