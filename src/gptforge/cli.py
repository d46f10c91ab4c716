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
    p = sub.add_parser("prepare", help="tokenize a corpus into cached token files")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    raise GptforgeError("prepare is not implemented yet")


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
