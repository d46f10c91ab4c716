"""The run plan: a config resolved once into everything a run derives from it.

    plan = plan_run(load_config("configs/x.toml", overrides), world_size=2)
    plan.grad_accum_steps, plan.tokens_per_update, plan.schedule_steps, plan.gpt_config(vocab_size=65)
    plan.save("runs/x/config.toml")          # the resolved config: what --resume reloads

`plan_run` turns (config, train.init weights, number of processes) into concrete values, in this
order, each from what came before it:
1. train.init: the model fields come from the weights (gptforge.train.init.prepare_init);
2. the model's shape: every field set (the preset fills what the config leaves unset);
3. the update size: tokens per update and micro-batches per process (for this world size);
4. the schedule's length: optim.decay_steps, else train.max_steps, else from train.max_tokens, else
   None (only train.max_time bounds the run: the budget is the schedule's clock, see by_time);
5. the data's identity: corpus paths made absolute (their sha256 goes to RUN/data.json once prepared).
The resolved config holds all of it (train.tokens_per_update, not the world-size-dependent
grad_accum_steps, so a resume on another number of processes keeps the update size), so the saved
RUN/config.toml describes the run exactly and resolving it again changes nothing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gptforge.config import Config
from gptforge.errors import GptforgeError
from gptforge.model import GPTConfig

if TYPE_CHECKING:
    from gptforge.train.init import InitWeights


@dataclass
class RunPlan:
    """A resolved run: its config (every derived value written in) and what was derived from it."""

    config: Config
    world_size: int
    grad_accum_steps: int
    tokens_per_update: int
    schedule_steps: int | None
    """The LR schedule's length in updates; None when a time budget (or nothing: "constant") is its clock."""
    init: InitWeights | None = None
    """train.init's weights, loaded (None without train.init, or on resume)."""
    extra_notes: list[str] = field(default_factory=list)
    """More comment lines for RUN/config.toml (what model.preset = "auto" chose and why)."""

    @property
    def block_size(self) -> int:
        return self.config.model.block_size  # type: ignore[return-value]

    @property
    def by_time(self) -> bool:
        """Whether train.max_time alone gives the run its length: the LR schedule then follows the
        fraction of the budget spent (optim.lr_at_time), not an update count."""
        return self.schedule_steps is None and self.config.train.max_time is not None

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The exact model: the resolved shape and the tokenizer's vocabulary size."""
        return GPTConfig(vocab_size=vocab_size, **self.config.model.shape())

    def notes(self) -> list[str]:
        return [f"resolved for {self.world_size} process(es): {self.grad_accum_steps} micro-batch(es) of "
                f"{self.config.train.batch_size} x {self.block_size} tokens per process per update "
                f"(train.grad_accum_steps), {self.tokens_per_update:,} tokens per update", *self.extra_notes]

    def save(self, path: str | Path) -> Path:
        """RUN/config.toml: the resolved config, with the derived micro-batch count as a comment."""
        return self.config.save(path, notes=self.notes())


def plan_run(config: Config, world_size: int = 1, resume: bool = False) -> RunPlan:
    """Resolve `config` for `world_size` processes (see the module docstring). With `resume` the config
    is a run's saved one: train.init is not loaded again (the checkpoint holds the weights) and the
    corpus paths are taken as saved. Raises GptforgeError naming the field at fault."""
    config = copy.deepcopy(config)
    init = None
    if config.train.init and not resume:
        from gptforge.train.init import prepare_init

        config, init = prepare_init(config)
    for name, value in config.model.shape().items():
        setattr(config.model, name, value)
    t, block = config.train, config.model.block_size
    per_micro = t.batch_size * block * world_size  # type: ignore[operator]
    if t.tokens_per_update is not None:
        if t.tokens_per_update % per_micro:
            raise GptforgeError(
                f"train.tokens_per_update = {t.tokens_per_update} is not a multiple of batch_size * block_size * "
                f"processes = {t.batch_size} * {block} * {world_size} = {per_micro}; choose a multiple of {per_micro}")
        accum = t.tokens_per_update // per_micro
    else:
        accum = t.grad_accum_steps or 1
        t.tokens_per_update = per_micro * accum
    t.grad_accum_steps = None  # derived: it depends on the number of processes, tokens_per_update does not
    o = config.optim
    if o.decay_steps is None and o.schedule != "constant":
        if t.max_steps is not None:
            o.decay_steps = t.max_steps
        elif t.max_tokens is not None:
            o.decay_steps = max(1, math.ceil(t.max_tokens / t.tokens_per_update))
    if not resume:
        config.data.corpus = _absolute(config.data.corpus)
    config.validate()
    return RunPlan(config=config, world_size=world_size, grad_accum_steps=accum,
                   tokens_per_update=t.tokens_per_update, schedule_steps=o.decay_steps, init=init)


def _absolute(corpus: str | list[str]) -> str | list[str]:
    """Corpus paths that exist made absolute, so they mean the same files from any working directory;
    names (tinyshakespeare), stdin (-) and Hub specs are kept as they are."""
    specs = [corpus] if isinstance(corpus, str) else list(corpus)
    specs = [str(Path(c).expanduser().resolve()) if c != "-" and Path(c).expanduser().exists() else c
             for c in specs]
    return specs[0] if isinstance(corpus, str) else specs
