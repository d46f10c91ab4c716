"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from gptforge.config import OptimConfig
from gptforge.model import GPT
from gptforge.train.optim import configure_optimizer, lr_at, param_groups


def test_decay_on_matrices_only_and_tied_weights_once():
    model = GPT.from_preset("tiny", n_layer=1, vocab_size=50, tie_embeddings=True)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    # nanoGPT's choice: the (2-D) embeddings are decayed; LayerNorm gains and biases are not.
    decayed = {id(p) for p in decay["params"]}
    assert id(model.transformer.wte.weight) in decayed and id(model.transformer.wpe.weight) in decayed
    assert id(model.transformer.ln_f.weight) not in decayed


def test_fused_adamw_on_cpu_steps():
    model = GPT.from_preset("tiny", n_layer=1, vocab_size=50)
    opt = configure_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    assert opt.defaults.get("fused") is True
    before = model.transformer.wte.weight.detach().clone()
    x = torch.randint(0, 50, (2, 8))
    model(x, x)[1].backward()
    opt.step()
    assert not torch.equal(before, model.transformer.wte.weight)


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)        # (step + 1) / warmup: never 0
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)      # halfway: the mean of lr and min_lr
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) and lr_at(500, cfg, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay


def test_constant_schedule():
    cfg = OptimConfig(lr=0.5, warmup_steps=4, schedule="constant")
    assert [lr_at(s, cfg, None) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    cos = OptimConfig(lr=2.0, min_lr=0.2, warmup_steps=0)
    assert lr_at(3, cos, 10) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi * 0.3)))


def test_wsd_is_a_trapezoid_that_ends_at_the_floor():
    from gptforge.config import OptimConfig
    from gptforge.train.optim import lr_at

    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", cooldown_fraction=0.2)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warm-up
    assert lrs[10:80] == [1.0] * 70  # stable
    assert lrs[80:] == pytest.approx([1.0 - 0.9 * (s - 79) / 20 for s in range(80, 100)])  # linear cool-down
    assert lrs[-1] == pytest.approx(0.1) and lr_at(100, cfg, 100) == 0.1
    assert lr_at(50, cfg, None) == 1.0  # not sized yet (a time budget): hold the peak


def test_edge_schedules_found_by_mutation_testing():
    """Cases `make mutate` showed no test held (docs/testing.md)."""
    # A one-step warm-up is the full LR at once, in every schedule (not a cosine already past its peak).
    for schedule in ("cosine", "wsd", "constant"):
        cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=1, schedule=schedule)
        assert lr_at(0, cfg, 10) == 1.0
    # "constant" ignores the schedule's length, even when one is known (and past it).
    cfg = OptimConfig(lr=0.5, min_lr=0.1, warmup_steps=2, schedule="constant")
    assert [lr_at(s, cfg, 6) for s in range(8)] == [0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    # A wsd cool-down of less than one update is one update: only the last is at the floor.
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=0, schedule="wsd", cooldown_fraction=0.2)
    assert [lr_at(s, cfg, 4) for s in range(4)] == [1.0, 1.0, 1.0, pytest.approx(0.1)]
