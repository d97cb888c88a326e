"""Reliability of the infrastructure (issue 7, items 3, 5, 8): node loss, concurrent logging, safe defaults.

- two Ray nodes (``ray start`` head + worker, separate processes, 1 CPU each) in a network namespace
  whose only interface is loopback; a smoke sweep spreads its trials over both; the worker node is
  killed (raylet and children, by pid) while it trains a trial; the lost trial is retried on the head
  and the sweep completes with every arm finished in MLflow;
- eight concurrent writers (Ray tasks, one MLflow run each, ``ssamba.sweep.tracking.Tracker``) log per-step
  metrics to the default sqlite store and to an ``mlflow server`` on PostgreSQL (started here on
  127.0.0.1): every point is counted back, none lost, no errors;
- safe defaults: a checkpoint holding a pickled object is refused; every ``torch.load`` of the code is
  ``weights_only=True``; the MLflow UI command and the sweep's Ray bind 127.0.0.1; no secret of the
  environment reaches an MLflow param or tag.

Every server here listens on loopback only and is stopped by process id (never ``ray stop``).
Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from _processes import MARK, kill_processes, marked_processes

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
NODE_MARK = "SSAMBA_TEST_NODE"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


# ----------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(ray_tmp: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "RAY_TMPDIR": str(ray_tmp),
            MARK: str(ray_tmp),
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **extra,
        }
    )
    env.pop("RAY_ADDRESS", None)
    return env


def _listening(procs) -> list[tuple[int, str, str, int]]:
    """``(pid, name, ip, port)`` of every TCP socket the processes listen on."""
    import psutil

    out = []
    for p in procs:
        try:
            name = "ray-dashboard" if "dashboard/dashboard.py" in " ".join(p.cmdline()) else p.name()
            for c in p.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.pid, name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def _stop_tree(proc: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True``: its own process group, by id."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited with {proc.returncode}: {log.read_text()[-3000:] if log and log.exists() else ''}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _runs(uri: str):
    from ssamba.sweep.tracking import Tracker

    t = Tracker(uri)
    df = t.runs_frame(t.sweep_experiments())
    return t, df[df["tags.sweep.role"] == "parent"], df[df["tags.sweep.role"] == "trial"]


@pytest.fixture
def ray_tmp():
    folder = Path(tempfile.mkdtemp(prefix="ri", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    yield folder
    for _ in range(2):  # a second pass for anything restarted while the first ran
        kill_processes(marked_processes(str(folder)).values())
        time.sleep(1)
    shutil.rmtree(folder, ignore_errors=True)


# ============================================================================= item 3: two nodes, one lost
_LO_UP = """
import fcntl, signal, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # SIOCSIFFLAGS: IFF_UP
print("up", flush=True)
signal.pause()
"""


@pytest.fixture
def loopback_netns():
    """A network namespace whose only interface is ``lo``, held by a sleeping process; yields a
    ``preexec_fn`` that moves a child process into it. A multi-node Ray cannot be kept on 127.0.0.1 by
    flags (it replaces 127.0.0.1 by the machine's address, and its single-machine mode refuses a second
    node); in this namespace loopback is the only network there is."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("a loopback-only network namespace needs root and util-linux `unshare` (CI runs as root)")
    holder = subprocess.Popen([unshare, "--net", "--", PY, "-c", _LO_UP], stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout.readline().strip() != "up":
            pytest.skip(f"could not make a network namespace (unshare exited {holder.wait(timeout=10)})")
        libc = ctypes.CDLL(None, use_errno=True)
        ns_path = f"/proc/{holder.pid}/ns/net"

        def join():  # runs in the child between fork and exec
            fd = os.open(ns_path, os.O_RDONLY)
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
            os.close(fd)

        interfaces = [
            line.split(":")[0].strip() for line in Path(f"/proc/{holder.pid}/net/dev").read_text().splitlines()[2:]
        ]
        assert interfaces == ["lo"], interfaces
        yield join
    finally:
        holder.kill()
        holder.wait(timeout=10)


def _ray_workers(procs, node_b: bool) -> list:
    """Ray Train worker processes among ``procs`` on node b (``node_b``) or on the head."""
    import psutil

    out = []
    for p in procs:
        try:
            if (
                p.cmdline()[:1]
                and p.cmdline()[0].startswith("ray::RayTrainWorker")
                and (p.environ().get(NODE_MARK) == "b") == node_b
            ):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


@pytest.mark.reliability
@pytest.mark.timeout(600)
def test_two_nodes_one_lost_the_sweep_completes(cache_env, tmp_path, ray_tmp, loopback_netns):
    join = loopback_netns
    # single-machine mode forbids a second node; the namespace keeps everything on loopback instead
    env = _env(
        ray_tmp,
        RAY_AUTH_MODE="disabled",
        SSAMBA_CACHE=str(cache_env),
        # a dead node noticed within ~3 s (the GCS health-checks each raylet; Ray's defaults wait longer)
        RAY_health_check_initial_delay_ms="1000",
        RAY_health_check_period_ms="1000",
        RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
    )
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    ray_bin = str(Path(PY).parent / "ray")
    gcs = _free_port()
    t0 = time.time()
    # no --temp-dir: Ray then uses $RAY_TMPDIR/ray, where its state API (used by Ray Train's clean-up
    # actors) finds this cluster's address even with other Ray clusters on the machine
    head = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--num-cpus",
            "1",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(_free_port()),
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--ray-client-server-port",
            str(_free_port()),
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=join,
    )
    assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
    worker = subprocess.run(
        [
            ray_bin,
            "start",
            "--address",
            f"127.0.0.1:{gcs}",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "1",
            "--resources",
            '{"node_b": 1}',
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--disable-usage-stats",
        ],
        env={**env, NODE_MARK: "b"},
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=join,
    )
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    cluster_s = time.time() - t0
    raylets = [p for p in marked_processes(str(ray_tmp)).values() if p.name() == "raylet"]
    assert len(raylets) == 2 and all("--node_ip_address=127.0.0.1" in p.cmdline() for p in raylets)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        sweep = subprocess.Popen(
            [
                PY,
                str(ROOT / "sweeps" / "masking.py"),
                "--smoke-test",
                "--storage",
                str(tmp_path / "store"),
                "--mlflow-uri",
                uri,
            ],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"},
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=join,
        )
    # wait until a trial trains on node b (its Ray Train worker has been running for a few seconds)
    deadline, seen_b, seen_head = time.time() + 300, None, False
    while time.time() < deadline and sweep.poll() is None:
        procs = marked_processes(str(ray_tmp)).values()
        seen_head = seen_head or bool(_ray_workers(procs, node_b=False))
        if _ray_workers(procs, node_b=True):
            seen_b = seen_b or time.time()
            if time.time() - seen_b >= 3 and seen_head:
                break
        else:
            seen_b = None
        time.sleep(0.5)
    assert seen_b and seen_head and sweep.poll() is None, (
        f"the trials did not run on both nodes (head {seen_head}, node b {bool(seen_b)}): {log.read_text()[-3000:]}"
    )
    # node b lost: its raylet and every process of that node, by pid
    node_b = [p for p in marked_processes(str(ray_tmp)).values() if _node_of(p) == "b"]
    lost = {p.pid: p for p in node_b}
    for p in node_b:
        try:
            lost.update({c.pid: c for c in p.children(recursive=True)})
        except Exception:  # noqa: BLE001 - already gone
            pass
    raylet_b = [p.pid for p in node_b if p.name() == "raylet"]
    assert len(raylet_b) == 1
    t_kill = time.time()
    killed = kill_processes(lost.values())
    rc = sweep.wait(timeout=max(30.0, deadline + 200 - time.time()))
    recovery = time.time() - t_kill
    text = log.read_text()
    assert rc == 0, text[-5000:]
    print(
        f"\ntwo nodes on loopback up in {cluster_s:.1f} s; killed node b (raylet pid {raylet_b[0]}, {killed} "
        f"processes) {t_kill - t0 - cluster_s:.1f} s into the sweep; the sweep completed {recovery:.1f} s after "
        f"the kill (total {time.time() - t0:.1f} s)"
    )
    assert "0.98 CPU per worker" in text  # a worker fits beside both trial drivers on one surviving node
    retried = [m for m in ("after retrying", "[FailurePolicy] RETRY") if m in text]
    print(
        f"recovery seen in the sweep's output: {retried}; "
        f"orphaned placement groups removed: {text.count('removed placement group')}"
    )
    assert retried, text[-5000:]
    _, parents, trials = _runs(uri)
    assert len(parents) == 1 and (parents["status"] == "FINISHED").all()
    assert sorted(trials["tags.ablation.arm"]) == ["250", "300", "400"]  # every arm, once
    assert (trials["status"] == "FINISHED").all() and (trials["tags.trial.status"] == "finished").all()
    assert trials["metrics.ft/demo/final"].notna().all()


