"""MSPM targets and losses (docs/model.md sections 4.3-4.4): InfoNCE and its accuracy convention, MSE, patch
targets, and how AudioModel.pretrain_losses combines them."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ssamba.config import model_preset
from ssamba.model.audio_model import AudioModel, Geometry
from ssamba.model.heads import gather_masked, info_nce, masked_mse, patch_targets
from ssamba.model.masking import make_masks

# A hand case (B=1, M=3, K=2). S = target @ pred^T =
#   [[-1, -2,  0],
#    [-4, -2, -3],
#    [-3, -4, -1]]
# Row-softmax P = softmax(S, -1). The three plausible accuracy conventions disagree here:
#   official, argmax over dim 0 of P (per column k, which row j is largest): [0, 1, 2] -> 3/3
#   argmax over dim 1 of P (per row j, which column):                       [2, 1, 2] -> 2/3
#   argmax over dim 0 of the raw S:                                          [0, 0, 0] -> 1/3
PRED = [[-2.0, 1.0], [-2.0, 0.0], [-1.0, 1.0]]
TARGET = [[1.0, 1.0], [1.0, -2.0], [2.0, 1.0]]
S_HAND = [[-1.0, -2.0, 0.0], [-4.0, -2.0, -3.0], [-3.0, -4.0, -1.0]]


def py_log_softmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def test_info_nce_hand_case_pins_official_accuracy_convention():
    # the scores, from the definition, in plain Python
    s = [[sum(t * p for t, p in zip(TARGET[j], PRED[k])) for k in range(3)] for j in range(3)]
    assert s == S_HAND
    logp = [py_log_softmax_row(r) for r in s]
    nce_hand = -sum(logp[j][j] for j in range(3)) / 3
    prob = [[math.exp(v) for v in r] for r in logp]
    col_argmax = [max(range(3), key=lambda j: prob[j][k]) for k in range(3)]
    row_argmax = [max(range(3), key=lambda k: prob[j][k]) for j in range(3)]
    raw_col_argmax = [max(range(3), key=lambda j: s[j][k]) for k in range(3)]
    assert (col_argmax, row_argmax, raw_col_argmax) == ([0, 1, 2], [2, 1, 2], [0, 0, 0])

    nce, acc = info_nce(torch.tensor([PRED]), torch.tensor([TARGET]))
    assert nce.item() == pytest.approx(nce_hand, rel=1e-6)
    # diagonal log-probabilities -1.4076, -0.4076, -0.1699
    assert nce.item() == pytest.approx(0.66169, abs=1e-4)
    assert acc.item() == pytest.approx(1.0)  # not 2/3 (row argmax) nor 1/3 (raw column argmax)


def test_info_nce_is_not_symmetric_in_pred_and_target():
    """``S = target @ pred^T`` with the softmax over rows: swapping the arguments transposes S."""
    nce_swapped, acc_swapped = info_nce(torch.tensor([TARGET]), torch.tensor([PRED]))
    st = [list(c) for c in zip(*S_HAND)]
    logp = [py_log_softmax_row(r) for r in st]
    assert nce_swapped.item() == pytest.approx(-sum(logp[j][j] for j in range(3)) / 3, rel=1e-6)
    prob = [[math.exp(v) for v in r] for r in logp]
    hits = [max(range(3), key=lambda j: prob[j][k]) == k for k in range(3)]
    assert acc_swapped.item() == pytest.approx(sum(hits) / 3)
    nce, _ = info_nce(torch.tensor([PRED]), torch.tensor([TARGET]))
    assert nce_swapped.item() != pytest.approx(nce.item(), rel=1e-3)


def test_info_nce_no_temperature_no_normalisation_and_batch_mean():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 5)
    target = torch.randn(2, 4, 5)
    per = []
    for b in range(2):
        s = target[b].double() @ pred[b].double().t()
        per.append(-torch.log_softmax(s, -1).diagonal().mean())
    nce, acc = info_nce(pred, target)
    assert nce.item() == pytest.approx(float(sum(per) / 2), rel=1e-5)
    # scaling the predictions scales the raw scores (no L2 normalisation, no temperature)
    nce3, _ = info_nce(3 * pred, target)
    assert nce3.item() != pytest.approx(nce.item(), rel=1e-3)
    # second spectrogram's negatives are its own patches only: changing sample 1 leaves sample 0's share
    pred2 = pred.clone()
    pred2[1] += 1.0
    s0 = -torch.log_softmax(target[0].double() @ pred[0].double().t(), -1).diagonal().mean()
    s1 = -torch.log_softmax(target[1].double() @ pred2[1].double().t(), -1).diagonal().mean()
    assert info_nce(pred2, target)[0].item() == pytest.approx(float(s0 + s1) / 2, rel=1e-5)
    assert 0.0 <= acc.item() <= 1.0


def test_masked_mse_hand_case():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    target = torch.tensor([[[0.0, 0.0], [1.0, 7.0]]])
    # squared errors 1, 4, 4, 9 -> mean 18 / 4
    assert masked_mse(pred, target).item() == pytest.approx(4.5)


def test_patch_targets_layout():
    # fbank[b, t, f] = 1000 f + t + 100000 b on a 32-bin x 48-frame input: a 2 x 3 patch grid
    b_, t_, f_ = 2, 48, 32
    fb = (
        1000 * torch.arange(f_)[None, None, :]
        + torch.arange(t_)[None, :, None]
        + 100000 * torch.arange(b_)[:, None, None]
    ).float()
    fb.requires_grad_(True)
    tgt = patch_targets(fb, 16)
    assert tgt.shape == (2, 6, 256)
    assert not tgt.requires_grad  # detached
    for b in range(2):
        for fp in range(2):
            for tp in range(3):
                n = fp * 3 + tp  # frequency-major patch order
                for fo in (0, 1, 7, 15):
                    for to in (0, 3, 15):
                        want = 1000 * (fp * 16 + fo) + (tp * 16 + to) + 100000 * b
                        assert tgt[b, n, fo * 16 + to].item() == want
    # no per-patch normalisation: the values are the raw inputs
    assert tgt.min().item() == 0.0 and tgt.max().item() == 100000 + 1000 * 31 + 47


def test_gather_masked():
    x = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    masks = torch.tensor([[4, 0], [1, 3]])
    out = gather_masked(x, masks)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0], torch.stack([x[0, 4], x[0, 0]]))
    assert torch.equal(out[1], torch.stack([x[1, 1], x[1, 3]]))


# ---------------------------------------------------------------------------- pretrain_losses
def model_and_batch(arch="ssamba", **kw):
    torch.manual_seed(0)
    cfg = replace(model_preset("test", arch), scan_backend="reference", **kw)
    model = AudioModel(cfg, Geometry(128, 128)).eval()  # 8 x 8 patches
    x = torch.randn(2, 128, 128)
    rng = np.random.default_rng(0)
    return model, x, make_masks("cluster", 2, 8, 8, 20, rng), make_masks("random", 2, 8, 8, 20, rng)


def hand_losses(model, x, mask_d, mask_g):
    """The losses recomputed from the encoder output at token ``patch index + n_prefix``."""
    p = model.v.n_prefix
    targets = patch_targets(x, 16)
    rows = torch.arange(x.shape[0])[:, None]
    out_d = model.encode(x, mask_d)[rows, mask_d + p]
    nce, acc = info_nce(model.cpredlayer(out_d), targets[rows, mask_d])
    out_g = model.encode(x, mask_g)[rows, mask_g + p]
    mse = masked_mse(model.gpredlayer(out_g), targets[rows, mask_g])
    return nce, acc, mse


@pytest.mark.parametrize("arch", ["ssamba", "ssast"])
def test_pretrain_losses_match_hand_computation(arch):
    model, x, mask_d, mask_g = model_and_batch(arch)
    with torch.no_grad():
        got = model.pretrain_losses(x, mask_d, mask_g)
        nce, acc, mse = hand_losses(model, x, mask_d, mask_g)
        assert got["nce"].item() == pytest.approx(nce.item(), rel=1e-6)
        assert got["mse"].item() == pytest.approx(mse.item(), rel=1e-6)
        assert got["acc"].item() == pytest.approx(acc.item())
        assert torch.equal(got["loss"], got["nce"] + 10 * got["mse"])
        w3 = model.pretrain_losses(x, mask_d, mask_g, mse_weight=3.0)
        assert torch.equal(w3["loss"], w3["nce"] + 3.0 * w3["mse"])
        via_forward = model(x, task="pretrain", mask_d=mask_d, mask_g=mask_g)
        assert torch.equal(via_forward["loss"], got["loss"])


def test_one_pass_and_two_pass():
    model, x, mask_d, mask_g = model_and_batch()
    with torch.no_grad():
        one = model.pretrain_losses(x, mask_d, None)
        same = model.pretrain_losses(x, mask_d, mask_d)
        two = model.pretrain_losses(x, mask_d, mask_g)
        g_only = model.pretrain_losses(x, mask_g, None)
    # mask_g None: the same mask for both objectives (one pass)
    assert one["nce"].item() == pytest.approx(same["nce"].item(), rel=1e-6)
    assert one["mse"].item() == pytest.approx(same["mse"].item(), rel=1e-6)
    # two passes: InfoNCE from mask_d, MSE from mask_g
    assert two["nce"].item() == pytest.approx(one["nce"].item(), rel=1e-6)
    assert two["acc"].item() == pytest.approx(one["acc"].item())
    assert two["mse"].item() == pytest.approx(g_only["mse"].item(), rel=1e-6)
    assert two["mse"].item() != pytest.approx(one["mse"].item(), rel=1e-4)


def test_two_passes_run_the_encoder_twice():
    model, x, mask_d, mask_g = model_and_batch()
    calls = []
    model.v.register_forward_hook(lambda mod, inp, out: calls.append(1))
    with torch.no_grad():
        model.pretrain_losses(x, mask_d, mask_g)
        assert len(calls) == 2
        model.pretrain_losses(x, mask_d)
        assert len(calls) == 3


@pytest.mark.parametrize("arch", ["ssamba", "ssast"])
def test_prefix_tokens_are_never_used_as_masked_outputs(arch):
    model, x, mask_d, mask_g = model_and_batch(arch)
    mask_d[0, 0] = 0  # patch 0 masked: its output is token n_prefix, not the cls token
    mask_d = mask_d.sort(dim=1).values
    assert len(set(mask_d[0].tolist())) == mask_d.shape[1]
    with torch.no_grad():
        ref = model.pretrain_losses(x, mask_d, mask_g)
    p = model.v.n_prefix

    def poison_prefix(mod, inp, out):
        out = out.clone()
        out[:, :p] = float("nan")
        return out

    model.v.register_forward_hook(poison_prefix)
    with torch.no_grad():
        got = model.pretrain_losses(x, mask_d, mask_g)
    for k in ("nce", "mse", "acc"):
        assert torch.isfinite(got[k]) and got[k].item() == pytest.approx(ref[k].item(), rel=1e-6)

    # and a change to patch i's output token changes the loss only if patch i is masked
    def shift_token(i):
        def hook(mod, inp, out):
            out = out.clone()
            out[:, p + i] += 5.0
            return out

        return hook

    unmasked = next(i for i in range(64) if i not in set(mask_d.flatten().tolist()) | set(mask_g.flatten().tolist()))
    masked = int(mask_d[0, 3])
    for i, changes in ((unmasked, False), (masked, True)):
        fresh, _, _, _ = model_and_batch(arch)
        h = fresh.v.register_forward_hook(shift_token(i))
        with torch.no_grad():
            out = fresh.pretrain_losses(x, mask_d, mask_g)
        h.remove()
        assert (out["loss"].item() != pytest.approx(ref["loss"].item(), rel=1e-6)) == changes


@pytest.mark.parametrize(
    "bad,msg",
    [
        (torch.tensor([[1, 2, 64]]), "in \\[0, 64\\)"),
        (torch.tensor([[-1, 2, 3]]), "in \\[0, 64\\)"),
        (torch.tensor([[1, 2, 2]]), "unique"),
        (torch.tensor([1, 2, 3]), "\\(B, M\\) integer"),
        (torch.tensor([[1.0, 2.0, 3.0]]), "\\(B, M\\) integer"),
    ],
)
def test_invalid_masks_are_rejected(bad, msg):
    model, x, _, _ = model_and_batch()
    with pytest.raises(ValueError, match=msg):
        model.pretrain_losses(x[:1], bad)
    good = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=msg):
        model.pretrain_losses(x[:1], good, bad)  # the generative mask is checked too


def test_pretraining_needs_stride_equal_to_patch():
    model, x, mask_d, _ = model_and_batch(fstride=10, tstride=10)
    assert model.grid == (12, 12)
    with pytest.raises(ValueError, match="stride"):
        model.pretrain_losses(x, mask_d)
    model, x, mask_d, _ = model_and_batch(fstride=16, tstride=10)
    with pytest.raises(ValueError, match="stride"):
        model.pretrain_losses(torch.randn(2, 128, 128), mask_d)
