"""The training loop: train() -> train_step() -> evaluate().

    from gptforge.config import load_config
    from gptforge.train.trainer import train
    result = train(load_config("configs/tinyshakespeare-char.toml"), "runs/char")
    result = train(config, "runs/char", resume=True)        # continue exactly where it stopped
    torchrun --nproc_per_node=2 -m gptforge train --config ...   # the same loop under DDP

What it logs is honest: the training loss of an update is the mean cross-entropy (nats/token) over
all the update's tokens on all processes (the backward pass divides by the micro-steps; the log
does not). Evaluation runs with dropout off over `eval_batches` fixed batches of each split, or,
with `stop_metric = "train_full"`, over every token of the training split.

Exactness of resume: the state saved in checkpoints/latest holds the step, tokens seen, elapsed
time, best validation loss, the optimizer, the sampler's position and every RNG of every rank, so a
run interrupted at step N and resumed computes the same updates as one that never stopped. A run
whose length is a time budget (train.max_time alone) takes its learning rate from the fraction of
the budget spent (optim.lr_at_time): its resume continues the clock, and is not bit-exact, since the
seconds of the resumed updates are not those of the first attempt.

The training clock (`elapsed`, what train.max_time counts) runs from the first update to the last
and includes everything the loop does in between: updates, periodic evaluations, samples and
checkpoints. It excludes the start-up (data preparation, building the model, measuring the peak
FLOPs), a train.compile warm-up update, and the final evaluation and save after the last update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge import runs
from gptforge.bpb import byte_table
from gptforge.config import AUTO, Config
from gptforge.data.identity import DATA_IDENTITY, check_data_identity, save_data_identity
from gptforge.data.pipeline import prepare
from gptforge.data.sampler import BatchSampler
from gptforge.data.tokenizers import load_tokenizer
from gptforge.errors import GptforgeError
from gptforge.evaluate import EvalLoss, evaluate_run, mean_loss, split_loss, split_windows
from gptforge.generate import Generator  # samples written while training (train.sample_every)
from gptforge.io import RunLock
from gptforge.model import GPT
from gptforge.runtime import (
    Runtime,
    grad_scaler,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_runtime,
)
from gptforge.train import checkpoint as ckpt
from gptforge.train.clock import _BudgetClock
from gptforge.train.metrics import MetricsLogger, device_peak_flops, mfu
from gptforge.train.optim import (
    configure_optimizer,
    lr_at,
    lr_at_time,
    set_lr,
    warmup_clipped_by_time,
    warmup_updates,
)
from gptforge.train.plan import RunPlan, plan_run
from gptforge.train.prefetch import _Prefetcher
from gptforge.train.readback import _ReadBack
from gptforge.train.signals import _StopRequest

# Evaluation and the data-identity file live outside the training package (gptforge.evaluate,
# gptforge.data.identity); their old names here keep working.
__all__ = ["DATA_IDENTITY", "EvalLoss", "TrainResult", "Trainer", "check_data_identity", "evaluate_run",
           "mean_loss", "save_data_identity", "split_loss", "split_windows", "train"]

EvalHook = Callable[[int, dict], None]


@dataclass
class TrainResult:
    """Where a run ended: its directory, step and tokens, last losses and what stopped it."""

    run_dir: Path
    step: int
    tokens: int
    train_loss: float | None
    """The last update's mean loss over its tokens (training mode: dropout on, training precision)."""
    val_loss: float | None
    """Validation loss at the last evaluation (eval mode, float32)."""
    stopped_by: str
    eval_train_loss: float | None = None
    """Training-split loss at the last evaluation, measured like val_loss (eval mode, float32): the
    number to put beside val_loss. Over `eval_batches` batches, or the whole split with train_full."""


def train(config: Config, out_dir: str | Path, resume: bool = False,
          eval_hook: EvalHook | None = None, clock: Callable[[], float] | None = None) -> TrainResult:
    """Train `config` into the run directory `out_dir` (or continue it with resume=True).

    `eval_hook(step, record)` is called after each evaluation on rank 0; an exception it raises
    stops the run after the latest checkpoint is saved and propagates. Ctrl-C or SIGTERM finish
    the current step, save latest and raise KeyboardInterrupt. A non-finite loss raises
    GptforgeError and leaves the last good checkpoint untouched. `clock` is the time source in seconds
    (time.perf_counter; tests pass one they control)."""
    trainer = Trainer(config, out_dir, resume=resume, eval_hook=eval_hook, clock=clock)
    return trainer.train()


