"""`model.preset = "auto"`: the model's shape, batch and learning rates chosen for a time budget.

    choice = choose_for_budget(config, data, rt)   # measures a few updates per rung, on this machine
    config = choice.config                          # every field explicit: the run reproduces without auto

The user's question is "I have this text and N seconds: give me the best model". The answer here is
one ladder of shapes (RUNGS, small to large; each with its context, batch and AdamW learning rate)
and one rule, derived from sweeps over budgets, corpora and tokenizers (docs/auto.md):

    climb the ladder while the next rung, at the speed measured for it on this machine, this
    tokenizer and this precision, would still train on enough tokens per non-embedding parameter
    in the budget left: 2 for each million of its parameters (TOKENS_PER_PARAM_PER_MILLION), at
    most Chinchilla's 20; take the last rung that did.

A bigger model learns more per token but sees fewer tokens in a fixed time. The side-by-side runs
behind the rule put the switch from one rung to the next at a few tokens per parameter, and further
out for bigger rungs (a2 is worth it from ~1.6 tokens per parameter, a3 not yet at 2.8). Each rung is
measured for a few updates (its first, a warm-up, untimed), so its speed includes the per-step
overheads that dominate small models and the LM head that dominates a large vocabulary; the
measurement's seconds count in the budget. a2 and a3 take twice their context (128, 256) once the run
would still make 1,000 updates with it, at the speed measured for it (LONG_CONTEXT_UPDATES): long runs
gained more from the context than they lost in updates. The recipe around the shape is the one the CPU recipes
were tuned with: Muon on the blocks' matrices, AdamW on the rest at an LR that scales as 1/width, a
warmup-stable-decay schedule with a 30% cool-down, dropout 0.05 (none on the attention weights) once
the run would see its training text more than DROPOUT_PASSES times, the exact GELU (model.activation = "gelu": cheaper than GPT-2's
tanh form on a CPU), and float32 for rungs up to 64 wide on a CPU where train.dtype = "auto" would
pick bf16 (per-op overhead dominates there; bf16 gains nothing).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from gptforge.config import Config
from gptforge.data.sampler import BatchSampler
from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig
from gptforge.runtime import Runtime
from gptforge.train.optim import configure_optimizer, set_lr

# Training tokens per non-embedding parameter a rung must still reach in the budget to be chosen grow with
# its size: TOKENS_PER_PARAM_PER_MILLION for each million parameters (a2, 0.79M: 1.6; a3, 1.77M: 3.5),
# never more than Chinchilla's 20. From side-by-side runs on an idle 2-core CPU (docs/auto.md): a2 lost to
# a1 at 0.66 tokens/param (30 s) and beat it at 2.1 (90 s); a3 lost to a2 at 2.4 and at 2.8 (10 minutes).
TOKENS_PER_PARAM_PER_MILLION = 2.0
MAX_TOKENS_PER_PARAM = 20.0
# The measurement may take at most this fraction of the budget (it stops climbing when it is spent).
MEASURE_FRACTION = 0.05
# Of the budget left after measuring, the share expected to go to updates (evaluations take the rest).
TRAINING_SHARE = 0.93
# On a CPU with bf16 matmuls, train.dtype = "auto" would pick bf16; at this width and below per-op
# overhead dominates and float32 is as fast (a1's update: 15.5 against 14.6-17.9 ms on the Intel Xeon of
# docs/benchmarks.md), so auto trains those rungs in float32. At 128 wide (a2) bf16's update is 1.3-1.4x
# float32's since attention's backward runs in the float32 flash kernel (it was no faster before).
CPU_FLOAT32_WIDTH = 64
# Dropout DROPOUT on the embeddings and residual paths, none on the attention weights (that keeps a CPU's
# attention in the flash kernel), once the run would see its training text more than DROPOUT_PASSES
# times (counted at the speed measured without dropout). From a2's 10-minute runs (docs/auto.md): side by
# side at ~4 passes, no dropout reached 1.529 against 1.558 with 0.05 and 1.577 with 0.1; alone on the
# machine, 0.05 reached 1.494 (~11.5 passes at no-dropout speed) against no dropout's 1.511 (12.6).
# Earlier, a1 in 30 s (2.3 passes) reached 1.933 with dropout 0.1 against 1.713 without. One pair of
# runs on each side: the threshold lies somewhere between 4.6 and ~11.5.
DROPOUT_PASSES = 8
DROPOUT = 0.05
# a2 (context 64) and a3 (128) train with their long_block_size, twice the context, the same windows per
# update, once the run would still make LONG_CONTEXT_UPDATES updates that way at the speed measured for it
# (auto measures the longer context too when the shorter one's speed says it may qualify). From runs four
# at once, one thread each, bf16 (docs/auto.md): a2 given 10 minutes, context 128 x 32 windows (1,355
# updates) beat 64 x 32 (2,486) on Tiny Shakespeare (1.507 against 1.530) and on Python source (1.169
# against 1.258); 128 x 16 (2,048 tokens an update, as 64 x 32) reached 1.515 and 1.172, so the context is
# most of the gain. a3 given an hour on Python source: 256 x 32 (2,271 updates) reached 1.047 where 128 x
# 32 (4,209, another group) had reached 1.124, and the `small` preset 1.058 and 1.059 in both groups.
# For a2 nothing under 1,355 updates was measured: 1,000 is a guess between that and the 90-s runs'
# ~800-1,250 updates of 64 x 32, which a doubled context would halve; a3 borrows it (its one long-context
# run made 2,271 updates, on one corpus). Every other rung keeps its context: not measured.
LONG_CONTEXT_UPDATES = 1000
# The exact GELU: the same quality as GPT-2's tanh form, several times cheaper on CPUs whose tanh kernel
# is slow (the Intel Xeon of docs/benchmarks.md), no dearer elsewhere; Hugging Face's GPT-2 runs it too.
ACTIVATION = "gelu"


@dataclass(frozen=True)
class Rung:
    """One shape of the ladder with its batch (sequences per micro-batch) and AdamW peak LR."""

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    long_block_size: int | None = None  # the context it takes for long runs (LONG_CONTEXT_UPDATES)

    @property
    def lr(self) -> float:
        """The AdamW part's peak LR: 1e-2 at 128 wide (the 30-s char recipe, tuned again on the budget's
        clock: 1e-2 beat 6e-3 by 0.014 nats after 240 updates and tied it after 660), scaled as 1/width."""
        return min(1e-2, 1e-2 * 128 / self.n_embd)


RUNGS: tuple[Rung, ...] = (
    Rung("a1", 2, 2, 64, 64, 32),       # the 30-s char recipe
    Rung("a2", 4, 4, 128, 64, 32, 128),  # nanoGPT's CPU shape: the demo (90 s); with context 128, the 10-minute recipe
    Rung("a3", 4, 6, 192, 128, 32, 256),  # with context 256, an hour on Python source (beat `small`)
    Rung("a4", 6, 8, 256, 128, 32),     # the 10-minute char recipe until 2026-11-30
    Rung("a5", 6, 6, 384, 256, 16),     # the `small` preset
    Rung("a6", 8, 8, 512, 256, 32),
    Rung("a7", 12, 12, 768, 512, 32),
    Rung("a8", 12, 12, 768, 1024, 32),  # GPT-2 124M
)


@dataclass
class Measured:
    rung: Rung
    tokens_per_s: float
    params: int          # non-embedding
    tokens: float        # expected training tokens in the budget left
    seconds: float       # measurement time

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclass
class AutoChoice:
    """What auto chose and why: the resolved config, the rung, every rung measured, the seconds spent,
    and the prepared data it measured on (the run trains on the same, without preparing it again)."""

    config: Config
    rung: Rung
    measured: list[Measured]
    seconds: float
    data: Any = None

    def event(self) -> dict[str, Any]:
        """The `auto` event of metrics.jsonl: the choice and each measurement behind it."""
        return {"rung": self.rung.name, "n_layer": self.rung.n_layer, "n_embd": self.rung.n_embd,
                "block_size": self.rung.block_size, "batch_size": self.rung.batch_size,
                "seconds": round(self.seconds, 3),
                "measured": ", ".join(f"{label(m.rung)} {m.tokens_per_s:,.0f} tok/s {m.tokens_per_param:.2f} tok/param"
                                      for m in self.measured)}


def label(rung: Rung) -> str:
    """A rung's name, with its context when it trains with its long one: "a2", "a2 (context 128)"."""
    long = rung.long_block_size is not None and rung.block_size == rung.long_block_size
    return f"{rung.name} (context {rung.block_size})" if long else rung.name


