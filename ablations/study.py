"""The real-data ablation study in one command: data, the four ablation sweeps on one Ray, results as files.

    python -m ablations.study --data ../shared/data --out study/                # the study (on GPUs: 0.5 per trial)
    python -m ablations.study --data ../shared/data --out study-smoke/ --smoke  # tiny sizes, e.g. on a CPU
    python -m ablations.study --data ../shared/data --out study/ --resume       # continue a killed study
    python -m ablations.study --data ../shared/data --out study/ --pilot        # one trial timed: the cost

1. **data** (:mod:`ablations.study_data`): the importers' commands on the published layouts, the pretraining
   union, statistics and the feature cache, into ``OUT/data``;
2. **Ray**: joins ``$RAY_ADDRESS`` (or a ``ray job submit`` cluster), else starts one on 127.0.0.1; every trial
   of every sweep gets the same share of it (``--gpus-per-trial``, and the CPUs left beside all trial drivers);
3. **sweeps**: ``python -m ablations.run FACTOR --preset study ...`` for each ablation (``--only``), ``--parallel``
   of them at once on that Ray, each with the from-scratch arm and the seeds, logged to ``OUT/logs``, all into
   one MLflow store (``OUT/mlflow.db``); meanwhile the GPUs (nvidia-smi) and the trial workers alive (Ray's
   state API) are sampled (:mod:`ablations.usage`);
4. **results** (:mod:`ablations.study_report`): ``RESULTS/<factor>/`` (tables, plot, ``run.json``, README) and
   ``RESULTS/study.md``. RESULTS is ``docs/results`` (``OUT/results`` with ``--smoke``).

Everything the run did is recorded in ``OUT/study.json``: commands, times, cards, sweep ids, GPU use.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ablations import study_data as D
from ablations import study_report as R
from ablations.usage import UsageSampler, cards, read_samples, read_workers, usage_summary
from ssamba.base.errors import ConfigError, SSAMBAError
from ssamba.sweep.factors import FACTORS

PRESET = "study"
ORDER = ("masking", "direction", "norm", "masking_strategy")
MIN_SEEDS = 3  # a study's arms are compared over seeds: fewer only with --smoke
GPU_SHARE = 0.5  # GPUs per trial by default: SSAMBA-tiny's training step leaves a card under-filled
SMOKE_SET = (
    "model.embed_dim=32",
    "model.depth=2",
    "model.d_state=8",
    "pretrain.batch_size=8",
    "pretrain.max_steps=4",
    "pretrain.warmup_steps=2",
    "pretrain.plateau_every=2",
    "pretrain.eval_batches=2",
    "finetune.batch_size=8",
    "finetune.epochs=1",
    "finetune.max_steps=3",
    "finetune.fstride=16",
    "finetune.tstride=16",
)
STUDY_SET = ("finetune.fold=0",)  # ESC-10's recipe cross-validates (fold 1): here its folds are splits


class StudyInterrupted(SSAMBAError):
    """Stopped by a signal; ``--resume`` continues."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ablations.study",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder with fsdd/, esc10/ and speech_commands_v0.01_mini/")
    p.add_argument("--out", required=True, help="the study's folder: data, MLflow store, sweeps, logs, record")
    p.add_argument("--only", help=f"comma-separated ablations (default all: {','.join(ORDER)})")
    p.add_argument("--smoke", action="store_true", help="tiny model and steps, 1 seed: the whole path in minutes")
    p.add_argument("--seeds", help=f"a count or a list (default: 0,1,2; 0 with --smoke); at least {MIN_SEEDS}")
    p.add_argument("--gpus-per-trial", type=float, help=f"default {GPU_SHARE} where Ray has GPUs, else 0")
    p.add_argument("--parallel", type=int, help="sweeps at once on the one Ray (default: all of them)")
    p.add_argument("--results", help="where the result pages go (default docs/results; OUT/results with --smoke)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every trial")
    p.add_argument("--resume", action="store_true", help="continue the study recorded in OUT/study.json")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between GPU samples (default 5)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes for the cache")
    p.add_argument(
        "--pilot",
        action="store_true",
        help="time one trial's stages here and work out the study's cost (no Ray, no MLflow; ablations.pilot)",
    )
    p.add_argument("--pilot-steps", type=int, default=200, help="pilot: pretraining steps (default 200)")
    p.add_argument("--pilot-epochs", type=int, default=2, help="pilot: fine-tuning epochs per task (default 2)")
    p.add_argument(
        "--pilot-share", type=int, help="pilot: pretrainings at once on the device (default 2 on a GPU, else 1)"
    )
    return p


