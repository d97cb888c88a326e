"""The fast mixer/encoder path (directions fused into one scan, pairs without flips, padding to the
scan chunk) computes the same function as the reference path, forward and every gradient."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ssamba.config import ModelConfig, model_preset
from ssamba.model.encoder import MambaEncoder, set_speedups
from ssamba.model.mixer import Mamba, padded_length, scan_chunk


def cfg(**kw) -> ModelConfig:
    base = replace(model_preset("test", "ssamba"), scan_backend="reference")
    return replace(base, **kw)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def run(module, x, **kw):
    x = x.clone().requires_grad_(True)
    y = module(x, **kw) if kw else module(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def assert_same(a, b, atol=2e-5):
    (ya, xa, ga), (yb, xb, gb) = a, b
    torch.testing.assert_close(ya, yb, atol=atol, rtol=1e-4)
    torch.testing.assert_close(xa, xb, atol=atol, rtol=1e-4)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=1e-4, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("bimamba", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length,pad", [(37, False), (300, True), (1000, True)])
def test_fast_mixer_matches_reference(bimamba, reverse, length, pad):
    c = cfg(bimamba=bimamba, layer_pairing=False)
    torch.manual_seed(0)
    m = Mamba(c, "reference")
    randomise(m)
    x = torch.randn(2, length, c.embed_dim)
    m.fast = False
    ref = run(m, x, reverse=reverse)
    m.fast, m.pad_to_chunk, m.pad_max_extra = True, pad, 1.0
    fast = run(m, x, reverse=reverse)
    assert_same(fast, ref)


def test_reverse_is_flip_mixer_flip():
    c = cfg(bimamba=True, layer_pairing=False)
    m = Mamba(c, "reference")
    randomise(m, 1)
    x = torch.randn(1, 50, c.embed_dim)
    with torch.no_grad():
        want = m(x.flip(1)).flip(1)
        m.fast = True
        got = m(x, reverse=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pairing,bimamba", [(True, True), (False, True), (True, False)])
def test_fast_encoder_matches_reference(pairing, bimamba):
    c = cfg(bimamba=bimamba, layer_pairing=pairing, drop_path=0.0)
    torch.manual_seed(0)
    enc = MambaEncoder(c, input_fdim=32, input_tdim=48)
    randomise(enc, 2)
    x = torch.randn(2, 48, 32)
    set_speedups(enc, fuse_directions=False)
    ref = run(enc, x)
    set_speedups(enc, fuse_directions=True, pad=True)
    for m in enc.modules():
        if isinstance(m, Mamba):
            m.pad_max_extra = 1.0
    fast = run(enc, x)
    assert_same(fast, ref, atol=5e-5)


def test_padding_rule_follows_kernel_chunks():
    assert [scan_chunk(n) for n in (1, 128, 129, 513, 1024, 1025, 22001)] == [128, 128, 256, 1024, 1024, 2048, 2048]
    assert padded_length(22001) == 22528  # +2.4%: pad
    assert padded_length(513) == 513  # to 1024 would double the work: no pad
    assert padded_length(1000) == 1024
    assert padded_length(16384) == 16384


def test_fused_norm_switch_needs_cuda_kernels():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    enc = MambaEncoder(cfg(), input_fdim=32, input_tdim=48)
    with pytest.raises(RuntimeError, match="Triton"):
        set_speedups(enc, fused_norm=True)


def test_floor_bytes_counts_each_unfused_op_once():
    """Hand count for D=4, d_inner=8, N=2, R=1, one bidirectional layer, bf16, 9 patches + cls:
    per token 424 B (add+norm 32, in_proj 40, conv 64, x_proj 52, dt_proj 36, scan 112, combine 64,
    out_proj 24) + final norm 48 B; weights 344 elements x 2 B."""
    from ssamba.bench.ladder import floor_bytes

    c = replace(
        model_preset("test", "ssamba"),
        embed_dim=4,
        d_state=2,
        expand=2,
        depth=1,
        layer_pairing=False,
        residual_in_fp32=False,
        bimamba=True,
    )
    assert (c.d_inner, c.resolved_dt_rank, c.d_conv) == (8, 1, 4)
    assert floor_bytes(c, 9, 1, "bf16") == 10 * (424 + 48) + 688
    assert floor_bytes(c, 9, 3, "bf16") == 3 * 10 * (424 + 48) + 688
    uni = replace(c, bimamba=False)
    assert floor_bytes(uni, 9, 1, "bf16") < floor_bytes(c, 9, 1, "bf16")
