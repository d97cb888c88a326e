"""Ablation summary: the pure table function on synthetic runs, every renderer, the plot, and the CLI
against a real MLflow sqlite store."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pandas as pd
import pytest
from scipy import stats as sps

from ablations import render
from ablations.stats import _t_quantile_fallback
from ablations.table import SummaryError, from_dict, summarize, to_dict

TASKS = ["esc50", "sc"]


def parent(sweep_id="s1", factor="masking", arms=("250", "300", "400"), reference="400", tasks=TASKS, start=0):
    return {
        "run_id": f"parent-{sweep_id}",
        "status": "RUNNING",
        "start_time": start,
        "tags.sweep.role": "parent",
        "tags.sweep.id": sweep_id,
        "tags.ablation.factor": factor,
        "tags.sweep.arms": json.dumps(list(arms)),
        "tags.sweep.reference_arm": reference,
        "tags.sweep.tasks": json.dumps(list(tasks)),
        "tags.sweep.preset": "demo",
    }


_counter = iter(range(1, 10**6))


def trial(
    arm,
    seed,
    metrics,
    *,
    status="FINISHED",
    tstatus="finished",
    factor="masking",
    sweep_id="s1",
    params=None,
    start=None,
    error=None,
    valid=None,
):
    """A trial run; ``valid`` gives task -> best validation score (default: the same as its final score)."""
    i = next(_counter)
    row = {
        "run_id": f"r{i}",
        "status": status,
        "start_time": i if start is None else start,
        "tags.sweep.role": "trial",
        "tags.sweep.id": sweep_id,
        "tags.ablation.factor": factor,
        "tags.ablation.arm": arm,
        "tags.seed": str(seed),
        "tags.trial.status": tstatus,
        "params.seed": str(seed),
        "params.name": "demo",
        "params.pretrain.mask_count": arm,
        "params.finetune.lr": "0.0001",
        "params.data.cache_dir": f"/tmp/cache-{i}",
    }
    row.update({f"params.{k}": v for k, v in (params or {}).items()})
    for k, v in metrics.items():
        row[f"metrics.ft/{k}/final" if k in TASKS else f"metrics.{k}"] = v
        if k in TASKS:
            row[f"metrics.ft/{k}/best_acc"] = (valid or {}).get(k, v)
    if error:
        row["tags.trial.error"] = error
    return row


def frame(*rows):
    return pd.DataFrame(list(rows))


# Per (arm, seed): esc50 / sc values with a large seed effect, so pairing matters.
VALUES = {
    "400": {0: (0.60, 0.80), 1: (0.70, 0.85), 2: (0.80, 0.90)},
    "300": {0: (0.62, 0.79), 1: (0.71, 0.86), 2: (0.83, 0.88)},
    "250": {0: (0.58, 0.81), 1: (0.69, 0.87), 2: (0.77, 0.91)},
}


def full_sweep(extra=()):
    rows = [parent()]
    for arm in ("400", "250", "300"):  # not the natural order on purpose
        for seed, (a, b) in VALUES[arm].items():
            rows.append(
                trial(
                    arm,
                    seed,
                    {
                        "esc50": a,
                        "sc": b,
                        "pretrain/acc": 0.3 + 0.01 * seed,
                        "pretrain/loss": {"250": 2.0, "300": 1.5, "400": 1.8}[arm] + seed,
                        "cost/device_hours": 0.002,
                    },
                )
            )
    return frame(*rows, *extra)


def by_label(table):
    return {r.label: r for r in table.rows}


# ------------------------------------------------------------------------------ the pure function
def test_means_stds_n_and_natural_arm_order():
    extra = [trial("1000", 0, {"esc50": 0.5, "sc": 0.5}), trial("500", 0, {"esc50": 0.5, "sc": 0.5})]
    (t,) = summarize(full_sweep(extra))
    assert t.factor == "masking" and t.reference_arm == "400" and t.tasks == ("esc50", "sc")
    assert [r.label for r in t.rows] == ["250", "300", "400", "500", "1000"]  # sweep.arms, then sorted numerically
    for arm, per_seed in VALUES.items():
        row = by_label(t)[arm]
        for j, task in enumerate(TASKS):
            vals = [v[j] for v in per_seed.values()]
            assert row.cells[task].n == 3
            assert row.cells[task].mean == pytest.approx(sum(vals) / 3)
            assert row.cells[task].std == pytest.approx(math.sqrt(sum((v - sum(vals) / 3) ** 2 for v in vals) / 2))
        assert row.cells["pretrain/acc"].mean == pytest.approx(0.31)
        assert row.cells["cost/device_hours"].mean == pytest.approx(0.002)
        assert row.status_line == "3 finished"
    assert t.total_device_hours == pytest.approx(9 * 0.002)


def test_paired_ci_over_seeds_matches_independent_t_interval():
    # the reference has an extra seed (3) that 300 lacks: only seeds 0-2 are paired
    (t,) = summarize(full_sweep([trial("400", 3, {"esc50": 0.99, "sc": 0.99})]))
    d = by_label(t)["300"].diffs["esc50"]
    diffs = [VALUES["300"][s][0] - VALUES["400"][s][0] for s in range(3)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = sps.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert d.n_pairs == 3 and d.vs == "400"
    assert d.mean == pytest.approx(mean) and d.mean > 0  # 300 beats 400 on every seed
    assert (d.low, d.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    # pairing removes the seed effect: the paired interval is far narrower than the cells' spread
    assert d.high - d.low < by_label(t)["400"].cells["esc50"].std
    assert by_label(t)["400"].diffs["esc50"].note == "reference"
    assert by_label(t)["400"].cells["esc50"].n == 4


def test_reference_override_flips_the_sign():
    (default,) = summarize(full_sweep())
    (t,) = summarize(full_sweep(), reference="250")
    assert t.reference_arm == "250" and by_label(t)["250"].is_reference
    assert by_label(default)["250"].diffs["esc50"].mean < 0
    assert by_label(t)["400"].diffs["esc50"].mean == pytest.approx(-by_label(default)["250"].diffs["esc50"].mean)
    (t2,) = summarize(full_sweep(), reference={"masking": "300"})
    assert t2.reference_arm == "300"
    with pytest.raises(SummaryError, match=r"not an arm of factor 'masking'.*'250', '300', '400'"):
        summarize(full_sweep(), reference="999")


def test_grouping_splits_differing_settings_into_labelled_rows():
    rows = [parent()]
    for seed in range(2):
        rows.append(trial("400", seed, {"esc50": 0.60 + seed / 100, "sc": 0.8}, params={"finetune.lr": "0.001"}))
        rows.append(trial("400", seed, {"esc50": 0.90 + seed / 100, "sc": 0.8}, params={"finetune.lr": "0.0001"}))
        rows.append(trial("250", seed, {"esc50": 0.65 + seed / 100, "sc": 0.8}, params={"finetune.lr": "0.001"}))
        rows.append(trial("300", seed, {"esc50": 0.5, "sc": 0.8}, params={"name": "smoke", "model.depth": "2"}))
        rows.append(trial("300", seed, {"esc50": 0.7, "sc": 0.8}))
    (t,) = summarize(frame(*rows))
    labels = [r.label for r in t.rows]
    assert labels == [
        "250",
        "300 (name=demo, model.depth=<unset>)",
        "300 (name=smoke, model.depth=2)",
        "400 (finetune.lr=0.0001)",
        "400 (finetune.lr=0.001)",
    ]
    rows_ = by_label(t)
    # never averaged together; the per-run cache_dir (noise) did not split anything
    assert rows_["400 (finetune.lr=0.001)"].cells["esc50"].mean == pytest.approx(0.605)
    assert rows_["400 (finetune.lr=0.0001)"].cells["esc50"].mean == pytest.approx(0.905)
    assert all(r.cells["esc50"].n == 2 for r in t.rows)
    # 250 (lr=0.001) is compared with the reference row of the same lr
    d = rows_["250"].diffs["esc50"]
    assert d.vs == "400 (finetune.lr=0.001)" and d.mean == pytest.approx(0.05)
    d = rows_["300 (name=demo, model.depth=<unset>)"].diffs["esc50"]
    assert d.vs == "400 (finetune.lr=0.0001)" and d.mean == pytest.approx(0.7 - 0.905)
    assert rows_["300 (name=smoke, model.depth=2)"].distinct == {"name": "smoke", "model.depth": "2"}


def test_failed_running_incomplete_are_counted_and_excluded():
    extra = [
        trial("300", 3, {"esc50": 0.0, "sc": 0.0}, status="FAILED", tstatus="failed", error="CUDA OOM\ntrace"),
        trial("300", 4, {"esc50": 0.0, "sc": 0.0}, tstatus="failed", error="NaN loss"),  # FINISHED but tagged failed
        trial("300", 5, {"esc50": 0.0}),  # finished without the sc task: incomplete
        trial("300", 6, {"esc50": 0.0, "sc": 0.0}, status="RUNNING", tstatus="running"),
        trial("300", 7, {"esc50": 0.0, "sc": 0.0}, status="KILLED", tstatus="running"),
    ]
    (t,) = summarize(full_sweep(extra))
    row = by_label(t)["300"]
    assert row.counts["finished"] == 3 and row.counts["failed"] == 3
    assert row.counts["incomplete"] == 1 and row.counts["running"] == 1
    assert row.status_line == "3 finished, 3 failed, 1 running, 1 incomplete"
    assert row.cells["esc50"].n == 3 and row.cells["esc50"].mean == pytest.approx(statistics.fmean([0.62, 0.71, 0.83]))
    assert sorted(err for _, _, err in row.failures) == ["", "CUDA OOM\ntrace", "NaN loss"]
    md = render.render_markdown([t])
    assert "3 finished, 3 failed, 1 running, 1 incomplete" in md and "CUDA OOM" in md and "trace" not in md


def test_single_seed_gives_no_std_and_no_interval():
    rows = [
        parent(),
        trial("400", 0, {"esc50": 0.812, "sc": 0.7}),
        trial("250", 0, {"esc50": 0.8, "sc": 0.7}),
        trial("250", 1, {"esc50": 0.9, "sc": 0.7}),
    ]
    (t,) = summarize(frame(*rows))
    ref = by_label(t)["400"]
    assert ref.cells["esc50"].n == 1 and ref.cells["esc50"].std is None
    d = by_label(t)["250"].diffs["esc50"]
    assert d.n_pairs == 1 and d.low is None and d.note == "1 pair, no CI" and d.mean == pytest.approx(-0.012)
    md = render.render_markdown([t])
    assert "0.812 (n=1, no std)" in md and "-0.012 (1 pair, no CI)" in md


def test_best_arm_marked_per_column():
    (t,) = summarize(full_sweep())
    r = by_label(t)
    assert "esc50" in r["300"].best and "esc50" not in r["400"].best  # 0.720 > 0.700 > 0.680
    assert "sc" in r["250"].best and "sc" not in r["300"].best  # 0.863 > 0.850 > 0.843
    assert "pretrain/loss" in r["300"].best  # lowest loss is best
    assert not any("pretrain/acc" in x.best for x in t.rows)  # all equal: nothing marked
    assert not any("cost/device_hours" in x.best for x in t.rows)


def test_duplicate_seed_keeps_the_latest_run():
    (t,) = summarize(full_sweep([trial("400", 0, {"esc50": 0.66, "sc": 0.80}, start=10**7)]))
    row = by_label(t)["400"]
    assert row.counts["duplicate"] == 1 and row.counts["finished"] == 3
    assert row.cells["esc50"].mean == pytest.approx(statistics.fmean([0.66, 0.70, 0.80]))


def test_several_factors_give_separate_tables():
    rows = [
        parent(),
        parent("s2", "direction", ("bidirectional", "unidirectional"), "bidirectional"),
        trial("400", 0, {"esc50": 0.7, "sc": 0.8}),
        trial("unidirectional", 0, {"esc50": 0.6, "sc": 0.7}, factor="direction", sweep_id="s2"),
        trial("bidirectional", 0, {"esc50": 0.7, "sc": 0.8}, factor="direction", sweep_id="s2"),
    ]
    tables = summarize(frame(*rows))
    assert [t.factor for t in tables] == ["direction", "masking"]
    assert [r.arm for r in tables[0].rows] == ["bidirectional", "unidirectional"]
    assert tables[0].parent_run_ids == ("parent-s2",)
    with pytest.raises(SummaryError, match="Fix"):
        summarize(frame(*rows), reference="400")  # not an arm of 'direction'


def test_t_quantile_fallback_matches_scipy():
    for df in (1, 2, 5, 29, 30, 31, 60, 200):
        assert _t_quantile_fallback(0.975, df) == pytest.approx(sps.t.ppf(0.975, df), rel=1e-4)


# ------------------------------------------------------------------------------ renderers
def test_markdown_has_numbers_bold_best_and_intervals():
    (t,) = summarize(full_sweep())
    md = render.render_markdown([t])
    assert "## Ablation: masking (reference arm: 400)" in md
    assert "**0.720 ± 0.105 (n=3)**" in md  # 300 on esc50, best
    d = by_label(t)["300"].diffs["esc50"]
    assert f"+0.020 [{render.fmt(d.low, True)}, {render.fmt(d.high, True)}] (n=3)" in md
    assert md.index("| 250 |") < md.index("| 300 |") < md.index("| 400 |")


def test_csv_parses_back():
    (t,) = summarize(full_sweep())
    rows = list(csv.DictReader(io.StringIO(render.render_csv([t]))))
    assert len(rows) == len(t.rows) * len(t.columns)
    cell = next(r for r in rows if r["row"] == "300" and r["column"] == "esc50")
    assert float(cell["mean"]) == pytest.approx(by_label(t)["300"].cells["esc50"].mean)
    assert float(cell["std"]) == pytest.approx(by_label(t)["300"].cells["esc50"].std)
    assert cell["best"] == "True" and int(cell["n"]) == 3 and cell["diff_vs"] == "400"
    assert float(cell["diff_low"]) == pytest.approx(by_label(t)["300"].diffs["esc50"].low)


def test_latex_has_a_tabular_with_escaped_names():
    (t,) = summarize(full_sweep())
    tex = render.render_latex([t])
    assert r"\begin{tabular}{" in tex and r"\end{tabular}" in tex
    assert r"\textbf{0.720 $\pm$ 0.105 (n=3)}" in tex and r"$\Delta$ esc50" in tex
    assert "pretrain acc" in tex and "_" not in tex.replace(r"\_", "")


def test_json_round_trips():
    (t,) = summarize(full_sweep([trial("300", 9, {}, status="FAILED", tstatus="failed", error="boom")]))
    data = json.loads(render.render_json([t]))
    assert data[0]["rows"][1]["cells"]["esc50"]["mean"] == pytest.approx(by_label(t)["300"].cells["esc50"].mean)
    assert from_dict(data) == [t]
    assert to_dict(from_dict(data)) == data


def test_plot_writes_a_png(tmp_path):
    (t,) = summarize(full_sweep())
    paths = render.plot_all([t], tmp_path / "plots")
    png = paths["masking"]
    assert png.name == "ablation-masking.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# ------------------------------------------------------------------------------ the CLI on a real store
def make_store(tmp_path):
    """A real sqlite store of two masking sweeps: s1 (arms 300 and 400, two seeds each, and one failed
    trial of 300) and s2 (one trial of 400). Returns ``(uri, tracker, parent run ids by sweep id)``."""
    from ssamba.sweep.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri)
    exp = tr.experiment("ssamba-masking", tags={"ssamba.sweep": "1", "ablation.factor": "masking"})
    tr.experiment("unrelated")  # not a sweep experiment: never read
    parents = {}
    for sid in ("s1", "s2"):
        pid, _ = tr.get_or_create_run(
            exp,
            key_tags={"sweep.role": "parent", "sweep.id": sid},
            name=f"sweep-{sid}",
            tags={
                "ablation.factor": "masking",
                "sweep.arms": json.dumps(["300", "400"]),
                "sweep.reference_arm": "400",
                "sweep.tasks": json.dumps(["esc50"]),
                "sweep.preset": "demo",
                "git.commit": "abc",
            },
        )
        parents[sid] = pid
    for arm, accs in (("400", (0.70, 0.80)), ("300", (0.75, 0.86))):
        for seed, acc in enumerate(accs):
            rid, _ = tr.get_or_create_run(
                exp,
                key_tags={"trial.key": f"{arm}-{seed}"},
                name=f"{arm}-s{seed}",
                tags={
                    "mlflow.parentRunId": parents["s1"],
                    "sweep.role": "trial",
                    "sweep.id": "s1",
                    "ablation.factor": "masking",
                    "ablation.arm": arm,
                    "seed": seed,
                    "git.commit": "abc",
                    "trial.status": "finished",
                },
                params={"name": "demo", "seed": seed, "pretrain.mask_count": int(arm), "finetune.lr": 1e-4},
            )
            tr.log_metrics(
                rid,
                {
                    "ft/esc50/final": acc,
                    "ft/esc50/best_acc": acc,  # validation agrees with test here
                    "pretrain/acc": 0.4,
                    "pretrain/loss": 1.0,
                    "cost/device_hours": 0.01,
                },
            )
            tr.finish(rid)
    rid, _ = tr.get_or_create_run(
        exp,
        key_tags={"trial.key": "300-2"},
        name="300-s2",
        tags={
            "mlflow.parentRunId": parents["s1"],
            "sweep.role": "trial",
            "sweep.id": "s1",
            "ablation.factor": "masking",
            "ablation.arm": "300",
            "seed": 2,
            "trial.status": "failed",
            "trial.error": "ValueError: bad clip",
        },
        params={"name": "demo", "seed": 2, "pretrain.mask_count": 300, "finetune.lr": 1e-4},
    )
    tr.finish(rid, "FAILED")
    rid, _ = tr.get_or_create_run(  # sweep s2 holds one more run of arm 400: filtered out by --sweep-id s1
        exp,
        key_tags={"trial.key": "s2-400-5"},
        name="400-s5",
        tags={
            "sweep.role": "trial",
            "sweep.id": "s2",
            "ablation.factor": "masking",
            "ablation.arm": "400",
            "seed": 5,
            "trial.status": "finished",
        },
        params={"name": "demo", "seed": 5, "pretrain.mask_count": 400, "finetune.lr": 1e-4},
    )
    tr.log_metrics(rid, {"ft/esc50/final": 0.1})
    tr.finish(rid)
    return uri, tr, parents


def store_state(tr, parents) -> dict:
    """What a reader must leave alone: every parent's tags, params, metrics, artifacts and status."""
    out = {}
    for sid, pid in parents.items():
        run = tr.client.get_run(pid)
        arts = sorted(f.path for f in tr.client.list_artifacts(pid))
        arts += sorted(f.path for f in tr.client.list_artifacts(pid, "summary"))
        out[sid] = (run.data.tags, run.data.params, run.data.metrics, arts, run.info.status)
    return out


