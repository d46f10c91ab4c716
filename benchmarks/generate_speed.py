"""Decoding speed: gptforge's Generator with and without the KV cache, and Hugging Face's
GPT2LMHeadModel.generate on the same weights, greedy, batch 1, in one run.

    python benchmarks/generate_speed.py                     # rewrites the bench:generate section of docs/benchmarks.md
    python benchmarks/generate_speed.py --quick --no-write  # the mini model and short lengths only
    python benchmarks/generate_speed.py --threads 1 --repeats 3

Both models have a 256-token context and GPT-2's vocabulary. A 16-token prompt is followed by 240
new tokens (filling the context exactly: the longest run Hugging Face's GPT-2 can do, since it has
no positions past its context), then 512 and 1,024 (past the context: gptforge slides its window,
re-prefilling the last 3/4 of the context when it is full). "No cache" recomputes the whole window
for every token (the same windows, hence the same tokens: asserted); the model returns logits for
every position, as its contract says, so that path also pays for the LM head over the window.
The Hugging Face model is exported with gptforge.hf.save_pretrained and loaded with from_pretrained;
its greedy tokens must match ours. Timings on a shared CPU move from run to run: compare the
columns of one row (measured back to back), and use --repeats to keep the fastest of several.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCHMARKS_MD, machine_summary, update_section  # noqa: E402

GPT2_VOCAB = 50257
CONTEXT = 256
PROMPT_TOKENS = 16
MODELS: dict[str, dict[str, int]] = {
    "mini": dict(n_layer=4, n_head=4, n_embd=128),  # 4 layers, 128 wide
    "small": dict(n_layer=6, n_head=6, n_embd=384),  # the small CPU model (nanoGPT's Shakespeare size)
}
LENGTHS = (CONTEXT - PROMPT_TOKENS, 512, 1024)


def prompt_ids() -> list[int]:
    """The first tokens of Tiny Shakespeare under GPT-2's BPE, or fixed ids when the data is not at hand."""
    try:
        from gptforge.data.corpus import data_dir
        from gptforge.data.tokenizers import GPT2Tokenizer

        path = data_dir() / "tinyshakespeare" / "input.txt"
        return GPT2Tokenizer().encode(path.read_text(encoding="utf-8")[:500])[:PROMPT_TOKENS]
    except Exception:
        return [(1000 + 37 * i) % GPT2_VOCAB for i in range(PROMPT_TOKENS)]


class _VocabOnly:
    """Just enough of a tokenizer for the engine when measuring token ids (nothing is decoded)."""

    spec, vocab_size, eot_id = "gpt2", GPT2_VOCAB, None

    def decode(self, ids):  # pragma: no cover - not called by generate_ids
        return ""


def best_rate(fn, n_tokens: int, repeats: int) -> tuple[float, object]:
    """Tokens/s of the fastest of `repeats` calls of fn() (which returns the tokens), and those tokens."""
    best, out = 0.0, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = max(best, n_tokens / (time.perf_counter() - t0))
    return best, out


