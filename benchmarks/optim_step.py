"""Muon against AdamW on the demo recipe's model and batch (nanoGPT's CPU shape): characters per
second of the whole training step, alternating in one process, and a profile of one step of each.

    python benchmarks/optim_step.py                      # writes docs/benchmarks.md's bench:optim_step
    python benchmarks/optim_step.py --rounds 3 --steps 5 --no-write
    python benchmarks/optim_step.py --threads 1 --clock cpu  # on a shared machine: CPU seconds, one thread
    python benchmarks/optim_step.py --dtype bfloat16 --no-write  # under bf16 autocast, as the recipe trains
                                                                 # where the CPU has bf16 matmuls

The model, batch and optimizer settings are configs/tinyshakespeare-char.toml's (4 layers, 4 heads,
128 wide, context 64, batch 32; float32 unless --dtype; Tiny Shakespeare's 65 characters). Three optimizers, each with
its own copy of the same initial model, take turns (a round of `--steps` steps each, `--rounds` times):
- `adamw`: the recipe with optim.name = "adamw" (fused AdamW on every parameter);
- `muon`: the recipe as it is (gptforge's batched Muon on the blocks' matrices, fused AdamW on the rest);
- `torch muon`: the same pair with PyTorch's own torch.optim.Muon, what optim.name = "muon" used before.
The step is the trainer's (forward, backward, clipping at optim.grad_clip, a skip flag on
non-finite loss or norm: handed to the optimizer as found_inf where it takes one, else read back).
On a machine that other work shares, wall time with two threads measures the others (a thread that is
descheduled holds up every parallel region); `--threads 1 --clock cpu` counts this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCHMARKS_MD, REPO, machine_summary, update_section  # noqa: E402

from gptforge.config import load_config  # noqa: E402
from gptforge.model import GPT, GPTConfig  # noqa: E402
from gptforge.train.optim import MuonAdamW, configure_optimizer, muon_params  # noqa: E402

RECIPE = REPO / "configs" / "tinyshakespeare-char.toml"  # the 30-s recipe's model until 2026-11-30 (now a1)
VOCAB = 65  # Tiny Shakespeare's characters


def build(name: str, model_cfg: GPTConfig, optim_cfg):
    """(model, optimizer) for variant `name`, the model initialised identically for every variant."""
    torch.manual_seed(0)
    model = GPT(model_cfg)
    cpu = torch.device("cpu")
    if name == "adamw":
        return model, configure_optimizer(model, dataclasses.replace(optim_cfg, name="adamw"), cpu)
    opt = configure_optimizer(model, optim_cfg, cpu)
    if name == "torch muon":
        torch_muon = torch.optim.Muon(muon_params(model), lr=optim_cfg.muon_lr, momentum=optim_cfg.muon_momentum,
                                      weight_decay=optim_cfg.muon_weight_decay)
        opt = MuonAdamW(torch_muon, opt.adamw)
    return model, opt


def update(opt, bad: torch.Tensor) -> None:
    """The trainer's optimizer.step() unless `bad`: on the device where the optimizer takes found_inf."""
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt.found_inf, opt.grad_scale = bad.to(torch.float32), None
        opt.step()
        del opt.found_inf, opt.grad_scale
    elif not bool(bad):
        opt.step()