def _node_of(p) -> str | None:
    try:
        return p.environ().get(NODE_MARK)
    except Exception:  # noqa: BLE001 - gone or trimmed environment
        return None


# ============================================================================= item 5: concurrent logging
WRITERS, STEPS, KEYS = 8, 100, ("loss", "acc", "lr")


def _writer(uri: str, experiment_id: str, index: int, steps: int, barrier: str) -> dict:
    """One 'trial': its own run, ``steps`` steps of per-step metrics, every exception counted."""
    from ssamba.sweep.tracking import Tracker

    t = Tracker(uri)
    run_id, _ = t.get_or_create_run(experiment_id, key_tags={"writer": str(index)}, name=f"writer-{index}")
    Path(barrier, str(index)).touch()
    wait_until = time.time() + 120
    while len(os.listdir(barrier)) < WRITERS and time.time() < wait_until:  # all start logging together
        time.sleep(0.02)
    errors, start = [], time.time()
    for step in range(steps):
        try:
            t.log_metrics(
                run_id,
                {"loss": 1.0 / (step + 1) + index, "acc": step / steps, "lr": 1e-3 * (index + 1) + 1e-6 * step},
                step=step,
            )
        except Exception as exc:  # noqa: BLE001 - counted, that is the point
            errors.append(f"step {step}: {type(exc).__name__}: {exc}"[:300])
    end = time.time()
    t.finish(run_id)
    return {"run_id": run_id, "errors": errors, "start": start, "end": end}


