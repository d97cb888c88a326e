"""Reliability (issue 7, items 1, 2, 4, 6, 7): faults injected into real sweeps and real writers.

- a Ray Train worker killed mid-pretraining: the stage resumes from ``last.pt`` within the configured
  number of worker restarts, one MLflow run per trial, nothing logged twice;
- a driver killed while a shared pretraining is being written: no partial checkpoint, cache shard or
  pretraining is ever served, two trials never compute one pretraining at once, ``--resume`` completes;
- checkpoint retention keeps a sweep's storage within a bound computed from the model size;
- a manifest with a few percent broken clips: the run completes, the clips are counted and listed in
  MLflow; strict mode stops at the first one, naming it;
- a NaN loss (fault injection, ``$SSAMBA_TEST_NAN_AT_STEP``): the trial errors naming the step and
  the batch, the sweep goes on, the summary shows the trial as failed.

Every Ray here is local on 127.0.0.1, started by this module (in process, or by a driver subprocess)
and stopped by process id, never with ``ray stop``. Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import psutil
import pytest
from _processes import MARK, kill_marked

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

pytestmark = pytest.mark.reliability

# every sweep here: the smoke preset on the small demo corpus
FAST = ["--preset", "smoke", "--quiet"]
LONGER_PRETRAINING = ["--set", "pretrain.max_steps=30", "--set", "pretrain.plateau_every=5"]  # time to kill it


# ------------------------------------------------------------------------------ helpers
def _data_args(manifest: Path) -> list[str]:
    return ["--set", f"data.manifest={manifest}", "--tasks", f"demo={manifest}"]


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else 0


def _runs(uri: str):
    from ssamba.sweep.tracking import Tracker

    t = Tracker(uri)
    df = t.runs_frame(t.sweep_experiments())
    return t, df[df["tags.sweep.role"] == "parent"], df[df["tags.sweep.role"] == "trial"]


def _steps(tracker, run_id: str, key: str) -> list[int]:
    return [s for s, _ in tracker.metric_history(run_id, key)]


def _metric_times(tracker, run_id: str, key: str) -> list[float]:
    return [m.timestamp / 1000.0 for m in tracker.client.get_metric_history(run_id, key)]


def _assert_nothing_logged_twice(tracker, run_id: str) -> None:
    """Every metric of the run holds each step at most once (``*/resumed_from_step`` counts resumes)."""
    run = tracker.client.get_run(run_id)
    for key in run.data.metrics:
        if key.endswith("/resumed_from_step"):
            continue
        steps = _steps(tracker, run_id, key)
        assert len(steps) == len(set(steps)), (key, steps)


def _pretrain_key(sets: dict, arm: dict, seed: int = 0) -> str:
    from ssamba.config import apply_overrides, to_flat
    from ssamba.config.presets import preset
    from ssamba.sweep.plan import pretrain_key

    return pretrain_key(to_flat(apply_overrides(preset("smoke"), {**sets, **arm, "seed": seed})))


def _step_of(last_pt: Path) -> int:
    import torch

    return int(torch.load(last_pt, map_location="cpu", weights_only=True)["step"])


# ------------------------------------------------------------------------------ Ray started by a subprocess
def _env(cache_env: Path, ray_tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "SSAMBA_CACHE": str(cache_env),
            "RAY_TMPDIR": str(ray_tmp),
            "PYTHONUNBUFFERED": "1",
            MARK: str(ray_tmp),
        }
    )
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def ray_tmp():
    folder = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    yield folder
    for _ in range(2):
        kill_marked(str(folder))
        time.sleep(1)
    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------ Ray in this process
@pytest.fixture(scope="module")
def local_ray(cache_env):
    """A local Ray on 127.0.0.1 for this module's in-process sweeps, shut down afterwards. Its workers
    inherit the fault hook of the ``nan`` arm (``fault_sweep``): no other arm of this module is named so."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ssamba.sweep.worker import FAULT_ENV

    os.environ[FAULT_ENV] = "nan:2"
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    yield ray
    ray.shutdown()
    os.environ.pop(FAULT_ENV, None)


