"""The encoder benchmark (python -m ssamba.bench) on CPU: tiny token counts, small models, fake OOMs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from ssamba.bench import __main__ as cli
from ssamba.bench import encoder as bench
from ssamba.bench.encoder import Bench, Settings, compare, headline, model_config, parse_tokens, sweep_lengths
from ssamba.bench.timing import find_max_batch, fits

MODELS = "ssamba-test-bi,ssast-test-mat,ssast-test-fused"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a busy 2-core machine: one thread avoids OpenMP barrier stalls (10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ok(tokens, ms, mem, thr, batch=1):
    return {
        "tokens": tokens,
        "status": "ok",
        "batch": 1,
        "latency_ms": ms,
        "peak_mem_bytes": mem,
        "throughput_seq_s": thr,
        "max_batch": batch,
    }


def test_cpu_run_json_table_headline_plots(tmp_path, capsys):
    res = cli.main(
        [
            "--device",
            "cpu",
            "--models",
            MODELS,
            "--tokens",
            "16,32",
            "--dtypes",
            "fp32,bf16",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--max-batch",
            "3",
            "--train-tokens",
            "32",
            "--train-batch",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["headline"] == json.loads(json.dumps(res["headline"]))
    meta = saved["meta"]
    assert meta["torch"] == torch.__version__ and meta["device_type"] == "cpu" and meta["date"][:2] == "20"
    assert set(saved["models"]) == {"ssamba-test-bi", "ssast-test-mat", "ssast-test-fused"}
    assert saved["models"]["ssamba-test-bi"]["backend"] == "reference"
    assert saved["models"]["ssast-test-mat"]["backend"] == "attention:materialized"
    assert saved["models"]["ssast-test-fused"]["config"]["attention"] == "fused"
    inf = saved["inference"]
    assert len(inf) == 3 * 2 * 2
    for e in inf:
        assert e["status"] == "ok" and e["tokens"] in (16, 32) and e["dtype"] in ("fp32", "bf16")
        assert e["latency_ms"] > 0 and len(e["latency_runs_ms"]) == 2 and e["peak_mem_bytes"] is None
        assert e["max_batch"] == 3 and e["batch_capped"] and e["throughput_seq_s"] > 0
    assert len(saved["train"]) == 6 and all(e["status"] == "ok" and e["step_ms"] > 0 for e in saved["train"])
    # headline: at the length nearest 22000 (32 here), against both baselines, for both dtypes
    hl = saved["headline"]
    assert {(h["dtype"], h["baseline"]) for h in hl} == {
        (d, b) for d in ("fp32", "bf16") for b in ("ssast-test-mat", "ssast-test-fused")
    }
    assert all(h["tokens"] == 32 and "nearest measured to 22000" in h["line"] for h in hl)
    out = capsys.readouterr().out
    assert "| model | dtype | backend | tokens |" in out
    assert "| ssast-test-mat | bf16 | attention:materialized | 32 | 1 |" in out
    assert out.count("HEADLINE [") == 4 and "Paper: 92.7% faster" in out
    assert "ssamba-test-bi     fp32 N=    16 latency" in out  # progress lines
    assert (tmp_path / "latency.png").stat().st_size > 1000
    assert (tmp_path / "throughput.png").exists() and not (tmp_path / "peak.png").exists()  # no memory on CPU
    assert (tmp_path / "table.md").read_text().count("| ssamba-test-bi |") == 4 + 2

    # --resume keeps every point and measures nothing again; --replot redoes only the report
    before = (tmp_path / "results.json").read_text()
    res2 = cli.main(
        [
            "--device",
            "cpu",
            "--models",
            MODELS,
            "--tokens",
            "16,32",
            "--dtypes",
            "fp32,bf16",
            "--train-tokens",
            "32",
            "--out",
            str(tmp_path),
            "--resume",
        ]
    )
    assert res2["inference"] == json.loads(before)["inference"] and res2["train"] == json.loads(before)["train"]
    res3 = cli.main(["--replot", "--out", str(tmp_path)])
    assert [h["line"] for h in res3["headline"]] == [h["line"] for h in res2["headline"]]


def test_paper_protocol(tmp_path):
    res = cli.main(
        [
            "--device",
            "cpu",
            "--models",
            "ssamba-test-uni,ssast-test-fused",
            "--tokens",
            "16",
            "--paper-protocol",
            "--out",
            str(tmp_path),
        ]
    )
    s = res["meta"]["settings"]
    assert (s["dtypes"], s["batch"], s["warmup"], s["repeats"], s["reduce"]) == (["fp32"], 2, 0, 5, "mean")
    e = res["inference"][0]
    assert e["batch"] == 2 and len(e["latency_runs_ms"]) == 5
    assert e["latency_ms"] == pytest.approx(sum(e["latency_runs_ms"]) / 5)
    assert e["throughput_seq_s"] == pytest.approx(2e3 / e["latency_ms"])
    assert res["train"] == [] and (tmp_path / "results_paper.json").exists()
    assert not (tmp_path / "results.json").exists()


def test_headline_arithmetic():
    gib = 2**30
    mib = 2**20
    c = compare(_ok(22000, 28.6, 425 * mib, 56.0), _ok(22000, 158.0, 14 * gib, 6.3))
    assert c["speed_phrase"] == "81.9% faster" and c["faster_pct"] == pytest.approx(81.899, abs=1e-3)
    assert c["latency_ratio"] == pytest.approx(158 / 28.6)
    assert c["memory_phrase"] == "97.0% more memory-efficient"
    assert c["memory_less_pct"] == pytest.approx(100 * (1 - 425 / (14 * 1024)))
    assert c["throughput_ratio"] == pytest.approx(56 / 6.3)
    # the paper's own read-off (0.4 s / 2 GB vs 5 s / 45 GB)
    p = compare(_ok(22000, 400, 2e9, None), _ok(22000, 5000, 45e9, None))
    assert p["speed_phrase"] == "92.0% faster" and p["memory_phrase"] == "95.6% more memory-efficient"
    assert p["throughput_ratio"] is None
    # slower and larger than the fused baseline: said as such, negative percentage
    f = compare(_ok(22000, 28.6, 425 * mib, 56.0), _ok(22000, 13.3, 196 * mib, 77.0))
    assert f["speed_phrase"] == "115.0% slower" and f["faster_pct"] == pytest.approx(-115.04, abs=0.01)
    assert f["memory_phrase"] == "needs 116.8% more memory" and f["memory_less_pct"] < 0
    # headline picks 22000 itself when measured, else the nearest common length, and notes an OOM
    res = {
        "inference": [
            {"model": "ssamba-tiny-bi", "dtype": "fp32", **_ok(16384, 20, 300 * mib, 60)},
            {"model": "ssamba-tiny-bi", "dtype": "fp32", **_ok(22000, 28.6, 425 * mib, 56.0, 64)},
            {"model": "ssast-tiny-mat", "dtype": "fp32", **_ok(16384, 100, 8 * gib, 9)},
            {"model": "ssast-tiny-mat", "dtype": "fp32", "tokens": 22000, "status": "oom"},
            {"model": "ssast-tiny-fused", "dtype": "fp32", **_ok(22000, 13.3, 196 * mib, 77.0, 64)},
        ]
    }
    rows = {r["baseline"]: r for r in headline(res)}
    assert rows["ssast-tiny-mat"]["tokens"] == 16384
    assert (
        "80.0% faster and 96.3% more memory-efficient than SSAST-tiny (materialised)" in rows["ssast-tiny-mat"]["line"]
    )
    assert "ssast-tiny-mat out of memory at 22000" in rows["ssast-tiny-mat"]["line"]
    assert rows["ssast-tiny-fused"]["tokens"] == 22000 and "nearest" not in rows["ssast-tiny-fused"]["line"]
    assert "[fp32, 22000 tokens, batch 1] SSAMBA-tiny (bi) is 115.0% slower" in rows["ssast-tiny-fused"]["line"]


def test_sweep_stops_at_oom():
    calls = []

    def measure(n):
        calls.append(n)
        if n >= 1024:
            raise torch.cuda.OutOfMemoryError("fake")
        return {"latency_ms": 1.0}

    out = list(sweep_lengths([512, 1024, 2048, 4096], measure))
    assert calls == [512, 1024]
    assert [(e["tokens"], e["status"]) for e in out] == [(512, "ok"), (1024, "oom")]
    errs = list(sweep_lengths([8, 16], lambda n: 1 / 0))
    assert len(errs) == 1 and errs[0]["status"] == "error" and "ZeroDivisionError" in errs[0]["error"]


def test_oom_in_words_and_other_errors():
    def raise_(e):
        raise e

    assert not fits(lambda: raise_(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")))
    assert not fits(lambda: raise_(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40 GiB")))
    assert fits(lambda: None)
    with pytest.raises(RuntimeError, match="boom"):
        fits(lambda: raise_(RuntimeError("boom")))
    out = list(sweep_lengths([8, 16], lambda n: raise_(RuntimeError("CUDA out of memory (from an extension)"))))
    assert [e["status"] for e in out] == ["oom"]


class FakeModel(nn.Module):
    """Pretends to run out of memory once batch x tokens passes a budget (tokens from the input frames)."""

    def __init__(self, budget):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.budget = budget

    def encode(self, x):
        b, t = x.shape[0], x.shape[1] // 16 * 8
        if b * t > self.budget:
            raise torch.cuda.OutOfMemoryError(f"fake: {b} x {t}")
        return x * self.w


def test_bench_records_oom_and_stops_growing(tmp_path):
    built = []

    def build(name, tokens, device, train):
        built.append((name, tokens))
        return FakeModel(budget=128 if name == "ssast-tiny-mat" else 10**9)

    s = Settings(
        device="cpu", dtypes=("fp32",), tokens=(16, 32, 64, 128, 256), warmup=0, repeats=1, max_batch=8, train=False
    )
    res = Bench(["ssast-tiny-mat", "ssamba-tiny-bi"], s, tmp_path, build=build).run()
    mat = [e for e in res["inference"] if e["model"] == "ssast-tiny-mat"]
    assert [(e["tokens"], e["status"]) for e in mat] == [(16, "ok"), (32, "ok"), (64, "ok"), (128, "ok"), (256, "oom")]
    # largest batch under the fake budget: 128 // tokens (bisection exact), capped at 8
    assert [e["max_batch"] for e in mat[:4]] == [8, 4, 2, 1]
    assert [e["batch_capped"] for e in mat[:4]] == [True, False, False, False]
    assert [n for m, n in built if m == "ssast-tiny-mat"] == [16, 32, 64, 128, 256]  # nothing past the OOM
    bi = [e for e in res["inference"] if e["model"] == "ssamba-tiny-bi"]
    assert [e["status"] for e in bi] == ["ok"] * 5  # the next model still grows
    assert json.loads((tmp_path / "results.json").read_text())["inference"][4]["status"] == "oom"
    # resume: a model/dtype that stopped is not retried
    built.clear()
    Bench(["ssast-tiny-mat"], replace_tokens(s, (16, 512)), tmp_path, build=build, resume=True).run()
    assert built == []


def replace_tokens(s, tokens):
    from dataclasses import replace

    return replace(s, tokens=tokens)


@pytest.mark.parametrize("limit,cap", [(1, 64), (5, 64), (37, 64), (63, 64), (64, 64), (1000, 64), (100, 100)])
def test_batch_search_bisection(limit, cap):
    probes = []

    def ok(b):
        probes.append(b)
        return fits(lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("fake")) if b > limit else None)

    best, capped = find_max_batch(ok, cap)
    assert best == min(limit, cap) and capped == (limit >= cap)
    assert max(probes) <= cap and len(probes) <= 2 * cap.bit_length()
    assert len(set(probes)) == len(probes)  # no size probed twice


def test_names_and_tokens():
    assert model_config("ssast-tiny-materialized")[0] == "ssast-tiny-mat"
    name, cfg = model_config("ssamba-small-uni")
    assert (name, cfg.embed_dim, cfg.bimamba, cfg.layer_pairing) == ("ssamba-small-uni", 384, False, False)
    assert model_config("ssamba-base-bi")[1].bimamba and model_config("ssast-base-fused")[1].num_heads == 12
    with pytest.raises(ValueError):
        model_config("ssast-tiny-bi")
    assert parse_tokens("512:1024:256,22000,20") == [24, 512, 768, 1024, 22000]
    assert bench.frames(22000) == 16 * 2750
    assert len(bench.ALL_MODELS) == 12


def test_train_ladder_batch_search_and_floors():
    from ssamba.bench import training as T
    from ssamba.bench.ladder import floor_bytes

    for limit in (1, 31, 32, 77, 100, 600, 5000):
        got = T.search_batch(lambda b: b <= limit, 32, 2048)
        assert got <= min(limit, 2048) and got >= 0.93 * min(limit, 2048), (limit, got)
    assert T.search_batch(lambda b: False, 32, 2048) == 0
    _, cfg = model_config("ssamba-tiny-bi")
    f32, f64 = (T.train_floor(cfg, "pretrain", b, "bf16", 3e12, 7e14) for b in (32, 64))
    assert f64["floor_flops"] == 2 * f32["floor_flops"]
    assert f32["floor_bytes"] == 3 * 2 * floor_bytes(cfg, 512, 32, "bf16")  # two MSPM passes, 512 patches
    ft = T.train_floor(cfg, "finetune", 32, "bf16", 3e12, 7e14)
    assert ft["floor_bytes"] == 3 * floor_bytes(cfg, 144, 32, "bf16")  # speechcommands: 12 x 12 patches, one pass
    assert abs(f32["floor_bytes_ms"] - f32["floor_bytes"] / 3e12 * 1e3) < 1e-9


def test_train_ladder_table_relates_ssamba_to_ssast_of_its_size_batch_and_dtype():
    from ssamba.bench import training as T

    P = T.Point
    pts = [
        P("ssamba-tiny-bi", "pretrain", "bf16", 2, "scan", 32, 40.0, 800.0, 2**30).__dict__,
        P("ssamba-small-bi", "pretrain", "bf16", 2, "scan", 32, 80.0, 400.0, 2**30).__dict__,
        P("ssast-tiny-fused", "pretrain", "bf16", None, "SSAST", 32, 50.0, 640.0, 2**30).__dict__,
        P("ssast-tiny-fused", "pretrain", "bf16", None, "SSAST g", 32, 40.0, 800.0, 2**30, graphed=True).__dict__,
        P("ssamba-tiny-bi", "pretrain", "bf16", 0, "ref", 96, error="OOM", max_batch=True).__dict__,
    ]
    md = T.train_markdown({"meta": {"device": "card"}, "points": pts, "profiles": []})
    rows = {
        r.split("|")[2].strip() + "/" + r.split("|")[4].strip(): r
        for r in md.splitlines()
        if r.startswith("| pretrain")
    }
    assert "| 1.25 / 1.00 |" in rows["ssamba-tiny-bi/2. scan"]
    assert "| - / - |" in rows["ssamba-small-bi/2. scan"]  # no SSAST-small measured
    assert "| OOM |" in rows["ssamba-tiny-bi/0. ref"] and "96 (max)" in rows["ssamba-tiny-bi/0. ref"]
