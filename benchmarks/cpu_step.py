"""The CPU training step, today's code against an earlier commit's, in one run: tokens/s and a profile.

    python benchmarks/cpu_step.py                        # against the commit this wave started from
    python benchmarks/cpu_step.py --baseline HEAD~5 --dtypes bfloat16 --repeats 3 --no-write

The model is the GPT-2-vocabulary one of docs/benchmarks.md's throughput table (6 layers, 6 heads,
384 wide, context 256, batch 8: 186.7 MFLOP/token, the LM head 62% of them) with the trainer's own
step (its allocator setting, configure_optimizer's AdamW, autocast, clipping). The baseline's
`src/` is extracted with `git archive` into a temporary directory; each measurement is a fresh process
importing one of the two trees, and the two alternate (A B A B ...) so that a machine whose speed drifts
treats both alike.
The table gives the best step of each process (median over processes) and the ratio, and each
process's peak RSS (VmHWM: torch, the model, AdamW's state and the step's largest moment; the highest over
processes); a torch.profiler table of one step (the ops with the most self time) shows where the time
goes, before and after.
Writes the `<!-- bench:cpu_step -->` section of docs/benchmarks.md, naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCHMARKS_MD, REPO, machine_summary, update_section  # noqa: E402

BASELINE = "dda2a2c"  # main when issues 10-15 began (2026-11-27)
SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50257)
BATCH = 8

WORKER = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
torch.manual_seed(0)
try:  # what gptforge's trainer asks of glibc on a CPU; nanoGPT's step gets it too, to compare like with like
    from gptforge.runtime import keep_freed_memory
    keep_freed_memory()
except ImportError:  # a baseline from before it
    pass
if args["impl"] == "nanogpt":  # nanoGPT's own model.py and its configure_optimizers (train.py's defaults)
    sys.path.insert(0, args["nanogpt"])
    from model import GPT, GPTConfig
    shape = dict(args["shape"], vocab_size=50304, dropout=0.0, bias=True)  # train.py's padded vocabulary
    model = GPT(GPTConfig(**shape))
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    model.flops_per_token = lambda: 0.0  # unused: the GEMM-share table counts gptforge's model
else:
    from gptforge.model import GPT, GPTConfig
    from gptforge.config import OptimConfig
    from gptforge.train.optim import configure_optimizer
    model = GPT(GPTConfig(**args["shape"], **({"activation": args["activation"]} if args.get("activation") else {})))
    opt = configure_optimizer(model, OptimConfig(), torch.device("cpu"))
dtype = getattr(torch, args["dtype"])
T, B, V = args["shape"]["block_size"], args["batch"], args["shape"]["vocab_size"]
g = torch.Generator().manual_seed(1)
x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)

def step():
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

for _ in range(args["warmup"]):
    step()
times = []
for _ in range(args["steps"]):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
out = {"best_s": min(times), "loss": float(step())}
a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
gemm = []
for _ in range(6):  # this dtype's matmul rate in the same process and minute: what the step is measured against
    t = time.perf_counter()
    a @ b
    gemm.append(time.perf_counter() - t)
out["gemm_flops"] = 2 * 2048**3 / min(gemm[1:])
out["flops_per_token"] = model.flops_per_token()
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):  # the process's peak RSS: model, optimizer state, the step's activations
        out["peak_rss"] = int(line.split()[1]) * 1024
if args["profile"]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    out["profile"] = [(e.key, e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total, e.count)
                      for e in rows[:args["profile"]]]
print(json.dumps(out))
"""


