"""The real-data study (python -m ablations.study): its data steps on small published layouts, the pretraining
union, the GPU sampler against a fake nvidia-smi, the packing numbers, its pages against
`python -m ablations.summarize` on a real MLflow store, and (slow) the smoke study of one ablation end to end."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _processes import MARK, kill_marked

from ablations import study_data as D
from ablations import study_report as R
from ablations.usage import UsageSampler, cards, held_time, read_samples, read_workers, usage_summary
from ssamba.base.errors import ManifestError
from ssamba.data.manifest import Manifest, read_manifest, union_manifests

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the pretraining union
def _part(root: Path, name: str, splits: dict[str, int], labels=("a", "b")) -> Manifest:
    rows = [
        {"path": f"{name}/{split}-{i}.wav", "labels": [labels[i % 2]], "split": split, "speaker": f"s{i % 3}"}
        for split, n in splits.items()
        for i in range(n)
    ]
    return Manifest.from_rows(rows, dataset=name, root=root)


def test_union_keeps_the_named_splits_with_absolute_paths_and_apart_labels(tmp_path):
    fsdd = _part(tmp_path / "f", "fsdd", {"train": 4, "validation": 2, "test": 3})
    esc = _part(tmp_path / "e", "esc", {"train": 2, "validation": 1, "test": 1}, labels=("a", "dog"))
    u = union_manifests({"fsdd": fsdd, "esc10": esc}, ("train", "validation"))
    assert len(u) == 4 + 2 + 2 + 1 and set(u.df["split"]) == {"train", "validation"}  # no test row
    assert all(Path(p).is_absolute() for p in u.df["path"])
    assert str(tmp_path / "f" / "fsdd" / "train-0.wav") in set(u.df["path"])  # nothing copied: the files' own paths
    assert u.label_vocab == ["fsdd/a", "fsdd/b", "esc10/a", "esc10/dog"]  # 'a' of two sets stays two classes
    assert dict(u.df["source"].value_counts()) == {"fsdd": 6, "esc10": 3}
    assert set(u.df["speaker"]) == {"fsdd/s0", "fsdd/s1", "fsdd/s2", "esc10/s0", "esc10/s1"}
    assert u.meta["notes"]["union_of"]["fsdd"]["rows"] == 6
    u.write(tmp_path / "u.parquet")  # a round trip through Parquet keeps all of it
    back = read_manifest(tmp_path / "u.parquet")
    assert back.abs_paths() == [Path(p) for p in u.df["path"]] and back.label_vocab == u.label_vocab


def test_union_refuses_a_clip_twice_and_a_part_without_the_splits(tmp_path):
    a = _part(tmp_path, "x", {"train": 2})
    b = _part(tmp_path, "x", {"train": 1})  # x/train-0.wav again
    with pytest.raises(ManifestError, match=r"x/train-0\.wav is in both 'a' and 'b'"):
        union_manifests({"a": a, "b": b})
    c = _part(tmp_path, "y", {"test": 2})
    with pytest.raises(ManifestError, match=r"part 'c' \(dataset 'y'\) has no rows of splits \['train'\].*\['test'\]"):
        union_manifests({"a": a, "c": c})


def test_split_by_fold_and_its_refusals(tmp_path):
    rows = [{"path": f"{f}-{i}.ogg", "labels": ["dog"], "fold": f} for f in range(1, 6) for i in range(2)]
    Manifest.from_rows(rows, dataset="esc10", root=tmp_path).write(tmp_path / "folds.parquet")
    D.split_by_fold(tmp_path / "folds.parquet", tmp_path / "split.parquet")
    m = read_manifest(tmp_path / "split.parquet")
    assert dict(m.df["split"].value_counts()) == {"train": 6, "validation": 2, "test": 2}
    assert set(m.df[m.df["split"] == "test"]["fold"]) == {5} and set(m.df[m.df["split"] == "validation"]["fold"]) == {4}
    with pytest.raises(ManifestError, match=r"folds present \[1, 2, 3, 4, 5\], unmapped \[5\]"):
        D.split_by_fold(
            tmp_path / "folds.parquet", tmp_path / "x.parquet", {1: "train", 2: "train", 3: "train", 4: "test"}
        )


# ------------------------------------------------------------------------------ the data steps on small layouts
def _tone(path: Path, seed: int, seconds: float = 0.3):
    from conftest import write_tone

    sr = 8000 if path.suffix == ".flac" else 16000  # FSDD's rate; the others' 16 kHz
    subtype = "VORBIS" if path.suffix == ".ogg" else "PCM_16"
    return write_tone(path, seconds=seconds, sr=sr, freq=200 + 37 * seed, seed=seed, subtype=subtype)


@pytest.fixture
def small_sets(tmp_path) -> Path:
    """FSDD (2 digits x 6 speakers x 3 takes), ESC-10 (3 classes x 5 folds x 2 clips) and Speech Commands (3 words x
    4 speakers, with its two lists) in their published layouts, short synthetic clips."""
    base = tmp_path / "sets"
    i = 0
    for digit in range(2):
        for spk in ("george", "jackson", "lucas", "nicolas", "theo", "yweweler"):
            for take in range(3):
                _tone(base / "fsdd" / "recordings" / f"{digit}_{spk}_{take}.flac", i := i + 1)
    for c, name in enumerate(("Dog bark", "Rain", "Rooster")):
        for fold in range(1, 6):
            for take in "AB":
                _tone(base / "esc10" / f"{c + 1:03d} - {name}" / f"{fold}-{100 + c}{fold}-{take}.ogg", i := i + 1)
    sc = base / "speech_commands_v0.01_mini"
    for w in ("yes", "no", "up"):
        for spk in ("0a1b2c3d", "1b2c3d4e", "2c3d4e5f", "3d4e5f6a"):
            _tone(sc / w / f"{spk}_nohash_0.wav", i := i + 1)
    (sc / "validation_list.txt").write_text("yes/1b2c3d4e_nohash_0.wav\nno/1b2c3d4e_nohash_0.wav\n")
    (sc / "testing_list.txt").write_text("yes/0a1b2c3d_nohash_0.wav\nup/0a1b2c3d_nohash_0.wav\nup/gone_nohash_0.wav\n")
    return base


def _run_here(step: D.Step) -> None:
    """A data step's command line run in this process: ``-m ssamba.data ARGS`` or ``-c CODE``."""
    if step.argv[:2] == ("-m", "ssamba.data"):
        from ssamba.data.__main__ import main

        assert main(list(step.argv[2:])) == 0, step.text()
    else:
        assert step.argv[0] == "-c", step.text()
        exec(step.argv[1], {})


