"""The chunked inference scan (ssamba/ops/chunk_scan.py) on CPU: its three-pass chunk algebra and its
parameter/group indexing against the reference scan, its use by the fast mixer, the chunk planning, the
build (where nvcc exists) and the ctypes mirror of the kernel's parameter struct. The CUDA kernel itself
is checked against the reference in tests/test_gpu.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch

import ssamba.model.mixer as mixer_mod
import ssamba.ops.chunk_scan as CS
from ssamba.config import model_preset
from ssamba.model.mixer import Mamba
from ssamba.ops.scan import selective_scan_ref


def inputs(b=2, ch=12, L=100, n=4, groups=None, rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = rows or ch
    u = torch.randn(b, ch, L, generator=g, dtype=torch.float64)
    delta = 0.5 * torch.randn(b, ch, L, generator=g, dtype=torch.float64)
    shape = (b, groups, n, L) if groups else (b, n, L)
    B = torch.randn(shape, generator=g, dtype=torch.float64)
    C = torch.randn(shape, generator=g, dtype=torch.float64)
    A = -torch.rand(rows, n, generator=g, dtype=torch.float64) * 3 - 0.05
    D = torch.randn(rows, generator=g, dtype=torch.float64)
    bias = torch.randn(rows, generator=g, dtype=torch.float64) * 0.3
    return u, delta, A, B, C, D, bias


@pytest.mark.parametrize("chunk_len", [32, 64, 128])
@pytest.mark.parametrize("softplus", [True, False])
def test_three_passes_equal_one_scan(chunk_len, softplus):
    u, delta, A, B, C, D, bias = inputs(L=150)  # 150: chunks of 32/64/128 with a partial last one
    ref = selective_scan_ref(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=softplus)
    got = CS.chunk_scan_emulated(u, delta, A, B, C, D, bias, softplus, chunk_len=chunk_len)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_long_decay_across_many_chunks():
    """Large dt: the carried state is mostly decay; small dt: it carries far. Both across 10 chunks."""
    u, delta, A, B, C, D, bias = inputs(b=1, ch=6, L=320, n=8)
    for scale in (4.0, 0.01):
        d = delta.abs() * scale
        ref = selective_scan_ref(u, d, A, B, C, None)
        got = CS.chunk_scan_emulated(u, d, A, B, C, None, chunk_len=32)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_groups_and_parameter_rows_without_repeats():
    """Channels (direction, batch, i) with parameters per (direction, i): the fast mixer's layout."""
    dirs, batch, di = 2, 3, 4
    ch = dirs * batch * di
    u, delta, A, B, C, D, bias = inputs(b=1, ch=ch, L=70, groups=dirs * batch, rows=dirs * di, seed=3)

    def rep(t):
        return t.view(dirs, 1, di, *t.shape[1:]).expand(dirs, batch, di, *t.shape[1:]).reshape(ch, *t.shape[1:])

    ref = selective_scan_ref(u, delta, rep(A), B, C, rep(D), delta_bias=rep(bias), delta_softplus=True)
    got = CS.chunk_scan_emulated(u, delta, A, B, C, D, bias, True, param_repeat=batch, param_period=di, chunk_len=32)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_parameter_sets_and_a_log():
    """A, D, delta_bias as pairs of per-direction tensors, A given as A_log: same as the concatenated rows."""
    dirs, batch, di = 2, 2, 4
    ch = dirs * batch * di
    u, delta, A, B, C, D, bias = inputs(b=1, ch=ch, L=64, groups=dirs * batch, rows=dirs * di, seed=5)
    want = CS.chunk_scan_emulated(u, delta, A, B, C, D, bias, True, param_repeat=batch, param_period=di)
    a_log = torch.log(-A)
    got = CS.chunk_scan_emulated(
        u,
        delta,
        (a_log[:di], a_log[di:]),
        B,
        C,
        (D[:di], D[di:]),
        (bias[:di], bias[di:]),
        True,
        param_repeat=batch,
        param_period=di,
        a_log=True,
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="D must be given per set exactly when A is"):
        CS.chunk_scan_emulated(u, delta, (a_log[:di], a_log[di:]), B, C, D, None, param_repeat=batch, param_period=di)


def test_bad_shapes_name_the_argument():
    u, delta, A, B, C, D, bias = inputs()
    with pytest.raises(ValueError, match="A has 12 rows"):
        CS.chunk_scan_emulated(u, delta, A, B, C, D, bias, param_repeat=2)
    with pytest.raises(ValueError, match="B must be"):
        CS.chunk_scan_emulated(u, delta, A, B[..., :-1], C)
    with pytest.raises(ValueError, match="D must be"):
        CS.chunk_scan_emulated(u, delta, A, B, C, D[:-1])
    with pytest.raises(ValueError, match="same number of groups"):
        CS.chunk_scan_emulated(
            u, delta, A, B.view(2, 1, 4, 100).expand(2, 3, 4, 100), C.view(2, 1, 4, 100).expand(2, 5, 4, 100)
        )


