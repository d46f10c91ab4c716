"""The evidence behind model.preset = "auto": for each corpus x tokenizer x time budget, train `auto`
and the `mini`, `small` and `base` presets (each in auto's recipe: Muon + wsd, the AdamW LR scaled as
1/width, the same budget) and score each exactly on the whole validation split.

    python benchmarks/auto_sweep.py                                  # 2 corpora x 2 tokenizers x 30 s, 90 s
    python benchmarks/auto_sweep.py --budgets 30 --corpora python --tokenizers char --no-write
    python benchmarks/auto_sweep.py --rungs                          # also every ladder rung (the rule's sweep)
    python benchmarks/auto_sweep.py --budgets 600 3600 --corpora python --tokenizers char --jobs 4
                                     # a cell's configs side by side: 4 processes of one thread each

Corpora: Tiny Shakespeare (what the CPU recipes were tuned on), ~2 MB of Python source gathered
from this Python's own standard library (`python`: code, a kind of text nothing was tuned on until
the hour-long cells of 2026-12-01), and ~1.3 MB of the English prose of that library's docstrings
(`docstrings`: technical prose, held out from every tuning); both made on the fly, never stored in
the repository. Writes docs/results/auto_sweep.jsonl (one line per run), the
table between the `<!-- bench:auto -->` markers of docs/auto.md and docs/results/auto_sweep.png
(validation loss of each shape against the budget, per corpus and tokenizer), with the machine.
Losses: mean cross-entropy in nats per token on the whole validation split (float32); bits per byte
beside it where the tokenizer knows its tokens' bytes.

With `--jobs N` the configs of one cell (corpus x tokenizer x budget) train N at a time, each in its
own process with one thread, started together: every config of a cell gets the same share of the
machine, so a cell compares like with like even when it does not compare with runs made alone (auto
measures the speed it gets, and so picks for a machine that N runs share). Long budgets need it: four
configs of an hour take an hour, not four.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_summary, update_section  # noqa: E402

from gptforge.config import load_config  # noqa: E402
from gptforge.evaluate import evaluate_run  # noqa: E402
from gptforge.train import auto  # noqa: E402
from gptforge.train.trainer import train  # noqa: E402

DOC = REPO / "docs" / "auto.md"
RESULTS = REPO / "docs" / "results"
PRESET_RUNGS = {  # the presets as rungs of the same recipe (their own context; batch as the ladder's)
    "mini": auto.Rung("mini", 4, 4, 128, 128, 32),
    "small": auto.Rung("small", 6, 6, 384, 256, 16),
    "base": auto.Rung("base", 6, 10, 640, 256, 16),
}


def python_corpus(out: Path, size: int = 2_000_000) -> Path:
    """~`size` bytes of this Python's standard library source (sorted files), as one text file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text.encode())
        if total >= size:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def docstrings_corpus(out: Path, size: int = 2_000_000) -> Path:
    """English prose: the docstrings (over 200 characters) of this Python's standard library, its tests and
    site packages left out, in path order, blank-line separated, stopping before `size` bytes (3.11's make
    ~1.3 MB: all of them). It varies with the Python version and how the distribution packaged it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    parts, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if skip & set(path.relative_to(stdlib).parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old files: SyntaxWarning on 3.12+
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError, RecursionError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    grown = total + len(doc.encode()) + (2 if parts else 0)
                    if grown > size:
                        break
                    parts.append(doc)
                    total = grown
        else:
            continue
        break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts), encoding="utf-8")
    return out


def common_overrides(corpus: str, tokenizer: str, budget: float) -> list[str]:
    return [f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", "data.val_fraction=0.1",
            "train.max_steps=none", f"train.max_time={budget}", "train.eval_every=100000",
            "train.eval_batches=10", "train.log_every=50", "train.checkpoint_every=100000", "train.keep_last=0",
            "train.sample_every=0", "train.dtype=auto", "train.device=cpu"]


def run_one(name: str, corpus: str, tokenizer: str, budget: float, out_root: Path, rung: auto.Rung | None) -> dict:
    run = out_root / f"{Path(corpus).stem}-{tokenizer}-{int(budget)}s-{name}"
    if run.exists():
        shutil.rmtree(run)
    overrides = common_overrides(corpus, tokenizer, budget)
    if rung is None:
        cfg = load_config(None, ["model.preset=auto", *overrides])
    else:
        cfg = auto.apply_rung(load_config(None, overrides), rung)
        from gptforge.runtime import setup_runtime

        if auto.runtime_for(rung, cfg, setup_runtime("cpu", "auto")).dtype == torch.float32:
            cfg.train.dtype = "float32"  # the precision auto would give this shape: like with like
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = train(cfg, run)
    wall = time.perf_counter() - start
    exact = evaluate_run(run, split="val")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    chosen = next((e for e in events if e.get("event") == "auto"), None)
    row = {"corpus": Path(corpus).stem, "tokenizer": tokenizer, "budget_s": budget, "config": name,
           "rung": chosen["rung"] if chosen else name,
           "block_size": chosen["block_size"] if chosen else cfg.model.block_size,
           "steps": result.step, "tokens": result.tokens,
           "val_loss": exact["loss"], "val_tokens": exact["tokens"], "wall_s": round(wall, 1),
           "load_at_start": round(load, 2),
           "python": platform.python_version()}  # the generated corpora come from its standard library
    if "bpb" in exact:
        row["val_bpb"] = exact["bpb"]
    print(json.dumps(row), flush=True)
    return row


def run_side_by_side(names: list[str], corpus: str, tokenizer: str, budget: float, out_root: Path,
                     jobs: int) -> list[dict]:
    """`names` trained `jobs` at a time, each by this script in its own process with one thread."""
    rows: list[dict] = []
    if len(names) % jobs:
        raise SystemExit(f"--jobs {jobs} does not divide the {len(names)} configs of a cell: every config "
                         "of a cell must get the same share of the machine")
    for i in range(0, len(names), jobs):
        procs = []
        for name in names[i:i + jobs]:
            cmd = [sys.executable, __file__, "--budgets", str(budget), "--corpora", corpus, "--tokenizers",
                   tokenizer, "--configs", name, "--threads", "1", "--out", str(out_root), "--no-write"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            log = out_root / f"{Path(corpus).stem}-{tokenizer}-{int(budget)}s-{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:  # a file, not a pipe: a long run's output never blocks it
                procs.append((name, log, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)))
        for name, log, proc in procs:
            proc.wait()
            found = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
            if proc.returncode != 0 or len(found) != 1:
                for _, _, other in procs:  # the rest of the cell would compare with nothing
                    other.kill()
                    other.wait()
                raise SystemExit(f"the {name} run of {Path(corpus).stem}/{tokenizer}/{budget:g} s failed "
                                 f"(exit {proc.returncode}); its output is in {log}")
            found[0]["side_by_side"] = len(procs)
            print(json.dumps(found[0]), flush=True)  # what --from-jsonl reads back
            rows.append(found[0])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| corpus | tokenizer | budget | config | runs at once | shape | updates | tokens | val loss (exact) | best? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["corpus"], r["tokenizer"], r["budget_s"]), []).append(r)
    for group in cells.values():
        best = min(g["val_loss"] for g in group)
        for r in group:
            gap = "**best**" if r["val_loss"] == best else f"+{r['val_loss'] - best:.3f}"
            shape = r["rung"] + (f", context {r['block_size']}" if "block_size" in r else "")
            lines.append(f"| {r['corpus']} | {r['tokenizer']} | {r['budget_s']:.0f} s | {r['config']} | "
                         f"{r.get('side_by_side', 1)} | {shape} | "
                         f"{r['steps']:,} | {r['tokens']:,} | {r['val_loss']:.4f} | {gap} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(r["corpus"], r["tokenizer"]) for r in rows})
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
    for ax, (corpus, tok) in zip(axes[0], pairs, strict=True):
        mine = [r for r in rows if (r["corpus"], r["tokenizer"]) == (corpus, tok)]
        for name in sorted({r["config"] for r in mine}):
            pts = sorted((r["budget_s"], r["val_loss"]) for r in mine if r["config"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linewidth=2.5 if name == "auto" else 1.2)
        ax.set_xscale("log")
        ax.set_title(f"{corpus}, {tok}")
        ax.set_xlabel("time budget (s)")
        ax.set_ylabel("val loss (nats/token, exact)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", type=float, default=[30, 90])
    ap.add_argument("--corpora", nargs="+", default=["tinyshakespeare", "python"])
    ap.add_argument("--tokenizers", nargs="+", default=["char", "gpt2"])
    ap.add_argument("--configs", nargs="+", default=["auto", "mini", "small", "base"])
    ap.add_argument("--rungs", action="store_true", help="also train every ladder rung up to a5")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=1,
                    help="train a cell's configs this many at a time, one thread each (default 1: in turn)")
    ap.add_argument("--out", default=str(REPO / "runs" / "auto-sweep"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--from-jsonl", nargs="+", default=None, metavar="FILE",
                    help="train nothing: write the table and plot from rows printed by earlier runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_root = Path(args.out)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: give 1 or more")
    corpora = {"tinyshakespeare": "tinyshakespeare"}
    if "python" in args.corpora and not args.from_jsonl:
        corpora["python"] = str(python_corpus(out_root / "corpora" / "python-stdlib.txt"))
    if "docstrings" in args.corpora and not args.from_jsonl:
        corpora["docstrings"] = str(docstrings_corpus(out_root / "corpora" / "python-docstrings.txt"))
    corpora.update({c: c for c in args.corpora if c not in corpora and Path(c).is_file()})  # a file made earlier
    rows = []
    if args.from_jsonl:
        rows = [json.loads(line) for f in args.from_jsonl for line in Path(f).read_text().splitlines() if line]
        args.corpora = []
    for corpus in args.corpora:
        for tok in args.tokenizers:
            for budget in args.budgets:
                names = list(args.configs) + ([r.name for r in auto.RUNGS[:5]] if args.rungs else [])
                if args.jobs > 1:
                    rows += run_side_by_side(names, corpora[corpus], tok, budget, out_root, args.jobs)
                    continue
                for name in names:
                    rung = (None if name == "auto" else PRESET_RUNGS.get(name)
                            or next(r for r in auto.RUNGS if r.name == name))
                    rows.append(run_one(name, corpora[corpus], tok, budget, out_root, rung))
    print(table(rows))
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "auto_sweep.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    plot(rows, RESULTS / "auto_sweep.png")
    if args.from_jsonl:
        how = "rows of earlier runs, each run as its 'runs at once' column says (1 thread each when more than one)"
        machine = "the machine each row names in docs/auto.md's text"
    else:
        how = (f"{args.jobs} runs at once, 1 thread each" if args.jobs > 1
               else f"{args.threads or torch.get_num_threads()} thread(s)")
        machine = machine_summary(torch.device("cpu"))
    text = (f"Measured on {machine}, torch {torch.__version__}, {how}; the load average at the start of "
            "each run is in docs/results/auto_sweep.jsonl.\n\n" + table(rows))
    update_section(DOC, "bench:auto", text)
    if not math.isfinite(min(r["val_loss"] for r in rows)):
        raise SystemExit("a run diverged")


if __name__ == "__main__":
    main()