def test_data_steps_prepare_the_study_data_from_published_layouts(small_sets, tmp_path, cache_env, capsys):
    from ablations.study import ORDER, check_plans, sweep_options

    out = str(tmp_path / "study")
    steps = D.data_steps(str(small_sets), out, workers=1)
    assert steps[0].text() == (
        f"python -m ssamba.data prepare fsdd {small_sets}/fsdd --out {out}/data/fsdd.parquet "
        "--speaker-split 0.67,0.17,0.16 --quiet"
    )
    assert D.run_step(steps[0], tmp_path / "data.log")["rc"] == 0  # a step as its recorded command, in a process
    for step in steps[1:]:  # the others as the same command lines, in this process (no interpreter start-ups)
        _run_here(step)
    facts = {n: D.manifest_facts(f"{out}/data/{n}.parquet") for n in (*D.TASKS, "pretrain")}
    assert facts["fsdd"]["splits"] == {"test": 6, "train": 24, "validation": 6}  # 4 / 1 / 1 speakers of 6 clips
    assert facts["fsdd"]["speakers"] == {"test": 1, "train": 4, "validation": 1}
    assert facts["esc10"]["splits"] == {"test": 6, "train": 18, "validation": 6}  # folds 1-3 / 4 / 5
    assert facts["speechcommands"]["splits"] == {"test": 2, "train": 8, "validation": 2}  # its own lists
    union = facts["pretrain"]
    assert union["splits"] == {"train": 24 + 18 + 8, "validation": 6 + 6 + 2}  # no test clip
    assert union["sources"]["esc10"] == {"train": 18, "validation": 6}
    for name in (*D.TASKS, "pretrain"):
        assert facts[name]["stats"]["n_clips"] == facts[name]["splits"]["train"]  # statistics of the training split
    # every sweep of the study plans on these manifests (each trial resolved), before any Ray
    options = sweep_options(out, (0, 1, 2), ["finetune.fold=0"], 0.5, 7.5, 16)
    check_plans(list(ORDER), options)
    from ablations.run import sweep_argv
    from ssamba.sweep.driver import build_parser
    from ssamba.sweep.factors import MASKING
    from ssamba.sweep.plan import make_plan

    plan = make_plan(MASKING, build_parser(MASKING).parse_args(sweep_argv(MASKING, options)), sweep_id="t")
    assert plan.preset == "study" and plan.seeds == (0, 1, 2) and list(plan.tasks) == list(D.TASKS)
    counts = {c.arm: c.config.pretrain.mask_count for c in plan.cells if c.pretrained}
    assert counts == {"250": 62, "300": 75, "400": 100}  # of 128 patches (256 frames)
    assert [c.arm for c in plan.cells].count("scratch") == 3 and not any(c.pretrained for c in plan.cells[-3:])
    esc = next(t for t in plan.cells[0].tasks if t.name == "esc10").config.finetune
    assert (esc.fold, esc.target_length, esc.loss) == (0, 512, "ce")  # its folds are splits here, not CV
    assert plan.cells[0].config.data.manifest == str(Path(out, "data", "pretrain.parquet").resolve())
    assert plan.resources.gpus == 0.5 and plan.resources.cpus_per_worker == 7.5


