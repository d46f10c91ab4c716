"""What dropout costs a small model's CPU training step: torch's own dropout, gptforge's cheaper CPU
mask, attention dropout off, and no dropout, alternating in one process.

    python benchmarks/dropout_step.py                    # writes docs/benchmarks.md's bench:dropout_step
    python benchmarks/dropout_step.py --rounds 3 --steps 5 --no-write

The model, batch and optimizers are configs/tinyshakespeare-char-10min.toml's (4 layers, 4 heads, 128
wide, batch 32, float32, Muon on the blocks' matrices and AdamW on the rest) with the context it had
when this was measured, 64 (CONTEXT; the recipe's is 128 since 2026-12-01), dropout 0.1.
Four variants, each with its own copy of the same initial model, take turns (a round of `--steps`
steps each, `--rounds` times), with the trainer's float32 step (benchmarks/optim_step.py's):
- `torch nn.Dropout`: torch's own dropout modules (gptforge's before 2026-11-30: a double, two 32-bit
  Mersenne Twister outputs, per element), attention dropout 0.1 (SDPA leaves the flash kernel);
- `gptforge Dropout`: model.Dropout (three 16-bit lanes of each 64-bit draw), attention dropout 0.1;
- `attn_dropout = 0`: model.Dropout on embeddings and residuals, none on the attention weights (the
  flash kernel);
- `no dropout`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCHMARKS_MD, REPO, machine_summary, update_section  # noqa: E402
from optim_step import make_step, profile_tables, take_turns  # noqa: E402

from gptforge.config import load_config  # noqa: E402
from gptforge.model import GPT, Dropout, GPTConfig  # noqa: E402
from gptforge.train.optim import configure_optimizer  # noqa: E402

RECIPE = REPO / "configs" / "tinyshakespeare-char-10min.toml"
CONTEXT = 64  # the recipe's context when docs/benchmarks.md's table was measured
VOCAB = 65  # Tiny Shakespeare's characters
P = 0.1


def build(name: str, shape: dict):
    """The model of variant `name`, initialised identically for every variant."""
    dropout = 0.0 if name == "no dropout" else P
    attn = 0.0 if name == "attn_dropout = 0" else None
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**shape, "dropout": dropout, "attn_dropout": attn}, vocab_size=VOCAB))
    if name == "torch nn.Dropout":
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, Dropout):
                    setattr(module, child_name, torch.nn.Dropout(child.p))
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--profile", type=int, default=8, help="rows of each profile table (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(RECIPE, [f"model.block_size={CONTEXT}"])
    shape = cfg.model.shape()
    batch, block = cfg.train.batch_size, shape["block_size"]
    machine = machine_summary(torch.device("cpu"))
    print(machine, flush=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, VOCAB, (batch, block), generator=g), torch.randint(0, VOCAB, (batch, block), generator=g)
    names = ["torch nn.Dropout", "gptforge Dropout", "attn_dropout = 0", "no dropout"]
    steps = {}
    for name in names:
        model = build(name, shape)
        opt = configure_optimizer(model, cfg.optim, torch.device("cpu"))
        steps[name] = make_step(model, opt, x, y, cfg.optim.grad_clip)
        for _ in range(3):  # warm-up: allocator, oneDNN primitives, optimizer state
            steps[name]()
    times = take_turns(steps, args.rounds, args.steps)
    load_end = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    chars = batch * block
    med = {n: statistics.median(times[n]) for n in names}
    base = med[names[0]]
    lines = ["## What dropout costs the small CPU step", "",
             f"`python benchmarks/dropout_step.py --rounds {args.rounds} --steps {args.steps}"
             + (f" --threads {args.threads}" if args.threads else "") + "`: "
             f"configs/tinyshakespeare-char-10min.toml's model, batch and optimizers (4 layers, 128 wide, "
             f"context {block} (the recipe's is 128 since 2026-12-01), batch 32 = {chars:,} characters per update, float32, Muon + AdamW), dropout {P}, "
             "the trainer's float32 step; four variants with the same initial model take turns in one "
             f"process ({args.rounds} rounds of {args.steps} steps each). `torch nn.Dropout` is what the "
             "model ran before its CPU mask; `attn_dropout = 0` keeps attention in the flash kernel.", "",
             f"Machine: {machine}; load average at the end {load_end}", "",
             "| variant | median ms/step | chars/s (median) | best ms/step | chars/s vs torch nn.Dropout |",
             "|---|---:|---:|---:|---:|"]
    for n in names:
        lines.append(f"| {n} | {med[n] * 1e3:.1f} | {chars / med[n]:,.0f} | {min(times[n]) * 1e3:.1f} | "
                     f"{base / med[n]:.2f}x |")
        print(f"{n:18s} median {med[n] * 1e3:.1f} ms ({chars / med[n]:,.0f} chars/s), "
              f"best {min(times[n]) * 1e3:.1f} ms, {base / med[n]:.2f}x torch nn.Dropout", flush=True)
    lines.append("")
    if args.profile:
        lines += profile_tables(steps, names[:3], args.profile)
    if not args.no_write:
        update_section(BENCHMARKS_MD, "bench:dropout_step", "\n".join(lines).rstrip())
        print(f"wrote {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