# ------------------------------------------------------------------------------ options
def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(ORDER)
    wanted = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in FACTORS]
    if unknown or not wanted:
        raise ConfigError(f"--only {text!r}: unknown ablation(s) {unknown}; choose from {', '.join(ORDER)}")
    return [f for f in ORDER if f in wanted]


def study_seeds(text: str | None, smoke: bool) -> tuple[int, ...]:
    from ssamba.config.presets import get_preset
    from ssamba.sweep.plan import parse_seeds

    seeds = parse_seeds(text or ("1" if smoke else None), get_preset(PRESET))
    if len(seeds) < MIN_SEEDS and not smoke:
        raise ConfigError(
            f"--seeds {text}: the study compares arms over at least {MIN_SEEDS} seeds, got {len(seeds)}. "
            f"Fix: --seeds {MIN_SEEDS} (or more), or --smoke for a quick run of the path"
        )
    return seeds


def settings(args: argparse.Namespace) -> list[str]:
    """Every --set of the sweeps: the study's own, the smoke sizes, the user's (checked against the preset)."""
    from ssamba.config import apply_overrides, parse_set_args
    from ssamba.config.presets import preset

    out = [*STUDY_SET, *(SMOKE_SET if args.smoke else ()), *args.set]
    apply_overrides(preset(PRESET), parse_set_args(out))  # an unknown key or bad value: an error, before any work
    return out


def sweep_options(out: str, seeds, sets: list[str], gpus: float, cpus: float, conc: int) -> list[str]:
    """The options of one sweep (after ``python -m ablations.run FACTOR``)."""
    d = f"{out}/data"
    return [
        "--preset", PRESET, "--scratch", "--seeds", seeds_text(seeds),
        "--pretrain-manifest", f"{d}/pretrain.parquet",
        "--tasks", *(f"{t}={d}/{t}.parquet" for t in D.TASKS),
        *(x for s in sets for x in ("--set", s)),
        "--gpus-per-trial", f"{gpus:g}", "--cpus-per-worker", f"{cpus:g}", "--max-concurrent", str(conc),
        "--storage", f"{out}/sweeps", "--pretrain-store", f"{out}/pretrain", "--mlflow-uri", mlflow_uri(out),
    ]  # fmt: skip


def seeds_text(seeds: tuple[int, ...]) -> str:
    """``--seeds`` for these seeds: a count for 0..n-1, else a list (``5,`` for one seed 5)."""
    if tuple(seeds) == tuple(range(len(seeds))):
        return str(len(seeds))
    return ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")


def mlflow_uri(out: str) -> str:
    return f"sqlite:///{out}/mlflow.db"


def check_plans(factors: list[str], options: list[str]) -> None:
    """Every sweep planned (each trial's config resolved and validated) before any sweep starts."""
    from ablations.run import sweep_argv
    from ssamba.sweep.driver import build_parser as sweep_parser
    from ssamba.sweep.plan import make_plan

    for i, f in enumerate(factors):
        factor = FACTORS[f]
        args = sweep_parser(factor).parse_args(sweep_argv(factor, options))
        with contextlib.redirect_stdout(io.StringIO()) if i else contextlib.nullcontext():
            make_plan(factor, args, sweep_id="check")  # prints each task's recipe line once


