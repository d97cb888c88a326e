"""A sweep on a Ray cluster it joined talks only to that cluster, while a second, unrelated Ray runs
on the same machine (issue 14, deliverable 6).

Two ``ray start --head`` clusters on 127.0.0.1, each with its own ports and temp folder: the sweep's
("own", started first) and an unrelated one ("other", started last). The other cluster's temp folder
is Ray's default one for every process of the test (``$RAY_TMPDIR/ray``), so it is "the latest
cluster" that Ray's address discovery (``address="auto"``, the state API without an address) would
find and connect to, as in the issue. The sweep joins its cluster as the README documents it: a
``ray job submit``, or ``$RAY_ADDRESS``. Both clusters are stopped by process id, never ``ray stop``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from _processes import MARK, kill_marked

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY = str(Path(PY).parent / "ray")
DISCOVERY = "Found multiple active Ray instances"
RAY_HINT = "You can override this by setting the `--address` flag or `RAY_ADDRESS` environment variable."
JOB_SUPERVISOR = ":actor_name:JobSupervisor"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmp():
    folder = Path(tempfile.mkdtemp(prefix="ro", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
    yield folder
    kill_marked(str(folder))
    time.sleep(1)
    kill_marked(str(folder))  # anything restarted while the first pass ran
    shutil.rmtree(folder, ignore_errors=True)


def _env(cache_env, ray_tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "SSAMBA_CACHE": str(cache_env),
            "RAY_TMPDIR": str(ray_tmp),  # Ray's default temp folder: $RAY_TMPDIR/ray
            "PYTHONUNBUFFERED": "1",
            MARK: str(ray_tmp),
            "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` of a job
        }
    )
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    return env


def _start_head(temp_dir: Path, env: dict, num_cpus: int) -> dict[str, int]:
    """``ray start --head`` on 127.0.0.1 with ports of its own -> the ports."""
    ports = {name: _free_port() for name in ("gcs", "dashboard", "agent", "client")}
    temp_dir.mkdir(parents=True, exist_ok=True)
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
           "--dashboard-agent-listen-port", str(ports["agent"]), "--ray-client-server-port",
           str(ports["client"]), "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir),
           "--disable-usage-stats"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return ports


def _logs(temp_dir: Path) -> dict[str, str]:
    """Every file under the cluster's session logs -> its text (once: not through ``session_latest``)."""
    texts = {}
    sessions = [s for s in temp_dir.glob("session_*") if not s.is_symlink()]
    for path in (p for s in sessions for p in s.glob("logs/**/*")):
        try:
            if path.is_file():
                texts[str(path.relative_to(temp_dir))] = path.read_text(errors="replace")
        except OSError:
            pass
    return texts


def _ray_job_supervisor(text: str, own_gcs: str) -> str:
    """The job supervisor's log less its one discovery, checked: Ray 2.60's supervisor (an actor of the
    cluster, started before the job's own code) picks the job's ``$RAY_ADDRESS`` with
    ``canonicalize_bootstrap_address_or_die("auto", <its node's temp folder>)``, which logs "Found
    multiple active Ray instances" whenever two Rays run on the machine, then takes the cluster recorded
    in that folder: its own. The sweep cannot change that; it must have handed the job its own cluster."""
    if "Submitting job with" not in text:
        return text  # the .out file
    assert f"Submitting job with RAY_ADDRESS = {own_gcs}" in text, text[-3000:]
    line = next((x for x in text.splitlines() if DISCOVERY in x), "")
    assert line.endswith(f"Connecting to latest cluster at {own_gcs}. {RAY_HINT}"), line
    return text.replace(line, "")


def _trials(uri: str):
    from ssamba.sweep.tracking import Tracker

    t = Tracker(uri)
    df = t.runs_frame(t.sweep_experiments())
    return df[df["tags.sweep.role"] == "parent"], df[df["tags.sweep.role"] == "trial"]