def test_chunk_plan():
    sms = 132
    # batch 1, 768 channels, 22528 steps: chunks of 256 (the measured best on an H200)
    assert CS.plan_chunk_len(1, 768, 22528, sms) == 256
    # shorter: never below the minimum chunk
    assert CS.plan_chunk_len(1, 768, 8192, sms) == CS.MIN_CHUNK
    # 16 x 768 channels: a few chunks, each a multiple of the tile
    c = CS.plan_chunk_len(16, 768, 22528, sms)
    assert c % CS.TILE == 0 and 256 < c < 22528 and 16 * 768 * (-(-22528 // c)) >= sms * CS.THREADS_PER_SM
    # enough channel threads alone: one chunk covering the (tile-rounded) sequence
    assert CS.plan_chunk_len(64, 768, 22001, sms) == 22016
    assert CS.plan_chunk_len(1, 32, 100, sms) == 128


def test_small_scans_stay_on_mamba_ssm():
    sms = 132
    assert CS.worthwhile(768, 22528, sms) and CS.worthwhile(768, 8192, sms) and CS.worthwhile(64 * 768, 512, sms)
    assert not CS.worthwhile(768, 1024, sms) and not CS.worthwhile(2 * 384, 513, sms)


def mixer(bimamba=True):
    c = replace(model_preset("test", "ssamba"), scan_backend="reference", bimamba=bimamba)
    torch.manual_seed(0)
    m = Mamba(c, "reference")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("bimamba", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_fast_mixer_uses_chunked_scan_at_inference_only(monkeypatch, bimamba, reverse):
    calls = []

    def emulated(*a, **kw):
        calls.append(1)
        return CS.chunk_scan_emulated(*a, chunk_len=32, **kw)

    monkeypatch.setattr(mixer_mod, "chunk_scan_fn", lambda device=None, threads=None, length=None: emulated)
    m = mixer(bimamba)
    x = torch.randn(3, 77, m.in_proj.in_features)
    m.fast = False
    with torch.no_grad():
        ref = m(x, reverse=reverse)
    m.fast, m.pad_to_chunk = True, True
    with torch.no_grad():
        got = m(x, reverse=reverse)
    assert calls, "the chunked scan was not used at inference"
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    calls.clear()
    out = m(x, reverse=reverse)  # gradients needed: mamba-ssm's (here the reference) scan
    assert not calls and out.requires_grad
    torch.testing.assert_close(out.detach(), ref, atol=2e-5, rtol=1e-4)
    m.chunk_scan = False  # the switch turns it off at inference too
    with torch.no_grad():
        m(x)
    assert not calls


def test_unavailable_without_cuda_or_when_disabled(monkeypatch):
    assert CS.chunk_scan_fn(torch.device("cpu")) is None
    monkeypatch.setenv("SSAMBA_CHUNK_SCAN", "0")
    assert CS.chunk_scan_fn() is None


def test_build_without_nvcc_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(CS, "find_nvcc", lambda: None)
    monkeypatch.setenv("SSAMBA_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(CS.KernelBuildError, match="nvcc not found"):
        CS.build_library("sm_90")


def test_params_struct_mirrors_the_kernel():
    """Field order and names of _Params match struct Params in chunk_scan.cu (ctypes passes it by pointer)."""
    src = CS.SOURCE.read_text()
    body = re.search(r"struct Params \{(.*?)\};", src, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = [
        n
        for decl in body.split(";")
        if decl.strip()
        for n in re.findall(r"\*?\s*(\w+)\s*(?:,|$)", decl.strip().split(None, 1)[1].replace("*", " "))
    ]
    assert names == [f[0] for f in CS._Params._fields_]
    assert ctypes_size() == 8 * len(names)


def ctypes_size():
    import ctypes

    return ctypes.sizeof(CS._Params)


@pytest.mark.skipif(CS.find_nvcc() is None, reason="nvcc not installed")
def test_kernel_compiles_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSAMBA_KERNEL_CACHE", str(tmp_path))
    path = CS.build_library("sm_90")
    assert "compiling chunk_scan.cu for sm_90" in capsys.readouterr().err  # said before the wait
    assert path.exists() and path.stat().st_size > 10_000
    mtime = path.stat().st_mtime_ns
    assert CS.build_library("sm_90") == path and path.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert capsys.readouterr().err == ""
    assert not list(tmp_path.glob("*.tmp"))
    if shutil.which("nm"):  # the ctypes entry points are exported
        syms = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True).stdout
        assert re.search(r" T ssamba_chunk_scan$", syms, re.M) and " T ssamba_chunk_scan_error" in syms


def test_unbuildable_kernel_is_said_once_and_not_retried(monkeypatch):
    monkeypatch.setattr(CS.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(CS, "device_arch", lambda device=None: "sm_test")
    builds = []

    def fail(arch, nvcc=None, verbose=False):
        builds.append(arch)
        raise CS.KernelBuildError("nvcc not found")

    monkeypatch.setattr(CS, "build_library", fail)
    CS._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="chunked scan unavailable on sm_test.*nvcc not found"):
            assert CS.chunk_scan_fn() is None
        assert CS.chunk_scan_fn() is None and builds == ["sm_test"]
    finally:
        CS._load.cache_clear()
        CS._warned.discard("sm_test")


def test_device_facts_are_looked_up_once_per_device(monkeypatch):
    """Architecture and SM count are asked at every scan call: cached per device index, not for 'current'."""
    asked = []
    props = type("Props", (), {"multi_processor_count": 132})()
    monkeypatch.setattr(CS, "device_arch", lambda device=None: asked.append(("arch", device)) or "sm_90")
    monkeypatch.setattr(
        CS.torch.cuda, "get_device_properties", lambda device=None: asked.append(("props", device)) or props
    )
    CS._device_facts.cache_clear()
    try:
        for _ in range(3):
            assert CS._facts(torch.device("cuda", 0)) == ("sm_90", 132)
        assert asked == [("arch", 0), ("props", 0)]
        CS._facts(torch.device("cuda"))  # the current device: asked again each time
        CS._facts(torch.device("cuda"))
        assert len(asked) == 6
    finally:
        CS._device_facts.cache_clear()