def _writers_main(uri: str, experiment_id: str, steps: int, barrier: str, out: str) -> None:
    """``python tests/test_reliability_infra.py writers ...``: a local Ray, WRITERS concurrent tasks."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=2 / WRITERS, max_retries=0)(_writer)
    res = ray.get([task.remote(uri, experiment_id, i, int(steps), barrier) for i in range(WRITERS)])
    ray.shutdown()
    Path(out).write_text(json.dumps(res))


def _concurrent_logging(uri: str, label: str, tmp_path: Path, ray_tmp: Path) -> dict:
    from ssamba.sweep.tracking import Tracker

    tracker = Tracker(uri)
    exp = tracker.experiment(f"concurrent-{label}")
    barrier, out = tmp_path / f"barrier-{label}", tmp_path / f"writers-{label}.json"
    barrier.mkdir()
    t0 = time.time()
    proc = subprocess.run(
        [PY, __file__, "writers", uri, exp, str(STEPS), str(barrier), str(out)],
        env=_env(ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len({r["run_id"] for r in res}) == WRITERS
    assert max(r["start"] for r in res) < min(r["end"] for r in res), "the writers did not overlap"
    written = 0
    for r in res:
        for key in KEYS:
            steps = [m.step for m in tracker.client.get_metric_history(r["run_id"], key)]
            assert sorted(steps) == list(range(STEPS)), (label, key, len(steps))  # each step once
            written += len(steps)
    errors = [e for r in res for e in r["errors"]]
    expected = WRITERS * STEPS * len(KEYS)
    span = max(r["end"] for r in res) - min(r["start"] for r in res)
    print(
        f"\n{label}: {WRITERS} concurrent Ray tasks x {STEPS} steps x {len(KEYS)} metrics: expected {expected}, "
        f"written {written}, lost {expected - written}, errors {len(errors)}; logging took {span:.1f} s "
        f"({expected / span:.0f} points/s), {elapsed:.1f} s with Ray start-up"
    )
    assert errors == []
    assert written == expected
    return {"expected": expected, "written": written, "span": span}


@pytest.mark.reliability
@pytest.mark.timeout(300)
def test_concurrent_logging_to_the_default_sqlite_store(tmp_path, ray_tmp):
    _concurrent_logging(f"sqlite:///{tmp_path / 'mlflow.db'}", "sqlite", tmp_path, ray_tmp)


def _postgres_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: Debian's /usr/lib/postgresql/<version>/bin, else PATH."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    found = debian[-1] if debian else (Path(shutil.which("initdb")).resolve() if shutil.which("initdb") else None)
    if found and all((found.parent / n).exists() for n in ("pg_ctl", "postgres")):
        return found.parent
    return None


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 (free port, unix socket in its own folder), trust auth for the
    local user ``mlflow``, database ``mlflow``; as root it runs as ``nobody`` (postgres refuses root)."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (/usr/lib/postgresql/*/bin or PATH): apt-get install postgresql")
    psycopg = pytest.importorskip("psycopg", reason="the dev extra installs psycopg[binary]")
    as_root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    run_as = []
    if as_root:
        shutil.chown(folder, "nobody")
        run_as = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "nobody", "--"]
    data, port = folder / "data", _free_port()
    pg_ctl = run_as + [str(bindir / "pg_ctl"), "-D", str(data)]
    t0 = time.time()
    try:
        init = subprocess.run(
            run_as
            + [str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--locale=C"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
        start = subprocess.run(
            pg_ctl
            + [
                "-l",
                str(folder / "postgres.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}",
                "start",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert start.returncode == 0, start.stdout + start.stderr + (folder / "postgres.log").read_text()[-2000:]
        with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE mlflow")
        print(
            f"\nPostgreSQL ({bindir}) on 127.0.0.1:{port}, up in {time.time() - t0:.1f} s"
            f"{' as nobody' if as_root else ''}"
        )
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(pg_ctl + ["-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.reliability
@pytest.mark.timeout(400)
def test_concurrent_logging_to_an_mlflow_server_on_postgres(tmp_path, ray_tmp, postgres):
    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:  # the README's command: python -m ssamba.sweep.tracking ui
        server = subprocess.Popen(
            [
                PY,
                "-m",
                "ssamba.sweep.tracking",
                "ui",
                "--backend-store-uri",
                postgres,
                "--port",
                str(port),
                "--",
                "--artifacts-destination",
                str(tmp_path / "artifacts"),
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        up = _wait_http(f"http://127.0.0.1:{port}/health", server, 120, log)
        import psutil

        bound = _listening([psutil.Process(server.pid)] + psutil.Process(server.pid).children(recursive=True))
        assert bound and all(ip in LOOPBACK for *_, ip, _ in bound), bound
        print(f"mlflow server on PostgreSQL up in {up:.1f} s (tables created), listening on {sorted(set(bound))}")
        _concurrent_logging(f"http://127.0.0.1:{port}", "postgres-server", tmp_path, ray_tmp)
    finally:
        _stop_tree(server)


# ============================================================================= item 8: safe by default
class _Payload:
    """Pickles to a call of ``os.makedirs(marker)``: loading it with full pickle runs that call."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.mark.reliability