def smallest_context() -> int:
    return min(r.block_size for r in RUNGS)


def choose_for_budget(config: Config, data: Any, rt: Runtime, clock=time.perf_counter) -> AutoChoice:
    """Climb RUNGS (see the module docstring) for config.train.max_time seconds of training on `data`
    (a prepared corpus: its tokenizer fixes the vocabulary, its size the epochs) and return the config
    with the chosen shape (a2 or a3 with its long context when the run is long enough: Rung.long_block_size),
    batch, learning rates and dropout written in. Under DDP rank 0 measures and every rank takes its
    choice."""
    t = config.train
    if t.max_time is None or t.max_steps is not None or t.max_tokens is not None:
        raise GptforgeError("model.preset = 'auto' chooses the model for a time budget: set train.max_time "
                            "(or --time 10m) and leave train.max_steps and train.max_tokens unset")
    # torch.optim.Muon imports torch._dynamo when first built (seconds): a start-up cost every run pays
    # before its clock starts, not one to charge to the budget through the measurement.
    import torch._dynamo  # noqa: F401

    start = clock()
    vocab = data.tokenizer.vocab_size
    n_train = len(data.train)
    n_val = len(data.val) if data.val is not None else None
    def fits_context(block_size: int) -> bool:  # each split holds a window and its next token
        return block_size + 1 <= n_train and (n_val is None or block_size + 1 <= n_val)

    fits = [r for r in RUNGS if fits_context(r.block_size)]
    if not fits:
        raise GptforgeError(f"the corpus is too short for model.preset = 'auto' (its smallest context is "
                            f"{smallest_context()} tokens); give more text or choose a preset")
    measured: list[Measured] = []
    index, longer, dropout = 0, False, False
    if rt.is_main:
        for i, rung in enumerate(fits):
            spent = clock() - start
            if measured and spent > MEASURE_FRACTION * t.max_time:
                break
            allowance = MEASURE_FRACTION * t.max_time - spent
            m = _measure(rung, config, vocab, data, runtime_for(rung, config, rt), clock, t.max_time - spent,
                         rt.world_size, allowance)
            measured.append(m)
            if i > 0 and m.tokens_per_param < tokens_per_param_needed(m.params):
                break  # too big for the budget: the previous rung it is
            index = i
        chosen = measured[index]  # measured in the ladder's order, from its first rung
        rung = fits[index]
        long = None if rung.long_block_size is None else dataclasses.replace(rung, block_size=rung.long_block_size)
        spent = clock() - start
        if long is not None and _long_updates(chosen, long, rt.world_size) >= LONG_CONTEXT_UPDATES and \
                spent <= MEASURE_FRACTION * t.max_time and fits_context(long.block_size):
            # At the short context's speed it may qualify: measure the long one (in the same allowance).
            m = _measure(long, config, vocab, data, runtime_for(long, config, rt), clock, t.max_time - spent,
                         rt.world_size, MEASURE_FRACTION * t.max_time - spent)
            measured.append(m)
            if _long_updates(m, long, rt.world_size) >= LONG_CONTEXT_UPDATES:
                longer, chosen = True, m
        dropout = chosen.tokens / n_train > DROPOUT_PASSES
    if rt.distributed:  # rank 0's choice for every rank (the others measured nothing: zeros in the sum)
        index, longer, dropout = (int(v) for v in rt.all_reduce_sum(torch.tensor(
            [float(index), float(longer), float(dropout)], dtype=torch.float64, device=rt.device)).tolist())
    rung = fits[index]
    if longer:
        rung = dataclasses.replace(rung, block_size=rung.long_block_size)
    seconds = clock() - start
    chosen_config = apply_rung(config, rung, dropout=DROPOUT if dropout else 0.0)
    if runtime_for(rung, config, rt).dtype != rt.dtype:
        chosen_config.train.dtype = "float32"
    return AutoChoice(config=chosen_config, rung=rung, measured=measured, seconds=seconds, data=data)