def measure(name: str, lengths: tuple[int, ...], repeats: int, no_cache_max: int | None) -> list[dict]:
    from transformers import GPT2LMHeadModel

    from gptforge.generate import Generator, SamplingSettings
    from gptforge.hf import save_pretrained
    from gptforge.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=GPT2_VOCAB, block_size=CONTEXT, **MODELS[name])).eval()
    gen = Generator(model, _VocabOnly())
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        hf = GPT2LMHeadModel.from_pretrained(d).eval()
    prompt = prompt_ids()
    x = torch.tensor([prompt])
    greedy = dict(temperature=0.0)

    def ours(n: int, use_cache: bool):
        return lambda: gen.generate_ids(prompt, SamplingSettings(max_new_tokens=n, **greedy), use_cache)[0]

    def theirs(n: int):
        def run():
            with torch.inference_mode():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=0)
            return out[0, len(prompt):].tolist()
        return run

    # warm-up: first calls allocate and pick kernels
    ours(16, True)()
    ours(16, False)()
    theirs(16)()
    rows = []
    for n in lengths:
        cached, tokens = best_rate(ours(n, True), n, repeats)
        row = dict(model=name, params=model.num_params(), new_tokens=n, cached=cached)
        if no_cache_max is None or n <= no_cache_max:
            row["plain"], plain_tokens = best_rate(ours(n, False), n, repeats)
            assert plain_tokens == tokens, "the KV cache changed the greedy tokens"
        if len(prompt) + n <= CONTEXT:
            row["hf"], hf_tokens = best_rate(theirs(n), n, repeats)
            row["same_as_hf"] = hf_tokens == tokens
        rows.append(row)
        print(f"{name} {n:>5} new tokens: cache {cached:8.1f} tok/s"
              + (f" | no cache {row['plain']:8.1f} tok/s" if "plain" in row else "")
              + (f" | HF {row['hf']:8.1f} tok/s (same tokens: {row['same_as_hf']})" if "hf" in row else ""),
              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | params | new tokens | KV cache tok/s | no cache tok/s | cache speed-up | HF generate tok/s "
           "| ours / HF | same tokens as HF |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        past = " (window slides)" if PROMPT_TOKENS + r["new_tokens"] > CONTEXT else ""
        hf = f"{r['hf']:,.1f}" if "hf" in r else "n/a (no positions past 256)"
        ratio = f"{r['cached'] / r['hf']:.2f}x" if "hf" in r else ""
        same = ("yes" if r["same_as_hf"] else "NO") if "hf" in r else ""
        plain = f"{r['plain']:,.1f}" if "plain" in r else "not run (--no-cache-max-tokens)"
        speedup = f"{r['cached'] / r['plain']:.1f}x" if "plain" in r else ""
        out.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['new_tokens']:,}{past} | {r['cached']:,.1f} | "
                   f"{plain} | {speedup} | {hf} | {ratio} | {same} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mini,small", help=f"comma-separated, from: {', '.join(MODELS)}")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                   help="new tokens per measurement, comma-separated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="time each cell this many times, keep the fastest")
    p.add_argument("--no-cache-max-tokens", type=int, default=None,
                   help="skip the (slow) no-cache measurement above this many new tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="the mini model at 240 and 512 new tokens")
    p.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md")
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/generate_speed.py", *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    models = ["mini"] if args.quick else args.models.split(",")
    lengths = (CONTEXT - PROMPT_TOKENS, 512) if args.quick else tuple(int(n) for n in args.lengths.split(","))
    machine = machine_summary(torch.device("cpu"))  # before the run: it records the load average at start

    rows = [r for name in models for r in measure(name, lengths, args.repeats, args.no_cache_max_tokens)]
    body = "\n".join([
        "## Generation speed",
        "",
        f"`{command}`: greedy decoding, batch 1, a {PROMPT_TOKENS}-token prompt, context {CONTEXT}, GPT-2 "
        "vocabulary, float32, random weights (speed does not depend on them). KV cache = gptforge's "
        "Generator; no cache = the same engine recomputing the whole window for every token; HF = "
        "`GPT2LMHeadModel.generate` (its own KV cache) on the same weights, via `gptforge.hf.save_pretrained`.",
        "",
        table(rows),
        "",
        "Shapes: mini = 4 layers, 4 heads, 128 wide; small = 6 layers, 6 heads, 384 wide (the `small` preset); "
        "both with context 256 here. params counts the 50,304-row (padded) token embedding, tied to the LM head, "
        "which is most of both models. No cache re-runs the model over the whole window for every token, and "
        "the model returns logits for every position of it, so that path also pays the LM head per position. "
        "Hugging Face's GPT-2 has no positions past its context, so it has no sliding window to compare with.",
        "",
        f"Machine: {machine}.",
    ])
    print()
    print(body)
    if not args.no_write:
        update_section(BENCHMARKS_MD, "bench:generate", body)
        print(f"\nwrote the bench:generate section of {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