def test_the_command_refuses_what_the_study_cannot_be(small_sets, tmp_path, capsys):
    from ablations.study import main

    base = ["--data", str(small_sets), "--out", str(tmp_path / "s")]
    cases = [
        (["--seeds", "2"], "at least 3 seeds, got 2. Fix: --seeds 3"),
        (["--only", "masking,depth"], "unknown ablation(s) ['depth']"),
        (["--set", "model.nrom=rmsnorm"], "model.nrom"),
        (["--resume"], "no study in"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "no fsdd/, esc10/, speech_commands_v0.01_mini/ or speech_commands/ in" in capsys.readouterr().err
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(json.dumps({"options": {}}))
    assert main(base) == 2
    assert "already holds a study" in capsys.readouterr().err
    assert main(base + ["--resume"]) == 2
    assert "--resume: the study in" in capsys.readouterr().err
    assert not (tmp_path / "s" / "data").exists()  # refused before any work


# ------------------------------------------------------------------------------ cards and GPU use
FAKE_SMI = """#!/bin/sh
case "$*" in
  *query-gpu=index,uuid,name*) printf '0, GPU-aaa, NVIDIA H100 80GB HBM3, 81559, 570.1\\n1, GPU-bbb, NVIDIA H100 80GB HBM3, 81559, 570.1\\n' ;;
  *query-gpu=index,uuid,utilization*) printf '0, GPU-aaa, 75, 20480\\n1, GPU-bbb, [N/A], 1024\\n' ;;
  *query-gpu=index*) printf '0\\n1\\n' ;;
  *query-compute-apps*) printf 'GPU-aaa, 4242, 10000\\nGPU-aaa, 4343, 10000\\n' ;;
  *) exit 9 ;;
esac
"""


def test_cards_and_sampled_use_come_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(FAKE_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    info = cards()
    assert info["source"] == "nvidia-smi" and [g["name"] for g in info["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2
    assert info["text"] == "2 x NVIDIA H100 80GB HBM3" and info["gpus"][0]["memory_mib"] == 81559
    alive = iter([[11, 12], RuntimeError("state API timed out"), [12]] + [[]] * 1000)

    def workers():
        x = next(alive)
        if isinstance(x, Exception):
            raise x
        return x

    sampler = UsageSampler(tmp_path / "samples.csv", every_s=0.05, workers=workers)
    assert sampler.available and sampler.note == ""
    sampler.start()
    time.sleep(0.6)
    sampler.stop()
    rows = read_samples(tmp_path / "samples.csv")
    assert len(rows) >= 4 and {r["gpu"] for r in rows} == {0, 1}
    u = usage_summary(rows)
    g0, g1 = u["gpus"]["0"], u["gpus"]["1"]
    assert g0["mean_utilization"] == 75 and g0["processes_seen"] == 2 and g0["max_processes"] == 2
    assert g0["peak_memory_mib"] == 20480 and g0["idle_share"] == 0
    assert g1["mean_utilization"] is None and g1["processes_seen"] == 0  # [N/A]: no number, not a zero
    assert u["mean_utilization"] == 75
    assert usage_summary(rows, t0=rows[-1]["time"] + 1)["samples"] == 0  # a window after the samples
    w = read_workers(tmp_path / "workers.csv")
    assert [r["workers"] for r in w[:2]] == [2, 1] and w[0]["pids"] == ["11", "12"]  # the failed probe: no row
    assert sampler.errors == 1 and sampler.last_error == "RuntimeError: state API timed out"


def test_without_a_gpu_the_record_says_so_and_the_workers_are_sampled(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    info = cards()
    assert info["gpus"] == [] and info["text"].startswith("CPU only (no GPU")
    sampler = UsageSampler(tmp_path / "samples.csv", every_s=0.05, workers=lambda: [7]).start()
    time.sleep(0.2)
    sampler.stop()
    assert not sampler.available and "no GPU" in sampler.note and not (tmp_path / "samples.csv").exists()
    assert read_workers(tmp_path / "workers.csv")[0]["workers"] == 1
    assert R.usage_lines({"note": sampler.note}) == [f"- GPU utilisation: {sampler.note}"]


def test_packing_compares_the_makespan_with_the_held_gpu_time():
    # two GPUs, half a GPU per trial (four fit at once); workers sampled every 10 s from t=100 to t=200
    counts = [4, 4, 4, 3, 3, 2, 0, 0, 2, 1]
    rows = [
        {"time": 100 + 10 * i, "workers": n, "pids": [str(1000 + j) for j in range(n)]} for i, n in enumerate(counts)
    ]
    h = held_time(rows, 100, 200, every_s=10)
    assert h["worker_s"] == 230 and h["most"] == 4 and h["mean"] == pytest.approx(2.3) and h["samples"] == 10
    gap = [r for r in rows if r["time"] != 150]
    # sampled every 3 s, a sample holds at most 9 s: these 10 s gaps (and the missed one at 150) count 9 s each
    assert held_time(gap, 100, 200, every_s=3)["worker_s"] == 9 * (4 + 4 + 4 + 3 + 3 + 0 + 0 + 2 + 1)
    p = R.packing(100, 200, rows, 10, share=0.5, devices=2, unit="GPU")
    assert p["makespan_s"] == 100 and p["capacity"] == 4
    assert p["held_device_h"] == pytest.approx(115 / 3600) and p["ideal_s"] == pytest.approx(57.5)
    assert p["ratio"] == pytest.approx(100 / 57.5) and p["idle_device_h"] == pytest.approx((200 - 115) / 3600)
    # no ramp (a worker in the first sample), a 10 s tail after the last sample with one; in between, from
    # t=100 to 190: 2 GPUs x 90 s - 105 held (the last sample's 10 s x 0.5 GPU are after it)
    assert p["ramp_s"] == 0 and p["tail_s"] == 10
    assert p["idle_between_device_h"] == pytest.approx((2 * 90 - (115 - 5)) / 3600)
    trials = [{"start": 100, "end": 160, "device_hours": 0.01}, {"start": 110, "end": 190, "device_hours": None},
              {"start": 120, "end": None, "device_hours": None}]  # fmt: skip
    p["trials"] = R.trials_summary(trials)
    assert p["trials"] == {"trials": 2, "span_s": 90, "stage_device_h": 0.01}
    text = "\n".join(R.packing_lines(p))
    assert "**1.74x**" in text and "4 trials fit at once" in text and "4 at most" in text and "2 trial runs" in text
    assert (
        "0 s before the first trial worker, 10 s after the last" in text
        and "4 trial worker processes seen, 2.0 per GPU" in text
    )
    assert R.packing_lines({"trials": {"trials": 0}}) == ["- 0 trials ended: no packing to measure"]


# ------------------------------------------------------------------------------ the pages against summarize
def _trial_params(factor: str, arm: str, seed: int) -> dict:
    norm = arm if factor == "norm" and arm != "scratch" else "layernorm"
    return {"seed": seed, "model.norm": norm, "model.depth": 24, "finetune.epochs": 20, "finetune.metric": "acc",
            "tasks.esc10.target_length": 512, "finetune.target_length": 128}  # fmt: skip


def _study_store(tmp_path):
    """A real sqlite store: a norm sweep of the study (arms layernorm, rmsnorm, scratch; seeds 0-2; three tasks;
    one failed trial) and a direction sweep that the norm pages must leave out."""
    from ssamba.base import names as N
    from ssamba.sweep.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri)
    tasks = list(D.TASKS)
    values = {"layernorm": 0.70, "rmsnorm": 0.72, "scratch": 0.55}
    for factor, arms, sid in (("norm", ["layernorm", "rmsnorm"], "norm-1"), ("direction", ["bidirectional"], "dir-1")):
        exp = tr.experiment(f"ssamba-{factor}", {N.EXPERIMENT_MARK: "1", N.FACTOR: factor})
        parent, _ = tr.get_or_create_run(
            exp,
            key_tags={N.SWEEP_ID: sid, N.ROLE: N.PARENT},
            name=sid,
            tags={N.FACTOR: factor, N.SWEEP_ARMS: json.dumps(arms + ["scratch"]), N.SWEEP_REFERENCE: arms[0],
                  N.SWEEP_TASKS: json.dumps(tasks), N.SWEEP_SCRATCH: "scratch", N.GIT_COMMIT: "abc1234"},
            params={"gpus_per_trial": 0.5, "cpus_per_worker": 8, "workers_per_trial": 1},
        )  # fmt: skip
        for arm in arms + ["scratch"]:
            for seed in range(3):
                rid, _ = tr.get_or_create_run(
                    exp,
                    key_tags={N.SWEEP_ID: sid, N.TRIAL_KEY: f"{arm}-{seed}"},
                    name=f"{arm}-s{seed}",
                    tags={
                        N.MLFLOW_PARENT: parent,
                        N.ROLE: N.TRIAL,
                        N.FACTOR: factor,
                        N.ARM: arm,
                        N.SEED: seed,
                        N.GIT_COMMIT: "abc1234",
                        N.TRIAL_STATUS: "finished",
                    },
                    params=_trial_params(factor, arm, seed),
                )
                metrics = {N.COST_DEVICE_HOURS: 0.05, "pretrain/acc": 0.3 + 0.01 * seed, "pretrain/loss": 2.0}
                for i, t in enumerate(tasks):
                    v = values.get(arm, 0.6) + 0.02 * seed - 0.1 * i
                    metrics.update({N.ft_final(t): v, f"{N.ft(t)}/best_acc": v + 0.01})
                tr.log_metrics(rid, metrics)
                tr.finish(rid)
        rid, _ = tr.get_or_create_run(
            exp,
            key_tags={N.SWEEP_ID: sid, N.TRIAL_KEY: "failed"},
            name="failed",
            tags={N.MLFLOW_PARENT: parent, N.ROLE: N.TRIAL, N.FACTOR: factor, N.ARM: arms[-1], N.SEED: 3,
                  N.TRIAL_STATUS: "failed", N.TRIAL_ERROR: "NonFiniteLossError: loss is nan at step 7"},
            params=_trial_params(factor, arms[-1], 3),
        )  # fmt: skip
        tr.finish(rid, "FAILED")
    return uri


def _record(tmp_path, uri: str) -> dict:
    steps = [{"name": "prepare fsdd", "command": "python -m ssamba.data prepare fsdd d/fsdd --out s/data/fsdd.parquet",
              "seconds": 0.7, "rc": 0}]  # fmt: skip
    manifests = {
        "fsdd": {"splits": {"train": 2000, "validation": 500, "test": 500}, "classes": 10},
        "esc10": {"splits": {"train": 240, "validation": 80, "test": 80}, "classes": 10},
        "speechcommands": {"splits": {"train": 205, "validation": 44, "test": 51}, "classes": 30},
        "pretrain": {"path": "s/data/pretrain.parquet", "splits": {"train": 2445, "validation": 624},
                     "sources": {"esc10": {"train": 240}, "fsdd": {"train": 2000}, "speechcommands": {"train": 205}}},
    }  # fmt: skip
    now = time.time()
    sweep = {"sweep_id": "norm-1", "command": "python -m ablations.run norm --preset study", "wall_s": 1800.0, "rc": 0,
             "start": now - 1800, "end": now, "usage": {"note": "no GPU: test"}}  # fmt: skip
    other = {"sweep_id": "dir-1", "command": "python -m ablations.run direction", "wall_s": 900.0, "rc": 0,
             "start": now - 1000, "end": now - 100}  # fmt: skip
    return {
        "command": "python -m ablations.study --data d --out s",
        "commit": "abc1234",
        "dirty": False,
        "out": "s",
        "preset": "study",
        "settings": ["finetune.fold=0"],
        "cards": {"text": "8 x NVIDIA H100 80GB HBM3"},
        "ray": {"cpus": 128.0, "gpus": 8.0},
        "mlflow_uri": uri,
        "finished_text": "2026-12-07 12:00 UTC",
        "wall_s": 3600.0,
        "phases": {"data": 60.0, "sweeps": 3500.0, "results": 40.0},
        "data": {"steps": steps},
        "manifests": manifests,
        "sweeps": {"norm": sweep, "direction": other},
        "every_s": 5.0,
        "gpus_per_trial": 0.5,
        "usage": {"note": "no GPU: test"},
    }


def test_the_pages_hold_exactly_what_summarize_prints_and_keep_the_reading(tmp_path, capsys):
    from ablations.summarize import main as summarize_main

    uri = _study_store(tmp_path)
    record = _record(tmp_path, uri)
    now = record["sweeps"]["norm"]["end"]
    workers = [{"time": now - 1800 + 5 * i, "workers": 16, "pids": []} for i in range(360)]  # all 16 slots held
    record["packing"] = R.study_packing(record, workers)
    assert record["packing"]["ratio"] == pytest.approx(1.0) and record["packing"]["trials"]["trials"] == 17
    files = R.write_ablation(tmp_path / "results" / "norm", "norm", "RMSNorm vs LayerNorm", record)
    for fmt, ext in (("markdown", "md"), ("csv", "csv"), ("latex", "tex"), ("json", "json")):
        assert summarize_main(["--mlflow-uri", uri, "--sweep-id", "norm-1", "--format", fmt]) == 0
        printed = capsys.readouterr().out
        assert files[fmt].name == f"ablation-norm.{ext}"
        assert files[fmt].read_bytes() == printed.encode(), fmt  # byte for byte
    table = files["markdown"].read_text()
    assert "| rmsnorm | 3 finished, 1 failed |" in table and "Δ fsdd vs scratch" in table
    assert "bidirectional" not in table  # the other sweep of the store stayed out
    readme = files["readme"].read_text()
    assert table.rstrip("\n") in readme  # the table, verbatim
    for needed in (
        f"`python -m ablations.summarize --mlflow-uri {uri} --sweep-id norm-1`",
        "commit `abc1234`",
        "8 x NVIDIA H100 80GB HBM3",
        "python -m ablations.study --data d --out s",
        "python -m ssamba.data prepare fsdd",
        "python -m ablations.run norm --preset study",
        "2445 training clips (esc10 240, fsdd 2000, speechcommands 205) and 624 validation clips",
        "| esc10 | 240 / 80 / 80 | 10 | 512 |",  # the task's own clip length, from its param
        "| fsdd | 2000 / 500 / 500 | 10 | 128 |",
        "this sweep's wall time: 30 min 00 s",
        "GPU utilisation: no GPU: test",
        "![norm: mean ± std over seeds per arm](ablation-norm.png)",
    ):
        assert needed in readme, needed
    for placeholder in ("None", "nan", "TODO", "TBD", "{", "}"):
        assert placeholder not in readme.replace(table, ""), placeholder
    assert (tmp_path / "results" / "norm" / "ablation-norm.png").stat().st_size > 5000
    run = json.loads((tmp_path / "results" / "norm" / "run.json").read_text())
    assert run["sweep"]["sweep_id"] == "norm-1" and run["trials"]["trials"] == 10  # its own ended trials
    assert "alongside direction" in readme and "**1.00x**" in readme
    # a person writes the reading; the next regeneration keeps it and changes nothing else of theirs
    written = "Two of three tasks favour rmsnorm; the intervals all cross zero.\n\nNot enough seeds to say more."
    text = readme.replace(R.READING_END, written + "\n" + R.READING_END)
    files["readme"].write_text(text)
    R.write_ablation(tmp_path / "results" / "norm", "norm", "RMSNorm vs LayerNorm", record)
    assert files["readme"].read_text() == text
    page = R.study_page({**record, "packing": record["packing"]})
    assert "[norm](norm/README.md)" in page and "makespan / that = **" in page and "None" not in page


# ------------------------------------------------------------------------------ the smoke study, end to end
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_study_of_one_ablation_end_to_end(shared_data, cache_env, tmp_path):
    """`python -m ablations.study --smoke --only norm` on the real data sets: data, a local Ray, the sweep (3 arms,
    one seed), the pages; the table is what summarize prints from the study's store."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", SSAMBA_CACHE=str(cache_env), RAY_TMPDIR=str(ray_tmp))
    env.update({MARK: str(ray_tmp), "PYTHONPATH": str(ROOT)})
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "ablations.study",
        "--data",
        str(shared_data),
        "--out",
        str(out),
        "--smoke",
        "--only",
        "norm",
    ]
    try:
        t0 = time.time()
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=840)
        print(f"smoke study of norm: {time.time() - t0:.0f} s")
    finally:
        kill_marked(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "study.json").read_text())
    assert record["sweeps"]["norm"]["rc"] == 0 and "no GPU" in record["usage"]["note"]
    pack = record["packing"]  # the trial workers, sampled from Ray's state API: 3 trials, at most 2 at once (2 CPUs)
    assert pack["samples"] > 0 and pack["workers_seen"] >= 3 and 1 <= pack["max_concurrency"] <= 2, pack
    assert pack["trials"]["trials"] == 3 and pack["ratio"] >= 1.0
    assert record["manifests"]["pretrain"]["splits"] == {"train": 2000 + 240 + 205, "validation": 500 + 80 + 44}
    page = out / "results" / "norm"
    summarize = subprocess.run(
        [sys.executable, "-m", "ablations.summarize", "--mlflow-uri", record["mlflow_uri"], "--sweep-id",
         record["sweeps"]["norm"]["sweep_id"]], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert summarize.returncode == 0 and (page / "ablation-norm.md").read_text() == summarize.stdout
    assert "| layernorm | 1 finished |" in summarize.stdout and "| scratch | 1 finished |" in summarize.stdout
    readme = (page / "README.md").read_text()
    assert "CPU only (no GPU" in readme and R.READING_START in readme and "makespan / that = **" in readme
    assert (out / "results" / "study.md").is_file() and (page / "ablation-norm.png").is_file()
    assert (out / ".gitignore").read_text().splitlines()[-1] == "*"  # the run's folder stays out of git


# ------------------------------------------------------------------------------ the pilot
def test_pilot_cost_scales_each_stage_to_its_budget():
    from ablations.pilot import full_steps, stage_estimate, study_cost

    pre = {"stage": "pretrain", "steps": 200, "fit_s": 50.0, "wall_s": 60.0, "full_steps": 2000}
    ft = {"stage": "ft/a", "steps": 124, "fit_s": 12.0, "wall_s": 20.0, "epochs": 2, "full_epochs": 20, "max_steps": 0}
    capped = {**ft, "stage": "ft/b", "max_steps": 100}
    assert full_steps(pre) == 2000 and full_steps(ft) == 1240 and full_steps(capped) == 100
    assert stage_estimate(pre) == pytest.approx(50.0 / 200 * 2000 + 10.0)
    assert stage_estimate(ft) == pytest.approx(12.0 / 124 * 1240 + 8.0)
    alone = [pre, ft]
    shared = [[{**pre, "fit_s": 60.0}], [{**pre, "fit_s": 70.0}]]  # 1.2x and 1.4x the step alone
    cost = study_cost(alone, shared, {"trials": 12, "pretrainings": 7}, 0.5)  # 10 pretrain, 3 of them reuse
    trial = stage_estimate(pre) + stage_estimate(ft)
    assert cost["trial_pretrained_s"] == pytest.approx(trial)
    assert cost["trial_scratch_s"] == pytest.approx(stage_estimate(ft))
    assert cost["share_slowdown"] == pytest.approx(1.3)
    held = (7 * stage_estimate(pre) + 12 * stage_estimate(ft)) * 1.3 * 0.5 / 3600
    assert cost["gpu_hours_held"] == pytest.approx(held) and cost["makespan_h"]["8"] == pytest.approx(held / 8)
    assert study_cost(alone, None, {"trials": 1, "pretrainings": 1}, 1.0)["share_slowdown"] == 1.0


def test_the_study_sweeps_share_their_pretrainings(small_sets, tmp_path, cache_env, capsys):
    """The four ablations' reference arms are one config: with the study's --pretrain-store each seed's reference
    pretraining is one folder for all four sweeps (computed once, reused by the others), 21 of 30 at 3 seeds."""
    from ablations.pilot import study_counts
    from ablations.study import ORDER, STUDY_SET, sweep_options

    out = str(tmp_path / "study")
    for step in D.data_steps(str(small_sets), out, workers=1):
        if step.name.startswith(("prepare", "esc10", "pretraining")):
            _run_here(step)
    options = sweep_options(out, (0, 1, 2), list(STUDY_SET), 0.5, 2, 2)
    assert options[options.index("--pretrain-store") + 1] == f"{out}/pretrain"
    assert study_counts(list(ORDER), options) == {"trials": 42, "pretrainings": 21}
    own = [o for i, o in enumerate(options) if o != "--pretrain-store" and options[i - 1] != "--pretrain-store"]
    assert study_counts(["masking", "norm"], own) == {"trials": 5 * 3 + 2 * 3, "pretrainings": 5 * 3}


def test_pilot_times_one_trial_of_the_study_on_the_real_path(small_sets, tmp_path, cache_env):
    """--pilot: the data steps, the reference arm's trial planned by the sweep's code, its stages run capped in
    processes of their own (twice at once with --pilot-share 2), and the cost worked out and recorded."""
    out = tmp_path / "study"
    argv = ["--data", str(small_sets), "--out", str(out), "--smoke", "--only", "norm", "--pilot",
            "--pilot-steps", "2", "--pilot-epochs", "1", "--pilot-share", "2"]  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "ablations.study", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads((out / "pilot.json").read_text())
    assert rec["factor"] == "norm" and rec["arm"] == "layernorm"  # the reference arm
    stages = [r["stage"] for r in rec["stages"]]
    assert stages == ["pretrain", "ft/fsdd", "ft/esc10", "ft/speechcommands"]
    assert rec["stages"][0]["steps"] == 2 and all(r["steps"] >= 1 and r["fit_s"] > 0 for r in rec["stages"])
    assert len(rec["shared"]) == 2 and all(rows[0]["steps"] == 2 for rows in rec["shared"])
    assert rec["cost"]["trials"] == {"trials": 3, "pretrainings": 2}  # layernorm, rmsnorm, scratch
    assert rec["cost"]["gpu_hours_held"] > 0
    assert "device-hours held" in res.stdout and "| pretrain | 2 |" in res.stdout
    assert (out / "data" / "pretrain.parquet").is_file() and (out / ".gitignore").is_file()
    assert not (out / "mlflow.db").exists()  # no MLflow, no Ray: nothing but the timing
