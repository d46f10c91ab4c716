"""model.preset = "auto": the ladder's rule (with measurements the test controls) and a real run
that measures, chooses, saves an explicit config and resumes without auto."""

from __future__ import annotations

import json

import pytest

from gptforge.config import load_config, resume_config
from gptforge.errors import GptforgeError
from gptforge.train import auto
from gptforge.train.trainer import train


class _Data:
    """What choose_for_budget reads of a prepared corpus."""

    class _Tok:
        vocab_size = 65

    def __init__(self, n_train: int, n_val: int) -> None:
        self.train, self.val, self.tokenizer = range(n_train), range(n_val), self._Tok()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_measure(monkeypatch, clock: _Clock, tokens_per_s: dict[str, float], seconds: float = 0.5):
    """Each rung 'runs' at the given tokens/s and its measurement takes `seconds` of the clock."""
    calls = []

    def measure(rung, config, vocab, data, rt, clk, budget_left, world, allowance):
        long = rung.long_block_size == rung.block_size
        calls.append(rung.name + ("@long" if long else ""))
        clock.now += seconds
        params = 12 * rung.n_layer * rung.n_embd ** 2
        tps = tokens_per_s.get(rung.name + "@long", tokens_per_s[rung.name]) if long else tokens_per_s[rung.name]
        return auto.Measured(rung=rung, tokens_per_s=tps, params=params,
                             tokens=tps * (budget_left - seconds) * auto.TRAINING_SHARE, seconds=seconds)

    monkeypatch.setattr(auto, "_measure", measure)
    return calls


def _rt():
    from gptforge.train.runtime import setup_runtime

    return setup_runtime("cpu", "float32")


SPEEDS = {"a1": 60_000, "a2": 20_000, "a3": 12_000, "a4": 5_800, "a5": 2_500, "a6": 900, "a7": 200, "a8": 100}


