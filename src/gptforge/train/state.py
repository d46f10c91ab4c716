"""The checkpointed training state: what a resume needs beyond the weights (step, tokens, the
training clock, the best and last losses, the optimizer, the GradScaler, the sampler's position and
every rank's RNG states), saved with the weights into checkpoints/latest (and its step-NNNNNNN copies)
and loaded back by a resume; and the check that a new run never overwrites an old one.

A mixin of the Trainer (gptforge.train.trainer): these methods read and set its counters, optimizer,
scaler, prefetcher and runtime, which the Trainer sets up. gptforge.train.checkpoint writes the files.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gptforge import runs
from gptforge.errors import GptforgeError
from gptforge.runtime import rng_state, set_rng_state
from gptforge.train import checkpoint as ckpt


class _TrainState:
    """The Trainer's checkpointed state (see the module docstring)."""

    def state_dict(self, collective: bool = True) -> dict[str, Any]:
        """Everything but the weights that a resume needs; tensors and plain containers only.
        Under DDP every rank must call it (it gathers all ranks' RNG states) unless collective=False."""
        rng = rng_state()
        if self.rt.distributed and collective:  # every rank's generators (rank 0 saves them)
            rngs: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        return {
            "trainer": {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                        "best_val": self.best_val, "last_train_loss": self.last_train_loss,
                        "last_eval_train_loss": self.last_eval_train_loss, "last_val_loss": self.last_val_loss, "last_eval_step": self.last_eval_step,
                        "world_size": self.world, "accum": self.accum},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": {k: int(v) if isinstance(v, (int, np.integer)) else v
                        for k, v in self.batches.state_dict().items()},
            "rng": rngs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tr = state["trainer"]
        if int(tr["world_size"]) * int(tr["accum"]) != self.world * self.accum:
            raise GptforgeError(
                f"the run was trained with {tr['world_size']} process(es) x {tr['accum']} accumulation steps; "
                f"resume with the same global batch (now {self.world} x {self.accum})")
        self.step, self.tokens, self.elapsed = int(tr["step"]), int(tr["tokens"]), float(tr["elapsed"])
        self.best_val = float(tr["best_val"])
        self.last_train_loss, self.last_val_loss = tr["last_train_loss"], tr["last_val_loss"]
        self.last_eval_train_loss = tr.get("last_eval_train_loss")  # absent in older checkpoints
        self.last_eval_step = int(tr["last_eval_step"])
        self.last_saved_step = self.step
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["sampler"])
        rngs = state["rng"]
        # Same world size: each rank its own generators; otherwise rank 0's (not bit-exact then).
        set_rng_state(rngs[self.rt.rank] if len(rngs) == self.world else rngs[0])

    def save_checkpoint(self, keep_step_copy: bool = False, collective: bool = True) -> None:
        """checkpoints/latest (atomically), plus a step-NNNNNNN copy and pruning when asked.
        Collective under DDP (every rank takes part) unless collective=False (rank 0 alone)."""
        clock = self.clock()
        # The elapsed time saved counts everything done at this step (its evaluation and sample too),
        # and the previous save's seconds stand in for this one's, so a resume gets no time back.
        self._tick()
        elapsed = self.elapsed
        self.elapsed += self._last_checkpoint_s
        try:
            state = self.state_dict(collective)
        finally:
            self.elapsed = elapsed
        if self.rt.is_main and self.last_saved_step != self.step:
            latest = self.run_dir / ckpt.CHECKPOINTS / "latest"
            ckpt.save_model(latest, self.raw_model, {**self._info(), "time": state["trainer"]["elapsed"]}, state=state)
            self.last_saved_step = self.step
        if self.rt.is_main and keep_step_copy and self.config.train.keep_last > 0:
            latest = self.run_dir / ckpt.CHECKPOINTS / "latest"
            ckpt.copy_checkpoint(latest, self.run_dir / ckpt.CHECKPOINTS / ckpt.step_name(self.step))
            ckpt.prune_step_checkpoints(self.run_dir, self.config.train.keep_last)
        if collective:
            self.rt.barrier()
        self._last_checkpoint_s = self.clock() - clock
        self._interval = (self.clock(), self.tokens)

    def _info(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "train_loss": self.last_train_loss,
                "eval_train_loss": self.last_eval_train_loss, "val_loss": self.last_val_loss,
                "time": round(self.elapsed, 3)}

    def _check_run_dir(self, resume: bool) -> bool:
        """Whether the run directory holds a checkpoint to resume; refuses to overwrite a run."""
        latest = self.run_dir / ckpt.CHECKPOINTS / "latest"
        has_checkpoint = latest.exists() or latest.with_name("latest.old").exists()
        if resume:
            if not has_checkpoint and (self.run_dir / "config.toml").is_file():
                return False  # killed before its first checkpoint: start it again (see __init__)
            runs.resolve_checkpoint(self.run_dir, "latest")  # clear error when there is none
        elif has_checkpoint:
            raise GptforgeError(f"{self.run_dir} already holds a run; resume it with --resume {self.run_dir}, "
                                "or pick another --out")
        elif (self.run_dir / "config.toml").exists():
            raise GptforgeError(f"{self.run_dir} holds a run that saved no checkpoint yet; start it again with "
                                f"--resume {self.run_dir}, or pick another --out")
        return has_checkpoint

    def _load_latest(self) -> None:
        latest = runs.resolve_checkpoint(self.run_dir, "latest")
        runs.load_weights(self.raw_model, latest, self.rt.device)
        # On the CPU: RNG states must be CPU tensors; optimizer.load_state_dict moves its state to the weights.
        self.load_state_dict(ckpt.load_state(latest, map_location="cpu"))
