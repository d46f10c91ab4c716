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
import gc
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

from gptforge.bpb import byte_table
from gptforge.config import AUTO, Config
from gptforge.data.identity import DATA_IDENTITY, check_data_identity, save_data_identity
from gptforge.data.sampler import BatchSampler
from gptforge.evaluate import EvalLoss, evaluate_run, mean_loss, split_loss, split_windows
from gptforge.io import RunLock
from gptforge.model import GPT
from gptforge.runtime import (
    Runtime,
    grad_scaler,
    keep_freed_memory,
    resolve_dtype,
    seed_everything,
    setup_runtime,
)
from gptforge.train import checkpoint as ckpt
from gptforge.train.clock import _BudgetClock
from gptforge.train.data import _RunData
from gptforge.train.metrics import MetricsLogger
from gptforge.train.optim import (
    configure_optimizer,
    lr_at,
    lr_at_time,
    set_lr,
    warmup_clipped_by_time,
)
from gptforge.train.plan import RunPlan, plan_run
from gptforge.train.prefetch import _Prefetcher
from gptforge.train.readback import _ReadBack
from gptforge.train.report import _Report
from gptforge.train.signals import _StopRequest
from gptforge.train.state import _TrainState

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


class Trainer(_ReadBack, _BudgetClock, _TrainState, _RunData, _Report):
    """One run: model, optimizer, data stream and counters; `train()` drives it."""

    # Beside the loop, methods of this class kept in files named for their concern: the device
    # read-backs (_ReadBack, train/readback.py), the training clock (_BudgetClock, train/clock.py), the
    # checkpointed state (_TrainState, train/state.py: state_dict, save_checkpoint, resume), the data
    # preparation (_RunData, train/data.py) and the start event, train records and samples (_Report,
    # train/report.py: write_sample).

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
        if self.rt.device.type == "cpu":
            keep_freed_memory()  # the update's large blocks reused, not faulted in again (gptforge.runtime)
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
            self.plan.extra_notes.append(f"model.preset = 'auto' chose rung {e['rung']} (context {e['block_size']}, "
                                         f"{e['batch_size']} windows per micro-batch) in {e['seconds']} s of the "
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

    # ------------------------------------------------------------------------------------ helpers

    def _evaluate_and_maybe_stop(self, final: bool = False) -> str | None:
        t = self.config.train
        started = self.clock()
        record = self.evaluate()
        record["elapsed_s"] = round(self.elapsed, 3)  # the training clock when this evaluation began
        record["eval_s"] = round(self.clock() - started, 3)  # what it took (the training clock counts it)
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
        if self.rt.distributed:
            # DDP's reducer holds the process group: dropped first, destroying the group frees it now,
            # while Python is whole. Left to interpreter shutdown, gloo aborted the process there (SIGABRT,
            # "terminate called without an active exception") about one run in 30 on a busy 2-core CPU.
            self.model = self.raw_model
            gc.collect()
        self.rt.close()
        self._lock.release()
