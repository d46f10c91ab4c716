"""The run's token data: prepared (or reused from the cache) by rank 0 while the other ranks wait,
then opened by them from the same cache; with the run's saved tokenizer when it has one (a resume),
or the init run's. With model.preset = "auto" the data is prepared at the smallest context first,
for auto's measurement of its rungs (gptforge.train.auto), and the run then trains on that data.

A mixin of the Trainer (gptforge.train.trainer): these methods read its config, plan, runtime and
init weights; _choose_for_budget sets them for the measurement and returns the config auto chose.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gptforge.config import Config
from gptforge.data.pipeline import prepare
from gptforge.data.tokenizers import load_tokenizer
from gptforge.train.plan import plan_run


class _RunData:
    """The Trainer's data preparation (see the module docstring)."""

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
