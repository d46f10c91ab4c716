"""What a run reports while it trains, beside its evaluations: the start event (device, shapes, the
peak FLOPs that MFU is measured against), each training record (tokens/s, MFU, a sequential
sampler's epoch) and the samples written at evaluations or every train.sample_every.

A mixin of the Trainer (gptforge.train.trainer): these methods read its counters, model, tokenizer
and clock and write to its MetricsLogger (gptforge.train.metrics).
"""

from __future__ import annotations

import torch

from gptforge.generate import Generator  # samples written while training (train.sample_every)
from gptforge.train.metrics import device_peak_flops, mfu
from gptforge.train.optim import warmup_updates


class _Report:
    """The Trainer's reports (see the module docstring)."""

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