# ------------------------------------------------------------------------------ the record
def load_record(path: Path, options: dict[str, Any], resume: bool) -> dict[str, Any]:
    if not path.is_file():
        if resume:
            raise ConfigError(f"--resume: no study in {path.parent} ({path} missing). Fix: drop --resume")
        return {"options": options, "data": {"steps": []}, "sweeps": {}, "phases": {}, "wall_s": 0.0}
    record = json.loads(path.read_text())
    if not resume:
        raise ConfigError(
            f"{path.parent} already holds a study ({path}). Fix: --resume to continue it, or another --out"
        )
    if record.get("options") != options:
        raise ConfigError(
            f"--resume: the study in {path.parent} ran with {record.get('options')}, not {options}. Fix: resume "
            "with its options, or start another --out"
        )
    return record


def save(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


def git_state() -> tuple[str, bool]:
    """The commit of the code that runs, and whether its working tree has uncommitted changes."""
    from ssamba.sweep.provenance import git_commit

    here = Path(__file__).resolve().parent
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return git_commit(), bool(dirty)


# ------------------------------------------------------------------------------ the phases
def run_data(record: dict, args, out: str, path: Path) -> None:
    done = {s["command"] for s in record["data"]["steps"] if s["rc"] == 0}
    for step in D.data_steps(args.data, out, args.workers):
        if step.text() in done and Path(step.output).is_file():
            continue
        print(f"data: {step.name}", flush=True)
        record["data"]["steps"].append(D.run_step(step, Path(out) / "logs" / "data.log"))
        save(record, path)
    record["manifests"] = {name: D.manifest_facts(f"{out}/data/{name}.parquet") for name in (*D.TASKS, "pretrain")}


def start_ray() -> tuple[str, dict[str, Any]]:
    """Ray for every sweep: joined or started here (its processes inherit what the sweeps need to join it)."""
    from ssamba.sweep.cluster import start_ray as start

    mode = start(quiet=True)
    import ray

    total = ray.cluster_resources()
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=total.get("CPU", 1))
    info = {
        "mode": mode,
        "address": ray.get_runtime_context().gcs_address,
        "cpus": total.get("CPU", 0.0),
        "gpus": total.get("GPU", 0.0),
        "largest_node_cpus": largest,
    }
    return mode, info


def run_sweeps(record: dict, factors: list[str], options: list[str], out: str, path: Path, parallel: int) -> None:
    """The sweeps, ``parallel`` at a time, as subprocesses joined to this process's Ray; Ctrl-C / SIGTERM
    stops them as interrupted (each marks its runs; ``--resume`` continues)."""
    env = dict(os.environ, RAY_ADDRESS=record["ray"]["address"], PYTHONUNBUFFERED="1")
    queue = [f for f in factors if record["sweeps"].get(f, {}).get("rc") != 0]
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                f = queue.pop(0)
                running[f] = _launch(record, f, options, out, env)
                save(record, path)
            time.sleep(2)
            for f, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    _ended(record, f, proc.returncode, out)
                    del running[f]
                    save(record, path)
    except KeyboardInterrupt:
        for f, (proc, log) in running.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for f, (proc, log) in running.items():
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            _ended(record, f, proc.returncode, out)
        save(record, path)
        raise StudyInterrupted(
            f"the study was interrupted; the sweeps that ran were stopped and marked. Continue it with the same "
            f"command and --resume (record: {path})"
        ) from None


