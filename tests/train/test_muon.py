"""Batched Muon: torch.optim.Muon's updates and checkpoints, and a skip flag that stays on the device."""

from __future__ import annotations

import io

import pytest
import torch

from gptforge.config import OptimConfig
from gptforge.model import GPT
from gptforge.train.muon import Muon, orthogonalize
from gptforge.train.optim import MuonAdamW, configure_optimizer

needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="needs torch.optim.Muon (2.9+)")

# Wide, tall and square, two of a shape (one stack), and a pair that differ only by a transpose.
SHAPES = [(48, 16), (16, 48), (24, 24), (48, 16), (32, 16)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _step(opt, params, grads) -> None:
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad.clone()
    opt.step()


@needs_torch_muon
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_same_updates_as_torch_muon(adjust_lr_fn, nesterov):
    """Several steps with weight decay and a learning rate that changes between them (as the schedule
    does): the weights follow torch.optim.Muon's to within bf16 rounding of the orthogonalised update
    (bit-identical on the machine this was written on), the momentum buffers exactly. The large lr and
    weight decay make a wrong decay order or lr adjustment show (~lr^2 wd = 5e-3 per step)."""
    ours, theirs = _params(), _params()
    kwargs = {"lr": 0.1, "weight_decay": 0.5, "momentum": 0.9, "nesterov": nesterov, "adjust_lr_fn": adjust_lr_fn}
    a, b = Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    for step in range(5):
        for opt in (a, b):
            opt.param_groups[0]["lr"] = 0.1 * (1 - 0.15 * step)
        grads = _grads(step)
        _step(a, ours, grads)
        _step(b, theirs, grads)
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)
    assert (ours[0] - _params()[0]).abs().max() > 0.1  # it moved: 5 updates of ~lr each


def test_orthogonalize_is_torch_newton_schulz_on_each_matrix():
    from torch.optim._muon import _zeropower_via_newtonschulz  # torch's own, one matrix at a time

    stack = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(1))
    batched = orthogonalize(stack)
    for i in range(3):
        one = _zeropower_via_newtonschulz(stack[i], (3.4445, -4.7750, 2.0315), 5, 1e-7)
        torch.testing.assert_close(batched[i].float(), one.float(), rtol=0, atol=2e-2)
    s = torch.linalg.svdvals(batched[0].float())
    assert s.min() > 0.4 and s.max() < 1.6  # nearly orthogonal: singular values around 1


@needs_torch_muon
def test_state_dict_round_trip_and_torch_muon_checkpoints_load():
    """Resume is exact: a saved and reloaded Muon continues as the uninterrupted one. The state is
    torch.optim.Muon's, so a checkpoint written by either loads into the other."""
    whole = _params()
    opt = Muon(whole, lr=0.05, weight_decay=0.1)
    for step in range(4):
        _step(opt, whole, _grads(step))

    for maker in (Muon, torch.optim.Muon):
        first = _params()
        before = maker(first, lr=0.05, weight_decay=0.1)
        for step in range(2):
            _step(before, first, _grads(step))
        buf = io.BytesIO()
        torch.save({"params": [p.detach() for p in first], "opt": before.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
        after = Muon(resumed, lr=0.05, weight_decay=0.1)
        after.load_state_dict(saved["opt"])
        for step in range(2, 4):
            _step(after, resumed, _grads(step))
        for p, q in zip(resumed, whole, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0 if maker is Muon else 1e-5)
        assert set(after.state_dict()["param_groups"][0]) == set(torch.optim.Muon(_params()).state_dict()
                                                                 ["param_groups"][0])


def test_a_skipped_update_changes_nothing_and_a_clear_flag_changes_nothing_either():
    """found_inf = 1: weights and momentum stay bit-identical even though the gradient holds inf and
    nan; found_inf = 0: the same update as without a flag. Nothing is read back (that is the GPU test's
    to check); here the flag is a tensor the step only computes with."""
    params, plain = _params(), _params()
    opt, ref = Muon(params, lr=0.05, weight_decay=0.1), Muon(plain, lr=0.05, weight_decay=0.1)
    _step(opt, params, _grads(0))
    _step(ref, plain, _grads(0))
    weights = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]

    bad = _grads(1)
    bad[0][0, 0], bad[2][1, 1] = float("inf"), float("nan")
    opt.found_inf = torch.ones(())
    _step(opt, params, bad)
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, bufs, strict=True))

    opt.found_inf = torch.zeros(())
    _step(opt, params, _grads(2))
    del opt.found_inf
    _step(ref, plain, _grads(2))
    assert all(torch.equal(p, q) for p, q in zip(params, plain, strict=True))


def test_grad_scale_unscales_like_fused_adamw():
    """GradScaler.step without a prior unscale_ hands over grad_scale; the update is the unscaled one."""
    params, plain = _params(), _params()
    opt, ref = Muon(params, lr=0.05), Muon(plain, lr=0.05)
    opt.grad_scale = torch.tensor(1024.0)
    _step(opt, params, [g * 1024 for g in _grads(0)])
    _step(ref, plain, _grads(0))
    for p, q in zip(params, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_muon_adamw_skips_both_parts_on_the_device():
    """configure_optimizer's MuonAdamW (fused AdamW) takes found_inf like a fused optimizer and hands it
    to both parts: a skipped update leaves every weight, Muon's momentum and AdamW's moments and step
    counts as they were; without a fused AdamW it does not claim the ability."""
    torch.manual_seed(0)
    model = GPT.from_preset("tiny", n_layer=1, vocab_size=50)
    opt = configure_optimizer(model, OptimConfig(name="muon", lr=1e-2), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW) and opt._step_supports_amp_scaling
    x = torch.randint(0, 50, (2, 8))
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}

    model(x, x)[1].backward()
    next(model.parameters()).grad.fill_(float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert not hasattr(opt.muon, "found_inf") and not hasattr(opt.adamw, "found_inf")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())

    unfused = configure_optimizer(model, OptimConfig(name="muon", fused=False), torch.device("cpu"))
    assert not unfused._step_supports_amp_scaling
