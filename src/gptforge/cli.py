"""gptforge's command line: each subcommand parses its arguments and calls one library function.

    gptforge prepare --corpus tinyshakespeare --tokenizer gpt2
    gptforge train --config configs/tinyshakespeare-char.toml --out runs/char
    gptforge generate runs/char --prompt "ROMEO:"
    gptforge --help | gptforge SUBCOMMAND --help

Each subcommand has an `_add_<name>(subparsers)` that defines its options and a `_run_<name>(args)`
that calls the library. Libraries are imported inside `_run_*` so `--help` does not load torch.
"""

from __future__ import annotations

import argparse
import sys

from gptforge import __version__
from gptforge.errors import GptforgeError

# --------------------------------------------------------------------------------------------- prepare


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a corpus into cached token files",
        description="Tokenize a corpus into memory-mapped train/val token files (cached and reused "
        "while the text and tokenizer stay the same).",
        epilog="examples:\n  gptforge prepare --corpus tinyshakespeare --tokenizer gpt2\n"
        "  gptforge prepare --corpus notes/ extra.txt --tokenizer bpe --bpe-vocab-size 8192\n"
        "  cat book.txt | gptforge prepare --corpus - --tokenizer char --out data/book",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--corpus", nargs="+", default=["tinyshakespeare"], metavar="SOURCE",
                   help="a named corpus (tinyshakespeare), text files, directories of .txt files, or - for "
                   "stdin; several are joined in order (default: tinyshakespeare)")
    p.add_argument("--tokenizer", default="gpt2", metavar="{gpt2,char,bpe}",
                   help="gpt2: GPT-2's BPE (tiktoken); char: one id per character of the corpus; bpe: a "
                   "byte-level BPE trained on the corpus (default: gpt2)")
    p.add_argument("--bpe-vocab-size", type=int, default=None, metavar="N",
                   help="vocabulary size of the trained bpe tokenizer, 257..65536 (default: 4096)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of the tokens, taken from the end, kept for validation; 0 = no "
                   "validation split (default: 0.1)")
    p.add_argument("--block-size", type=int, default=256, metavar="T",
                   help="context length you will train with: each split must hold at least one window "
                   "of T+1 tokens (default: 256)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the files here instead of the cache ($GPTFORGE_CACHE_DIR/tokens/...)")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from gptforge.data.tokens import prepare

    data = prepare(args.corpus, tokenizer=args.tokenizer, val_fraction=args.val_fraction, out=args.out,
                   bpe_vocab_size=args.bpe_vocab_size, block_size=args.block_size)
    m = data.meta
    eot = f", end-of-text id {m['eot_id']}" if m["eot_id"] is not None else ""
    val = f"{m['val_tokens']:,} validation" if m["val_tokens"] else "no validation split"
    files = ", ".join(n for n in ("train.bin", "val.bin", "meta.json", "tokenizer/")
                      if (data.dir / n.rstrip("/")).exists())
    how = "reused (meta.json matched)" if data.reused else "prepared"
    n_src = len(m["sources"])
    print(f"corpus      {m['corpus']} ({n_src} source{'s' * (n_src != 1)}, sha256 {m['source_sha256'][:12]})")
    print(f"characters  {m['characters']:,} ({m['distinct_characters']:,} distinct)")
    print(f"tokenizer   {m['tokenizer']}, vocabulary {m['vocab_size']:,}{eot}")
    print(f"tokens      {m['tokens']:,}: {m['train_tokens']:,} train, {val} ({m['dtype']})")
    print(f"files       {data.dir} ({files})")
    print(f"cache       {how} in {data.seconds:.2f} s")


# --------------------------------------------------------------------------------------------- train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (prepares the data itself)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    raise GptforgeError("train is not implemented yet")


# --------------------------------------------------------------------------------------------- eval


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact mean cross-entropy of a run over a whole split")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    raise GptforgeError("eval is not implemented yet")


# --------------------------------------------------------------------------------------------- plot


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss and learning-rate curves into a PNG")
    p.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> None:
    raise GptforgeError("plot is not implemented yet")


# --------------------------------------------------------------------------------------------- generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a trained run")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    raise GptforgeError("generate is not implemented yet")


# --------------------------------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="web page to sample from a run (Gradio)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    raise GptforgeError("serve is not implemented yet")


# --------------------------------------------------------------------------------------------- export-space


def _add_export_space(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-space", help="write a folder ready to push as a Hugging Face Space")
    p.set_defaults(func=_run_export_space)


def _run_export_space(args: argparse.Namespace) -> None:
    raise GptforgeError("export-space is not implemented yet")


# --------------------------------------------------------------------------------------------- sweep


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="hyperparameter search with Optuna")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> None:
    raise GptforgeError("sweep is not implemented yet")


# --------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptforge",
        description="Train GPT-style transformers from scratch, evaluate them honestly, and sample from them.",
    )
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_prepare, _add_train, _add_eval, _add_plot, _add_generate, _add_serve,
                _add_export_space, _add_sweep):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GptforgeError as e:
        print(f"gptforge: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("gptforge: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
