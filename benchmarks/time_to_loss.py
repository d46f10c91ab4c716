"""Time to quality: validation loss against wall-clock seconds of training for the char-level recipes,
side by side with nanoGPT's CPU recipe (its model and hyperparameters in gptforge's trainer).

    python benchmarks/time_to_loss.py                       # nanoGPT's recipe, the 30-s, demo and 10-min recipes
    python benchmarks/time_to_loss.py --configs configs/tinyshakespeare-char-30s.toml --no-write
    python benchmarks/time_to_loss.py --override train.max_time=10 --no-write   # a quick smoke run
    python benchmarks/time_to_loss.py --threads 1            # steady timing on a CPU shared with other jobs
    python benchmarks/time_to_loss.py --nanogpt /tmp/nanogpt --configs auto:30 configs/tinyshakespeare-char-30s.toml
                                        # nanoGPT's own train.py first (a checkout with data/shakespeare_char
                                        # prepared), then model.preset=auto with a 30-s budget and a recipe
    python benchmarks/time_to_loss.py --nanogpt /tmp/nanogpt --pairs 4 --configs
                                        # only the step-speed comparison, printed: nanoGPT's train.py and
                                        # configs/nanogpt-cpu-char.toml in turn, 4 times, the order alternating

Each recipe is trained as is (its own evaluation points, its own time budget) into runs/time-to-loss/.
At every evaluation the trainer's clock is read: the seconds of training so far, which include the
earlier evaluations and the first step's warm-up but not data preparation or model construction. The
final model is then scored exactly over the whole validation split (gptforge eval's float32 path),
next to the trainer's estimate from `eval_batches` random windows.

With `--nanogpt DIR --pairs N`, nanoGPT's own train.py and configs/nanogpt-cpu-char.toml (its recipe in
gptforge) are also run in turn N times, nanoGPT first in odd pairs and second in even ones, and each
pair's ratio of training-step speeds is reported with their median: a machine whose speed drifts within
the hour (these do, by up to 2x) then favours neither. nanoGPT's process, in pairs or not, runs with the
allocator settings of gptforge's trainer (which keeps freed memory, `gptforge.runtime.keep_freed_memory`;
nanoGPT's process is given the same through GLIBC_TUNABLES), so the comparison is of the computation, not
of glibc's defaults (until 2026-12-01 nanoGPT ran on glibc's defaults).

For each recipe it reports the seconds of training at which the validation loss first reached 1.886
(nanoGPT's recipe's own result), from the evaluations along the way. Writes docs/results/time_to_loss.jsonl
(one line per evaluation), docs/results/time_to_loss.png (`gptforge plot RUN... --x seconds`, the runs'
validation curves overlaid) and the table between the `<!-- bench:time_to_loss -->` markers of
docs/benchmarks.md, with the machine.
Losses are mean cross-entropy in nats per character. Time measured while other processes load the
CPU is slower: the load average at the start of each run is recorded next to its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_summary, update_section  # noqa: E402

from gptforge.config import load_config  # noqa: E402
from gptforge.evaluate import evaluate_run  # noqa: E402
from gptforge.train.trainer import Trainer  # noqa: E402

DEFAULT_CONFIGS = ["configs/nanogpt-cpu-char.toml", "configs/tinyshakespeare-char-30s.toml",
                   "configs/tinyshakespeare-char.toml", "configs/tinyshakespeare-char-10min.toml"]
RESULTS = REPO / "docs" / "results"
TARGET_LOSS = 1.886  # nanoGPT's CPU shakespeare_char recipe: val 1.8857 after 94 s (../shared/NOTES.md)
NANOGPT_RECIPE = "configs/nanogpt-cpu-char.toml"  # nanoGPT's CPU char recipe in gptforge's trainer
# What gptforge.runtime.keep_freed_memory asks of glibc (no mmap'd blocks, no trimming), as glibc's
# tunables for nanoGPT's subprocess: both processes then reuse freed memory the same way.
SAME_ALLOCATOR = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"


def auto_config(seconds: float, overrides: list[str]):
    """`auto:SECONDS`: character-level Tiny Shakespeare with model.preset = auto and that budget."""
    return load_config(None, ["data.corpus=tinyshakespeare", "data.tokenizer=char", "model.preset=auto",
                              "train.max_steps=none", f"train.max_time={seconds}", "train.eval_every=100",
                              "train.eval_batches=10", "train.log_every=25", "train.checkpoint_every=100000",
                              "train.keep_last=0", *overrides])


def run_nanogpt(checkout: Path) -> dict:
    """nanoGPT's own train.py, its README's CPU char recipe, in a subprocess from `checkout` (with
    data/shakespeare_char prepared): wall seconds and its last reported losses (its own estimate over
    eval_iters=20 batches)."""
    import re
    import subprocess

    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
           "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
           "--out_dir=out-time-to-loss", "--always_save_checkpoint=False"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "GLIBC_TUNABLES": SAME_ALLOCATOR}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed: {proc.stderr[-2000:]}")
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", proc.stdout)
    step, train_loss, val_loss = evals[-1]
    # Its per-iteration times ("iter N: loss L, time T ms"), leaving out the iterations that also evaluated
    # (every 250th) and the first (warm-up): the training step's own speed, 12 x 64 tokens each.
    iters = [(int(i), float(ms)) for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout)]
    step_ms = statistics.median(ms for i, ms in iters if i % 250 != 0 and i > 1)
    return {"config": "nanoGPT train.py (its own code)", "path": "nanoGPT train.py, README CPU recipe",
            "wall_s": round(wall, 1), "step": int(step), "val_loss": float(val_loss), "train_loss": float(train_loss),
            "load_at_start": round(load, 2), "train_tokens_per_s": round(12 * 64 / (step_ms / 1e3))}


def run_recipe(config_path: str, out_root: Path, overrides: list[str]) -> dict:
    """Train one recipe, timing each evaluation; returns its summary and its curve."""
    if config_path.startswith("auto:"):
        cfg = auto_config(float(config_path.split(":", 1)[1]), overrides)
        name = f"auto-{config_path.split(':', 1)[1]}s"
    else:
        cfg = load_config(REPO / config_path, overrides)
        name = Path(config_path).stem
    run_dir = out_root / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the benchmark's own scratch runs: always start fresh
    load = os.getloadavg()[0]
    curve: list[dict] = []
    trainer: Trainer | None = None

    def hook(step: int, record: dict) -> None:
        # trainer.elapsed was read just before this evaluation: seconds of training that produced the model.
        curve.append({"config": name, "step": step, "seconds": round(trainer.elapsed, 3),
                      "tokens": record["tokens"], "val_loss": record.get("val_loss"),
                      "train_loss": record.get("train_loss")})
        print(f"  {name}: {trainer.elapsed:7.1f} s  step {step:5d}  val_loss {record.get('val_loss'):.4f}",
              flush=True)

    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, eval_hook=hook)
    setup_s = time.perf_counter() - t0
    result = trainer.train()
    exact = evaluate_run(run_dir, split="val", which="latest", device="cpu")
    reached = next((p["seconds"] for p in curve if p["val_loss"] is not None and p["val_loss"] <= TARGET_LOSS), None)
    # The training step's own speed: the median over the log windows' tokens/s (the windows that held an
    # evaluation are slower; the median leaves them out as nanoGPT's figure leaves out its eval iterations).
    windows = [r["tokens_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if r.get("kind") == "train" and r["step"] > 1]
    return {"config": name, "seconds_to_target": reached, "path": config_path, "run_dir": str(run_dir), "load_at_start": round(load, 2),
            "setup_s": round(setup_s, 1), "seconds": round(trainer.elapsed, 1), "step": result.step,
            "tokens": result.tokens, "tokens_per_s": round(result.tokens / max(trainer.elapsed, 1e-9)),
            "train_tokens_per_s": round(statistics.median(windows)) if windows else None,
            "stopped_by": result.stopped_by, "val_loss_estimate": result.val_loss,
            "val_loss_exact": exact["loss"], "val_tokens": exact["tokens"], "params": trainer.raw_model.num_params(),
            "curve": curve}


def speed_pair(checkout: Path, out_root: Path, nanogpt_first: bool) -> dict:
    """nanoGPT's train.py and its recipe in gptforge, one after the other: their training steps' speeds
    (median tokens/s, evaluations left out) and the ratio."""
    order = ["nanogpt", "gptforge"] if nanogpt_first else ["gptforge", "nanogpt"]
    pair: dict = {"order": order}
    for who in order:
        print(f"pair: {who}", flush=True)
        if who == "nanogpt":
            pair["nanogpt"] = run_nanogpt(checkout)["train_tokens_per_s"]
        else:
            pair["gptforge"] = run_recipe(NANOGPT_RECIPE, out_root, [])["train_tokens_per_s"]
    pair["ratio"] = pair["gptforge"] / pair["nanogpt"]
    print(f"  -> gptforge {pair['gptforge']:,} tokens/s, nanoGPT {pair['nanogpt']:,}: {pair['ratio']:.2f}x", flush=True)
    return pair


def pairs_table(pairs: list[dict]) -> str:
    """Each pair's step speeds and ratio, and the median ratio."""
    lines = [f"nanoGPT's CPU char recipe (batch 12 x 64, AdamW, float32): its own `train.py` and `{NANOGPT_RECIPE}` "
             "in turn, the order alternating; training-step tokens/s (the median iteration, evaluations left out), "
             "both processes keeping freed memory:", "",
             "| pair | first | nanoGPT tokens/s | gptforge tokens/s | gptforge / nanoGPT |", "|---:|---|---:|---:|---:|"]
    for i, p in enumerate(pairs, 1):
        lines.append(f"| {i} | {p['order'][0]} | {p['nanogpt']:,} | {p['gptforge']:,} | {p['ratio']:.2f}x |")
    ratios = [p["ratio"] for p in pairs]
    lines += ["", f"Median of the {len(pairs)} pairs: **{statistics.median(ratios):.2f}x** "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}x)."]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """The runs' validation curves against seconds, overlaid: what `gptforge plot RUN... --x seconds` draws."""
    from gptforge.plot import plot_runs

    plot_runs([r["run_dir"] for r in results], path, x="seconds")