def _long_updates(m: Measured, long: Rung, world: int) -> float:
    """Updates of `long`'s windows the budget left would give at measurement `m`'s speed."""
    return m.tokens / (long.batch_size * long.block_size * world)


def tokens_per_param_needed(params: int) -> float:
    """Training tokens per non-embedding parameter a rung of `params` must reach in the budget."""
    return min(MAX_TOKENS_PER_PARAM, TOKENS_PER_PARAM_PER_MILLION * params / 1e6)


def runtime_for(rung: Rung, config: Config, rt: Runtime) -> Runtime:
    """The runtime a rung trains in: float32 for narrow rungs on a CPU where dtype "auto" chose bf16."""
    if (rt.device.type == "cpu" and config.train.dtype == "auto" and rt.dtype == torch.bfloat16
            and rung.n_embd <= CPU_FLOAT32_WIDTH):
        return dataclasses.replace(rt, dtype=torch.float32)
    return rt


def apply_rung(config: Config, rung: Rung, dropout: float = 0.0) -> Config:
    """`config` with `rung`'s shape, batch and learning rates and the budget recipe written in."""
    c = copy.deepcopy(config)
    m, o, t = c.model, c.optim, c.train
    m.preset = "mini"  # a real preset under explicit fields: the saved config needs no auto
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout = (rung.n_layer, rung.n_head, rung.n_embd,
                                                             rung.block_size, dropout)
    m.attn_dropout = 0.0
    m.activation = ACTIVATION
    t.batch_size, t.grad_accum_steps, t.tokens_per_update = rung.batch_size, None, None
    o.name, o.muon_lr, o.muon_momentum = "muon", 0.02, 0.95
    o.lr, o.min_lr = rung.lr, rung.lr / 10
    o.schedule, o.cooldown_fraction, o.warmup_steps = "wsd", 0.3, 20
    o.beta2, o.weight_decay, o.grad_clip = 0.99, 0.1, 1.0
    c.validate()
    return c


