"""Preparation speed and memory: `gptforge prepare` by corpus size and tokenizer, with the old
whole-corpus-in-memory prepare as the peer on one size, in one run.

    python benchmarks/prepare_speed.py                           # 50 MB, 250 MB, 1 GB; writes docs/benchmarks.md
    python benchmarks/prepare_speed.py --sizes 50 --tokenizers gpt2 --no-write
    python benchmarks/prepare_speed.py --peer-size 250 --peer-rev dda2a2c

Corpora are generated into --workdir (default /tmp/gptforge-bench-prepare, never the repository):
JSON Lines of varied documents made from the Python sources of the installed site-packages and Tiny
Shakespeare, each document's lines shuffled in blocks and headed by a few random words, so no two
documents are alike. Each row is a fresh `python -m gptforge prepare --out DIR` process; its wall
time covers everything (hashing, tokenizer building, tokenizing, writing). Peak RSS is the highest
*sum* over the process and its worker processes, sampled every 20 ms from /proc (the biggest single
process is shown too). The peer is the prepare of git revision --peer-rev (before streaming), run
on the same documents written as one .txt file (it reads text only), with the new prepare on that
same .txt beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCHMARKS_MD, REPO, machine_summary, update_section  # noqa: E402

MB = 1_000_000


# --------------------------------------------------------------------------------------------- corpora


def _seed_texts() -> list[str]:
    """Python sources of the installed packages plus Tiny Shakespeare cut into scenes."""
    import site

    texts = []
    for root in site.getsitepackages():
        for p in sorted(Path(root).rglob("*.py")):
            try:
                t = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if 2_000 < len(t) < 200_000:
                texts.append(t)
            if len(texts) >= 6_000:
                break
    data = os.environ.get("GPTFORGE_DATA_DIR")
    shakespeare = Path(data) / "tinyshakespeare" / "input.txt" if data else None
    if shakespeare is not None and shakespeare.is_file():
        s = shakespeare.read_text(encoding="utf-8")
        texts += [s[i:i + 20_000] for i in range(0, len(s), 20_000)] * 8
    if not texts:
        raise SystemExit("no seed texts found (no site-packages sources, GPTFORGE_DATA_DIR unset)")
    return texts


def make_corpus(path: Path, size: int, seed: int = 0) -> Path:
    """`size` bytes (about) of JSON Lines documents with a "text" field, written once and reused."""
    if path.is_file() and path.stat().st_size >= size:
        return path
    rng = random.Random(seed)
    seeds = _seed_texts()
    words = sorted({w for t in seeds[:200] for w in t.split() if w.isalpha() and 3 < len(w) < 12})
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            lines = rng.choice(seeds).splitlines(keepends=True)
            blocks = [lines[i:i + 20] for i in range(0, len(lines), 20)]
            rng.shuffle(blocks)
            head = " ".join(rng.choices(words, k=rng.randint(3, 12)))
            text = f"# {head}\n" + "".join(line for b in blocks for line in b)
            line = json.dumps({"id": written, "text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    tmp.replace(path)
    return path


def as_text_file(jsonl: Path, out: Path) -> Path:
    """The same documents as one plain text file (one blank line between them), for the old prepare."""
    if out.is_file():
        return out
    tmp = out.with_suffix(".tmp")
    with open(jsonl, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as f:
        for line in src:
            f.write(json.loads(line)["text"].rstrip("\n") + "\n\n")
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------------------------- measuring


def _tree_rss(pid: int) -> tuple[int, int]:
    """(sum, max) of VmRSS in bytes over `pid` and all its descendants."""
    total, biggest, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    total, biggest = total + rss, max(biggest, rss)
                    break
            for t in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (t / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total, biggest


def run_prepare(corpus: Path, tokenizer: str, out: Path, src: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src), "GPTFORGE_CACHE_DIR": str(out.parent / "cache")}
    cmd = [sys.executable, "-m", "gptforge", "prepare", "--corpus", str(corpus), "--tokenizer", tokenizer,
           "--out", str(out), "--block-size", "8", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        s, m = _tree_rss(proc.pid)
        peak_sum, peak_one = max(peak_sum, s), max(peak_one, m)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_sum": peak_sum, "peak_one": peak_one, "tokens": meta["tokens"]}


def old_source(rev: str, workdir: Path) -> Path | None:
    """The package as it was at git revision `rev` (the peer), extracted into workdir."""
    dest = workdir / f"old-{rev}"
    if (dest / "src" / "gptforge").is_dir():
        return dest / "src"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True)
    if archive.returncode != 0:
        print(f"peer skipped: git revision {rev} is not in this checkout", file=sys.stderr)
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50,250,1000", help="corpus sizes in MB (default: 50,250,1000)")
    p.add_argument("--tokenizers", default="gpt2,char,bpe", help="comma-separated (default: gpt2,char,bpe)")
    p.add_argument("--big-tokenizers", default="gpt2,char,bpe",
                   help="tokenizers also run at sizes >= 1000 MB (default: all)")
    p.add_argument("--bpe-vocab-size", type=int, default=16384)
    p.add_argument("--peer-size", type=int, default=50, help="size (MB) for the old-prepare comparison; 0 = none")
    p.add_argument("--peer-rev", default="dda2a2c", help="git revision of the old prepare (default: dda2a2c)")
    p.add_argument("--peer-tokenizers", default="gpt2", help="tokenizers of the peer comparison")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gptforge-bench-prepare"))
    p.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md")
    args = p.parse_args()

    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_summary(torch.device("cpu"))
    src = REPO / "src"
    sizes = [int(s) for s in args.sizes.split(",") if s]
    toks = [t for t in args.tokenizers.split(",") if t]
    big_toks = set(args.big_tokenizers.split(","))
    rows = []

    def extra(tok: str) -> list[str]:
        return ["--bpe-vocab-size", str(args.bpe_vocab_size)] if tok == "bpe" else []

    def show(row: dict) -> None:
        print(f"{row['what']:<26} {row['size']:>6} MB {row['tok']:<5} {row['seconds']:7.1f} s "
              f"{row['mbps']:6.1f} MB/s  peak {row['peak_sum'] / 1e9:5.2f} GB (largest process "
              f"{row['peak_one'] / 1e9:4.2f} GB)  {row['tokens']:,} tokens", flush=True)

    for size in sizes:
        corpus = make_corpus(args.workdir / f"corpus-{size}MB.jsonl", size * MB)
        nbytes = corpus.stat().st_size
        for tok in toks:
            if size >= 1000 and tok not in big_toks:
                continue
            r = run_prepare(corpus, tok, args.workdir / "out", src, extra(tok))
            rows.append({"what": "gptforge prepare (.jsonl)", "size": size, "tok": tok,
                         "mbps": nbytes / MB / r["seconds"], **r})
            show(rows[-1])

    peer = []
    if args.peer_size:
        old = old_source(args.peer_rev, args.workdir)
        corpus = make_corpus(args.workdir / f"corpus-{args.peer_size}MB.jsonl", args.peer_size * MB)
        text = as_text_file(corpus, args.workdir / f"corpus-{args.peer_size}MB.txt")
        nbytes = text.stat().st_size
        for tok in [t for t in args.peer_tokenizers.split(",") if t] if old is not None else []:
            for what, where in (("old prepare (.txt)", old), ("gptforge prepare (.txt)", src)):
                r = run_prepare(text, tok, args.workdir / "out", where, extra(tok))
                peer.append({"what": what, "size": args.peer_size, "tok": tok,
                             "mbps": nbytes / MB / r["seconds"], **r})
                show(peer[-1])

    lines = [
        "## Preparation speed and memory",
        "",
        f"`python benchmarks/prepare_speed.py --sizes {args.sizes} --tokenizers {args.tokenizers} "
        f"--peer-size {args.peer_size}`: one fresh `gptforge prepare --out DIR` process per row (default "
        "workers: one per core); wall time from start to exit (hashing, tokenizer, tokenizing, writing); "
        "MB/s = input bytes / wall time. Peak RSS = the highest sum over the process and its worker "
        "processes (sampled every 20 ms); the largest single process in brackets. bpe: vocabulary "
        f"{args.bpe_vocab_size:,}, trained on a 64 MiB sample (the default).",
        "",
        f"Machine: {machine}.",
        "",
        "Corpora: JSON Lines of varied documents generated from the installed packages' Python sources "
        "and Tiny Shakespeare (each document's lines shuffled in blocks and headed by random words), "
        "written to /tmp.",
        "",
        "| input | size | tokenizer | seconds | MB/s | peak RSS, all processes (largest one) | tokens |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows + peer:
        lines.append(f"| {r['what']} | {r['size']:,} MB | {r['tok']} | {r['seconds']:.1f} | {r['mbps']:.1f} | "
                     f"{r['peak_sum'] / 1e9:.2f} GB ({r['peak_one'] / 1e9:.2f} GB) | {r['tokens']:,} |")
    if peer:
        lines += ["", f"Peer: the old prepare (git revision {args.peer_rev}: whole corpus in memory, ids as "
                  "Python lists) and the new one on the same documents as one .txt file, back to back."]
        for tok in sorted({r["tok"] for r in peer}):
            old_r = next(r for r in peer if r["tok"] == tok and r["what"].startswith("old"))
            new_r = next(r for r in peer if r["tok"] == tok and not r["what"].startswith("old"))
            lines.append(f"- {tok}: {new_r['mbps'] / old_r['mbps']:.2f}x the old speed, "
                         f"{old_r['peak_sum'] / new_r['peak_sum']:.1f}x less peak memory.")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Load average at the end: {load} (the 2-core machine may be shared: a load above 2 means "
              "other work competed for the cores, so rates are lower bounds). The small corpora's MB/s "
              "include fixed start-up (Python, the worker processes, each loading the tokenizer), which "
              "the 1 GB rows amortise."]
    body = "\n".join(lines)
    print()
    print(body)
    if not args.no_write:
        update_section(BENCHMARKS_MD, "bench:prepare", body)
        print(f"\nwrote the bench:prepare section of {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
