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
    assert lr_at(50, cfg, None) == 1.0  # no length: hold the peak


def test_a_warm_up_longer_than_half_the_run_is_clipped():
    """A warm-up of 300 updates in a run of 100 would never reach the peak nor cool down: it takes
    half the run, then the schedule decays to the floor on the last update."""
    from gptforge.train.optim import warmup_updates

    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=300, schedule="wsd", cooldown_fraction=0.2)
    assert warmup_updates(cfg, 100) == 50 and warmup_updates(cfg, 1000) == 300
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[:50] == pytest.approx([(s + 1) / 50 for s in range(50)]) and max(lrs) == 1.0
    assert lrs[-1] == pytest.approx(0.1)
    cos = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=30, schedule="cosine")
    assert lr_at(9, cos, 20) == pytest.approx(1.0) and lr_at(19, cos, 20) < 0.2


@pytest.mark.parametrize("schedule", ["wsd", "cosine", "constant"])
def test_the_time_schedule_is_a_function_of_the_budget_spent(schedule):
    """lr_at_time(step, progress): warm-up over warmup_steps updates, then the shape over the fraction
    of the budget, min_lr as the budget runs out (constant: lr), whatever the step count."""
    from gptforge.train.optim import lr_at_time

    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, cooldown_fraction=0.25)
    assert lr_at_time(0, 0.0, cfg) == pytest.approx(0.1)         # first update of the warm-up
    assert lr_at_time(4, 0.0, cfg) == pytest.approx(0.5)
    end = {"wsd": 0.1, "cosine": 0.1, "constant": 1.0}[schedule]
    for steps in (20, 500, 10_000):  # the step count does not move the end
        assert lr_at_time(steps, 1.0, cfg) == pytest.approx(end)
        assert lr_at_time(steps, 1.7, cfg) == pytest.approx(end)   # past the budget: held at the floor
    if schedule == "wsd":
        assert lr_at_time(100, 0.75, cfg) == 1.0 and lr_at_time(100, 0.5, cfg) == 1.0
        assert lr_at_time(100, 0.875, cfg) == pytest.approx(0.55)  # half-way down the cool-down
    if schedule == "cosine":
        assert lr_at_time(100, 0.5, cfg) == pytest.approx(0.55)
        lrs = [lr_at_time(100, p / 100, cfg) for p in range(101)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_a_time_budget_ends_a_slow_warm_up_by_half_the_budget():
    """Updates so slow that warmup_steps would outlast the budget: the ramp follows the budget too, so
    the peak is reached at half of it at the latest and the floor at its end."""
    from gptforge.train.optim import lr_at_time, warmup_clipped_by_time

    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=1000, schedule="wsd", cooldown_fraction=0.3)
    assert lr_at_time(3, 0.25, cfg) == pytest.approx(0.5)
    assert lr_at_time(6, 0.5, cfg) == 1.0 and warmup_clipped_by_time(6, 0.5, cfg)
    assert not warmup_clipped_by_time(6, 0.4, cfg) and not warmup_clipped_by_time(999, 0.9, cfg)
    assert lr_at_time(12, 1.0, cfg) == pytest.approx(0.1)


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


def test_set_lr_scales_muon_groups_by_their_own_peak():
    """Muon's groups run at muon_lr where AdamW's run at lr: the schedule's value is scaled for them."""
    from gptforge.train.optim import set_lr

    model = GPT.from_preset("tiny", n_layer=1, vocab_size=50)
    opt = configure_optimizer(model, OptimConfig(name="muon", lr=0.01, muon_lr=0.04), torch.device("cpu"))
    set_lr(opt, 0.005)  # half of the peak
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(0.02)] * len(opt.muon.param_groups)
    assert [g["lr"] for g in opt.adamw.param_groups] == [0.005] * len(opt.adamw.param_groups)
    adamw = configure_optimizer(model, OptimConfig(lr=0.01), torch.device("cpu"))
    set_lr(adamw, 0.003)
    assert [g["lr"] for g in adamw.param_groups] == [0.003, 0.003]


def test_warmup_updates_clips_to_half_of_a_known_length():
    from gptforge.train.optim import warmup_clipped_by_time, warmup_updates

    cfg = OptimConfig(warmup_steps=10)
    assert warmup_updates(cfg, None) == 10  # no known length: as configured
    assert [warmup_updates(cfg, n) for n in (5, 9, 20, 21, 100)] == [2, 4, 10, 10, 10]  # whole updates
    # A time budget cuts the warm-up only while updates are left in it, and from half the budget on.
    cfg = OptimConfig(warmup_steps=1000)
    assert warmup_clipped_by_time(998, 0.9, cfg) and not warmup_clipped_by_time(999, 0.9, cfg)
    assert warmup_clipped_by_time(6, 0.5, cfg) and not warmup_clipped_by_time(6, 0.49, cfg)


def test_the_time_schedule_after_its_warm_up_and_without_one():
    from gptforge.train.optim import lr_at_time

    for schedule in ("wsd", "cosine", "constant"):
        cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, cooldown_fraction=0.25)
        # Past the warm-up the ramp no longer scales anything (it would be 1.1 and 1.5 here).
        assert lr_at_time(10, 0.0, cfg) == 1.0 and lr_at_time(14, 0.0, cfg) == 1.0
        assert lr_at_time(100, 0.1, cfg) == pytest.approx({"wsd": 1.0, "constant": 1.0}.get(
            schedule, 0.1 + 0.45 * (1 + math.cos(math.pi * 0.1))))
        no_warmup = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=0, schedule=schedule, cooldown_fraction=0.25)
        assert lr_at_time(0, 0.0, no_warmup) == 1.0  # the first update at the peak


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optim_eps_is_the_epsilon_of_the_adamw_that_updates_the_embedding(name):
    """The GPT-2-token recipe sets optim.eps = 1e-5 for the embedding rows of tokens its text never
    contains (docs/results.md): it must reach the AdamW that steps the embedding, alone or in Muon's pair."""
    model = GPT.from_preset("tiny", n_layer=1, vocab_size=50)
    opt = configure_optimizer(model, OptimConfig(name=name, lr=1e-2, eps=1e-5), torch.device("cpu"))
    adamw = opt.adamw if name == "muon" else opt
    wte = model.transformer.wte.weight
    (group,) = [g for g in adamw.param_groups if any(p is wte for p in g["params"])]
    assert group["eps"] == 1e-5