def _launch(record: dict, factor: str, options: list[str], out: str, env: dict) -> tuple[subprocess.Popen, Any]:
    sweep = record["sweeps"].setdefault(factor, {"attempts": [], "wall_s": 0.0, "rc": None})
    name = f"{factor}-{PRESET}"
    argv = ["-m", "ablations.run", factor, *options, "--name", name]
    if (Path(out) / "sweeps" / name / "sweep.json").is_file():
        argv.append("--resume")  # an earlier attempt began: continue its sweep (same id, runs and trials)
    sweep.update(command=shlex.join(["python", *argv]), name=name, log=f"{out}/logs/{factor}.log")
    sweep["attempts"].append({"start": time.time()})
    sweep.setdefault("start", sweep["attempts"][-1]["start"])
    log = open(Path(sweep["log"]), "a")
    print(f"sweep {factor}: started, log {sweep['log']}", flush=True)
    # its own session: a Ctrl-C at the terminal reaches the study alone, which passes one SIGINT to each sweep
    proc = subprocess.Popen(
        [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, log


def _ended(record: dict, factor: str, rc: int, out: str) -> None:
    sweep = record["sweeps"][factor]
    attempt = sweep["attempts"][-1]
    attempt.update(end=time.time(), rc=rc)
    sweep.update(rc=rc, end=attempt["end"], wall_s=sum(a["end"] - a["start"] for a in sweep["attempts"] if "end" in a))
    meta = Path(out) / "sweeps" / sweep["name"] / "sweep.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        sweep.update(sweep_id=info["sweep_id"], experiment=info["experiment"])
    print(f"sweep {factor}: exit {rc} after {R.hms(sweep['wall_s'])}", flush=True)


def train_workers() -> list[int]:
    """The process ids of the Ray Train workers alive now: each holds one trial's share of the devices (the
    study's trials have one worker each). Ray's state API, through the dashboard this process's Ray runs."""
    from ray.util.state import list_actors

    alive = list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        limit=10000,  # the state API's most
        timeout=10,
        raise_on_missing_output=False,
    )
    return [a.pid for a in alive if a.pid]


def write_results(record: dict, factors: list[str], results: Path, out: Path) -> list[str]:
    """The result pages; returns the ablations written (a sweep without trial runs has none)."""
    samples = read_samples(out / "gpu_samples.csv")
    note = record["usage"].get("note", "")
    for f, s in record["sweeps"].items():
        s["usage"] = {
            **usage_summary(samples, s.get("start"), s.get("end")),
            "note": note,
            "every_s": record["every_s"],
        }
    record["packing"] = R.study_packing(record, read_workers(out / "workers.csv"))
    written = []
    for f in factors:
        if not record["sweeps"].get(f, {}).get("sweep_id"):
            print(f"results {f}: no sweep to summarise (see {record['sweeps'].get(f, {}).get('log')})", flush=True)
            continue
        try:
            files = R.write_ablation(results / f, f, FACTORS[f].description, record)
        except SSAMBAError as exc:
            print(f"results {f}: {exc}", file=sys.stderr, flush=True)
            continue
        written.append(f)
        print(f"results {f}: {files['readme']}", flush=True)
    return written


# ------------------------------------------------------------------------------ the command
def run_study(args: argparse.Namespace, argv: list[str]) -> int:
    factors = parse_only(args.only)
    seeds = study_seeds(args.seeds, args.smoke)
    sets = settings(args)
    out = args.out.rstrip("/") or "."
    D.find_sets(args.data)
    if args.pilot:
        return _pilot(args, factors, seeds, sets, out)
    options = {"data": args.data, "smoke": args.smoke, "seeds": list(seeds), "set": sets, "only": factors}
    path = Path(out) / "study.json"
    record = load_record(path, options, args.resume)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / ".gitignore").write_text("# the study's run (data, MLflow store, checkpoints): never in git\n*\n")
    commit, dirty = git_state()
    card_info = cards()
    results = Path(args.results or (f"{out}/results" if args.smoke else "docs/results"))
    command = shlex.join(["python", "-m", "ablations.study", *argv])
    record.setdefault("command", command)  # the first invocation; the later ones (--resume) are listed
    record.setdefault("invocations", []).append(
        {"command": command, "commit": commit, "dirty": dirty, "start": time.time()}
    )
    record.setdefault("commit", commit)
    record["dirty"] = record.get("dirty", False) or dirty
    record.update(
        out=out, preset=PRESET, settings=sets, cards=card_info, mlflow_uri=mlflow_uri(out),
        every_s=args.sample_every, results=str(results),
    )  # fmt: skip
    t_start = time.time()
    phase = time.time()
    run_data(record, args, out, path)
    record["phases"]["data"] = record["phases"].get("data", 0) + time.time() - phase
    save(record, path)
    # MLflow's telemetry (nothing to send it to here) sets and unsets an environment variable in a thread of its
    # own, which raced with a trial reading os.environ (KeyError '_MLFLOW_TELEMETRY_SESSION_ID'; Tune retried it)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before Ray starts: its workers inherit it
    mode, record["ray"] = start_ray()
    try:
        return _on_ray(record, args, factors, seeds, sets, out, path, results, t_start)
    finally:
        if mode == "local":
            import ray

            ray.shutdown()  # the Ray this process started (a joined cluster stays up)


