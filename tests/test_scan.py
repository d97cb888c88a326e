"""Tests of ssamba.ops.scan: the fast selective scan against the naive per-step specification.

Run with ``pytest tests/test_scan.py -s`` to see the largest differences per case.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import ssamba.ops.scan as scan_mod
from ssamba.ops.scan import (
    causal_conv1d_ref,
    clear_workspace,
    selective_scan_naive,
    selective_scan_ref,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, d, L, N, kind_B, kind_C, dtype=torch.float32, groups=2, seed=0):
    """Random inputs in realistic ranges; kind: "var" (b, N, L), "group" (b, G, N, L), "const" (d, N)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    def bc(kind):
        if kind == "var":
            return rnd(b, N, L)
        if kind == "group":
            return rnd(b, groups, N, L)
        return rnd(d, N)

    return {
        "u": rnd(b, d, L),
        "delta": rnd(b, d, L, scale=0.5),
        "A": (-torch.exp(torch.randn(d, N, generator=g, dtype=torch.float64) * 0.5)).to(dtype),
        "B": bc(kind_B),
        "C": bc(kind_C),
        "D": rnd(d),
        "z": rnd(b, d, L),
        "delta_bias": rnd(d, scale=0.3),
    }


def run_with_grads(fn, inputs, use, softplus, last, seed=1):
    """Forward + backward of a random linear functional of the outputs; returns (outputs, grads)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if k in use}
    args = [leaves.get(k) for k in NAMES]
    res = fn(*args, delta_softplus=softplus, return_last_state=last)
    outs = res if last else (res,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], {k: v.grad for k, v in leaves.items()}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.fixture(params=["one_chunk", "many_chunks"])
def chunking(request, monkeypatch):
    """Run with the default chunking and with chunks of 3 time steps (boundaries + a remainder)."""
    if request.param == "many_chunks":
        monkeypatch.setattr(scan_mod, "_CHUNK_BYTES", 3 * 2 * 8 * 4 * 4)  # 3 steps at b=2, d=8, N=4
    yield request.param


KINDS = [("var", "var"), ("group", "group"), ("const", "const"), ("group", "var"), ("var", "const")]
OPTIONS = list(itertools.product([False, True], repeat=5))  # D, z, bias, softplus, last


@pytest.mark.parametrize("kind_B,kind_C", KINDS)
def test_ref_matches_naive_float32(kind_B, kind_C, chunking):
    b, d, L, N = 2, 8, 13, 4
    inputs = make_inputs(b, d, L, N, kind_B, kind_C)
    worst = {}
    for has_D, has_z, has_bias, softplus, last in OPTIONS:
        use = {"u", "delta", "A", "B", "C"}
        use |= {"D"} if has_D else set()
        use |= {"z"} if has_z else set()
        use |= {"delta_bias"} if has_bias else set()
        o_ref, g_ref = run_with_grads(selective_scan_ref, inputs, use, softplus, last)
        o_nv, g_nv = run_with_grads(selective_scan_naive, inputs, use, softplus, last)
        assert len(o_ref) == len(o_nv) == (2 if last else 1)
        assert o_ref[0].shape == (b, d, L) and o_ref[0].dtype == torch.float32
        if last:
            assert o_ref[1].shape == (b, d, N)
        tag = f"D={has_D:d} z={has_z:d} bias={has_bias:d} softplus={softplus:d} last={last:d}"
        errs = {f"out{i}": rel_err(a, e) for i, (a, e) in enumerate(zip(o_ref, o_nv))}
        for k in use:
            assert g_ref[k] is not None and g_nv[k] is not None, (k, tag)
            assert g_ref[k].shape == inputs[k].shape and g_ref[k].dtype == inputs[k].dtype
            errs["d" + k] = rel_err(g_ref[k], g_nv[k])
        for k, e in errs.items():
            worst[k] = max(worst.get(k, 0.0), e)
            assert e < 2e-5, f"{kind_B}/{kind_C} {chunking} {tag}: {k} rel err {e:.2e}"
    print(
        f"\n[fp32 {kind_B}/{kind_C} {chunking}] max rel diff over {len(OPTIONS)} option sets: "
        + " ".join(f"{k}={v:.1e}" for k, v in sorted(worst.items()))
    )


@pytest.mark.parametrize("kind_B,kind_C", [("var", "var"), ("group", "group"), ("const", "const")])
def test_gradcheck_float64(kind_B, kind_C, monkeypatch):
    monkeypatch.setattr(scan_mod, "_CHUNK_BYTES", 2 * 2 * 4 * 3 * 8)  # chunks of 2 steps
    inputs = make_inputs(2, 4, 5, 3, kind_B, kind_C, dtype=torch.float64)
    args = [inputs[k].clone().requires_grad_(True) for k in NAMES]

    def f(*a):
        return selective_scan_ref(*a, delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    # float64 stays float64 and agrees with the naive loop to rounding
    out, last = f(*args)
    out_n, last_n = selective_scan_naive(*args, delta_softplus=True, return_last_state=True)
    assert out.dtype == last.dtype == torch.float64
    diff = max((out - out_n).abs().max().item(), (last - last_n).abs().max().item())
    print(f"\n[fp64 {kind_B}/{kind_C}] gradcheck ok, max |ref - naive| = {diff:.1e}")
    assert diff < 1e-12


def test_gradcheck_without_options():
    inputs = make_inputs(1, 4, 4, 2, "var", "var", dtype=torch.float64, seed=3)
    args = [inputs[k].clone().requires_grad_(True) for k in ("u", "delta", "A", "B", "C")]
    assert torch.autograd.gradcheck(lambda *a: selective_scan_ref(*a), args, eps=1e-6, atol=1e-7)


def test_partial_requires_grad_all_args_present():
    inputs = make_inputs(2, 8, 9, 4, "group", "group", seed=6)
    for grad_keys in ({"A"}, {"B", "D"}, {"delta_bias"}, {"z"}, {"u", "C"}):
        results = []
        for fn in (selective_scan_ref, selective_scan_naive):
            args = {k: v.clone().requires_grad_(k in grad_keys) for k, v in inputs.items()}
            out, last = fn(*[args[k] for k in NAMES], delta_softplus=True, return_last_state=True)
            (out.sum() + 0.5 * last.pow(2).sum()).backward()
            results.append({k: args[k].grad for k in grad_keys})
            assert all(args[k].grad is None for k in NAMES if k not in grad_keys)
        for k in grad_keys:
            assert rel_err(results[0][k], results[1][k]) < 2e-5, (grad_keys, k)


def test_sequence_length_one_and_shape_errors():
    inputs = make_inputs(2, 4, 1, 3, "var", "var")
    o_ref, g_ref = run_with_grads(selective_scan_ref, inputs, set(NAMES), True, True)
    o_nv, g_nv = run_with_grads(selective_scan_naive, inputs, set(NAMES), True, True)
    for a, e in zip(o_ref, o_nv):
        assert rel_err(a, e) < 1e-6
    for k in NAMES:
        assert torch.allclose(g_ref[k], g_nv[k], atol=1e-6, rtol=1e-5), k
    assert g_ref["A"].abs().max() == 0  # with L = 1 the state never decays
    bad = make_inputs(2, 4, 5, 3, "var", "var")
    with pytest.raises(ValueError):
        selective_scan_ref(bad["u"], bad["delta"], bad["A"], bad["B"][:, :, :4], bad["C"])
    with pytest.raises(ValueError):
        selective_scan_ref(bad["u"], bad["delta"], bad["A"], torch.randn(2, 3, 3, 5), bad["C"])


def test_two_graphs_alive_and_retain_graph():
    """Scratch buffers are shared between calls: two pending graphs must not interfere."""
    x1 = make_inputs(2, 8, 11, 4, "var", "var", seed=7)
    x2 = make_inputs(2, 8, 11, 4, "var", "var", seed=8)

    def grads(fn, retain_twice=False):
        a1 = [x1[k].clone().requires_grad_(True) for k in NAMES]
        a2 = [x2[k].clone().requires_grad_(True) for k in NAMES]
        y1 = fn(*a1, delta_softplus=True)
        y2 = fn(*a2, delta_softplus=True)
        loss = (y1 * y2).sum()
        if retain_twice:
            loss.backward(retain_graph=True)
            for t in a1 + a2:
                t.grad = None
        loss.backward()
        return [t.grad for t in a1 + a2]

    ref = grads(selective_scan_naive)
    for got in (grads(selective_scan_ref), grads(selective_scan_ref, retain_twice=True)):
        for a, e in zip(got, ref):
            assert rel_err(a, e) < 2e-5
    clear_workspace()
    for a, e in zip(grads(selective_scan_ref), ref):
        assert rel_err(a, e) < 2e-5


def test_bf16_inputs():
    b, d, L, N = 2, 8, 16, 4
    inputs = make_inputs(b, d, L, N, "var", "var", dtype=torch.bfloat16, seed=9)
    use = set(NAMES)
    o_bf, g_bf = run_with_grads(selective_scan_ref, inputs, use, True, True)
    inputs32 = {k: v.float() for k, v in inputs.items()}  # the same (bf16-representable) values
    o_32, g_32 = run_with_grads(selective_scan_ref, inputs32, use, True, True)
    o_nv, _ = run_with_grads(selective_scan_naive, inputs, use, True, True)
    assert o_bf[0].dtype == torch.bfloat16 and o_nv[0].dtype == torch.bfloat16
    assert o_bf[1].dtype == torch.float32  # the state is kept in the working precision
    # internal compute is float32: the bf16 output is the float32 output rounded once
    assert torch.equal(o_bf[0], o_32[0].to(torch.bfloat16))
    assert torch.equal(o_bf[1], o_32[1])
    errs = {"out": rel_err(o_bf[0], o_32[0])}
    for k in use:
        assert g_bf[k].dtype == torch.bfloat16
        errs["d" + k] = rel_err(g_bf[k], g_32[k])
    print("\n[bf16] max rel diff vs fp32: " + " ".join(f"{k}={v:.1e}" for k, v in sorted(errs.items())))
    assert max(errs.values()) < 2**-7
    # mixed: bf16 activations with float32 parameters (autocast-style)
    mixed = dict(inputs)
    for k in ("A", "D", "delta_bias"):
        mixed[k] = inputs32[k]
    o_mx, g_mx = run_with_grads(selective_scan_ref, mixed, use, True, False)
    assert o_mx[0].dtype == torch.bfloat16 and g_mx["A"].dtype == torch.float32
    assert torch.equal(o_mx[0], o_bf[0])


def test_long_sequence_runs():
    """Memory stays bounded for long sequences: only the (L, b, d, N) state is kept."""
    torch.manual_seed(0)
    b, d, L, N = 2, 384, 1200, 16
    u = torch.randn(b, d, L, requires_grad=True)
    delta = torch.randn(b, d, L, requires_grad=True)
    A = (-torch.rand(d, N) - 0.1).requires_grad_(True)
    B = torch.randn(b, N, L, requires_grad=True)
    C = torch.randn(b, N, L, requires_grad=True)
    out = selective_scan_ref(u, delta, A, B, C, delta_softplus=True)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (u, delta, A, B, C))


# --------------------------------------------------------------------------------------------------
# causal conv1d
# --------------------------------------------------------------------------------------------------


def test_causal_conv1d_hand_computed():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 2.0, 0.0]]])  # (1, 2, 4)
    w = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 1.0]])  # (2, 3): w[:, -1] multiplies x_t
    bias = torch.tensor([0.5, -1.0])
    # ch0: x_{t-2} - x_t + 0.5 ; ch1: 0.5 x_{t-2} + 2 x_{t-1} + x_t - 1
    expected = torch.tensor([[[-0.5, -1.5, -1.5, -1.5], [0.0, 0.0, -0.5, 2.5]]])
    out = causal_conv1d_ref(x, w, bias)
    assert out.shape == x.shape
    assert torch.allclose(out, expected)
    assert torch.allclose(causal_conv1d_ref(x, w, bias, activation="silu"), F.silu(expected))
    assert torch.allclose(causal_conv1d_ref(x, w, bias, activation="swish"), F.silu(expected))
    assert torch.allclose(causal_conv1d_ref(x, w), expected - bias[None, :, None])
    with pytest.raises(NotImplementedError):
        causal_conv1d_ref(x, w, bias, activation="relu")


def test_causal_conv1d_is_causal_and_keeps_dtype():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12)
    w = torch.randn(5, 4)
    bias = torch.randn(5)
    base = causal_conv1d_ref(x, w, bias, activation="silu")
    for t in range(12):
        x2 = x.clone()
        x2[..., t] += 10.0
        out = causal_conv1d_ref(x2, w, bias, activation="silu")
        assert torch.equal(out[..., :t], base[..., :t]), t  # the past is untouched
        assert not torch.equal(out[..., t], base[..., t])
    out_bf = causal_conv1d_ref(x.bfloat16(), w.bfloat16(), bias.bfloat16())
    assert out_bf.dtype == torch.bfloat16
    ref32 = causal_conv1d_ref(x.bfloat16().float(), w.bfloat16().float(), bias.bfloat16().float())
    assert torch.equal(out_bf, ref32.bfloat16())