def _run_sweep(factor, argv: list[str]):
    from ssamba.sweep.driver import build_parser, run_sweep

    return run_sweep(factor, build_parser(factor).parse_args(argv))


# ============================================================================== item 2: atomic writes, one computer
_RACER = r"""
import json, sys, time
from pathlib import Path
from ssamba.sweep.worker import shared_pretraining

pdir, log, me, go, work = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
fail = sys.argv[6] == "fail"  # the computation dies before DONE: the next racer must compute it again

def compute():
    start = time.time()
    pdir.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps({"who": me, "event": "start", "t": start}) + "\n")
    (pdir / "best.pt").write_bytes(b"half a checkpoint")  # what a killed writer would leave (no DONE)
    time.sleep(work)
    with open(log, "a") as f:
        f.write(json.dumps({"who": me, "event": "end", "t": time.time()}) + "\n")
    if fail:
        raise SystemExit(3)
    (pdir / "best.pt").write_bytes(b"complete")
    return {"pretrain/acc": 0.5}

time.sleep(max(0.0, go - time.time()))  # every racer reaches the lock at the same moment
with open(log, "a") as f:
    f.write(json.dumps({"who": me, "event": "ready", "t": time.time()}) + "\n")
res = shared_pretraining(pdir, compute, owner=me, log=lambda m: None)
print(json.dumps({"who": me, "reused": res["reused"], "t": time.time()}), flush=True)
"""