def extract(rev: str, into: Path) -> Path:
    """`src/` of commit `rev`, extracted into `into` (git archive, no worktree left behind)."""
    archive = into / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def measure(src: Path | None, dtype: str, steps: int, warmup: int, profile: int = 0, impl: str = "gptforge",
            activation: str | None = None, nanogpt: str | None = None) -> dict:
    """One fresh process: gptforge from `src` (its GELU set to `activation` when given), or nanoGPT's
    model from the checkout `nanogpt` (impl="nanogpt")."""
    env = {**os.environ, "PYTHONPATH": str(src or "")}
    spec = {"shape": SHAPE, "batch": BATCH, "dtype": dtype, "steps": steps, "warmup": warmup, "profile": profile,
            "impl": impl, "activation": activation, "nanogpt": nanogpt}
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def profile_table(rows: list, title: str) -> list[str]:
    lines = [f"{title}:", "", "| op | self ms | share | calls |", "|---|---:|---:|---:|"]
    lines += [f"| `{name}` | {ms:.0f} | {share:.0%} | {count} |" for name, ms, share, count in rows]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help=f"git revision to compare with (default {BASELINE})")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=3, help="processes per (tree, dtype), alternating")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--nanogpt", default=None, metavar="DIR",
                        help="also measure nanoGPT's model.py from this checkout (fetch it; never copied here), "
                             "beside today's model with nanoGPT's exact GELU (model.activation = 'gelu')")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    machine = machine_summary(torch.device("cpu"))
    print(machine, flush=True)
    tokens = BATCH * SHAPE["block_size"]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": (extract(args.baseline, Path(tmp)), {}), "today": (REPO / "src", {})}
        if args.nanogpt:
            trees["today, exact GELU"] = (REPO / "src", {"activation": "gelu"})
            trees["nanoGPT"] = (None, {"impl": "nanogpt", "nanogpt": str(Path(args.nanogpt).resolve())})
        results: dict[tuple[str, str], list[float]] = {}
        rss: dict[tuple[str, str], list[int]] = {}
        gemm: dict[str, list[float]] = {}
        flops_per_token = 0.0
        profiles: dict[tuple[str, str], list] = {}
        for dtype in args.dtypes.split(","):
            for rep in range(args.repeats):
                for name, (src, how) in trees.items():
                    r = measure(src, dtype, args.steps, args.warmup, profile=12 if rep == 0 else 0, **how)
                    results.setdefault((name, dtype), []).append(r["best_s"])
                    rss.setdefault((name, dtype), []).append(r.get("peak_rss", 0))
                    gemm.setdefault(dtype, []).append(r["gemm_flops"])
                    if how.get("impl") != "nanogpt":  # the GEMM-share table counts gptforge's FLOPs
                        flops_per_token = r["flops_per_token"]
                    if "profile" in r:
                        profiles[(name, dtype)] = r["profile"]
                    print(f"{dtype:9s} {name:17s} step {r['best_s']:.3f} s ({tokens / r['best_s']:,.0f} tokens/s), "
                          f"loss {r['loss']:.4f}, peak RSS {r.get('peak_rss', 0) / 1e6:,.0f} MB", flush=True)
    lines = [f"## CPU training step: today against {args.baseline}", "",
             f"`python benchmarks/cpu_step.py --baseline {args.baseline}`: the GPT-2-vocabulary model "
             "(6 layers, 384 wide, context 256, batch 8) through the trainer's step, each tree in fresh "
             f"processes, alternating; the median over {args.repeats} processes of each one's best of "
             f"{args.steps} steps.", "", f"Machine: {machine}", "",
             "| dtype | baseline tokens/s | today tokens/s | today / baseline | baseline peak RSS | today peak RSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for dtype in args.dtypes.split(","):
        base = statistics.median(results[("baseline", dtype)])
        today = statistics.median(results[("today", dtype)])
        peaks = [max(rss[(name, dtype)]) / 1e6 for name in ("baseline", "today")]
        lines.append(f"| {dtype} | {tokens / base:,.0f} | {tokens / today:,.0f} | {base / today:.2f}x | "
                     f"{peaks[0]:,.0f} MB | {peaks[1]:,.0f} MB |")
        print(f"{dtype}: today / baseline = {base / today:.2f}x", flush=True)
    lines.append("")
    if args.nanogpt:
        lines += ["Beside nanoGPT's own `model.py` (a checkout given with `--nanogpt`; its `configure_optimizers`, "
                  "the same shape, its vocabulary padded to 50,304 as its train.py does, the same step: autocast, "
                  "backward, clipping at 1.0, AdamW), in the same alternating processes. nanoGPT's MLP runs the "
                  "exact GELU; `today, exact GELU` is gptforge with `model.activation = \"gelu\"`:", "",
                  "| dtype | nanoGPT tokens/s | gptforge (GPT-2's tanh GELU) | ratio | gptforge (exact GELU) | ratio "
                  "| nanoGPT peak RSS | gptforge peak RSS (exact GELU) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for dtype in args.dtypes.split(","):
            nano = statistics.median(results[("nanoGPT", dtype)])
            today = statistics.median(results[("today", dtype)])
            exact = statistics.median(results[("today, exact GELU", dtype)])
            lines.append(f"| {dtype} | {tokens / nano:,.0f} | {tokens / today:,.0f} | {nano / today:.2f}x | "
                         f"{tokens / exact:,.0f} | {nano / exact:.2f}x | {max(rss[('nanoGPT', dtype)]) / 1e6:,.0f} MB | "
                         f"{max(rss[('today, exact GELU', dtype)]) / 1e6:,.0f} MB |")
            print(f"{dtype}: gptforge (exact GELU) / nanoGPT = {nano / exact:.2f}x", flush=True)
        lines.append("")
    lines += [f"The step against the matmul rate of the same processes (a 2048x2048 matmul, median over them; "
              f"the model's {flops_per_token / 1e6:.1f} MFLOP per token, forward and backward):", "",
              "| dtype | GEMM GFLOP/s | tokens/s at the GEMM rate | today's share of it |", "|---|---:|---:|---:|"]
    for dtype in args.dtypes.split(","):
        rate = statistics.median(gemm[dtype])
        at_gemm = rate / flops_per_token
        today = tokens / statistics.median(results[("today", dtype)])
        lines.append(f"| {dtype} | {rate / 1e9:,.0f} | {at_gemm:,.0f} | {today / at_gemm:.0%} |")
    lines.append("")
    for (name, dtype), rows in sorted(profiles.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines += profile_table(rows, f"Profile of one {dtype} step, {name} (torch.profiler, self CPU time)")
    if not args.no_write:
        update_section(BENCHMARKS_MD, "bench:cpu_step", "\n".join(lines).rstrip())
        print(f"wrote {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
