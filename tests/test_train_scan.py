"""The training scan's algebra (checkpoints, recompute, reverse adjoint) and its shape rules, on CPU.

The CUDA kernel itself is checked against the reference on a GPU (tests/test_gpu.py); here its
torch emulation is checked against autograd through the reference scan in float64.
"""

from __future__ import annotations

import re

import pytest
import torch

from ssamba.ops import train_scan as TS
from ssamba.ops.scan import selective_scan_ref


def _inputs(b, ch, L, groups, sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    period = ch // sets
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    u, delta = r(b, ch, L), r(b, ch, L, scale=0.5)
    B, C = r(b, groups, 16, L), r(b, groups, 16, L)
    A_log = [torch.log(torch.rand(period, 16, generator=g, dtype=torch.float64) * 4 + 0.1) for _ in range(sets)]
    D = [r(period) for _ in range(sets)]
    bias = [r(period, scale=0.5) - 2 for _ in range(sets)]
    return u, delta, B, C, A_log, D, bias


def _reference(u, delta, B, C, A_log, D, bias, softplus, dy):
    leaves = [t.clone().requires_grad_() for t in (u, delta, B, C, *A_log, *D, *bias)]
    n = len(A_log)
    uu, dd, BB, CC = leaves[:4]
    Al, Dl, bl = leaves[4 : 4 + n], leaves[4 + n : 4 + 2 * n], leaves[4 + 2 * n :]
    A = -torch.exp(torch.cat(Al))
    y = selective_scan_ref(uu, dd, A, BB, CC, torch.cat(Dl), delta_bias=torch.cat(bl), delta_softplus=softplus)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize(
    "b,ch,L,groups,sets,tile,softplus,segs",
    [
        (2, 8, 37, 2, 2, 16, True, 1),  # two directions, a partial last tile
        (1, 6, 16, 1, 1, 16, True, 1),  # exactly one tile
        (3, 4, 50, 2, 1, 8, False, 1),  # groups within one set, no softplus
        (2, 8, 5, 4, 2, 16, True, 1),  # shorter than a tile
        (2, 8, 37, 2, 2, 4, True, 3),  # segments: 10 tiles in 3 segments of 4, 4, 2; a partial last tile
        (1, 4, 64, 1, 1, 4, False, 16),  # one tile per segment
        (2, 8, 37, 2, 2, 8, True, 2),  # two segments
    ],
)
def test_emulated_forward_and_backward_match_autograd(b, ch, L, groups, sets, tile, softplus, segs):
    u, delta, B, C, A_log, D, bias = _inputs(b, ch, L, groups, sets)
    if not softplus:  # dt = delta + bias itself: keep it positive
        delta, bias = delta.abs() * 0.2, [x.abs() * 0.1 for x in bias]
    dy = torch.randn(b, ch, L, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    pair = (lambda xs: tuple(xs)) if sets == 2 else (lambda xs: xs[0])
    y, grads = TS.train_scan_emulated(
        u,
        delta,
        pair(A_log),
        B,
        C,
        pair(D),
        pair(bias),
        softplus,
        period=ch // sets,
        dy=dy,
        tile=tile,
        n_segments=segs,
    )
    y_ref, g_ref = _reference(u, delta, B, C, A_log, D, bias, softplus, dy)
    worst = (y - y_ref).abs().max().item()
    assert worst < 1e-10, worst
    got = [grads["u"], grads["delta"], grads["B"], grads["C"]]
    for key in ("A_log", "D", "delta_bias"):
        got += list(grads[key]) if sets == 2 else [grads[key]]
    names = ["u", "delta", "B", "C"] + [f"{k}{i}" for k in ("A_log", "D", "bias") for i in range(sets)]
    for name, a, r in zip(names, got, g_ref):
        err = ((a - r).norm() / r.norm()).item()
        print(f"{name}: rel err {err:.2e}")
        assert err < 1e-10, (name, err)


def test_large_dt_and_long_sequence_stay_finite_and_exact():
    u, delta, B, C, A_log, D, bias = _inputs(1, 4, 70, 1, 1, seed=3)
    delta = delta * 30  # softplus' linear branch (v > 20) and strong decay
    dy = torch.randn(1, 4, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y, grads = TS.train_scan_emulated(u, delta, A_log[0], B, C, D[0], bias[0], True, dy=dy)
    y_ref, g_ref = _reference(u, delta, B, C, A_log, D, bias, True, dy)
    assert torch.isfinite(y).all() and ((y - y_ref).norm() / y_ref.norm()) < 1e-10
    # float64 rounding of large, nearly cancelling terms: ~1e-10 relative (seen up to 7e-11)
    assert ((grads["delta"] - g_ref[1]).norm() / g_ref[1].norm()) < 1e-8


@pytest.mark.parametrize(
    "args,why",
    [
        ((768, 2, 384, 16, 32), ""),
        ((3072, 2, 1536, 16, 128), ""),
        ((384, 1, 384, 16, 65535), ""),
        ((768, 2, 384, 8, 32), "d_state must be 16"),
        ((768, 5, 384, 16, 32), "5 B/C groups do not divide 768"),
        ((96 * 2, 4, 96, 16, 8), r"channels per group \(48\) must be a multiple of 32"),
        ((80, 1, 80, 16, 8), r"channels \(80\) must be a multiple of 32"),
        ((1152, 3, 384, 16, 8), "one or two parameter sets"),
        ((768, 2, 384, 16, 65536), "batch 65536 is over 65535"),
    ],
)
def test_launch_shape_rules(args, why):
    got = TS.supported(*args)
    assert (got == "") if not why else re.search(why, got), got


@pytest.mark.parametrize(
    "batch,channels,length,sms,forced,want",
    [
        # SSAMBA-tiny bi at pretraining (513 steps = 33 tiles) on 132 SMs: 768 blocks >= 4 x 132 -> one segment
        (32, 768, 513, 132, None, (33, 1)),
        (128, 768, 513, 132, None, (33, 1)),
        (32, 384, 513, 132, None, (3, 11)),  # tiny uni: 384 blocks -> ceil(4,224 / 384) = 11 segments of 3 tiles
        (1, 768, 513, 132, None, (3, 11)),  # one clip: at most 33 // 2 = 16 asked, 3 tiles -> 11 segments
        (4, 384, 20, 132, None, (2, 1)),  # 2 tiles: too short to cut
        (32, 768, 513, 132, 1, (33, 1)),  # forced: no segments
        (32, 768, 513, 132, 10, (4, 9)),  # forced 10 -> 4 tiles each, 9 non-empty segments
        (32, 768, 513, 132, 1000, (1, 33)),  # forced beyond the tiles: one tile each
    ],
)
def test_segments_cover_every_tile_once(batch, channels, length, sms, forced, want):
    got = TS.segments(batch, channels, length, sms, forced)
    seg_tiles, n_seg = got
    n_tiles = -(-length // TS.TILE)
    assert seg_tiles * n_seg >= n_tiles > (n_seg - 1) * seg_tiles  # every segment non-empty
    assert got == want


def test_segments_reject_nonsense_and_read_the_override(monkeypatch):
    with pytest.raises(ValueError, match="batch=0"):
        TS.segments(0, 768, 513, 132)
    monkeypatch.setenv(TS.SEGMENTS_ENV, "x")
    with pytest.raises(ValueError, match="SSAMBA_TRAIN_SCAN_SEGMENTS must be a positive integer; got 'x'"):
        TS._forced_segments()
    monkeypatch.setenv(TS.SEGMENTS_ENV, "4")
    assert TS._forced_segments() == 4


def test_public_function_checks_shapes_before_launching():
    u = torch.zeros(2, 64, 10)
    B = torch.zeros(2, 2, 16, 10)
    A = torch.zeros(32, 16)
    with pytest.raises(ValueError, match="u and delta must both be"):
        TS.train_scan(u, u[:, :, :5], (A, A), B, B)
    with pytest.raises(ValueError, match="B must be"):
        TS.train_scan(u, u, (A, A), B[:, :, :8], B)
    with pytest.raises(ValueError, match="channels per group"):
        TS.train_scan(
            torch.zeros(2, 64, 10),
            torch.zeros(2, 64, 10),
            (A, A),
            torch.zeros(2, 4, 16, 10),
            torch.zeros(2, 4, 16, 10),
            period=32,
        )
    with pytest.raises(ValueError, match="need 2 parameter sets"):
        TS.train_scan(u, u, A, B, B, period=32)


def test_unavailable_without_cuda_or_when_disabled(monkeypatch):
    assert TS.train_scan_fn(torch.device("cpu")) is None
    monkeypatch.setenv("SSAMBA_TRAIN_SCAN", "0")
    assert TS.train_scan_fn() is None


def test_params_struct_mirrors_the_kernel():
    """Field order of _Params matches struct Params in train_scan.cu (ctypes passes it by pointer)."""
    src = TS.SOURCE.read_text()
    body = re.search(r"struct Params \{(.*?)\};", src, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = [
        n
        for decl in body.split(";")
        if decl.strip()
        for n in re.findall(r"\*?\s*(\w+)\s*(?:,|$)", decl.strip().split(None, 1)[1].replace("*", " "))
    ]
    assert names == [f[0] for f in TS._Params._fields_]
    assert re.search(rf"constexpr int TT = {TS.TILE};", src) and re.search(rf"constexpr int BD = {TS.BLOCK};", src)


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc not installed")
def test_kernel_compiles_and_exports_its_entry_points(tmp_path, monkeypatch):
    import shutil
    import subprocess

    monkeypatch.setenv("SSAMBA_KERNEL_CACHE", str(tmp_path))
    path = TS.build_library("sm_90", source=TS.SOURCE)
    assert path.exists() and path.name.startswith("train_scan-sm_90-")
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True).stdout
        assert re.search(r" T ssamba_train_scan$", syms, re.M) and " T ssamba_train_scan_error" in syms


class _Emulated(torch.autograd.Function):
    """train_scan's contract computed by the emulation (forward and backward), for the mixer test."""

    @staticmethod
    def forward(ctx, u, delta, B, C, A0, A1, D0, D1, b0, b1, period, n_segments=None):
        ctx.save_for_backward(u, delta, B, C, A0, A1, D0, D1, b0, b1)
        ctx.period, ctx.segs = period, n_segments or 1
        y, _ = TS.train_scan_emulated(
            u, delta, (A0, A1), B, C, (D0, D1), (b0, b1), True, period=period, n_segments=ctx.segs
        )
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, B, C, A0, A1, D0, D1, b0, b1 = ctx.saved_tensors
        _, g = TS.train_scan_emulated(
            u, delta, (A0, A1), B, C, (D0, D1), (b0, b1), True, period=ctx.period, dy=dy, tile=8, n_segments=ctx.segs
        )
        cast = lambda t, like: t.to(like.dtype)  # noqa: E731
        return (
            cast(g["u"], u),
            cast(g["delta"], delta),
            cast(g["B"], B),
            cast(g["C"], C),
            *(cast(x, A0) for x in g["A_log"]),
            *(cast(x, D0) for x in g["D"]),
            *(cast(x, b0) for x in g["delta_bias"]),
            None,
            None,
        )


@pytest.mark.parametrize("reverse", [False, True])
def test_fast_mixer_trains_through_the_training_scan(monkeypatch, reverse):
    """The fast mixer's (batch, direction x channel) layout hands the training scan the right tensors:
    outputs and every parameter gradient equal the per-direction reference path."""
    from ssamba.config import model_preset
    from ssamba.model import mixer as mixer_mod
    from ssamba.model.mixer import Mamba

    calls = []

    def fn(u, delta, A_log, B, C, D, bias, delta_softplus=True, period=None):
        calls.append(tuple(u.shape))
        assert len(A_log) == 2 and B.shape[1] == 2 and delta_softplus
        return _Emulated.apply(u, delta, B, C, *A_log, *D, *bias, period)

    monkeypatch.setattr(mixer_mod, "train_scan_fn", lambda device=None: fn)
    cfg = model_preset("demo")
    m = Mamba(cfg, "reference").double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(3, 37, cfg.embed_dim, dtype=torch.float64, generator=g)
    w = torch.randn(3, 37, cfg.embed_dim, dtype=torch.float64, generator=g)

    def run(fast):
        m.zero_grad()
        m.fast = fast
        out = m(x, reverse=reverse)
        (out * w).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}

    ref, g_ref = run(False)
    got, g_got = run(True)
    assert calls and calls[0] == (3, 2 * m.d_inner, 40)  # padded to a multiple of 8
    # the reference path takes A, D and the dt bias in float32 (as it hands them to the scan kernels)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for k in g_ref:
        err = ((g_got[k] - g_ref[k]).norm() / g_ref[k].norm().clamp_min(1e-30)).item()
        assert err < 1e-5, (k, err)


def _recipe_batches():
    from ssamba.config import PretrainConfig
    from ssamba.config.presets import TASK_RECIPES

    return {"pretrain": PretrainConfig().batch_size, **{k: v["finetune.batch_size"] for k, v in TASK_RECIPES.items()}}


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_launch_shapes_stay_within_the_grid_limit(size):
    """At every recipe batch, and at batches far beyond any that fits in memory, the fast path's conv and scan
    see the batch as sequences and at most 2 x d_inner channels: within the 65,535 grid limit; the training
    scan accepts the shape."""
    from ssamba.config import model_preset
    from ssamba.model.mixer import GRID_Y_LIMIT, fast_launch_shape

    di = model_preset(size).d_inner
    for batch in [*_recipe_batches().values(), 86, 1024, 16384]:
        for g in (1, 2):
            seqs, ch = fast_launch_shape(batch, g, di)
            assert seqs == batch and ch == g * di <= GRID_Y_LIMIT
            assert TS.supported(ch, g, di, 16, batch) == "", (size, batch, g)


def test_fast_path_calls_conv_and_scan_with_that_shape(monkeypatch):
    """The shape function is what the mixer really does (recorded on CPU, both directions, odd batch)."""
    from ssamba.config import model_preset
    from ssamba.model import mixer as mixer_mod
    from ssamba.model.mixer import Mamba, fast_launch_shape
    from ssamba.ops.scan import causal_conv1d_ref, selective_scan_ref

    seen = {}
    m = Mamba(model_preset("demo"), "reference")
    m.fast = True
    m._conv = lambda x, *a, **k: seen.setdefault("conv", tuple(x.shape[:2])) and causal_conv1d_ref(x, *a, **k)
    m._scan = lambda u, *a, **k: seen.setdefault("scan", tuple(u.shape[:2])) and selective_scan_ref(u, *a, **k)
    monkeypatch.setattr(mixer_mod, "train_scan_fn", lambda device=None: None)
    m(torch.randn(5, 21, m.in_proj.in_features)).sum().backward()
    want = fast_launch_shape(5, 2, m.d_inner)
    assert seen == {"conv": want, "scan": want}


_GATE_CHECK = r"""
import torch
from ssamba.ops.triton_ops import combine_gate_train
torch.manual_seed(0)
worst = 0.0
for revs in ([False, True], [True, False], [False], [True]):
    G, B, d, L, Lp = len(revs), 2, 48, 37, 40
    y = torch.randn(B, G, d, Lp, requires_grad=True)
    zfull = torch.randn(B, d, Lp)
    z = zfull[..., :L].clone().requires_grad_()
    scale = 0.5 if G > 1 else 1.0
    w = torch.randn(B, d, L)
    out = combine_gate_train(y, z, L, revs, scale, out_stride=Lp)
    (out * w).sum().backward()
    got = (out.detach(), y.grad.clone(), z.grad.clone())
    y2, z2 = y.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    parts = [y2[:, i, :, :L].flip(-1) if r else y2[:, i, :, :L] for i, r in enumerate(revs)]
    ref = sum(parts) * scale * torch.nn.functional.silu(z2)
    (ref * w).sum().backward()
    assert out.stride() == (d * Lp, Lp, 1), out.stride()
    assert torch.all(y.grad[..., L:] == 0)
    for a, b in zip(got, (ref.detach(), y2.grad, z2.grad)):
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
print("WORST", worst)
"""


def test_triton_combine_gate_backward_under_the_interpreter():
    """The fused direction-sum + gate (forward and backward Triton kernels), run by Triton's interpreter on
    CPU, against the torch ops it replaces: every direction order, padded steps get zero gradient."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", _GATE_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    worst = float(res.stdout.split("WORST")[-1])
    assert worst < 1e-5, worst


def _emulated_kernel(u, delta, A_log, B, C, D=None, delta_bias=None, delta_softplus=True, period=None, n_segments=None):
    return _Emulated.apply(u, delta, B, C, *A_log, *D, *delta_bias, period, n_segments)


def test_self_check_passes_a_right_kernel_and_names_what_a_wrong_one_gets_wrong(monkeypatch):
    monkeypatch.setattr(TS, "train_scan", _emulated_kernel)
    assert TS.self_check(torch.device("cpu")) == ""
    monkeypatch.setattr(TS, "train_scan", lambda *a, **k: _emulated_kernel(*a, **k) * 1.01)
    bad = TS.self_check(torch.device("cpu"))
    assert bad.startswith("y 1.0e-02, u 1.0e-02") and "bias1" in bad


def test_failed_self_check_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(TS.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(TS, "device_arch", lambda device=None: "sm_test")
    monkeypatch.setattr(TS, "_load", lambda arch: (object(), ""))
    monkeypatch.setattr(TS.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(TS, "_checked", lambda arch, index: "dB 3.1e-01")
    TS._warned.discard(("sm_test", "check"))
    with pytest.warns(UserWarning, match=r"disagrees with the reference scan on sm_test \(dB 3.1e-01\)"):
        assert TS.train_scan_fn() is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TS.train_scan_fn() is None  # said once
    monkeypatch.setattr(TS, "_checked", lambda arch, index: "")
    assert TS.train_scan_fn() is TS.train_scan


def test_first_use_check_runs_in_fp32_with_gradients_whatever_the_callers_context(monkeypatch):
    seen = {}

    def record(device):
        seen.update(
            grad=torch.is_grad_enabled(),
            inference=torch.is_inference_mode_enabled(),
            autocast=torch.is_autocast_enabled("cuda"),
        )
        return ""

    monkeypatch.setattr(TS, "self_check", record)
    with torch.inference_mode():
        assert TS._checked.__wrapped__("sm_test", 0) == ""
    assert seen == {"grad": True, "inference": False, "autocast": False}