def _racers(
    pdir: Path, log: Path, names: list[str], work: float, delay: float = 6.0, fail: bool = False
) -> list[subprocess.Popen]:
    go = time.time() + delay  # after the imports (torch) of every racer
    return [
        subprocess.Popen(
            [PY, "-c", _RACER, str(pdir), str(log), n, str(go), str(work), "fail" if fail else "ok"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in names
    ]


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.mark.timeout(120)
def test_racing_trials_compute_one_pretraining_once(tmp_path):
    """Three processes race for one pretraining key: one computes, the others wait and reuse it. Three
    more race for another key whose computation always dies before DONE: each computes in turn, and
    their computing intervals never overlap."""
    pdir, log = tmp_path / "pretrain" / "k", tmp_path / "events.jsonl"
    fdir, flog = tmp_path / "pretrain" / "f", tmp_path / "failing.jsonl"
    procs = _racers(pdir, log, ["a", "b", "c"], work=1.5)
    failing = _racers(fdir, flog, ["x", "y", "z"], work=0.5, fail=True)
    for p in failing:
        p.communicate(timeout=90)
        assert p.returncode == 3
    spans = sorted((e["t"], e["who"], e["event"]) for e in _events(flog) if e["event"] != "ready")
    assert [ev for _, _, ev in spans] == ["start", "end"] * 3  # one at a time: start, end, start, end, ...
    assert [who for _, who, _ in spans][::2] == [who for _, who, _ in spans][1::2]
    assert not (fdir / "DONE").exists()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    events = _events(log)
    computed = [o for o in outs if not o["reused"]]
    assert len(computed) == 1, outs  # exactly one computed
    starts = [e for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    assert len(starts) == len(ends) == 1
    assert all(o["t"] >= ends[0]["t"] for o in outs if o["reused"])  # the others returned after it finished
    assert json.loads((pdir / "DONE").read_text())["trial"] == computed[0]["who"]
    assert (pdir / "best.pt").read_bytes() == b"complete"


@pytest.mark.timeout(120)
def test_killed_computation_is_never_reused_and_the_lock_passes_on(tmp_path):
    """The process computing a pretraining is killed -9 (a partial best.pt, no DONE): the lock is freed,
    and the waiting trial computes (resumes) the pretraining instead of reusing the partial one."""
    pdir, log = tmp_path / "pretrain" / "k", tmp_path / "events.jsonl"
    victim = _racers(pdir, log, ["victim"], work=60.0, delay=0.0)[0]
    deadline = time.time() + 60
    while time.time() < deadline and not any(e["event"] == "start" for e in _events(log)):
        time.sleep(0.05)
    assert (pdir / "best.pt").read_bytes() == b"half a checkpoint"
    waiter = _racers(pdir, log, ["waiter"], work=0.2, delay=0.0)[0]
    while time.time() < deadline and not any(e["who"] == "waiter" for e in _events(log)):
        time.sleep(0.05)
    time.sleep(2.0)
    assert waiter.poll() is None and not (pdir / "DONE").exists()  # blocked on the lock the victim holds
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err[-2000:]
    res = json.loads(out.strip().splitlines()[-1])
    starts = {e["who"]: e["t"] for e in _events(log) if e["event"] == "start"}
    assert res["reused"] is False and starts["waiter"] >= killed_at  # computed anew, after the kill
    assert (pdir / "best.pt").read_bytes() == b"complete"
    assert json.loads((pdir / "DONE").read_text())["trial"] == "waiter"
    print(f"lock handed over {starts['waiter'] - killed_at:.2f} s after the holder was killed")


_CKPT_WRITER = r"""
import sys
from ssamba.config import model_preset
from ssamba.model.audio_model import AudioModel, Geometry
from ssamba.model.checkpoints import save_checkpoint

model = AudioModel(model_preset("small"), Geometry(128, 1024), num_classes=527)  # ~100 MB per checkpoint
while True:
    save_checkpoint(sys.argv[1], model, metrics={"acc": 0.5})
"""

_SHARD_WRITER = r"""
import sys
import numpy as np
from ssamba.config import FrontendConfig
from ssamba.data.features import FeatureCache

cache = FeatureCache(FrontendConfig(), sys.argv[1])
fb = np.ones((1024, 128), np.float32).tobytes()
rows = [{"path": f"/clip{i}.wav", "size": -1, "mtime_ns": -1, "n_frames": 1024, "n_bins": 128, "fbank": fb,
         "error_kind": None, "error": None} for i in range(200)]  # ~100 MB per shard; (-1, -1): no such file
while True:
    cache._write_shard(rows)
"""


def _kill_mid_write(code: str, arg: Path, tmp_glob: str, folder: Path) -> int:
    """Run a writer looping over atomic writes; SIGKILL it while a temporary file is half written."""
    proc = subprocess.Popen([PY, "-c", code, str(arg)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            tmps = [p for p in folder.glob(tmp_glob) if p.is_file()]
            done = [p for p in folder.glob("*") if p.is_file() and p not in tmps]
            sizes = [p.stat().st_size for p in tmps if p.exists()]
            if done and sizes and 0 < sizes[0] < 50_000_000:  # a complete file exists, the next is mid-write
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return sizes[0]
            time.sleep(0.005)
        raise AssertionError(f"no write caught in time: {proc.stderr.read()[-2000:] if proc.poll() else ''}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_checkpoint_killed_mid_write_is_never_served(tmp_path):
    import torch

    from ssamba.model.checkpoints import read_checkpoint

    folder = tmp_path / "pretrain" / "k"
    folder.mkdir(parents=True)
    best = folder / "best.pt"
    _kill_mid_write(_CKPT_WRITER, best, "best.pt.*.tmp", folder)
    partial = list(folder.glob("best.pt.*.tmp"))
    assert partial and partial[0].stat().st_size < best.stat().st_size  # the kill landed mid-write
    with pytest.raises(Exception):
        torch.load(partial[0], weights_only=True)  # what a non-atomic writer would have served
    payload = read_checkpoint(best)  # the checkpoint under the real name is the last complete one
    assert payload["metrics"] == {"acc": 0.5} and len(payload["state_dict"]) > 10


@pytest.mark.timeout(180)
def test_feature_shard_killed_mid_write_is_never_served(tmp_path):
    import numpy as np

    from ssamba.config import FrontendConfig
    from ssamba.data.features import STALE_TMP_S, CachedFeatures, FeatureCache

    cache = FeatureCache(FrontendConfig(), tmp_path)
    _kill_mid_write(_SHARD_WRITER, tmp_path, ".shard-*.tmp", cache.folder)
    shards = sorted(cache.folder.glob("shard-*.arrow"))
    tmps = sorted(cache.folder.glob(".shard-*.tmp"))
    assert shards and tmps
    # a truncated shard under a final name (a copy cut short, a full disk) is skipped, not served
    (cache.folder / "shard-99999999999999999999-trunc.arrow").write_bytes(shards[0].read_bytes()[:1_000_000])
    reader = CachedFeatures(cache.folder)
    assert len(reader) == 200  # the rows of complete shards only
    for i in (0, 199):
        fb = reader.get(f"/clip{i}.wav")
        assert fb.shape == (1024, 128) and np.all(fb == 1.0)
    # a later build removes a killed writer's temporary file once it is stale
    old = time.time() - STALE_TMP_S - 10
    for t in tmps:
        os.utime(t, (old, old))
    cache._remove_stale_tmp()  # (what FeatureCache.build does first)
    assert not list(cache.folder.glob(".shard-*.tmp"))


_SHARED_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from ssamba.sweep.driver import Factor, run_sweep_cli

SHARED = Factor(name="shared", arms={{"a": {{"finetune.lr": 1e-3}}, "b": {{"finetune.lr": 2e-3}}}}, reference="a",
                description="two fine-tunings of one shared pretraining")
sys.exit(run_sweep_cli(SHARED))
"""


@pytest.mark.timeout(480)
def test_driver_killed_during_shared_pretraining_then_resume(small_demo, cache_env, tmp_path, ray_tmp):
    """Two trials share one pretraining; the driver (and its Ray) is killed -9 while it is being computed.
    Nothing partial is served, ``--resume`` completes the sweep, the pretraining resumes from its last
    checkpoint and is computed by one trial only; no MLflow run is duplicated."""
    script = tmp_path / "shared.py"
    script.write_text(_SHARED_SCRIPT.format(root=str(ROOT)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tmp_path / "store"
    cmd = [
        PY,
        str(script),
        *FAST,
        *_data_args(small_demo),
        *LONGER_PRETRAINING,
        "--storage",
        str(store),
        "--mlflow-uri",
        uri,
        "--max-concurrent",
        "2",
    ]
    env = _env(cache_env, ray_tmp)
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pre_root = store / "shared-smoke" / "pretrain"
    deadline = time.time() + 240
    pdir = None
    while time.time() < deadline and proc.poll() is None:
        lasts = [p for p in pre_root.glob("*/last.pt")] if pre_root.is_dir() else []
        if lasts and not (lasts[0].parent / "DONE").exists():
            pdir = lasts[0].parent
            break
        time.sleep(0.05)
    assert pdir is not None, "the shared pretraining never wrote a checkpoint"
    tree = tuple(psutil.Process(proc.pid).children(recursive=True))
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-pretraining
    proc.wait(timeout=30)
    for _ in range(2):
        kill_marked(str(ray_tmp), tree)  # and its local Ray, workers included
        time.sleep(1)
    killed_at = time.time()
    assert not (pdir / "DONE").exists()
    resume_step = _step_of(pdir / "last.pt")  # the state a restart must continue from
    assert resume_step >= 5
    from ssamba.model.checkpoints import read_checkpoint

    read_checkpoint(pdir / "best.pt")  # whatever is under the final name is complete

    out = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    done_at = time.time()
    t, parents, trials = _runs(uri)
    assert len(parents) == 1 and len(trials) == 2 and trials["tags.trial.key"].is_unique
    assert (trials["tags.trial.status"] == "finished").all()
    assert sorted(trials["tags.pretrain.reused"]) == ["false", "true"]  # computed once, reused once
    computer = trials[trials["tags.pretrain.reused"] == "false"].iloc[0]
    assert trials[trials["tags.pretrain.reused"] == "true"].iloc[0]["tags.pretrain.computed_by"] == computer["run_name"]
    resumed = t.metric_history(computer["run_id"], "pretrain/resumed_from_step")
    assert [v for _, v in resumed] == [resume_step]  # continued from the checkpoint, not from step 0
    assert _steps(t, computer["run_id"], "pretrain/step")[-1] == 30
    for run_id in trials["run_id"]:
        _assert_nothing_logged_twice(t, run_id)
        assert len(t.metric_history(run_id, "ft/demo/final")) == 1
    done = json.loads((pdir / "DONE").read_text())
    assert done["trial"] == computer["run_name"] and done["pretrain/step"] == 30
    assert not list(pdir.glob("*.tmp")) and not (pdir / "last.pt").exists()
    resumed_at = _metric_times(t, computer["run_id"], "pretrain/resumed_from_step")[0]
    print(
        f"driver killed at pretraining step {resume_step}: --resume continued it {resumed_at - killed_at:.1f} s "
        f"later (fresh Ray included) and completed the sweep {done_at - killed_at:.1f} s after the kill"
    )


# ============================================================================== item 1: a worker killed mid-stage
@pytest.mark.timeout(420)
def test_worker_killed_mid_pretraining_resumes_within_the_retry_bound(small_demo, local_ray, tmp_path):
    """Two trials, one Ray Train worker restart allowed each (``--worker-retries 1``, no trial retry).
    Trial ``once``: its worker is killed -9 once after the first checkpoint: the pretraining continues
    from that checkpoint, the trial finishes in its one MLflow run, nothing logged twice. Trial ``twice``:
    killed again after its restart made progress: past the bound, the trial fails."""
    from ssamba.sweep.driver import Factor

    arms = {"once": {"pretrain.lr": 1e-3}, "twice": {"pretrain.lr": 2e-3}}
    factor = Factor(name="workerkill", arms=arms, reference="once")
    sets = {"data.manifest": str(small_demo), "pretrain.max_steps": "30", "pretrain.plateau_every": "5"}
    store = tmp_path / "store"
    pre_root = store / "workerkill-smoke" / "pretrain"
    plan = {
        _pretrain_key(sets, arms[a]): {"arm": a, "kills": n, "at": [], "steps": []}
        for a, n in (("once", 1), ("twice", 2))
    }
    stop = threading.Event()

    def holder(lock: Path):
        for p in psutil.Process().children(recursive=True):
            try:
                if any(f.path == str(lock) for f in p.open_files()):
                    return p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return None

    def killer():
        while not stop.is_set():
            for key, k in plan.items():
                last, done = pre_root / key / "last.pt", pre_root / key / "DONE"
                if len(k["at"]) >= k["kills"] or not last.is_file() or done.exists():
                    continue
                if k["at"] and last.stat().st_mtime <= k["at"][-1]:
                    continue  # wait for the restarted worker to make progress
                proc = holder(pre_root / f"{key}.lock")
                if proc is None:
                    continue
                step = _step_of(last)
                proc.kill()
                k["at"].append(time.time())
                k["steps"].append(step)
            time.sleep(0.05)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        res = _run_sweep(
            factor,
            [
                *FAST,
                *_data_args(small_demo),
                *LONGER_PRETRAINING,
                "--storage",
                str(store),
                "--mlflow-uri",
                uri,
                "--worker-retries",
                "1",
                "--max-failures",
                "0",
            ],
        )
    finally:
        stop.set()
        watcher.join(timeout=10)
    by_arm = {plan[k]["arm"]: plan[k] for k in plan}
    assert [len(by_arm[a]["at"]) for a in ("once", "twice")] == [1, 2], by_arm
    t, _, trials = _runs(uri)
    assert len(trials) == 2 and trials["tags.trial.key"].is_unique  # one MLflow run per trial
    once = trials[trials["tags.ablation.arm"] == "once"].iloc[0]
    twice = trials[trials["tags.ablation.arm"] == "twice"].iloc[0]
    assert once["status"] == "FINISHED" and once["tags.trial.status"] == "finished"
    assert twice["status"] == "FAILED" and twice["tags.trial.status"] == "failed"
    assert sum(tr["error"] is not None for tr in res.trials) == 1  # Tune: the second trial errored
    # the step counter continued from the checkpoint the worker was killed after
    k = by_arm["once"]
    resumed = t.metric_history(once["run_id"], "pretrain/resumed_from_step")
    assert len(resumed) == 1 and resumed[0][1] >= k["steps"][0] >= 5
    assert _steps(t, once["run_id"], "pretrain/step")[-1] == 30
    _assert_nothing_logged_twice(t, once["run_id"])
    assert len(t.metric_history(once["run_id"], "ft/demo/final")) == 1  # final metrics logged once
    recovery = _metric_times(t, once["run_id"], "pretrain/resumed_from_step")[0] - k["at"][0]
    # past the bound: one restart, then the second kill fails the trial
    assert len(t.metric_history(twice["run_id"], "pretrain/resumed_from_step")) == 1
    assert "ft/demo/final" not in (t.client.get_run(twice["run_id"]).data.metrics)
    print(
        f"worker killed at pretraining step {k['steps'][0]}: the restarted worker resumed at step "
        f"{int(resumed[0][1])} {recovery:.1f} s after the kill; trial 'twice' failed after its 2nd kill "
        f"(worker retries 1): {twice['tags.trial.error'].splitlines()[0][:160]}"
    )


# ============================================================================== item 4: bounded storage
def _checkpoint_bounds() -> dict[str, int]:
    """Upper bounds of one checkpoint file of the smoke preset, from its parameter counts: ``best.pt``
    holds the weights (4 bytes each); ``last.pt`` the weights and the two Adam moments; each file gets
    64 KiB for its config, statistics and pickle framing."""
    from dataclasses import replace

    from ssamba.config.presets import preset
    from ssamba.model.audio_model import AudioModel, Geometry

    cfg = preset("smoke")
    pre = AudioModel(cfg.model, Geometry(128, cfg.pretrain.target_length), num_classes=0, pretrain_heads=True)
    ft = AudioModel(
        replace(cfg.model, fstride=cfg.finetune.fstride, tstride=cfg.finetune.tstride),
        Geometry(128, cfg.finetune.target_length),
        num_classes=8,
    )
    n = {name: sum(t.numel() for t in m.state_dict().values()) for name, m in (("pretrain", pre), ("ft", ft))}
    meta = 64 * 1024
    return {
        "pretrain/best.pt": 4 * n["pretrain"] + meta,
        "pretrain/last.pt": 12 * n["pretrain"] + meta,
        "ft/best.pt": 4 * n["ft"] + meta,
        "ft/last.pt": 12 * n["ft"] + meta,
    }


BOOKKEEPING = 256 * 1024  # per trial: Tune/Train state, progress and result files, DONE, sweep.json
KEPT = {
    "all": ("pretrain/best.pt", "pretrain/last.pt", "ft/best.pt", "ft/last.pt"),
    "best": ("pretrain/best.pt", "ft/best.pt"),
    "none": (),
}


@pytest.mark.timeout(420)
def test_checkpoint_retention_bounds_the_sweep_storage(small_demo, local_ray, tmp_path):
    """One smoke trial (one pretraining + one fine-tuning) per retention setting. Bound on the sweep
    storage: the bytes of the checkpoints that setting keeps (``all``: best + last of both stages;
    ``best``: the two best; ``none``: nothing, the pretraining too once the sweep finished) from the
    model size (:func:`_checkpoint_bounds`), plus 256 KiB of bookkeeping per trial. MLflow artifacts hold
    the two best checkpoints in every setting (``log_checkpoints`` on)."""
    from ssamba.sweep.driver import Factor

    factor = Factor(name="retention", arms={"one": {}}, reference="one")
    bounds = _checkpoint_bounds()
    measured = {}
    for keep in ("all", "best", "none"):
        home = tmp_path / keep
        res = _run_sweep(
            factor,
            [
                *FAST,
                *_data_args(small_demo),
                "--storage",
                str(home / "store"),
                "--mlflow-uri",
                f"sqlite:///{home / 'mlflow.db'}",
                "--keep-checkpoints",
                keep,
            ],
        )
        assert all(tr["error"] is None for tr in res.trials)
        store, artifacts = _tree_bytes(home / "store"), _tree_bytes(home / "mlartifacts")
        ckpts = {str(p.relative_to(home / "store")): p.stat().st_size for p in (home / "store").rglob("*.pt")}
        bound = sum(bounds[k] for k in KEPT[keep]) + BOOKKEEPING
        measured[keep] = store
        print(
            f"retention {keep}: sweep storage {store:,} bytes (bound {bound:,}), checkpoints kept {ckpts}, "
            f"MLflow artifacts {artifacts:,} bytes, mlflow.db {(home / 'mlflow.db').stat().st_size:,} bytes"
        )
        assert store <= bound, (keep, store, bound)
        assert len(ckpts) == len(KEPT[keep]), ckpts
        assert len(list((home / "mlartifacts").rglob("checkpoints/*/best.pt"))) == 2
    assert measured["none"] < measured["best"] < measured["all"]


# ============================================================================== items 6 and 7: bad clips, NaN loss
BROKEN = {"junk header": b"RIFF\x00\x00\x00\x00WAVEjunk", "empty file": b"", "text file": b"not audio at all\n"}


@pytest.fixture(scope="module")
def broken_manifest(small_demo, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the small demo corpus with 4 of its 96 clips broken (~4 %): three training clips (junk
    header, empty file, a missing file) and the first validation clip (a text file)."""
    from ssamba.data.manifest import read_manifest

    m = read_manifest(small_demo)
    root = tmp_path_factory.mktemp("broken") / "corpus"
    shutil.copytree(m.root, root)
    train = m.df["path"][m.df["split"] == "train"].tolist()
    victims = {
        train[3]: "junk header",
        train[17]: "empty file",
        train[40]: "missing",
        m.df["path"][m.df["split"] == "validation"].iloc[0]: "text file",
    }
    for rel, kind in victims.items():
        target = root / rel
        if kind == "missing":
            target.unlink()
        else:
            target.write_bytes(BROKEN[kind])
    m.meta["root"] = str(root)
    out = root.parent / "broken.parquet"
    m.write(out)
    return out, {str((root / rel).resolve()): kind for rel, kind in victims.items()}


@pytest.fixture(scope="module")
def fault_sweep(broken_manifest, local_ray, tmp_path_factory):
    """One sweep, three arms on the broken manifest: ``ok`` (bad clips skipped), ``strict``
    (``data.strict=true``) and ``nan`` (its pretraining loss NaN at step 2: ``$SSAMBA_TEST_NAN_AT_STEP``,
    set for the whole module before its Ray starts); no retries."""
    from ssamba.sweep.driver import Factor

    manifest, victims = broken_manifest
    factor = Factor(
        name="faults",
        reference="ok",
        arms={"ok": {}, "strict": {"data.strict": True}, "nan": {"pretrain.mse_weight": 9.0}},
    )  # its own pretraining: the NaN hook is not in the key
    home = tmp_path_factory.mktemp("faults")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    t0 = time.time()
    res = _run_sweep(
        factor,
        [
            *FAST,
            *_data_args(manifest),
            "--storage",
            str(home / "store"),
            "--mlflow-uri",
            uri,
            "--max-failures",
            "0",
            "--worker-retries",
            "0",
            "--set",
            "pretrain.max_steps=16",
            "--set",
            "pretrain.plateau_every=8",
        ],
    )
    print(f"fault sweep (ok / strict / nan) took {time.time() - t0:.1f} s")
    tracker, _, trials = _runs(uri)
    return {
        "result": res,
        "uri": uri,
        "tracker": tracker,
        "victims": victims,
        "trials": {r["tags.ablation.arm"]: r for _, r in trials.iterrows()},
    }


def _artifact_json(tracker, run_id: str, path: str) -> dict:
    import mlflow.artifacts

    return mlflow.artifacts.load_dict(f"{tracker.client.get_run(run_id).info.artifact_uri}/{path}")


@pytest.mark.timeout(420)
def test_broken_clips_are_skipped_counted_and_listed_in_mlflow(fault_sweep):
    t, victims = fault_sweep["tracker"], fault_sweep["victims"]
    ok = fault_sweep["trials"]["ok"]
    assert ok["status"] == "FINISHED" and ok["tags.trial.status"] == "finished"  # the run completes
    names = {a.path for a in t.client.list_artifacts(ok["run_id"], "skipped_clips")}
    assert names == {"skipped_clips/pretrain.json", "skipped_clips/ft_demo.json"}
    counts = {}
    for stage, prefix in (("pretrain", "pretrain"), ("ft_demo", "ft/demo")):
        listed = _artifact_json(t, ok["run_id"], f"skipped_clips/{stage}.json")
        assert listed["count"] == len(listed["clips"]) == ok[f"metrics.{prefix}/skipped_clips"]
        assert set(listed["clips"]) <= set(victims)  # every listed clip is a broken one, with its reason
        assert next(p for p, k in victims.items() if k == "text file") in listed["clips"]  # validation too
        for path, reason in listed["clips"].items():
            assert reason.split(":")[0] in ("unreadable", "empty", "missing"), reason
        counts[stage] = listed["count"]
    print(
        f"broken clips: {len(victims)} of 96 in the manifest; skipped and listed: pretraining {counts['pretrain']}, "
        f"fine-tuning {counts['ft_demo']}"
    )


@pytest.mark.timeout(420)
def test_strict_mode_stops_at_the_first_broken_clip_naming_it(fault_sweep):
    strict = fault_sweep["trials"]["strict"]
    assert strict["status"] == "FAILED" and strict["tags.trial.status"] == "failed"
    first = strict["tags.trial.error"].splitlines()[0]
    assert first.startswith("AudioError: ") and "strict mode" in strict["tags.trial.error"]
    assert any(first.startswith(f"AudioError: {p}: ") for p in fault_sweep["victims"]), first
    # an error of the inputs fails the trial once: reported, not raised, so neither Train nor Tune retries it
    (tune_result,) = [t for t in fault_sweep["result"].trials if t["metrics"].get("arm") == "strict"]
    assert tune_result["error"].startswith("AudioError: ") and not tune_result["retried"]
    print(f"strict mode: {first[:200]}")


@pytest.mark.timeout(420)
def test_nan_loss_fails_the_trial_and_the_sweep_goes_on(fault_sweep):
    from ablations.summarize import main as summarize_main

    res, trials = fault_sweep["result"], fault_sweep["trials"]
    nan = trials["nan"]
    errors = [tr["error"] for tr in res.trials if tr["error"]]
    assert len(errors) == 2 and any("non-finite loss nan at step 2" in e for e in errors)  # Tune marked it errored
    assert nan["status"] == "FAILED" and nan["tags.trial.status"] == "failed"
    first = nan["tags.trial.error"].splitlines()[0]
    assert first.startswith("NonFiniteLossError: [pretrain] non-finite loss nan at step 2 (epoch 0, batch 2 "), first
    assert trials["ok"]["tags.trial.status"] == "finished"  # the sweep went on
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert summarize_main(["--mlflow-uri", fault_sweep["uri"], "--sweep-id", res.sweep_id, "--no-log"]) == 0
    table = buf.getvalue()
    row = next(line for line in table.splitlines() if line.startswith("| nan |"))
    assert "1 failed" in row, table
    assert any(
        line.startswith("- failed: nan seed 0") and "NonFiniteLossError" in line and "at step 2" in line
        for line in table.splitlines()
    ), table
    print(f"summary row: {row}")
