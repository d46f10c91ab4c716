"""What the loop reads back from the device, and when: the update applied or skipped on the device
(_step_unless), the first non-finite update remembered there (_watch_finite), the sync steps
(_is_sync_step) and the one read-back at each (_read_back), which stops the run on a non-finite
update (_stop_on_nan), so that between log, evaluation and checkpoint steps the device never waits
for Python.

A mixin of the Trainer (gptforge.train.trainer): these methods work on its state (rt, optimizer,
scaler, step, the _bad_* tensors, the training clock), which the Trainer sets up.
"""

from __future__ import annotations

import torch

from gptforge.errors import GptforgeError
from gptforge.train import checkpoint as ckpt


class _ReadBack:
    """The Trainer's device read-backs (see the module docstring)."""

    def _step_unless(self, bad: torch.Tensor) -> None:
        """optimizer.step() unless `bad` (a bool tensor on the device) is set, without reading it back:
        fused optimizers take a found_inf flag and skip the update on the device, the mechanism
        GradScaler uses. Others read the flag back (a host sync per step, as before)."""
        # MPS's fused AdamW kernel ignores found_inf: there the flag is read back like elsewhere.
        if getattr(self.optimizer, "_step_supports_amp_scaling", False) and self.rt.device.type != "mps":
            self.optimizer.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
            self.optimizer.grad_scale = None  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale  # type: ignore[attr-defined]
        elif not bool(bad):
            self.optimizer.step()

    def _watch_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Remember, on the device, the first update whose loss (or, without a GradScaler, gradient
        norm) was not finite; _read_back turns it into the error that stops the run."""
        bad_loss = ~torch.isfinite(loss)
        bad = bad_loss if self.scaler.is_enabled() else bad_loss | ~torch.isfinite(grad_norm)
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, self.step + 1, self._bad_step)
        self._bad_what = torch.where(first, torch.where(bad_loss, 0, 1), self._bad_what)
        self._bad_value = torch.where(first, torch.where(bad_loss, loss.float(), grad_norm.float()),
                                      self._bad_value)

    def _is_sync_step(self, stop_requested: bool, time_up: bool) -> bool:
        """Whether this step reads its results back: log, evaluation and checkpoint steps, the last
        step, the end of a time budget, and (in one process) a Ctrl-C. Under DDP a Ctrl-C is agreed on
        at the next such step, so every rank stops at the same one; the end of a budget is decided on
        the agreed clock, the same on every rank (see _time_is_up)."""
        t, s = self.config.train, self.step
        return (s == 1 or s % t.log_every == 0 or s % t.eval_every == 0 or s % t.checkpoint_every == 0
                or (bool(t.sample_every) and s % t.sample_every == 0)
                or (t.max_steps is not None and s >= t.max_steps)
                or (t.max_tokens is not None and self.tokens >= t.max_tokens)
                or time_up or (stop_requested and not self.rt.distributed))

    def _read_back(self, loss: torch.Tensor, grad_norm: torch.Tensor, stop_requested: bool,
                   time_up: bool) -> tuple[float, float, bool]:
        """The host's view at a sync step: (mean loss over ranks, grad norm, interrupted). Every rank
        agrees on the flags and on the training clock (one all-reduce); a non-finite update since the
        last sync raises."""
        if self.rt.distributed:
            host = torch.tensor([float(stop_requested), float(time_up), self.elapsed], dtype=torch.float64)
            flags = torch.cat([loss.detach().double().reshape(1), host.to(loss.device),
                               (self._bad_step >= 0).double().reshape(1)])
            loss_sum, stops, _, elapsed_sum, bads = self.rt.all_reduce_sum(flags).tolist()
            mean_loss, interrupted, any_bad = loss_sum / self.world, stops > 0, bads > 0
            step0, elapsed0, _ = self._sync_clock
            agreed = elapsed_sum / self.world
            per_update = (agreed - elapsed0) / (self.step - step0) if self.step > step0 else 0.0
            self._sync_clock = (self.step, agreed, per_update)
            # Every rank's own clock is set to the agreed one, so the seconds logged and checkpointed
            # (by rank 0) are the job's, not one rank's.
            self._clock_start += self.elapsed - agreed
            self.elapsed = agreed
            # The end of the budget is read on the agreed clock itself, not on the extrapolation that
            # made this a sync step (it may run ahead after a slow first update).
            max_time = self.config.train.max_time
            self._time_up = max_time is not None and agreed >= max_time
        else:
            mean_loss, interrupted, self._time_up = float(loss), stop_requested, time_up
            any_bad = int(self._bad_step) >= 0
        if any_bad:
            step = int(self._bad_step)
            if step < 0:  # another rank's loss
                self._stop_on_nan("training loss", float("nan"), self.step)
            what = "training loss" if int(self._bad_what) == 0 else "gradient norm"
            self._stop_on_nan(what, float(self._bad_value), step)
        return mean_loss, float(grad_norm), interrupted

    def _stop_on_nan(self, what: str, value: float, step: int) -> None:
        latest = self.run_dir / ckpt.CHECKPOINTS / "latest"
        where = (f"the last good checkpoint is {latest} (step {self.last_saved_step})"
                 if self.last_saved_step >= 0 else "no checkpoint was saved yet")
        self.log.event("stopped", reason="nan", metric=what, value=str(value), step=step)
        raise GptforgeError(f"the {what} became {value} at step {step} (that update was not applied); {where}; "
                            "lower optim.lr, set optim.grad_clip, or use train.dtype=bfloat16/float32")

    def _synchronize(self) -> None:
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