def test_cli_reads_a_real_mlflow_store_and_logs_artifacts_only_with_log(tmp_path, capsys):
    from ablations.summarize import main, parse_reference

    uri, tr, parents = make_store(tmp_path)
    before = store_state(tr, parents)
    assert before["s1"][3] == []  # no artifacts yet

    # the default reads only: tables and plots on this machine, nothing written into the store
    plots = tmp_path / "plots"
    assert main(["--mlflow-uri", uri, "--sweep-id", "s1", "--plot", str(plots)]) == 0
    captured = capsys.readouterr()
    assert "## Ablation: masking (reference arm: 400)" in captured.out and "logged" not in captured.err
    assert (plots / "ablation-masking.png").stat().st_size > 0
    assert store_state(tr, parents) == before
    assert not (tmp_path / "mlartifacts").exists()  # the local store's artifact folder was never made

    # --log writes the table and the plot into the parent run of the summarised sweep
    assert main(["--mlflow-uri", uri, "--sweep-id", "s1", "--plot", str(plots), "--log"]) == 0
    out, err = capsys.readouterr()
    assert "logged the summary on 1 parent run(s) under summary/" in err
    assert "## Ablation: masking (reference arm: 400)" in out
    assert "**0.805 ± 0.078 (n=2)**" in out  # arm 300: (0.75 + 0.86) / 2, best
    assert "| 400 | 2 finished | 0.750 ± 0.071 (n=2) | reference |" in out
    assert "| 300 | 2 finished, 1 failed |" in out and "ValueError: bad clip" in out
    assert "+0.055 [" in out  # paired over seeds 0 and 1
    assert (plots / "ablation-masking.png").stat().st_size > 0
    logged = {f.path for f in tr.client.list_artifacts(parents["s1"], "summary")}
    assert logged == {"summary/ablation-masking.md", "summary/ablation-masking.png"}
    assert not tr.client.list_artifacts(parents["s2"], "summary")  # s2 was not part of this summary
    assert store_state(tr, parents)["s2"] == before["s2"]

    # JSON to a file, every sweep, nothing logged; then a clear error for an unknown experiment
    out_file = tmp_path / "t.json"
    assert main(["--mlflow-uri", uri, "--format", "json", "--out", str(out_file), "--no-log"]) == 0
    (t,) = from_dict(json.loads(out_file.read_text()))
    assert {r.label: r.cells["esc50"].n for r in t.rows} == {"300": 2, "400": 3}
    assert main(["--mlflow-uri", uri, "--experiment", "nope"]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
    assert parse_reference(["masking=300", "norm=rmsnorm"]) == {"masking": "300", "norm": "rmsnorm"}


def test_a_missing_store_is_an_error_and_never_created(tmp_path, monkeypatch, capsys):
    """No store where the summary looks: exit 2 with one line naming the path and the fix, and no file made
    (MLflow would create an empty ~1 MB database for a missing sqlite file)."""
    from ablations.summarize import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases = [
        ([], work / "mlflow.db", "the default, mlflow.db in the current folder"),
        (["--mlflow-uri", "sqlite:///runs/m.db"], work / "runs" / "m.db", "--mlflow-uri sqlite:///runs/m.db"),
        (["--mlflow-uri", f"sqlite:///{tmp_path}/x/m.db"], tmp_path / "x" / "m.db", "--mlflow-uri sqlite:///"),
        (["--mlflow-uri", "mlruns"], work / "mlruns", "--mlflow-uri mlruns"),  # a file store
        (["--mlflow-uri", f"file://{tmp_path}/store"], tmp_path / "store", "--mlflow-uri file://"),
    ]
    for argv, path, origin in cases:
        assert main([*argv, "--log"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: no MLflow store at {path} ("), err
        assert origin in err and "nothing was created" in err and "Fix: " in err and "--mlflow-uri" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert main([]) == 2
    assert f"no MLflow store at {work / 'env.db'} ($MLFLOW_TRACKING_URI=sqlite:///env.db)" in capsys.readouterr().err
    assert list(tmp_path.rglob("*")) == [work]  # nothing created anywhere


def test_an_existing_store_is_read_where_the_default_points(tmp_path, monkeypatch, capsys):
    """Run in the folder holding mlflow.db with no option: the default store is found and read, unchanged."""
    from ablations.summarize import main

    uri, tr, parents = make_store(tmp_path)
    before = store_state(tr, parents)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--sweep-id", "s1"]) == 0
    assert "| 400 | 2 finished | 0.750 ± 0.071 (n=2) | reference |" in capsys.readouterr().out
    assert store_state(tr, parents) == before


def test_mlflow_names_are_spelled_once():
    """Writers and the ablation table use ssamba.base.names: no tag or metric-name literal is written twice."""
    import re
    from pathlib import Path

    from ssamba.base import names as N

    assert N.ft_final("esc50") == "ft/esc50/final" and N.is_final("ft/esc50/final") and not N.is_final("ft/x/acc")
    assert N.column("tags", N.ARM) == "tags.ablation.arm"
    root = Path(__file__).resolve().parents[1]
    literal = re.compile(
        r'"(sweep\.(role|id|arms|tasks|status|trials|failed)|ablation\.(arm|factor)|trial\.'
        r'(key|status|error)|git\.commit|pretrain\.(key|reused)|cost/[a-z_]+|ssamba\.sweep)"'
    )
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for p in [*root.glob("ssamba/**/*.py"), *root.glob("ablations/*.py")]
        if p.name != "names.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert not offenders, offenders


def test_best_is_chosen_on_validation_not_on_test():
    """Arm 300 has the higher test score, arm 400 the higher validation score: 400 is marked best (the
    shown numbers stay the test scores), and a task without validation scores marks nothing."""
    runs = frame(
        parent(),
        *[trial("300", s, {"esc50": 0.9, "sc": 0.5}, valid={"esc50": 0.6, "sc": 0.5}) for s in range(3)],
        *[trial("400", s, {"esc50": 0.8, "sc": 0.4}, valid={"esc50": 0.7, "sc": 0.45}) for s in range(3)],
    )
    (t,) = summarize(runs)
    rows = {r.label: r for r in t.rows}
    assert rows["300"].cells["esc50"].mean == pytest.approx(0.9)  # the test score is what is shown
    assert "esc50" in rows["400"].best and "esc50" not in rows["300"].best
    assert "sc" in rows["300"].best  # validation agrees with test here
    assert rows["400"].selection["esc50"].mean == pytest.approx(0.7)
    assert from_dict(to_dict([t]))[0].rows[1].selection == t.rows[1].selection  # the JSON round trip keeps it
    no_valid = runs.drop(columns=[c for c in runs.columns if "/best_" in c])
    (t2,) = summarize(no_valid)
    assert all("esc50" not in r.best for r in t2.rows)


def test_paired_difference_against_the_scratch_arm():
    p = parent(arms=("300", "400", "scratch"))
    p["tags.sweep.scratch_arm"] = "scratch"
    runs = frame(
        p,
        *[trial("300", s, {"esc50": 0.6 + 0.01 * s, "sc": 0.5}) for s in range(3)],
        *[trial("400", s, {"esc50": 0.7 + 0.02 * s, "sc": 0.5}) for s in range(3)],
        *[trial("scratch", s, {"esc50": 0.5 + 0.01 * s, "sc": 0.5}, params={"pretrain.mask_count": "400"})
          for s in range(3)],
    )  # fmt: skip
    (t,) = summarize(runs)
    assert t.scratch_arm == "scratch"
    rows = {r.arm: r for r in t.rows}
    d = rows["400"].scratch_diffs["esc50"]
    assert d.mean == pytest.approx(0.2 + 0.01) and d.n_pairs == 3  # (0.7+0.02s) - (0.5+0.01s), s = 0..2
    assert rows["300"].scratch_diffs["esc50"].mean == pytest.approx(0.1)
    assert rows["scratch"].scratch_diffs == {}
    md = render.render_markdown([t])
    assert "Δ esc50 vs scratch" in md and "what pretraining adds" in md
    assert from_dict(to_dict([t]))[0].rows[1].scratch_diffs == t.rows[1].scratch_diffs


def test_unfinished_trials_are_left_out_unless_asked():
    runs = frame(
        parent(),
        *[trial("400", s, {"esc50": 0.8, "sc": 0.5}) for s in range(2)],
        trial("400", 2, {"esc50": 0.2}, status="KILLED", tstatus="interrupted"),
    )
    (t,) = summarize(runs)
    (row,) = t.rows
    assert row.counts["interrupted"] == 1 and row.cells["esc50"].n == 2
    assert any("1 unfinished trial(s)" in n and "left out" in n for n in t.notes)
    (t2,) = summarize(runs, include_unfinished=True)
    assert t2.rows[0].cells["esc50"].n == 3 and t2.rows[0].cells["esc50"].mean == pytest.approx(0.6)