def _on_ray(record, args, factors, seeds, sets, out, path, results, t_start) -> int:
    from ssamba.sweep.plan import Resources
    from ssamba.sweep.tracking import Tracker

    mode, ray = record["ray"]["mode"], record["ray"]
    parallel = max(1, min(args.parallel or len(factors), len(factors)))
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else (GPU_SHARE if ray["gpus"] > 0 else 0.0)
    record["gpus_per_trial"] = gpus
    res = Resources(gpus=gpus).fit(ray["cpus"], ray["gpus"], ray["largest_node_cpus"], driver_cpus=0.01 * parallel)
    print(
        f"Ray ({mode}): {ray['cpus']:g} CPUs, {ray['gpus']:g} GPUs; per trial {gpus:g} GPU and "
        f"{res.cpus_per_worker:g} CPUs, {res.concurrent} trials at once; {parallel} sweep(s) at once",
        flush=True,
    )
    options_ = sweep_options(out, seeds, sets, gpus, res.cpus_per_worker, res.concurrent)
    check_plans(factors, options_)
    Tracker(mlflow_uri(out)).client.search_experiments()  # the store's tables, made once before the sweeps race
    sampler = UsageSampler(Path(out) / "gpu_samples.csv", args.sample_every, workers=train_workers).start()
    record["usage"] = {"note": sampler.note}
    phase = time.time()
    previous = signal.signal(signal.SIGTERM, _as_interrupt)
    try:
        run_sweeps(record, factors, options_, out, path, parallel)
    except StudyInterrupted:
        record["wall_s"] = record.get("wall_s", 0) + time.time() - t_start  # this invocation's time, recorded
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sampler.stop()
        record["phases"]["sweeps"] = record["phases"].get("sweeps", 0) + time.time() - phase
        samples = read_samples(Path(out) / "gpu_samples.csv")
        record["usage"] = {**usage_summary(samples), "note": sampler.note, "every_s": args.sample_every}
        record["usage"].update(probe_errors=sampler.errors, probe_error=sampler.last_error)
        save(record, path)
    phase = time.time()
    record["wall_s"] = record.get("wall_s", 0) + time.time() - t_start  # so far: the pages say it
    record["finished_text"] = R.now_text()
    written = write_results(record, factors, results, Path(out))
    record["phases"]["results"] = record["phases"].get("results", 0) + time.time() - phase
    record["wall_s"] += time.time() - phase
    results.mkdir(parents=True, exist_ok=True)
    (results / "study.md").write_text(R.study_page(record))
    save(record, path)
    for f in written:
        print((results / f / f"ablation-{f}.md").read_text())
    failed = [f for f in factors if record["sweeps"].get(f, {}).get("rc") != 0]
    print(
        f"study: {R.hms(record['wall_s'])}; pages in {results}; record {path}"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


def _pilot(args, factors, seeds, sets, out) -> int:
    import torch

    from ablations.pilot import run_pilot

    gpu = torch.cuda.is_available()
    share = args.gpus_per_trial if args.gpus_per_trial is not None else (GPU_SHARE if gpu else 1.0)
    if args.pilot_share is None:
        args.pilot_share = 2 if gpu else 1
    if min(args.pilot_steps, args.pilot_epochs, args.pilot_share) < 1:
        raise ConfigError("--pilot-steps, --pilot-epochs and --pilot-share take 1 or more")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / ".gitignore").write_text("# the study's run (data, MLflow store, checkpoints): never in git\n*\n")
    return run_pilot(args, factors, seeds, sets, out, share, sweep_options)


def _as_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return run_study(args, argv)
    except StudyInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except SSAMBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