def table(results: list[dict], machine: str, command: str, nano: dict | None = None) -> str:
    lines = [
        "## Time to quality (character level, CPU)",
        "",
        f"`{command}`: each char-level recipe trained as is; validation loss is the "
        "mean cross-entropy in nats per character, estimated during the run from the recipe's `eval_batches` "
        "random windows, and at the end exactly over the whole validation split (float32). "
        "Seconds are the trainer's clock (training plus its periodic evaluations; data preparation and "
        f"model construction excluded). 'Seconds to {TARGET_LOSS}' is the first evaluation at or below nanoGPT's "
        "recipe's result (val 1.8857 in nanoGPT itself, 94 s on a 2-core AMD EPYC with AVX-512 BF16).",
        "",
        f"Machine: {machine}",
        "",
        *([f"nanoGPT's own `train.py` (its README's CPU char recipe, 2,000 iterations), in the same run: "
           f"**{nano['wall_s']} s** of wall time (load average {nano['load_at_start']} at its start), val loss "
           f"{nano['val_loss']:.4f} (its own estimate over 20 batches) at step {nano['step']}; a third of its "
           f"time is {nano['wall_s'] / 3:.1f} s. Its training step (the median iteration, evaluations left out): "
           f"**{nano['train_tokens_per_s']:,} tokens/s**.", ""] if nano else []),
        f"| recipe | params | load avg at start | seconds to {TARGET_LOSS} | seconds | steps | tokens | tokens/s "
        "| step tokens/s (median) | val loss (estimate) | val loss (exact, whole split) | stopped by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        reached = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"
        step_speed = f"{r['train_tokens_per_s']:,}" if r.get("train_tokens_per_s") else "-"
        if nano and r.get("train_tokens_per_s") and "nanogpt" in r["path"]:
            step_speed += f" ({r['train_tokens_per_s'] / nano['train_tokens_per_s']:.2f}x nanoGPT's)"
        lines.append(f"| `{r['path']}` | {r['params'] / 1e6:.2f}M | {r['load_at_start']} | {reached} | "
                     f"{r['seconds']} | {r['step']} | {r['tokens']:,} | {r['tokens_per_s']:,} | {step_speed} | "
                     f"{r['val_loss_estimate']:.4f} | {r['val_loss_exact']:.4f} ({r['val_tokens']:,} tokens) | "
                     f"{r['stopped_by']} |")
    lines += ["", "Validation loss by seconds of training (estimates at each evaluation):", "",
              "| recipe | seconds | step | val loss |", "|---|---:|---:|---:|"]
    for r in results:
        for p in r["curve"]:
            lines.append(f"| {r['config']} | {p['seconds']:.1f} | {p['step']} | {p['val_loss']:.4f} |")
    lines += ["", "![validation loss against seconds](results/time_to_loss.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS,
                        help="recipes to run, in order (none, with --pairs: only the pairs, printed)")
    parser.add_argument("--override", nargs="*", default=[], help="section.key=value for every recipe")
    parser.add_argument("--out", default="runs/time-to-loss", help="directory for the runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own). 1 keeps the timing steady on a shared CPU: "
                             "2 threads slow down many-fold whenever another process wants a core")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ untouched")
    parser.add_argument("--nanogpt", default=None, metavar="DIR",
                        help="also run nanoGPT's own train.py from this checkout first (its data prepared)")
    parser.add_argument("--pairs", type=int, default=0, metavar="N",
                        help=f"with --nanogpt: also run nanoGPT's train.py and {NANOGPT_RECIPE} in turn N times "
                             "(the order alternating) and report the step-speed ratio of each pair")
    args = parser.parse_args()
    if args.pairs < 0:
        parser.error("--pairs must be >= 0")
    if args.pairs and not args.nanogpt:
        parser.error("--pairs needs --nanogpt DIR (a nanoGPT checkout with data/shakespeare_char prepared)")
    if not args.configs and not args.pairs:
        parser.error("give --configs one or more recipes, or --pairs N")
    if args.threads:
        torch.set_num_threads(args.threads)

    os.environ.setdefault("GPTFORGE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    machine = machine_summary(torch.device("cpu"))
    print(machine, flush=True)
    nano = None
    if args.nanogpt and args.configs:  # beside the recipes (the pairs run it again themselves)
        print("nanoGPT train.py:", flush=True)
        nano = run_nanogpt(Path(args.nanogpt))
        print(f"  -> {nano['wall_s']} s of wall time, val loss {nano['val_loss']:.4f} (its estimate)", flush=True)
    # The pairs run the recipe as it is: --override would change gptforge's side alone.
    pairs = [speed_pair(Path(args.nanogpt), Path(args.out), nanogpt_first=i % 2 == 0) for i in range(args.pairs)]
    if not args.configs:  # only the pairs: docs/benchmarks.md's section holds the recipes too, so it is left as is
        print("\n" + pairs_table(pairs))
        return
    results = []
    for path in args.configs:
        print(f"{path}:", flush=True)
        r = run_recipe(path, Path(args.out), args.override)
        print(f"  -> {r['seconds']} s, {r['tokens_per_s']:,} tokens/s, val loss {r['val_loss_exact']:.4f} exact "
              f"({r['val_loss_estimate']:.4f} estimated), stopped by {r['stopped_by']}", flush=True)
        results.append(r)
    command = ("python benchmarks/time_to_loss.py" + (f" --threads {args.threads}" if args.threads else "")
               + (" --nanogpt NANOGPT_CHECKOUT" if nano or pairs else "")
               + (f" --pairs {args.pairs}" if pairs else "") + " --configs " + " ".join(args.configs))
    section = table(results, machine, command, nano) + (("\n\n" + pairs_table(pairs)) if pairs else "")
    if args.no_write:  # the section it would have written
        print(section.split("\n\nValidation loss by seconds")[0])
        if pairs:
            print("\n" + pairs_table(pairs))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "time_to_loss.jsonl", "w", encoding="utf-8") as f:
        if nano:
            f.write(json.dumps(nano | {"kind": "nanogpt"}) + "\n")
        for r in results:
            f.write(json.dumps({k: v for k, v in r.items() if k != "curve"} | {"kind": "summary"}) + "\n")
            for p in r["curve"]:
                f.write(json.dumps(p | {"kind": "eval"}) + "\n")
    plot(results, RESULTS / "time_to_loss.png")
    update_section(REPO / "docs" / "benchmarks.md", "bench:time_to_loss", section)
    print(f"wrote {RESULTS / 'time_to_loss.png'}, {RESULTS / 'time_to_loss.jsonl'} and docs/benchmarks.md")


if __name__ == "__main__":
    main()