def loss_of(model, x, y, dtype: torch.dtype) -> torch.Tensor:
    """The model's training loss, under bf16 autocast when `dtype` is bfloat16 (the trainer's CPU bf16 path)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return model(x, y)[1]


def make_step(model, opt, x, y, grad_clip: float, dtype: torch.dtype = torch.float32):
    def step():
        loss = loss_of(model, x, y, dtype)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        update(opt, ~(torch.isfinite(loss) & torch.isfinite(norm)))
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def profile_rows(step, top: int) -> list[tuple[str, float, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [(e.key, e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total, e.count) for e in rows[:top]]


def take_turns(steps: dict, rounds: int, per_round: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Each step's times over `rounds` rounds of `per_round` calls each, the order reversed every other
    round, so a machine whose speed drifts treats every variant alike. Prints each round's medians."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(per_round):
                t = clock()
                steps[name]()
                times[name].append(clock() - t)
        print(f"round {r + 1}: " + ", ".join(f"{n} {statistics.median(times[n][-per_round:]) * 1e3:.1f} ms"
                                            for n in names), flush=True)
    return times


def profile_tables(steps: dict, names: list[str], top: int) -> list[str]:
    """Markdown lines: a torch.profiler table of one step of each of `names` (the ops with most self time)."""
    lines = []
    for n in names:
        lines += [f"Profile of one step, {n} (torch.profiler, self CPU time):", "",
                  "| op | self ms | share | calls |", "|---|---:|---:|---:|"]
        lines += [f"| `{k}` | {ms:.1f} | {share:.0%} | {count} |"
                  for k, ms, share, count in profile_rows(steps[n], top)]
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--profile", type=int, default=10, help="rows of each profile table (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: this process's CPU time (all its threads)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the step's precision: bfloat16 runs the forward under bf16 autocast, as the recipe "
                             "does where the CPU multiplies bf16 natively")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    cfg = load_config(RECIPE)
    model_cfg = GPTConfig(**cfg.model.shape(), vocab_size=VOCAB)
    batch, block = cfg.train.batch_size, model_cfg.block_size
    machine = machine_summary(torch.device("cpu"))
    print(machine, flush=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, VOCAB, (batch, block), generator=g), torch.randint(0, VOCAB, (batch, block), generator=g)
    names = ["adamw", "muon", "torch muon"]
    steps, opts = {}, {}
    for name in names:
        model, opt = build(name, model_cfg, cfg.optim)
        steps[name] = make_step(model, opt, x, y, cfg.optim.grad_clip, dtype)
        opts[name] = (model, opt)
        for _ in range(3):  # warm-up: allocator, oneDNN primitives, optimizer state
            steps[name]()
    times = take_turns(steps, args.rounds, args.steps, clock)
    # The optimizer's update alone (the only part that differs), on one backward's gradients, alternating.
    opt_times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        model, _ = opts[name]
        loss_of(model, x, y, dtype).backward()
    ok = torch.zeros((), dtype=torch.bool)
    for r in range(args.rounds * 2):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(args.steps):
                t = clock()
                update(opts[name][1], ok)
                opt_times[name].append(clock() - t)
    load_end = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    chars = batch * block
    med = {n: statistics.median(times[n]) for n in names}
    best = {n: min(times[n]) for n in names}
    lines = ["## Muon against AdamW on nanoGPT's CPU shape (CPU)", "",
             f"`python benchmarks/optim_step.py --rounds {args.rounds} --steps {args.steps}"
             + (f" --threads {args.threads}" if args.threads else "") + f" --clock {args.clock}"
             + (f" --dtype {args.dtype}" if args.dtype != "float32" else "") + "`: "
             "configs/tinyshakespeare-char.toml's model and batch (4 layers, 128 wide, context 64, batch 32 = "
             f"{chars:,} characters per update, {args.dtype}), the trainer's {args.dtype} step (forward, backward, clipping, "
             "the skip flag), three optimizers with the same initial model taking turns in one process "
             f"({args.rounds} rounds of {args.steps} steps each). `torch muon` is PyTorch's torch.optim.Muon in "
             "the same pair, what `optim.name = \"muon\"` ran before train/muon.py. "
             + ("Times are wall-clock." if args.clock == "wall" else
                "Times are the process's CPU seconds (the machine was shared: wall time measured the others)."),
             "",
             f"Machine: {machine}; load average at the end {load_end}", "",
             "| optimizer | median ms/step | chars/s (median) | best ms/step | chars/s vs adamw | "
             "optimizer update alone, median ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        lines.append(f"| {n} | {med[n] * 1e3:.1f} | {chars / med[n]:,.0f} | {best[n] * 1e3:.1f} | "
                     f"{med['adamw'] / med[n]:.2f}x | {statistics.median(opt_times[n]) * 1e3:.2f} |")
        print(f"{n:10s} median {med[n] * 1e3:.1f} ms ({chars / med[n]:,.0f} chars/s), best {best[n] * 1e3:.1f} ms, "
              f"{med['adamw'] / med[n]:.2f}x adamw; update alone {statistics.median(opt_times[n]) * 1e3:.2f} ms",
              flush=True)
    lines.append("")
    if args.profile:
        lines += profile_tables(steps, names, args.profile)
    if not args.no_write:
        update_section(BENCHMARKS_MD, "bench:optim_step", "\n".join(lines).rstrip())
        print(f"wrote {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
