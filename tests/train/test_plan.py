"""gptforge.train.plan: a config resolved once, for a number of processes, into everything derived from it."""

from __future__ import annotations

import pytest

from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.train.plan import plan_run


def test_update_size_depends_on_the_processes_and_is_saved_as_tokens():
    cfg = load_config(None, ["model.preset=tiny", "model.block_size=64", "train.batch_size=4",
                             "train.tokens_per_update=1024", "train.max_tokens=10000"])
    one, two = plan_run(cfg, world_size=1), plan_run(cfg, world_size=2)
    assert (one.grad_accum_steps, two.grad_accum_steps) == (4, 2)
    assert one.tokens_per_update == two.tokens_per_update == 1024
    assert one.schedule_steps == 10  # ceil(10,000 / 1,024) updates
    with pytest.raises(GptforgeError, match=r"not a multiple of batch_size \* block_size \* processes = 4 \* 64 \* 3"):
        plan_run(cfg, world_size=3)
    # grad_accum_steps given instead: the tokens are derived, and saved in its place.
    acc = plan_run(load_config(None, ["model.preset=tiny", "train.batch_size=4", "train.grad_accum_steps=3"]), 2)
    assert (acc.grad_accum_steps, acc.tokens_per_update) == (3, 3 * 4 * 64 * 2)
    assert acc.config.train.tokens_per_update == 1536 and acc.config.train.grad_accum_steps is None


def test_the_resolved_config_is_complete_and_resolving_it_again_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("hello world\n" * 100, encoding="utf-8")
    cfg = load_config(None, ["model.preset=mini", "model.n_layer=2", "data.corpus=corpus.txt", "train.max_steps=30",
                             "optim.schedule=wsd"])
    plan = plan_run(cfg)
    m = plan.config.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias, m.tie_embeddings) == \
           (2, 4, 128, 128, 0.0, True, True)  # the set field and the preset's others, all written out
    assert plan.config.optim.decay_steps == plan.schedule_steps == 30
    assert plan.config.data.corpus == str(tmp_path / "corpus.txt")
    assert plan.gpt_config(vocab_size=65).n_layer == 2 and plan.block_size == 128
    assert m.attn_dropout is None and plan.gpt_config(vocab_size=65).attn_dropout_p == 0.0  # dropout's
    split = plan_run(load_config(None, ["model.preset=mini", "data.corpus=corpus.txt", "train.max_steps=30",
                                        "model.dropout=0.1", "model.attn_dropout=0"])).gpt_config(vocab_size=65)
    assert (split.dropout, split.attn_dropout, split.attn_dropout_p) == (0.1, 0.0, 0.0)
    plan.save(tmp_path / "config.toml")
    text = (tmp_path / "config.toml").read_text()
    assert "# resolved for 1 process(es): 1 micro-batch(es) of 8 x 128 tokens" in text
    again = plan_run(load_config(tmp_path / "config.toml"), resume=True)
    assert again.config == plan.config and again.grad_accum_steps == plan.grad_accum_steps


def test_a_time_budget_alone_is_the_schedules_clock():
    """train.max_time alone: no update count is derived (the LR follows the fraction of the budget);
    with max_steps too, the steps give the schedule and the time only stops the run."""
    plan = plan_run(load_config(None, ["train.max_steps=none", "train.max_time=10m"]))
    assert plan.schedule_steps is None and plan.by_time and plan.config.train.max_time == 600.0
    both = plan_run(load_config(None, ["train.max_steps=50", "train.max_time=30"]))
    assert both.schedule_steps == 50 and not both.by_time