class _RayProcessEnvs:
    """While open, samples the environment each ``ray::`` process of a cluster started with (its raylet's
    descendants): process kind (``TrainController``, ``PlacementGroupCleaner``, ...) -> the set of
    (``$RAY_ADDRESS``, ``$RAY_API_SERVER_ADDRESS``) seen."""

    def __init__(self, temp_dir: Path):
        self.temp_dir, self.seen, self._done = str(temp_dir), {}, threading.Event()

    def _raylet(self) -> psutil.Process:
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if cmd and cmd[0].endswith("raylet") and any(self.temp_dir in a for a in cmd):
                return p
        raise AssertionError(f"no raylet of {self.temp_dir}")

    def _sample(self, raylet: psutil.Process):
        while not self._done.wait(0.5):
            try:
                procs = raylet.children(recursive=True)
            except psutil.Error:
                return
            for p in procs:
                try:
                    title, env = " ".join(p.cmdline()), p.environ()
                except psutil.Error:
                    continue
                if title.startswith("ray::"):
                    kind = title[5:].split(".")[0].split(" ")[0]
                    self.seen.setdefault(kind, set()).add((env.get("RAY_ADDRESS"), env.get("RAY_API_SERVER_ADDRESS")))

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, args=(self._raylet(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("join", ["job-submit", "RAY_ADDRESS"])
def test_sweep_on_a_joined_cluster_talks_only_to_it(cache_env, tmp_path, ray_tmp, join):
    """The sweep finishes on its cluster; every process Ray started for it was given that cluster's GCS
    address (and no API server address of its own); no log of the sweep or of its cluster shows an
    address discovery or the other cluster's address; the other cluster is still up."""
    env = _env(cache_env, ray_tmp)
    own_tmp, other_tmp = ray_tmp / "own", ray_tmp / "ray"
    own = _start_head(own_tmp, env, num_cpus=2)
    other = _start_head(other_tmp, env, num_cpus=1)  # the latest `ray start`: what discovery would find
    assert (other_tmp / "ray_current_cluster").read_text().strip() == f"127.0.0.1:{other['gcs']}"
    other_pids = {
        p.pid for p in psutil.process_iter(["cmdline"]) if str(other_tmp) in " ".join(p.info["cmdline"] or [])
    }
    own_gcs = f"127.0.0.1:{own['gcs']}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = ["python", "sweeps/norm.py", "--smoke-test", "--arms", "layernorm", "--storage",
             str(tmp_path / "store"), "--mlflow-uri", uri]  # fmt: skip
    t0 = time.time()
    with _RayProcessEnvs(own_tmp) as envs:
        if join == "job-submit":
            submit = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{own['dashboard']}",
                      "--working-dir", str(ROOT), "--", *sweep]  # fmt: skip
            for _ in range(30):  # the dashboard agent takes a few seconds to accept jobs after `ray start`
                run = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=700)
                if "No available agent" not in run.stderr + run.stdout:
                    break
                time.sleep(2)
        else:
            sweep[0:2] = [PY, str(ROOT / "sweeps" / "norm.py")]
            run = subprocess.run(sweep, env={**env, "RAY_ADDRESS": own_gcs}, cwd=tmp_path, capture_output=True,
                                 text=True, timeout=700)  # fmt: skip
    print(f"{join}: the sweep took {time.time() - t0:.0f} s; Ray processes seen: {sorted(envs.seen)}")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "## Ablation: norm" in out

    # every process Ray started for the sweep: trial driver, Train controller and workers, clean-up actors
    assert {"ImplicitFunc", "TrainController", "RayTrainWorker", "PlacementGroupCleaner"} <= set(envs.seen)
    # not the sweep's: the node's agents (started with the raylet), a worker not yet given a task, Ray's job actor
    not_the_sweeps = ("DashboardAgent", "RuntimeEnvAgent", "IDLE", "JobSupervisor")
    unpinned = {k: v for k, v in envs.seen.items() if k not in not_the_sweeps and v != {(own_gcs, "")}}
    assert unpinned == {}, unpinned

    logs = {"sweep output": out, **_logs(own_tmp)}
    assert len(logs) > 10, sorted(logs)  # the own cluster's session logs were found
    supervisors = [name for name, text in logs.items() if JOB_SUPERVISOR in text[:200]]
    assert len(supervisors) == (2 if join == "job-submit" else 0), supervisors  # its .out and .err
    for name in supervisors:  # Ray's job supervisor, before any code of the sweep runs: see _ray_job_supervisor
        logs[name] = _ray_job_supervisor(logs[name], own_gcs)
    other_addresses = (f"127.0.0.1:{other['gcs']}", f"127.0.0.1:{other['dashboard']}")
    found = {name: [m for m in (DISCOVERY, *other_addresses) if m in text] for name, text in logs.items()}
    found = {name: hits for name, hits in found.items() if hits}
    assert found == {}, found

    parents, trials = _trials(uri)
    assert len(parents) == 1 and parents["tags.sweep.ray"].iloc[0] == "cluster"
    assert len(trials) == 1 and (trials["tags.trial.status"] == "finished").all()
    assert all(psutil.pid_exists(pid) for pid in other_pids), "the other Ray must still be up"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_handed_another_cluster_by_ray_is_refused(cache_env, tmp_path, ray_tmp):
    """Two clusters sharing one temp folder: Ray's job supervisor gives a job submitted to the first the
    address of the second (the latest there). The sweep refuses to run there, saying why, before it opens
    any run."""
    env = _env(cache_env, ray_tmp)
    shared = ray_tmp / "ray"
    first = _start_head(shared, env, num_cpus=1)
    second = _start_head(shared, env, num_cpus=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    submit = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{first['dashboard']}", "--working-dir",
              str(ROOT), "--", "python", "sweeps/norm.py", "--smoke-test", "--arms", "layernorm", "--storage",
              str(tmp_path / "store"), "--mlflow-uri", uri]  # fmt: skip
    for _ in range(30):  # the dashboard agent takes a few seconds to accept jobs after `ray start`
        run = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=500)
        if "No available agent" not in run.stderr + run.stdout:
            break
        time.sleep(2)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    assert f"was not submitted to the Ray cluster at 127.0.0.1:{second['gcs']}" in out, out[-3000:]
    assert "--temp-dir" in out
    from ssamba.sweep.tracking import Tracker

    tracker = Tracker(uri)
    assert tracker.runs_frame(tracker.sweep_experiments()).empty  # no parent run, no trial