class Trainer(_ReadBack, _BudgetClock):
    """One run: model, optimizer, data stream and counters; `train()` drives it."""

    # Beside the loop: the device read-backs (_ReadBack, train/readback.py) and the training clock
    # (_BudgetClock, train/clock.py) are methods of this class kept in files named for them.

    def __init__(self, config: Config, out_dir: str | Path, resume: bool = False,
                 eval_hook: EvalHook | None = None, clock: Callable[[], float] | None = None) -> None:
        self.run_dir = Path(out_dir)
        self.clock = clock or time.perf_counter
        # One trainer per run directory (rank 0 holds the lock for every rank of its job): a second
        # `train --resume RUN` while this one runs is refused before it reads or writes anything.
        self._lock = RunLock(self.run_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            created = not self.run_dir.exists()
            self._lock.acquire()
            try:
                self._init(config, resume, eval_hook)
            except BaseException:
                self._lock.release()
                if created:  # a run that never started leaves no directory behind
                    shutil.rmtree(self.run_dir, ignore_errors=True)
                raise
        else:
            self._init(config, resume, eval_hook)

    def _init(self, config: Config, resume: bool, eval_hook: EvalHook | None) -> None:
        # A run killed before its first checkpoint has only its config: --resume starts it again from
        # step 0 with that config, so a restart loop on a preemptible machine always gets somewhere.
        has_checkpoint = self._check_run_dir(resume)
        self.restarted = resume and not has_checkpoint
        resume = resume and not self.restarted
        self.rt: Runtime = setup_runtime(config.train.device, config.train.dtype)
        self.auto = None  # model.preset = "auto": what it chose (gptforge.train.auto)
        if config.model.preset == AUTO and not resume:
            config = self._choose_for_budget(config)
            if config.train.dtype != "auto":  # a narrow rung on a bf16 CPU trains in float32
                self.rt = dataclasses.replace(self.rt, dtype=resolve_dtype(config.train.dtype, self.rt.device))
        # Everything derived from the config (the init weights' shapes, the update size, the schedule's
        # length, absolute corpus paths) is resolved here, once, before any data is prepared.
        self.plan: RunPlan = plan_run(config, world_size=self.rt.world_size, resume=resume)
        self.config, self.eval_hook, self.init = self.plan.config, eval_hook, self.plan.init
        if self.auto is not None:
            e = self.auto.event()
            self.plan.extra_notes.append(f"model.preset = 'auto' chose rung {e['rung']} in {e['seconds']} s of the "
                                         f"budget; measured: {e['measured']}")
        config, t = self.config, self.config.train
        # Evaluation runs in float32 whatever the training precision, as `gptforge eval` does, so a
        # logged loss (and a stop_at_loss decision) is the number `gptforge eval` reproduces.
        self.eval_rt: Runtime = dataclasses.replace(self.rt, dtype=torch.float32)
        self.world = self.rt.world_size
        self.accum = self.plan.grad_accum_steps
        self.tokens_per_update = self.plan.tokens_per_update
        self.total_steps = self.plan.schedule_steps
        self.block_size = block_size = self.plan.block_size

        # Data first: the tokenizer fixes the vocabulary size (auto prepared it already, for its measure).
        self.data = self.auto.data if self.auto is not None else self._prepare_data_in_turn(resume)
        if resume or self.restarted:
            check_data_identity(self.run_dir, self.data)
        self.tokenizer = self.data.tokenizer

        # The model is built from the same seed on every rank (DDP also broadcasts rank 0's weights).
        seed_everything(t.seed)
        self.raw_model = GPT(self.plan.gpt_config(self.tokenizer.vocab_size)).to(self.rt.device)
        self.optimizer = configure_optimizer(self.raw_model, config.optim, self.rt.device)
        self.scaler = grad_scaler(self.rt.device, self.rt.dtype)
        self.sampler = BatchSampler(self.data.train, t.batch_size, block_size, mode=config.data.sampling,
                                    seed=t.seed, rank=self.rt.rank, world_size=self.world)
        self.batches = _Prefetcher(self.sampler, self.rt.device)
        # Dropout masks differ between ranks, as their data does.
        torch.manual_seed(t.seed + self.rt.rank)

        # Counters; all of them are part of state_dict().
        self.step = 0            # optimizer updates done
        self.tokens = 0          # training tokens consumed, all ranks
        self.elapsed = 0.0       # training seconds, summed over resumed runs
        self.best_val = math.inf
        self.last_train_loss: float | None = None       # the last update's loss (dropout on)
        self.last_eval_train_loss: float | None = None  # the training split at the last evaluation
        self.last_val_loss: float | None = None
        self.last_eval_step = -1
        self.last_saved_step = -1
        # The first update that was not finite, watched on the device (see _watch_finite): -1 = none.
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=self.rt.device)
        self._bad_what = torch.zeros((), dtype=torch.int64, device=self.rt.device)  # 0: loss, 1: grad norm
        self._bad_value = torch.zeros((), dtype=torch.float32, device=self.rt.device)
        self.compile_s: float | None = None  # the first update's seconds under train.compile (warm-up)
        self.elapsed_start = 0.0  # self.elapsed when train() began (set there)
        self._interval = (self.clock(), 0)  # (time, tokens) where tokens/s is measured from
        self._last_logged_step = -1
        self._time_up = False
        self._stop_event: dict[str, Any] | None = None
        self._flops_per_token, self._peak_flops = 0.0, None
        # train.max_time alone: the budget is the schedule's clock (see _progress).
        self.by_time = self.plan.by_time
        self._clock_start = 0.0  # self.clock() at which self.elapsed_start was the elapsed time
        self._last_checkpoint_s = 0.0  # how long the last save took
        self._update_s = 0.0  # the last update's seconds (single process)
        # Under DDP the clock the LR follows must be the same on every rank: (step, elapsed, seconds per
        # update) agreed at the last sync step, extrapolated between them (see _agreed_elapsed).
        self._sync_clock = (0, 0.0, 0.0)
        self._warmup_clip_logged = False
        self._agreed_exit = False  # the ranks end together (see _finish)
        self._last_sample_step = -1

        if self.auto is not None:  # measuring the rungs took part of the budget
            self.elapsed = self.auto.seconds
        if resume:
            self._load_latest()
        elif self.init is not None:
            self.init.load_into(self.raw_model)

        self.model: torch.nn.Module = self.raw_model
        if t.compile:
            self.model = torch.compile(self.raw_model)
        # Evaluation runs the plain module, eagerly, in float32: no gradient sync, and no second
        # compilation for eval mode and another precision.
        self.eval_model = self.raw_model
        if self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)

        self.log = MetricsLogger(self.run_dir, total_steps=t.max_steps, enabled=self.rt.is_main,
                                 tensorboard=t.tensorboard,
                                 resume_step=self.step if (resume or self.restarted) else None)
        if self.by_time:
            self.log.time_budget = t.max_time
        if self.rt.is_main and not resume:
            if not self.restarted:  # a restart runs the config saved when the run began
                self.plan.save(self.run_dir / "config.toml")
            if not self.restarted or not (self.run_dir / "tokenizer").is_dir():
                self.tokenizer.save(self.run_dir / "tokenizer")
            if not self.restarted or not (self.run_dir / DATA_IDENTITY).is_file():
                save_data_identity(self.run_dir, self.data)

    # ------------------------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run until a stop condition; returns the TrainResult. See the module docstring.

        Between log, evaluation and checkpoint steps nothing is read back to the host, so the device
        never waits for Python: the loss, the gradient norm and the check for non-finite updates stay
        on the device until the next such step (see _read_back and _watch_finite)."""
        t = self.config.train
        self._log_start()
        stop = _StopRequest()
        stop.install()
        self._clock_start, self.elapsed_start = self.clock(), self.elapsed
        self._sync_clock = (self.step, self.elapsed, 0.0)
        # Before the first step all ranks hold the same (saved) elapsed time.
        self._time_up = t.max_time is not None and self.elapsed >= t.max_time
        stopped_by, last = None, None
        self._stop_event = None
        try:
            while True:
                stopped_by = self._limit_reached()
                if stopped_by:
                    break
                step_start = self.clock()
                loss, grad_norm, lr = self.train_step()
                self._watch_finite(loss, grad_norm)
                self.step += 1
                self.tokens += self.tokens_per_update
                compiled_now = t.compile and self.compile_s is None
                if compiled_now:
                    # The first update compiles the model: its seconds are reported apart and left out
                    # of tokens/s, MFU and max_time.
                    self._synchronize()
                    self.compile_s = self.clock() - step_start
                    self._clock_start += self.compile_s
                    self._interval = (self.clock(), self.tokens)
                    self.log.event("compiled", step=self.step, seconds=round(self.compile_s, 3))
                self._tick()
                self._update_s = 0.0 if compiled_now else self.clock() - step_start
                time_up = self._time_is_up()
                if not self._is_sync_step(stop.requested, time_up):
                    continue
                loss, grad_norm, interrupted = self._read_back(loss, grad_norm, stop.requested, time_up)
                self.last_train_loss = loss
                last = (loss, grad_norm, lr)

                if self.step % t.log_every == 0 or self.step == 1:
                    self._log_train(*last)
                if self.step % t.eval_every == 0:
                    stopped_by = self._evaluate_and_maybe_stop()
                if self._sample_due():
                    self.write_sample()
                if self.step % t.checkpoint_every == 0:
                    self.save_checkpoint(keep_step_copy=True)
                if interrupted:  # Ctrl-C or SIGTERM on some rank: the step is complete, save it
                    self.save_checkpoint()
                    self.log.event("stopped", reason="interrupted", value=self.step, step=self.step)
                    self._agreed_exit = True
                    raise KeyboardInterrupt
                if stopped_by:
                    break
            if last is not None and self._last_logged_step != self.step:
                self._log_train(*last)
            if self.last_eval_step != self.step:
                self._evaluate_and_maybe_stop(final=True)
            if self._sample_due(final=True):
                self.write_sample()
            self.save_checkpoint(keep_step_copy=self.step % t.checkpoint_every == 0)
            if self._stop_event:
                self.log.event("stopped", **self._stop_event)
        except BaseException:
            stop.uninstall()
            self._finish()
            raise
        stop.uninstall()
        self._agreed_exit = True
        self._finish()
        return TrainResult(run_dir=self.run_dir, step=self.step, tokens=self.tokens,
                           train_loss=self.last_train_loss, val_loss=self.last_val_loss, stopped_by=stopped_by,
                           eval_train_loss=self.last_eval_train_loss)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer update over `accum` micro-batches; returns (this rank's mean loss, grad norm, lr),
        the first two as tensors on the device (reading them would make the host wait for the device).

        Each micro-batch's loss is divided by the number of micro-steps for the backward pass only,
        so the accumulated gradient is that of the mean over the update's tokens. An update whose loss
        or gradient norm is not finite is skipped on the device: it never reaches the weights."""
        o = self.config.optim
        if self.by_time:
            progress = self._progress()
            lr = lr_at_time(self.step, progress, o)
            if not self._warmup_clip_logged and warmup_clipped_by_time(self.step, progress, o):
                self._warmup_clip_logged = True
                self.log.event("warmup_clipped", step=self.step, warmup_steps=self.step, asked=o.warmup_steps,
                               reason="half of train.max_time spent before optim.warmup_steps updates")
        else:
            lr = lr_at(self.step, o, self.total_steps)
        set_lr(self.optimizer, lr)
        self.model.train()
        loss_sum = torch.zeros((), device=self.rt.device, dtype=torch.float32)
        for micro in range(self.accum):
            x, y = self.batches.next()
            last = micro == self.accum - 1
            # DDP all-reduces gradients on every backward unless told not to; only the last counts.
            sync = contextlib.nullcontext() if (last or not self.rt.distributed) else self.model.no_sync()
            with sync:
                with self.rt.autocast():
                    _, loss = self.model(x, y)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        max_norm = o.grad_clip if o.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        loss = loss_sum / self.accum
        if self.scaler.is_enabled():  # fp16: GradScaler skips steps with inf/nan gradients by itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            if self.rt.distributed:
                # The gradients (and so their norm) are the same on every rank, the loss is not: one rank's
                # non-finite loss must skip the update everywhere, or the replicas would part. A device
                # all-reduce: no host read-back.
                bad = self.rt.all_reduce_sum(bad.to(torch.float32)) > 0
            self._step_unless(bad)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, lr

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Losses with dropout off: val_loss and train_loss over `eval_batches` fixed batches each
        (the same windows at every evaluation, so the curve compares like with like), or train_loss
        over the whole training split when stop_metric is "train_full". Beside each, its bits per
        byte (val_bpb, train_bpb) over the bytes of the same predicted tokens."""
        t = self.config.train
        record: dict[str, Any] = {"tokens": self.tokens}
        self.eval_model.eval()
        try:
            if self.data.val is not None and len(self.data.val) > self.block_size:
                val = self._estimate_loss(self.data.val, seed=t.seed + 1)
                record["val_loss"], record["val_bpb"] = val.loss, val.bpb
            if t.stop_metric == "train_full":
                full = split_loss(self.eval_model, self.data.train, self.block_size, t.batch_size, self.eval_rt,
                                  rank=self.rt.rank, world_size=self.world, token_bytes=byte_table(self.tokenizer))
                record["train_loss"], record["train_bpb"] = full.loss, full.bpb
                record["train_loss_tokens"], record["train_loss_bytes"] = full.tokens, full.bytes
            else:
                train = self._estimate_loss(self.data.train, seed=t.seed + 2)
                record["train_loss"], record["train_bpb"] = train.loss, train.bpb
        finally:
            self.eval_model.train()
        return record

    def write_sample(self) -> str:
        """A short sample from train.sample_prompt, with a fixed seed so samples compare across the run
        (console and RUN/samples.jsonl, rank 0). Its own RNG and eval mode: the training is unchanged."""
        t = self.config.train
        settings = {"temperature": 0.8, "top_k": 40, "seed": t.seed}
        text = ""
        if self.rt.is_main:
            try:
                text = Generator(self.raw_model, self.tokenizer).generate(
                    t.sample_prompt, max_new_tokens=t.sample_tokens, **settings)[0]
            finally:
                self.raw_model.train()
            self.log.sample(self.step, t.sample_prompt, text, tokens=self.tokens, **settings)
        self._last_sample_step = self.step
        return text

    def _sample_due(self, final: bool = False) -> bool:
        """At each evaluation by default (final: the one that ends the run), else every sample_every."""
        every = self.config.train.sample_every
        if self._last_sample_step == self.step:
            return False
        if every is None:
            return self.last_eval_step == self.step
        return every > 0 and (final or self.step % every == 0)

    # ------------------------------------------------------------------------------------ state

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

    # ------------------------------------------------------------------------------------ helpers

    def _evaluate_and_maybe_stop(self, final: bool = False) -> str | None:
        t = self.config.train
        record = self.evaluate()
        record["elapsed_s"] = round(self.elapsed, 3)  # the training clock when this evaluation began
        self.last_eval_step = self.step
        self.last_val_loss = record.get("val_loss", self.last_val_loss)
        self.last_eval_train_loss = record.get("train_loss", self.last_eval_train_loss)
        self.log.log_eval(self.step, **record)
        self._interval = (self.clock(), self.tokens)  # tokens/s counts training time only
        val = record.get("val_loss")
        if val is not None and val < self.best_val:
            self.best_val = val
            if self.rt.is_main:
                ckpt.save_model(self.run_dir / ckpt.CHECKPOINTS / "best", self.raw_model, self._info())
        if self.eval_hook is not None and self.rt.is_main:
            try:
                self.eval_hook(self.step, {"step": self.step, **record})
            except BaseException as e:
                # Only rank 0 runs the hook, so it saves alone (under DDP its RNG state then stands
                # in for the others': such a resume is not bit-exact) and its exit ends the others.
                self.save_checkpoint(collective=False)
                self.log.event("stopped", reason="eval_hook", step=self.step, value=type(e).__name__)
                raise
        if t.stop_at_loss is not None and not final:
            metric = "val_loss" if t.stop_metric == "val" else "train_loss"
            value = record.get(metric)
            if value is not None and value <= t.stop_at_loss:
                held_out = {}  # a memorisation run stops on the training split: what unseen text costs beside it
                if metric != "val_loss" and record.get("val_loss") is not None:
                    held_out = {"val_loss": record["val_loss"], "val_bpb": record.get("val_bpb")}
                self.log.event("stopped", reason="stop_at_loss", metric=metric, value=value,
                               target=t.stop_at_loss, step=self.step, **held_out)
                return "stop_at_loss"
        return None

    def _limit_reached(self) -> str | None:
        """The name of the limit that ends the run before another step, logged with its value."""
        t = self.config.train
        reason, value = None, None
        if t.max_steps is not None and self.step >= t.max_steps:
            reason, value = "max_steps", self.step
        elif t.max_tokens is not None and self.tokens >= t.max_tokens:
            reason, value = "max_tokens", self.tokens
        elif self._time_up:
            reason, value = "max_time", round(self.elapsed, 3)
        if reason:  # logged once the final evaluation and checkpoint are done
            self._stop_event = {"reason": reason, "value": value, "step": self.step}
        return reason

    def _estimate_loss(self, tokens: np.ndarray, seed: int) -> EvalLoss:
        """The mean over `eval_batches` random windows drawn from a fixed seed (the same windows at
        every evaluation), with the bytes of their targets."""
        t = self.config.train
        sampler = BatchSampler(tokens, t.batch_size, self.block_size, mode="random", seed=seed,
                               rank=self.rt.rank, world_size=self.world)
        batches = (sampler.next_batch() for _ in range(t.eval_batches))
        return mean_loss(self.eval_model, batches, self.eval_rt, byte_table(self.tokenizer))

    def _stop_on_nan(self, what: str, value: float, step: int) -> None:
        latest = self.run_dir / ckpt.CHECKPOINTS / "latest"
        where = (f"the last good checkpoint is {latest} (step {self.last_saved_step})"
                 if self.last_saved_step >= 0 else "no checkpoint was saved yet")
        self.log.event("stopped", reason="nan", metric=what, value=str(value), step=step)
        raise GptforgeError(f"the {what} became {value} at step {step} (that update was not applied); {where}; "
                            "lower optim.lr, set optim.grad_clip, or use train.dtype=bfloat16/float32")

    def _log_train(self, loss: float, grad_norm: float, lr: float) -> None:
        now = self.clock()
        t0, tok0 = self._interval
        tps = (self.tokens - tok0) / max(now - t0, 1e-9) if self.tokens > tok0 else None
        self._interval = (now, self.tokens)
        fields = {"tokens": self.tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "elapsed_s": round(self.elapsed, 3)}
        if tps is not None:  # none right after the compile step, which is timed apart
            fields["tokens_per_s"] = tps
        if self.config.data.sampling == "sequential":
            fields["epoch"] = self.batches.state_dict()["epoch"]
        if self._peak_flops and tps is not None:
            fields["mfu"] = mfu(self._flops_per_token, tps / self.world, self._peak_flops)
        self.log.log_train(self.step, **fields)
        self._last_logged_step = self.step

    def _log_start(self) -> None:
        self._flops_per_token = float(self.raw_model.flops_per_token())
        peak_source = "unknown"
        if self.rt.is_main:
            try:
                # Measuring a CPU's peak draws random matrices: keep that off the training RNGs,
                # or a run's dropout masks would depend on whether the number was cached.
                gpu = self.rt.device.type != "cpu"
                with torch.random.fork_rng(devices=[self.rt.device] if gpu else [],
                                           device_type=self.rt.device.type if gpu else "cuda"):
                    self._peak_flops, peak_source = device_peak_flops(self.rt.device, self.rt.dtype)
            except Exception as e:  # MFU is a nicety; never fail a run over it
                peak_source = f"unavailable ({type(e).__name__})"
        self.log.mfu_basis = "vs measured GEMM" if peak_source.startswith("measured") else "vs datasheet peak"
        self._interval = (self.clock(), self.tokens)
        self._last_logged_step = self.step
        if self.restarted:
            self.log.print(f"gptforge: {self.run_dir} saved no checkpoint before it stopped; starting it again "
                           "from step 0 with its saved config")
        self.log.event(
            "resumed" if self.step else ("restarted" if self.restarted else "started"), step=self.step, run_dir=str(self.run_dir),
            device=str(self.rt.device), dtype=str(self.rt.dtype).removeprefix("torch."), world_size=self.world,
            params=self.raw_model.num_params(), batch_size=self.config.train.batch_size,
            grad_accum_steps=self.accum, tokens_per_update=self.tokens_per_update, block_size=self.block_size,
            vocab_size=self.tokenizer.vocab_size, train_tokens=len(self.data.train),
            val_tokens=0 if self.data.val is None else len(self.data.val), peak_flops=self._peak_flops,
            peak_flops_source=peak_source, mfu_basis=self.log.mfu_basis)
        if self.auto is not None:
            self.log.event("auto", step=0, **self.auto.event())
        o = self.config.optim
        if not self.by_time and self.step == 0 and warmup_updates(o, self.total_steps) < o.warmup_steps:
            self.log.event("warmup_clipped", step=0, warmup_steps=warmup_updates(o, self.total_steps),
                           asked=o.warmup_steps, reason=f"at most half of the run's {self.total_steps} updates")

    def _finish(self) -> None:
        self.log.close()
        if self.rt.is_main and (self.run_dir / "metrics.jsonl").is_file():
            try:
                from gptforge.plot import plot_run

                plot_run(self.run_dir)
            except Exception as e:  # the run's results matter more than its picture
                print(f"gptforge: could not draw {self.run_dir / 'loss.png'}: {type(e).__name__}: {e}")
        if self._agreed_exit:
            # Every rank ends here together (a finished run, or a stop they agreed on): none may exit
            # while rank 0 still writes, or torchrun would end rank 0 mid-write.
            self.rt.barrier()
        self.rt.close()
        self._lock.release()

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

    def _choose_for_budget(self, config: Config) -> Config:
        """model.preset = "auto": prepare the data at the smallest context, measure the ladder's rungs on
        this machine and return the config with the chosen shape, batch and LRs written in (saved in
        RUN/config.toml, so the run reproduces and resumes without auto). Its seconds count in the budget."""
        from gptforge.train import auto

        config.validate()
        probe = dataclasses.replace(config, model=dataclasses.replace(config.model, preset="tiny",
                                                                      block_size=auto.smallest_context()))
        self.plan = plan_run(probe, world_size=self.rt.world_size)
        self.config = self.plan.config
        self.block_size = self.plan.block_size
        self.init = None
        data = self._prepare_data_in_turn(False)
        self.auto = auto.choose_for_budget(config, data, self.rt, clock=self.clock)
        return self.auto.config

    def _prepare_data_in_turn(self, resume: bool):
        """Rank 0 prepares (or reuses) the token files while the others wait, then they read the same cache."""
        if self.rt.is_main:
            data = self._prepare_data(resume)
        self.rt.barrier()
        if not self.rt.is_main:
            data = self._prepare_data(resume)
        return data

    def _prepare_data(self, resume: bool):
        d = self.config.data
        tokenizer: Any = d.tokenizer
        if resume or (self.run_dir / "tokenizer").is_dir():
            # The saved tokenizer, so a char/bpe vocabulary is never rebuilt differently.
            tokenizer = load_tokenizer(self.run_dir / "tokenizer")
        elif self.init is not None and self.init.tokenizer is not None:
            tokenizer = self.init.tokenizer  # fine-tuning a gptforge run keeps its vocabulary
        return prepare(d.corpus, tokenizer=tokenizer, val_fraction=d.val_fraction,
                       bpe_vocab_size=d.bpe_vocab_size if d.tokenizer == "bpe" else None,
                       block_size=self.block_size, **d.prepare_options())

    def _load_latest(self) -> None:
        latest = runs.resolve_checkpoint(self.run_dir, "latest")
        runs.load_weights(self.raw_model, latest, self.rt.device)
        # On the CPU: RNG states must be CPU tensors; optimizer.load_state_dict moves its state to the weights.
        self.load_state_dict(ckpt.load_state(latest, map_location="cpu"))