@pytest.mark.timeout(120)
def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    import torch

    from ssamba.model.checkpoints import FORMAT, CheckpointError, load_checkpoint, read_checkpoint, safe_load

    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "state_dict": {"w": torch.zeros(2)}, "extra": _Payload(str(marker))}, path)
    for load in (safe_load, read_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            load(path)
        msg = str(err.value)
        assert str(path) in msg and "holds a pickled Python object (os.makedirs)" in msg, msg
    assert not marker.exists()  # the payload never ran
    print(f"\nrefused: {msg[:300]}")


def _torch_loads(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if (name == "load" and owner == "torch") or (name in ("load", "loads") and owner in ("pickle", "dill")):
                yield owner, node


@pytest.mark.reliability
@pytest.mark.timeout(60)
def test_every_torch_load_in_the_code_is_weights_only():
    found = []
    for path in sorted(p for d in ("ssamba", "ablations", "sweeps") for p in (ROOT / d).rglob("*.py")):
        for owner, call in _torch_loads(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            assert owner == "torch", f"{where}: {owner}.load unpickles arbitrary objects"
            kw = {k.arg: k.value for k in call.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, (
                f"{where}: torch.load without weights_only=True"
            )
            found.append(where)
    print(f"\ntorch.load calls, all weights_only=True: {found}")
    assert found  # the scan does see the loaders


@pytest.mark.reliability
@pytest.mark.timeout(180)
def test_the_mlflow_ui_command_binds_loopback(tmp_path):
    import psutil

    from ssamba.sweep.tracking import ui_command

    assert ui_command("sqlite:////x.db", host="0.0.0.0")[6:8] == ["--host", "0.0.0.0"]  # a flag says otherwise
    with pytest.raises(ValueError, match="database store"):
        ui_command("http://127.0.0.1:5000")
    port = _free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        ui = subprocess.Popen(
            [
                PY,
                "-m",
                "ssamba.sweep.tracking",
                "ui",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--port",
                str(port),
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        up = _wait_http(f"http://127.0.0.1:{port}/health", ui, 120, log)
        root = psutil.Process(ui.pid)
        bound = _listening([root] + root.children(recursive=True))
        print(f"\n`python -m ssamba.sweep.tracking ui` up in {up:.1f} s, listening on {sorted(set(bound))}")
        assert any(p == port for *_, p in bound)
        assert all(ip in LOOPBACK for *_, ip, _ in bound), bound
    finally:
        _stop_tree(ui)


SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-4f9a8c7e",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-77e1c0de",
    "HF_TOKEN": "hf_token_9b3d5e7f",
    "DB_PASSWORD": "db-pw-0c4e2a9b",
    "SSAMBA_API_KEY": "api-key-6d8f1b3a",
}


@pytest.mark.reliability
@pytest.mark.timeout(120)
def test_tracker_scrubs_secrets_from_params_and_tags(tmp_path, monkeypatch):
    from ssamba.sweep.tracking import Tracker

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id, _ = t.get_or_create_run(
        t.experiment("scrub"),
        key_tags={"k": "1"},
        name="r",
        params={
            "cmd": f"--token {SECRETS['HF_TOKEN']}",
            "db_password": "x",
            "uri": "postgresql://u:hunter22@db/mlflow",
        },
    )
    t.set_tags(run_id, {"trial.error": f"connect failed for {SECRETS['DB_PASSWORD']}", "api_token": "y"})
    data = t.client.get_run(run_id).data
    assert data.params == {"cmd": "--token ***", "uri": "postgresql://u:***@db/mlflow"}
    assert data.tags["trial.error"] == "connect failed for ***" and "api_token" not in data.tags


@pytest.mark.reliability
@pytest.mark.timeout(400)
def test_sweep_binds_loopback_and_logs_no_secrets(cache_env, tmp_path, ray_tmp):
    import psutil

    from ssamba.sweep.driver import build_parser
    from ssamba.sweep.factors import NORM

    assert build_parser(NORM).parse_args([]).dashboard_host == "127.0.0.1"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(ray_tmp, SSAMBA_CACHE=str(cache_env), **SECRETS)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the sweep sets it itself for its local Ray
    t0 = time.time()
    sweep = subprocess.Popen(
        [
            PY,
            str(ROOT / "sweeps" / "norm.py"),
            "--smoke-test",
            "--quiet",
            "--arms",
            "rmsnorm",
            "--storage",
            str(tmp_path / "store"),
            "--mlflow-uri",
            uri,
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    bound: set = set()
    try:
        while sweep.poll() is None and time.time() - t0 < 360:  # every listening socket of its Ray, while it runs
            bound.update(_listening(marked_processes(str(ray_tmp), (psutil.Process(sweep.pid),)).values()))
            time.sleep(1)
        out, _ = sweep.communicate(timeout=30)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 0, out[-4000:]
    dashboards = {(ip, port) for pid, name, ip, port in bound if name == "ray-dashboard"}
    print(
        f"\nsmoke sweep with its local Ray ran {time.time() - t0:.1f} s; listening sockets seen: "
        f"{len(bound)} ({len({p for p, *_ in bound})} processes), dashboard on {sorted(dashboards)}"
    )
    assert dashboards, "the dashboard was not seen listening"
    # torch.distributed's rendezvous store (a TCPStore, set up by Ray Train in each worker even for one
    # worker) listens on every interface and has no option to bind one: the one known exception
    # (matched on the kernel's 15-character name: psutil gives that when it cannot read the full title in time)
    rendezvous = sorted(b for b in bound if b[1][:15] == "ray::RayTrainWorker"[:15] and b[2] not in LOOPBACK)
    others = sorted(b for b in bound if b[2] not in LOOPBACK and b not in rendezvous)
    print(f"not on loopback: {others or 'nothing'} (+ torch.distributed's store in the Train worker: {rendezvous})")
    assert others == []
    # no secret of the environment in any param, tag or experiment tag of the sweep
    from ssamba.sweep.tracking import Tracker

    t = Tracker(uri)
    exps = t.sweep_experiments()
    df = t.runs_frame(exps)
    assert len(df) == 2  # the parent and the trial
    texts = [f"{c}={v}" for c in df.columns if c.startswith(("params.", "tags.")) for v in df[c].dropna()]
    texts += [f"{k}={v}" for e in exps for k, v in t.client.get_experiment(e).tags.items()]
    leaks = [s for s in texts if any(v in s or k in s for k, v in SECRETS.items())]
    print(f"checked {len(texts)} params and tags: {len(leaks)} hold a secret")
    assert leaks == []


if __name__ == "__main__" and sys.argv[1:2] == ["writers"]:
    _writers_main(*sys.argv[2:7])
