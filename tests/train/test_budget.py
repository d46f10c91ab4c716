"""A time budget is the schedule's clock: with a clock the test controls (each update takes a set
number of seconds, exact in binary), the LR follows the fraction of train.max_time spent, and the run ends on the
budget with the LR at its floor: at a steady speed, after a 2x slowdown half-way, and after a kill
and a resume. Nothing here depends on how fast or busy this machine is."""

from __future__ import annotations

import pytest

from gptforge.config import resume_config
from gptforge.train import checkpoint as ckpt
from gptforge.train.optim import lr_at_time
from gptforge.train.trainer import Trainer, train

BUDGET = 10.0
MIN_LR = 3e-4
REAL_STEP = Trainer.train_step
REAL_EVALUATE = Trainer.evaluate


class FakeClock:
    """A time source that moves only when the test says so."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _timed_steps(monkeypatch, clock: FakeClock, seconds, kill_at: int | None = None):
    """Each update advances `clock` by seconds(trainer) after it has run; at update `kill_at` the
    process 'dies' (an exception out of the loop, no checkpoint written for it)."""
    def step(self):
        out = REAL_STEP(self)
        clock.now += seconds(self)
        if kill_at is not None and self.step + 1 == kill_at:
            raise RuntimeError("killed")
        return out

    monkeypatch.setattr(Trainer, "train_step", step)


def _timed_evaluations(monkeypatch, clock: FakeClock, seconds: float):
    """Each evaluation advances `clock` by `seconds` after it has run."""
    def evaluate(self):
        out = REAL_EVALUATE(self)
        clock.now += seconds
        return out

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def _budget_config(tiny_config, *extra):
    return tiny_config("train.max_steps=none", f"train.max_time={BUDGET}", "optim.schedule=wsd",
                       "optim.warmup_steps=5", "optim.cooldown_fraction=0.3", f"optim.min_lr={MIN_LR}",
                       "train.eval_every=100000", "train.checkpoint_every=100000", *extra)


def _check_ends_on_budget(run, read_metrics, last_update_s: float):
    records = read_metrics(run, "train")
    stop = read_metrics(run, "event")[-1]
    assert (stop["event"], stop["reason"]) == ("stopped", "max_time")
    end = records[-1]["elapsed_s"]
    assert BUDGET <= end <= BUDGET + last_update_s + 1e-6   # within one update of the budget (+3% here)
    assert records[-1]["lr"] == pytest.approx(MIN_LR)    # the floor on the last update
    assert records[-2]["lr"] > MIN_LR                    # ...and not long before: the cool-down is whole
    return records


def test_the_lr_follows_the_fraction_of_the_budget(tiny_config, tmp_path, read_metrics, monkeypatch):
    clock = FakeClock()
    _timed_steps(monkeypatch, clock, lambda t: 0.125)
    cfg = _budget_config(tiny_config)
    result = train(cfg, tmp_path / "run", clock=clock)
    assert result.stopped_by == "max_time" and result.step == 80
    records = _check_ends_on_budget(tmp_path / "run", read_metrics, 0.125)
    # Each update's LR is lr_at_time at the fraction spent when it ends (the first: nothing measured yet).
    for r in records:
        progress = 0.0 if r["step"] == 1 else r["elapsed_s"] / BUDGET
        assert r["lr"] == pytest.approx(lr_at_time(r["step"] - 1, progress, cfg.optim)), r["step"]
    stable = [r["lr"] for r in records if 6 <= r["step"] <= 56]   # the cool-down: the last 30% = 3 s
    assert stable == [cfg.optim.lr] * len(stable)
    # No update count was made up: the saved config still has none.
    assert resume_config(tmp_path / "run").train.max_steps is None


def test_a_2x_slowdown_half_way_still_ends_on_the_budget(tiny_config, tmp_path, read_metrics, monkeypatch):
    """Another process takes a core half-way: the updates take twice as long, the cool-down stays whole
    (it is measured in seconds) and the run ends with the budget, the LR at its floor."""
    clock = FakeClock()
    _timed_steps(monkeypatch, clock, lambda t: 0.125 if t.elapsed < BUDGET / 2 else 0.25)
    result = train(_budget_config(tiny_config), tmp_path / "run", clock=clock)
    assert result.stopped_by == "max_time" and result.step == 60   # 40 updates of 0.125 s, 20 of 0.25 s
    records = _check_ends_on_budget(tmp_path / "run", read_metrics, 0.25)
    cooling = [r for r in records if r["step"] > 5 and r["lr"] < cfg_lr(tiny_config)]
    assert cooling[0]["elapsed_s"] == 7.25  # the first update that ends past 70% of the time


def cfg_lr(tiny_config) -> float:
    return _budget_config(tiny_config).optim.lr


def test_a_killed_and_resumed_run_ends_on_the_budget(tiny_config, tmp_path, read_metrics, monkeypatch):
    """Killed at update 43 (checkpoint at 40), resumed on a fresh clock: the clock continues from the
    checkpoint's seconds, which count the evaluations done at or before that step, and the run ends on
    the budget with the LR at its floor."""
    clock = FakeClock()
    _timed_steps(monkeypatch, clock, lambda t: 0.125, kill_at=43)
    _timed_evaluations(monkeypatch, clock, 0.5)
    run = tmp_path / "run"
    cfg = _budget_config(tiny_config, "train.checkpoint_every=10", "train.eval_every=20")
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, run, clock=clock)
    info = ckpt.load_state(run / "checkpoints" / "latest")["trainer"]
    assert info["step"] == 40
    assert info["elapsed"] == 40 * 0.125 + 2 * 0.5  # the updates and the evaluations at 20 and 40

    resumed_clock = FakeClock(start=5_000.0)
    _timed_steps(monkeypatch, resumed_clock, lambda t: 0.125)
    monkeypatch.setattr(Trainer, "evaluate", REAL_EVALUATE)
    result = train(resume_config(run), run, resume=True, clock=resumed_clock)
    assert result.stopped_by == "max_time"
    records = _check_ends_on_budget(run, read_metrics, 0.125)
    after = [r for r in records if r["step"] > 40]
    assert after[0]["step"] == 41 and after[0]["elapsed_s"] == 6.125
    assert result.step == 40 + 32   # the 4 s left, at 0.125 s an update
    resumed = [e for e in read_metrics(run, "event") if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 40


def test_a_warm_up_the_budget_cannot_hold_is_clipped_and_logged(tiny_config, tmp_path, read_metrics, monkeypatch):
    """optim.warmup_steps = 500 in a budget that fits 100 updates: the warm-up ends at half the budget,
    the log says so, and the run still cools down to the floor."""
    clock = FakeClock()
    _timed_steps(monkeypatch, clock, lambda t: 0.125)
    run = tmp_path / "run"
    train(_budget_config(tiny_config, "optim.warmup_steps=500"), run, clock=clock)
    clipped = [e for e in read_metrics(run, "event") if e["event"] == "warmup_clipped"]
    assert len(clipped) == 1 and clipped[0]["asked"] == 500 and clipped[0]["step"] == 39  # 40 x 0.125 s = half
    records = _check_ends_on_budget(run, read_metrics, 0.125)
    assert max(r["lr"] for r in records) == pytest.approx(cfg_lr(tiny_config))


def test_a_step_run_logs_a_clipped_warm_up(tiny_config, tmp_path, read_metrics):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=8", "optim.warmup_steps=50", "optim.schedule=wsd"), run)
    clipped = [e for e in read_metrics(run, "event") if e["event"] == "warmup_clipped"]
    assert len(clipped) == 1 and (clipped[0]["warmup_steps"], clipped[0]["asked"]) == (4, 50)
    assert read_metrics(run, "train")[3]["lr"] == pytest.approx(3e-3)  # the peak, at update 4


def test_each_evaluation_logs_its_seconds_and_the_clock_counts_them(tiny_config, tmp_path, read_metrics,
                                                                    monkeypatch):
    """An evaluation record carries eval_s, the seconds it took; the training clock (elapsed_s) runs on
    through it, so the next evaluation's clock is 10 updates and one evaluation later."""
    clock = FakeClock()
    _timed_steps(monkeypatch, clock, lambda t: 0.125)
    _timed_evaluations(monkeypatch, clock, 0.75)
    train(tiny_config("train.max_steps=30", "train.eval_every=10"), tmp_path / "run", clock=clock)
    evals = read_metrics(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert [e["eval_s"] for e in evals] == [0.75, 0.75, 0.75]
    assert evals[1]["elapsed_s"] - evals[0]["elapsed_s"] == pytest.approx(10 * 0.125 + 0.75)
