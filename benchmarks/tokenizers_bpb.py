"""Which tokenizer for a budget: char, GPT-2's BPE and a BPE trained on the text, the same model and the
same seconds of CPU training on Tiny Shakespeare, compared in bits per byte.

    python benchmarks/tokenizers_bpb.py                          # 30 s and 90 s budgets, ~8 minutes in all
    python benchmarks/tokenizers_bpb.py --budgets 30 --no-write  # one budget, print only
    python benchmarks/tokenizers_bpb.py --budgets 600 --threads 1

A loss in nats per token does not compare across tokenizers (a GPT-2 token holds ~3.3 characters, a char
token one); bits per byte do: the same nats divided by the UTF-8 bytes of the predicted text (see
gptforge.bpb). For each budget the recipe of that length (configs/tinyshakespeare-char-30s.toml for 30 s,
configs/tinyshakespeare-char.toml otherwise: 4 layers, 128 wide, context 64 tokens, Muon, a wsd schedule
sized to the budget) is trained three times, changing only data.tokenizer (bpe: 4,096 ids trained on the
corpus, the default). Context is 64 *tokens*, so the BPE models see more text per window: that is part of
what a tokenizer buys. The periodic estimate runs on EVAL_BATCHES batches (the recipes' 10-20 cost a
GPT-2-vocabulary model most of its budget: its 50,257-wide head makes an evaluated token ~10x dearer),
since the budget includes evaluations, every EVAL_EVERY updates; what is reported is the exact evaluation afterwards, off the
clock: each final model over its whole validation split with `gptforge eval`'s path (the splits are
the last 10% of each tokenization, nearly the same text). `--override train.eval_batches=N` changes it.
The sample text written at each evaluation is turned off (train.sample_every=0).

Writes docs/results/tokenizers_bpb.jsonl, docs/results/tokenizers-bpb-<budget>s.png (`gptforge plot
RUN... --metric bpb`) and the table between the `<!-- bench:tokenizers_bpb -->` markers of docs/results.md
(other budgets than the default 30 and 90: their own file and markers, e.g. tokenizers_bpb-600s).
"Text bytes/s" is training tokens/s times the validation split's bytes per token (an approximation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_summary, update_section  # noqa: E402

from gptforge.config import load_config  # noqa: E402
from gptforge.evaluate import evaluate_run  # noqa: E402
from gptforge.train.trainer import Trainer  # noqa: E402

TOKENIZERS = ("char", "gpt2", "bpe")
RESULTS = REPO / "docs" / "results"
EVAL_BATCHES = 2
EVAL_EVERY = 20  # updates: a curve, not just the sizing and the final evaluations


def recipe_for(budget: int) -> str:
    return "configs/tinyshakespeare-char-30s.toml" if budget <= 30 else "configs/tinyshakespeare-char.toml"


def run_one(budget: int, tokenizer: str, out_root: Path, overrides: list[str]) -> dict:
    path = recipe_for(budget)
    cfg = load_config(REPO / path, [f"data.tokenizer={tokenizer}", f"train.max_time={budget}",
                                    f"train.eval_batches={EVAL_BATCHES}", f"train.eval_every={EVAL_EVERY}", "train.sample_every=0",
                                    *overrides])
    run_dir = out_root / f"{budget}s" / tokenizer
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the benchmark's own scratch runs: always start fresh
    load = os.getloadavg()[0]
    curve: list[dict] = []
    trainer: Trainer | None = None

    def hook(step: int, record: dict) -> None:
        curve.append({"budget": budget, "tokenizer": tokenizer, "step": step, "seconds": round(trainer.elapsed, 3),
                      "val_loss": record.get("val_loss"), "val_bpb": record.get("val_bpb")})
        print(f"  {tokenizer}: {trainer.elapsed:6.1f} s  step {step:5d}  val_loss {record['val_loss']:.4f}  "
              f"val_bpb {record['val_bpb']:.4f}", flush=True)

    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, eval_hook=hook)
    setup_s = time.perf_counter() - t0
    result = trainer.train()
    exact = evaluate_run(run_dir, split="val", which="latest", device="cpu")
    return {"budget": budget, "tokenizer": tokenizer, "recipe": path, "run_dir": str(run_dir),
            "vocab_size": trainer.tokenizer.vocab_size, "params": trainer.raw_model.num_params(),
            "load_at_start": round(load, 2), "setup_s": round(setup_s, 1), "seconds": round(trainer.elapsed, 1),
            "step": result.step, "tokens": result.tokens, "tokens_per_s": round(result.tokens / max(trainer.elapsed, 1e-9)),
            "val_loss": exact["loss"], "val_bpb": exact["bpb"], "val_tokens": exact["tokens"],
            "val_bytes": exact["bytes"], "curve": curve}


def table(results: list[dict], machine: str, command: str) -> str:
    lines = [
        f"## Which tokenizer for {' and '.join(f'{b} s' for b in sorted({r['budget'] for r in results}))} "
        "(bits per byte, CPU)",
        "",
        f"`{command}`: the same model (4 layers, 4 heads, 128 wide, context 64 tokens, Muon, wsd sized to "
        f"the budget, periodic estimates on {EVAL_BATCHES} batches every {EVAL_EVERY} updates) trained for the same seconds on Tiny "
        "Shakespeare with each tokenizer. Validation numbers "
        "are exact, over the whole validation split of each tokenization (the last 10% of its tokens). "
        "Lower bits per byte is better; nats per token are shown but do not compare across rows.",
        "",
        f"Machine: {machine}",
        "",
        "| budget | tokenizer | vocab | params | load avg at start | steps | tokens/s | text bytes/s (approx.) | "
        "val loss (nats/token) | val bits per byte | val tokens | val bytes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        bytes_per_token = r["val_bytes"] / r["val_tokens"]
        lines.append(f"| {r['budget']} s | {r['tokenizer']} | {r['vocab_size']:,} | {r['params'] / 1e6:.2f}M | "
                     f"{r['load_at_start']} | {r['step']} | {r['tokens_per_s']:,} | "
                     f"{round(r['tokens_per_s'] * bytes_per_token):,} | {r['val_loss']:.4f} | "
                     f"**{r['val_bpb']:.4f}** | {r['val_tokens']:,} | {r['val_bytes']:,} |")
    for budget in sorted({r["budget"] for r in results}):
        lines += ["", f"![validation bits per byte against seconds, {budget} s](results/tokenizers-bpb-{budget}s.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", type=int, default=[30, 90], help="seconds of training per run")
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=TOKENIZERS)
    parser.add_argument("--override", nargs="*", default=[], help="section.key=value for every run")
    parser.add_argument("--out", default="runs/tokenizers-bpb", help="directory for the runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ untouched")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("GPTFORGE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    machine = machine_summary(torch.device("cpu"))
    print(machine, flush=True)
    results = []
    for budget in args.budgets:
        for tok in args.tokenizers:
            print(f"{budget} s, {tok}:", flush=True)
            r = run_one(budget, tok, Path(args.out), args.override)
            print(f"  -> {r['step']} steps, {r['tokens_per_s']:,} tokens/s; val {r['val_loss']:.4f} nats/token, "
                  f"{r['val_bpb']:.4f} bits/byte (exact: {r['val_tokens']:,} tokens, {r['val_bytes']:,} bytes)",
                  flush=True)
            results.append(r)
    if args.no_write:
        return
    from gptforge.plot import plot_runs

    RESULTS.mkdir(parents=True, exist_ok=True)
    # The default budgets own the docs' section and files; others get their own beside them.
    suffix = "" if args.budgets == [30, 90] else "-" + "-".join(map(str, args.budgets)) + "s"
    with open(RESULTS / f"tokenizers_bpb{suffix}.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({k: v for k, v in r.items() if k != "curve"} | {"kind": "summary"}) + "\n")
            for p in r["curve"]:
                f.write(json.dumps(p | {"kind": "eval"}) + "\n")
    for budget in args.budgets:
        plot_runs([r["run_dir"] for r in results if r["budget"] == budget],
                  RESULTS / f"tokenizers-bpb-{budget}s.png", x="seconds", metric="bpb")
    command = ("python benchmarks/tokenizers_bpb.py --budgets " + " ".join(map(str, args.budgets))
               + (f" --threads {args.threads}" if args.threads else ""))
    update_section(REPO / "docs" / "results.md", f"bench:tokenizers_bpb{suffix}", table(results, machine, command),
                   title="# Results")
    print(f"wrote {RESULTS / f'tokenizers_bpb{suffix}.jsonl'}, the plots and docs/results.md")


if __name__ == "__main__":
    main()