def _measure(rung: Rung, config: Config, vocab: int, data: Any, rt: Runtime, clock, budget_left: float,
             world: int, allowance: float = float("inf")) -> Measured:
    """Seconds per update of `rung`: one warm-up update, then at least 3 timed ones and ~0.3 s, or
    fewer (but one at least) once the measurement has taken `allowance` seconds."""
    cfg = apply_rung(config, rung)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=vocab, n_layer=rung.n_layer, n_head=rung.n_head, n_embd=rung.n_embd,
                              block_size=rung.block_size, dropout=0.0, activation=ACTIVATION)).to(rt.device)
        optimizer = configure_optimizer(model, cfg.optim, rt.device)
        set_lr(optimizer, cfg.optim.lr)
        sampler = BatchSampler(data.train, rung.batch_size, rung.block_size, mode="random", seed=12345)
        begin = clock()

        def update() -> None:
            x, y = sampler.next_batch()
            with rt.autocast():
                _, loss = model(x.to(rt.device), y.to(rt.device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)

        update()  # allocations, kernels chosen, caches warm: not timed
        timed_from, updates = clock(), 0
        while True:
            update()
            updates += 1
            now = clock()
            if (updates >= 3 and now - timed_from >= 0.3) or now - begin >= allowance:
                break
        per_update = (clock() - timed_from) / updates
        seconds = clock() - begin
    tokens_per_s = rung.batch_size * rung.block_size * world / per_update
    left = max(0.0, budget_left - seconds)
    return Measured(rung=rung, tokens_per_s=tokens_per_s, params=model.num_params(non_embedding=True),
                    tokens=tokens_per_s * left * TRAINING_SHARE, seconds=seconds)
