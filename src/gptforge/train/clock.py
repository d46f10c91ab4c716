"""The training clock and the time budget: `elapsed` (what train.max_time counts, summed over resumed
runs), the clock every DDP rank agrees on without talking, the fraction of the budget the LR
follows and whether the budget is spent.

A mixin of the Trainer (gptforge.train.trainer): these methods read its clock, counters and
_sync_clock (agreed at each sync step by _read_back, gptforge.train.readback), which the Trainer
sets up.
"""

from __future__ import annotations


class _BudgetClock:
    """The Trainer's training clock (see the module docstring)."""

    def _tick(self) -> None:
        """self.elapsed: the training clock (see the module docstring), summed over resumed runs."""
        self.elapsed = self.elapsed_start + self.clock() - self._clock_start

    def _agreed_elapsed(self) -> float:
        """Under DDP, the training clock every rank agrees on without talking: the mean over ranks at the
        last sync step, plus the seconds per update measured between the last two sync steps for each
        update since. One process reads its own clock."""
        if not self.rt.distributed:
            return self.elapsed_start + self.clock() - self._clock_start
        step0, elapsed0, per_update = self._sync_clock
        return elapsed0 + (self.step - step0) * per_update

    def _progress(self) -> float:
        """The fraction of train.max_time spent when the coming update ends: the clock now plus the last
        update's seconds (one process; under DDP the agreed seconds per update), so the update that uses
        up the budget is the one that reaches min_lr."""
        if self.rt.distributed:
            step0, elapsed0, per_update = self._sync_clock
            seconds = elapsed0 + (self.step + 1 - step0) * per_update
        else:
            seconds = self._agreed_elapsed() + self._update_s
        return seconds / self.config.train.max_time  # type: ignore[operator]

    def _time_is_up(self) -> bool:
        """train.max_time spent, on this process's clock (one process) or the agreed one (DDP)."""
        max_time = self.config.train.max_time
        if max_time is None:
            return False
        return (self._agreed_elapsed() if self.rt.distributed else self.elapsed) >= max_time