@pytest.mark.parametrize("budget, expected", [(30, "a1"), (600, "a3"), (10800, "a4")])
def test_auto_climbs_while_the_budget_gives_enough_tokens_per_parameter(monkeypatch, budget, expected):
    clock = _Clock()
    calls = _fake_measure(monkeypatch, clock, SPEEDS, seconds=0.001 * budget)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", f"train.max_time={budget}"])
    choice = auto.choose_for_budget(cfg, _Data(1_000_000, 100_000), _rt(), clock=clock)
    assert choice.rung.name == expected
    # It measured up to the first rung that fell short, and no further (a3 at 12k tokens/s in 600 s would
    # make ~815 updates of 32 x 256, under LONG_CONTEXT_UPDATES: its long context is not measured).
    names = [r.name for r in auto.RUNGS]
    assert calls == names[:names.index(expected) + 2]
    assert choice.rung.block_size == auto.RUNGS[names.index(expected)].block_size
    m = {auto.label(x.rung): x for x in choice.measured}
    assert m[expected].tokens_per_param >= auto.tokens_per_param_needed(m[expected].params) or expected == "a1"
    assert m[calls[-1]].tokens_per_param < auto.tokens_per_param_needed(m[calls[-1]].params)
    # The config holds the rung explicitly, with the budget recipe, and validates without auto.
    c = choice.config
    r = choice.rung
    assert (c.model.preset, c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == (
        "mini", r.n_layer, r.n_head, r.n_embd, r.block_size)
    assert (c.train.batch_size, c.optim.name, c.optim.schedule, c.optim.lr) == (r.batch_size, "muon", "wsd", r.lr)
    assert c.optim.min_lr == pytest.approx(r.lr / 10) and c.train.max_time == budget
    assert choice.seconds == pytest.approx(len(calls) * 0.001 * budget)


MEASURED = dict(SPEEDS, a1=45_700, a2=17_400, a3=7_000, a4=3_700)  # the pairs' runs (tokens/s)
MEASURED_BY_AUTO = dict(SPEEDS, a1=86_051, a2=18_116, a3=9_077, a4=4_265)  # auto's own, at 600 s


@pytest.mark.parametrize("budget, expected, speeds", [(30, "a1", MEASURED), (90, "a2", MEASURED),
                                                      (600, "a2", MEASURED), (600, "a2", MEASURED_BY_AUTO)])
def test_the_rule_picks_the_winners_of_the_side_by_side_runs_it_was_derived_from(monkeypatch, budget, expected,
                                                                                  speeds):
    """docs/auto.md's pairs, at the speeds measured there (idle 2-core Intel Xeon, 2 threads): a1 beat a2
    in 30 s, a2 beat a1 in 90 s, a2 beat a3 in 10 minutes (twice: at a3's speed in the pair and at the
    speed auto measured for it when it chose a3 under the old rule)."""
    clock = _Clock()
    _fake_measure(monkeypatch, clock, speeds, seconds=0.01)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", f"train.max_time={budget}"])
    rung = auto.choose_for_budget(cfg, _Data(1_000_000, 100_000), _rt(), clock=clock).rung
    assert rung.name == expected
    # The 10-minute runs take a2's long context (the side-by-side runs of docs/auto.md's *The context*);
    # 90 s (~360 updates of 4,096 tokens at these speeds) keeps 64.
    assert rung.block_size == (128 if budget == 600 else 64)


@pytest.mark.parametrize("a2_speed, long_speed, context", [(10_000, None, 64), (16_000, None, 128),
                                                            (16_000, 10_000, 64)])
def test_a2_takes_its_long_context_once_the_run_still_makes_a_thousand_updates_with_it(monkeypatch, a2_speed,
                                                                                      long_speed, context):
    """a2 (context 64, 32 windows) for 300 s: at 10k tokens/s context 128 would give ~680 updates of 4,096
    tokens (under 1,000: it stays 64, and the long context is not even measured); at 16k, ~1,090 (it
    takes 128); at 16k for 64 but 10k measured for 128, the long context's own speed decides (64). The
    rung, batch and dropout are the same either way, and the config holds the context it trains with."""
    clock = _Clock()
    speeds = dict(SPEEDS, a1=10**9, a2=a2_speed, a3=1.0)
    if long_speed:
        speeds["a2@long"] = long_speed
    calls = _fake_measure(monkeypatch, clock, speeds, seconds=0.0)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", "train.max_time=300"])
    choice = auto.choose_for_budget(cfg, _Data(1_000_000, 100_000), _rt(), clock=clock)
    assert calls == ["a1", "a2", "a3"] + (["a2@long"] if a2_speed == 16_000 else [])
    assert choice.rung.name == "a2" and choice.rung.block_size == context == choice.event()["block_size"]
    assert (choice.config.model.block_size, choice.config.train.batch_size) == (context, 32)
    assert ("a2 (context 128)" in choice.event()["measured"]) == ("a2@long" in calls)
    if context == 128:  # a validation split shorter than the long context keeps the short one
        calls.clear()
        choice = auto.choose_for_budget(cfg, _Data(1_000_000, 100), _rt(), clock=clock)
        assert choice.rung.block_size == 64 and "a2@long" not in calls


# What auto measured at the start of the first hour-long cell on Python source (docs/auto.md), half a core
# each; a3 with context 256 measured 5,586 tokens/s at the start of the docstrings cell.
HOUR_ON_CODE = dict(SPEEDS, a1=26_446, a2=7_271, a3=5_799, a4=2_021)


@pytest.mark.parametrize("long_speed, context, dropout", [(5_586, 256, auto.DROPOUT), (2_000, 128, auto.DROPOUT),
                                                          (4_000, 256, 0.0)])
def test_a3_takes_context_256_once_the_run_still_makes_a_thousand_updates_with_it(monkeypatch, long_speed,
                                                                                  context, dropout):
    """The hour on ~1.8M characters of Python source at the speeds auto measured there: a3 (a4 falls short
    of its tokens per parameter), then a3 with context 256 measured too. At 5,586 tokens/s that gives
    ~2,280 updates of 32 x 256: it takes 256, the shape that beat `small` side by side, and sees the text
    ~10 times (dropout 0.05); at 2,000 tokens/s (~815 updates) it keeps 128 (and its ~11 passes: dropout);
    at 4,000, 256 with ~1,630 updates and 7.4 passes, counted at the long context's own speed: no dropout.
    Each measurement takes 1 s of the budget, and the long one is sized for what is left of it."""
    clock = _Clock()
    calls = _fake_measure(monkeypatch, clock, dict(HOUR_ON_CODE, **{"a3@long": long_speed}), seconds=1.0)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", "train.max_time=3600"])
    choice = auto.choose_for_budget(cfg, _Data(1_803_175, 200_352), _rt(), clock=clock)
    assert calls == ["a1", "a2", "a3", "a4", "a3@long"]
    assert (choice.rung.name, choice.rung.block_size, choice.config.model.block_size) == ("a3", context, context)
    assert choice.config.train.batch_size == 32 and choice.config.model.dropout == dropout
    assert choice.seconds == pytest.approx(5.0)
    assert choice.measured[-1].tokens == pytest.approx(long_speed * (3600 - 5) * auto.TRAINING_SHARE)
    labels = [part.rsplit(" ", 4)[0] for part in choice.event()["measured"].split(", ")]
    assert labels == ["a1", "a2", "a3", "a4", "a3 (context 256)"] and choice.event()["block_size"] == context


class _Ranks:
    """Two ranks of a DDP run in one process: rank 0's all-reduce records what it adds, rank 1's adds
    that to its own (zeros), as a sum over the two would."""

    def __init__(self) -> None:
        import dataclasses

        import torch

        self.sent: dict[int, list[float]] = {}
        ranks = self

        class _Rank(type(_rt())):
            def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
                ranks.sent[self.rank] = t.tolist()
                return t if self.rank == 0 else t + torch.tensor(ranks.sent[0], dtype=t.dtype)

        base = {f.name: getattr(_rt(), f.name) for f in dataclasses.fields(_rt())}
        self.rank0 = _Rank(**dict(base, rank=0, world_size=2))
        self.rank1 = _Rank(**dict(base, rank=1, world_size=2))


@pytest.mark.parametrize("a2_speed, context, dropout", [(20_000, 64, 0.0), (32_000, 128, 0.0),
                                                       (80_000, 128, auto.DROPOUT)])
def test_under_ddp_every_rank_takes_rank_0s_rung_context_and_dropout(monkeypatch, a2_speed, context, dropout):
    """Rank 0 measures and decides for 2 ranks (updates count both ranks' windows: at 20k tokens/s
    a2 would make ~1,360 updates of 4,096 tokens alone but ~680 with two ranks, so it keeps 64); rank 1
    measured nothing and takes rung, context and dropout from the all-reduce, each on its own (a long
    context without dropout at 32k: 4.5 passes over the 2M tokens; both at 80k: 11 passes)."""
    clock = _Clock()
    calls = _fake_measure(monkeypatch, clock, dict(SPEEDS, a1=10**9, a2=a2_speed, a3=1.0), seconds=0.0)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", "train.max_time=300"])
    ranks = _Ranks()
    first = auto.choose_for_budget(cfg, _Data(2_000_000, 100_000), ranks.rank0, clock=clock)
    calls.clear()
    second = auto.choose_for_budget(cfg, _Data(2_000_000, 100_000), ranks.rank1, clock=clock)
    assert calls == [] and second.measured == [] and ranks.sent[1] == [0.0, 0.0, 0.0]
    for choice in (first, second):
        assert (choice.rung.name, choice.rung.block_size, choice.config.model.dropout) == ("a2", context, dropout)


def test_bigger_rungs_need_more_tokens_per_parameter_up_to_chinchillas_20():
    need = [auto.tokens_per_param_needed(12 * r.n_layer * r.n_embd ** 2) for r in auto.RUNGS]
    assert need == sorted(need) and need[1] == pytest.approx(2.0 * 0.786432) and need[-1] == 20.0


@pytest.mark.parametrize("passes, dropout", [(7.0, 0.0), (9.0, 0.05)])
def test_dropout_only_when_the_run_sees_its_text_more_than_eight_times(monkeypatch, passes, dropout):
    clock = _Clock()
    n_train = 1_000_000
    tps = passes * n_train / (30 * auto.TRAINING_SHARE)  # a1's speed for `passes` passes in 30 s
    _fake_measure(monkeypatch, clock, dict(SPEEDS, a1=tps, a2=1.0), seconds=0.0)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", "train.max_time=30"])
    choice = auto.choose_for_budget(cfg, _Data(n_train, 100_000), _rt(), clock=clock)
    assert choice.rung.name == "a1" and choice.config.model.dropout == dropout
    assert choice.config.model.attn_dropout == 0.0  # never on the attention weights: the flash kernel stays


def test_auto_stops_measuring_when_its_share_of_the_budget_is_spent(monkeypatch):
    """Measurements of 1 s each in a 30-s budget: after the first two (more than 5% of it) it stops
    climbing, and takes the best rung measured so far."""
    clock = _Clock()
    calls = _fake_measure(monkeypatch, clock, {k: 10**9 for k in SPEEDS}, seconds=1.0)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", "train.max_time=30"])
    choice = auto.choose_for_budget(cfg, _Data(1_000_000, 100_000), _rt(), clock=clock)
    assert calls == ["a1", "a2"] and choice.rung.name == "a2"


def test_auto_leaves_out_contexts_the_corpus_cannot_fill(monkeypatch):
    clock = _Clock()
    calls = _fake_measure(monkeypatch, clock, {k: 10**9 for k in SPEEDS}, seconds=0.0)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", "train.max_time=600"])
    choice = auto.choose_for_budget(cfg, _Data(100_000, 200), _rt(), clock=clock)
    assert choice.rung.block_size == 128 and all(auto.RUNGS[[r.name for r in auto.RUNGS].index(n)].block_size <= 128
                                                 for n in calls)


def test_auto_needs_a_time_budget():
    with pytest.raises(GptforgeError, match="time budget"):
        load_config(None, ["model.preset=auto", "train.max_steps=100"])
    with pytest.raises(GptforgeError, match="unknown"):
        load_config(None, ["model.preset=automatic"])


class _Ticking:
    """A clock that moves 50 ms each time it is read: the measurement and the budget run on it, so the
    test takes the same course on a fast or a busy machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.05
        return self.now


def test_an_auto_run_measures_chooses_saves_and_resumes_without_auto(tiny_config, tmp_path, read_metrics):
    run = tmp_path / "run"
    cfg = tiny_config("model.preset=auto", "model.n_layer=none", "model.n_embd=none", "model.block_size=none",
                      "train.max_steps=none", "train.max_time=4")
    result = train(cfg, run, clock=_Ticking())
    assert result.stopped_by == "max_time" and result.step >= 1
    event = next(e for e in read_metrics(run, "event") if e["event"] == "auto")
    rung = next(r for r in auto.RUNGS if r.name == event["rung"])
    assert event["seconds"] > 0 and rung.name in event["measured"]
    assert event["block_size"] in (rung.block_size, rung.long_block_size)
    saved = resume_config(run)
    assert saved.model.preset != "auto"
    assert (saved.model.n_layer, saved.model.n_embd, saved.model.block_size, saved.train.batch_size) == (
        rung.n_layer, rung.n_embd, event["block_size"], rung.batch_size)
    assert saved.model.activation == auto.ACTIVATION == "gelu"
    assert json.loads((run / "checkpoints" / "latest" / "model_config.json").read_text())["activation"] == "gelu"
    assert "model.preset = 'auto' chose rung" in (run / "config.toml").read_text()
    # The first evaluation's clock already counts the measurement.
    assert read_metrics(run, "train")[0]["elapsed_s"] > event["seconds"]
    result = train(resume_config(run, ["train.max_time=5"]), run, resume=True, clock=_Ticking())
    assert result.stopped_by == "max_time"
    assert not [e for e in read_metrics(run, "event") if e["event"] == "auto" and e["step"] > 0]


def test_the_shortest_path_train_corpus_time(tiny_corpus, tmp_path):
    """`gptforge train --corpus FILE --time 3s`: a budget and nothing else picks model.preset=auto; the
    run's config names the file, the budget, an explicit shape and no step limit."""
    from gptforge import cli

    run = tmp_path / "run"
    cli.main(["train", "--corpus", str(tiny_corpus), "--tokenizer", "char", "--time", "3s", "--out", str(run),
              "train.device=cpu", "train.dtype=float32"])
    saved = resume_config(run)
    assert saved.data.corpus == str(tiny_corpus) and saved.data.tokenizer == "char"
    assert saved.train.max_time == 3.0 and saved.train.max_steps is None
    assert saved.model.preset == "mini" and saved.model.n_layer in {r.n_layer for r in auto.RUNGS}
    assert "model.preset = 'auto' chose rung" in (run / "config.toml").read_text()


def test_narrow_rungs_train_in_float32_where_auto_would_pick_bf16_on_a_cpu():
    import dataclasses

    import torch

    bf16_cpu = dataclasses.replace(_rt(), dtype=torch.bfloat16)
    cfg = load_config(None, ["model.preset=auto", "train.max_steps=none", "train.max_time=60", "train.dtype=auto"])
    narrow, wide = auto.RUNGS[0], auto.RUNGS[1]  # a1 (64 wide), a2 (128)
    assert auto.runtime_for(narrow, cfg, bf16_cpu).dtype == torch.float32
    assert auto.runtime_for(wide, cfg, bf16_cpu).dtype == torch.bfloat16
    asked = load_config(None, ["model.preset=auto", "train.max_steps=none", "train.max_time=60",
                               "train.dtype=bfloat16"])
    assert auto.runtime_for(narrow, asked, bf16_cpu).dtype == torch.bfloat16  # the user's choice stands
