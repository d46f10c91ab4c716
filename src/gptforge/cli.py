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
import os
import sys

from gptforge import __version__
from gptforge.errors import GptforgeError

# --------------------------------------------------------------------------------------------- prepare


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a corpus into cached token files",
        description="Tokenize a corpus into sharded, memory-mapped token files (cached and reused while the "
        "text and tokenizer stay the same). The corpus is streamed, so any size fits in memory; an "
        "interrupted prepare continues from its finished shards when run again.",
        epilog="examples:\n  gptforge prepare --corpus tinyshakespeare --tokenizer gpt2\n"
        "  gptforge prepare --corpus notes/ extra.txt --tokenizer bpe --bpe-vocab-size 8192\n"
        "  gptforge prepare --corpus owt/ --tokenizer gpt2 --val-tokens 5000000 --out data/owt\n"
        "  gptforge prepare --corpus fineweb/000_00000.parquet --text-field text --out data/fw\n"
        "  cat book.txt | gptforge prepare --corpus - --tokenizer char --out data/book",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--corpus", nargs="+", default=["tinyshakespeare"], metavar="SOURCE",
                   help="a named corpus (tinyshakespeare), text files, .jsonl/.jsonl.gz/.parquet files, "
                   "directories of those, a directory saved by Hugging Face datasets (DIR or DIR:SPLIT), "
                   "hf:NAME[:CONFIG][@SPLIT] streamed from the Hub, or - for stdin; several are read in order "
                   "(default: tinyshakespeare)")
    p.add_argument("--tokenizer", default="gpt2", metavar="{gpt2,char,bpe}",
                   help="gpt2: GPT-2's BPE (tiktoken); char: one id per character of the corpus; bpe: a "
                   "byte-level BPE trained on (a sample of) the corpus (default: gpt2)")
    p.add_argument("--bpe-vocab-size", type=int, default=None, metavar="N",
                   help="vocabulary size of the trained bpe tokenizer, 257..65536 (default: 4096)")
    p.add_argument("--bpe-sample-bytes", default=None, metavar="SIZE",
                   help="train the bpe tokenizer on a seeded random sample of this much text, e.g. 64MB or "
                   "1GiB (default: 64MiB; all of a smaller corpus)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the JSON field or column that holds each document's text in .jsonl, .parquet and "
                   "datasets inputs (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of the tokens, taken from the end (whole documents when a document "
                   "boundary is near), kept for validation; 0 = no validation split (default: 0.1)")
    p.add_argument("--val-tokens", type=int, default=None, metavar="N",
                   help="keep about N tokens for validation instead of a fraction (default: use --val-fraction)")
    p.add_argument("--block-size", type=int, default=256, metavar="T",
                   help="context length you will train with: each split must hold at least one window "
                   "of T+1 tokens (default: 256)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizer processes; 0 = tokenize in this process (default: one per CPU core, none "
                   "for corpora under 16 MB)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the files here instead of the cache ($GPTFORGE_CACHE_DIR/tokens/...)")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from gptforge.data.pipeline import prepare

    data = prepare(args.corpus, tokenizer=args.tokenizer, val_fraction=args.val_fraction, out=args.out,
                   bpe_vocab_size=args.bpe_vocab_size, block_size=args.block_size, text_field=args.text_field,
                   val_tokens=args.val_tokens, bpe_sample_bytes=args.bpe_sample_bytes, workers=args.workers)
    m = data.meta
    eot = f", end-of-text id {m['eot_id']}" if m["eot_id"] is not None else ""
    val = f"{m['val_tokens']:,} validation" if m["val_tokens"] else "no validation split"
    how = "reused (meta.json matched)" if data.reused else "prepared"
    n_src, n_shards = len(m["sources"]), len(m["shards"])
    print(f"corpus      {m['corpus']} ({n_src} source{'s' * (n_src != 1)}, sha256 {m['source_sha256'][:12]})")
    print(f"characters  {m['characters']:,} ({m['distinct_characters']:,} distinct) in "
          f"{m['documents']:,} document{'s' * (m['documents'] != 1)}")
    print(f"tokenizer   {m['tokenizer']}, vocabulary {m['vocab_size']:,}{eot}")
    print(f"tokens      {m['tokens']:,}: {m['train_tokens']:,} train, {val} ({m['dtype']})")
    if m["val_tokens"]:
        docs = m["val_split"]["documents"]
        print("validation  " + (f"the last {docs:,} whole document{'s' * (docs != 1)}"
                                if m["val_split"]["by"] == "documents" else
                                f"the last {m['val_tokens']:,} tokens (cut inside a document)"))
    print(f"files       {data.dir} (meta.json, tokenizer/, shards/: {n_shards} shard{'s' * (n_shards != 1)})")
    print(f"cache       {how} in {data.seconds:.2f} s")


# --------------------------------------------------------------------------------------------- train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (prepares the data itself)",
        usage="gptforge train [--corpus SOURCE ...] [--time DURATION] [--config FILE] [--out DIR | --resume RUN] "
              "[section.key=value ...] [--section.key VALUE ...]",
        description="Train a GPT. The shortest path: gptforge train --corpus notes.txt --time 10m (the model's "
                    "shape, batch and learning rates chosen for the budget on this machine: model.preset=auto). "
                    "Or from a TOML config plus section.key=value overrides, e.g. "
                    "gptforge train --config configs/tinyshakespeare-char.toml train.max_steps=500 optim.lr=1e-3. "
                    "Under torchrun it trains with DDP. Ctrl-C saves the latest checkpoint (exit 130).")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, parsed by the field's type (e.g. train.max_steps=200, data.corpus=a.txt)")
    p.add_argument("--corpus", nargs="+", metavar="SOURCE", default=None,
                   help="text to train on: files, directories, a named corpus (same as data.corpus)")
    p.add_argument("--tokenizer", metavar="{gpt2,char,bpe}", default=None, help="same as data.tokenizer")
    p.add_argument("--time", metavar="DURATION", default=None,
                   help="the time budget (90s, 10m, 1.5h): train.max_time, with no step limit; without --config "
                        "the model is chosen for it (model.preset=auto)")
    p.add_argument("--config", metavar="FILE", help="TOML config (default: the built-in defaults)")
    p.add_argument("--out", metavar="DIR", help="run directory to create (default: runs/<config name>)")
    p.add_argument("--resume", metavar="RUN",
                   help="continue RUN from checkpoints/latest with RUN/config.toml (overrides: stop limits only)")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start from these weights instead of random ones: a Hugging Face GPT-2 directory, a Hub "
                        "name such as gpt2 (online), or another gptforge run (same as train.init=WEIGHTS)")
    # Every config field is also an option (--train.max_steps 200 or --train.max_steps=200), so
    # --help lists them all; config.py imports nothing heavy, so this keeps --help fast.
    from gptforge.config import describe

    for section, fields in describe().items():
        group = p.add_argument_group(f"[{section}] fields (same as {section}.KEY=VALUE)")
        for name, doc in fields:
            group.add_argument(f"--{section}.{name}", action=_ConfigOverride, metavar="VALUE",
                               dest="option_overrides", help=doc.replace("%", "%%"))
    p.set_defaults(func=_run_train, option_overrides=None)


class _ConfigOverride(argparse.Action):
    """`--section.key VALUE` -> the override string `section.key=VALUE`, in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        items.append(f"{option_string.lstrip('-')}={values}")
        setattr(namespace, self.dest, items)


def _run_train(args: argparse.Namespace) -> None:
    import json
    import re
    from pathlib import Path

    from gptforge.config import load_config, resume_config
    from gptforge.train.runtime import print0
    from gptforge.train.trainer import train

    shortcuts = []
    if args.corpus:  # `--corpus a.txt train.x=1`: the overrides after the sources are overrides still
        overrides = [c for c in args.corpus if re.match(r"^(model|data|optim|train)\.\w+=", c)]
        args.corpus = [c for c in args.corpus if c not in overrides]
        args.overrides = [*overrides, *args.overrides]
    if args.corpus:
        shortcuts.append("data.corpus=" + (args.corpus[0] if len(args.corpus) == 1 else json.dumps(args.corpus)))
    if args.tokenizer:
        shortcuts.append(f"data.tokenizer={args.tokenizer}")
    if args.time:
        shortcuts.append(f"train.max_time={args.time}")
        if not args.resume:
            shortcuts += ["train.max_steps=none", "train.max_tokens=none"]
    args.overrides = [*shortcuts, *args.overrides, *(args.option_overrides or [])]
    if args.time and not args.config and not args.resume and not args.init and not any(
            o.startswith("model.") for o in args.overrides):
        args.overrides.insert(0, "model.preset=auto")  # a budget and nothing else: the model is chosen for it
    if args.init:
        args.overrides.append(f"train.init={args.init}")
    if args.resume:
        if args.config:
            raise GptforgeError("--resume uses RUN/config.toml; drop --config (stop limits can be overridden)")
        if args.out and Path(args.out) != Path(args.resume):
            raise GptforgeError("--resume continues in RUN itself; drop --out")
        result = train(resume_config(args.resume, args.overrides), args.resume, resume=True)
    else:
        out = args.out or str(Path("runs") / (Path(args.config).stem if args.config
                                              else Path(args.corpus[0]).stem if args.corpus else "default"))
        result = train(load_config(args.config, args.overrides), out)
    print0(summary_line(result))


def summary_line(result) -> str:
    """The run's last line: eval-mode losses side by side (like with like), the last update's loss
    named as what it is, then the last evaluation's bits per byte (from metrics.jsonl, when logged)."""
    from pathlib import Path

    from gptforge.io import iter_jsonl

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    line = (f"stopped by {result.stopped_by} at step {result.step:,} ({result.tokens:,} tokens): "
            f"train {fmt(result.eval_train_loss)}, val {fmt(result.val_loss)} at the last evaluation "
            f"(eval mode, float32); last update's loss {fmt(result.train_loss)} (dropout on)")
    metrics = Path(result.run_dir) / "metrics.jsonl"
    evals = [r for _, r in iter_jsonl(metrics) if r.get("kind") == "eval"] if metrics.is_file() else []
    last = evals[-1] if evals and evals[-1].get("step") == result.step else {}
    if last.get("train_bpb") is not None or last.get("val_bpb") is not None:
        line += f"; bits per byte: train {fmt(last.get('train_bpb'))}, val {fmt(last.get('val_bpb'))}"
    return f"{line}; run in {result.run_dir}"


# --------------------------------------------------------------------------------------------- eval


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact mean cross-entropy and bits per byte of a run over a whole split",
                       description="Mean cross-entropy (nats/token) of a checkpoint over every token of a split: "
                                   "windows of block_size with stride block_size, each token but the first "
                                   "predicted once; beside it bits per byte, the same nats over the UTF-8 bytes "
                                   "of the predicted tokens (comparable across tokenizers). "
                                   "Example: gptforge eval runs/char --split val --checkpoint best")
    p.add_argument("run", metavar="RUN", help="run directory (or a checkpoint directory inside one)")
    p.add_argument("--split", choices=("train", "val"), default="val", help="which split (default: val)")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                   help="which checkpoint of RUN (default: latest)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="precision of the evaluation (default: float32)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: the run's)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    import math

    from gptforge.evaluate import evaluate_run

    if args.batch_size is not None and args.batch_size < 1:
        raise GptforgeError(f"--batch-size {args.batch_size} is out of range; give a positive number of windows "
                            "(or leave it out for the run's batch size)")
    r = evaluate_run(args.run, split=args.split, which=args.checkpoint, device=args.device, dtype=args.dtype,
                     batch_size=args.batch_size)
    bpb = "n/a (no bytes)" if r["bpb"] is None else f"{r['bpb']:.4f}"
    print(f"{r['split']} loss {r['loss']:.4f} nats/token (perplexity {math.exp(min(r['loss'], 700)):.2f}) "
          f"over {r['tokens']:,} tokens; {bpb} bits/byte over their {r['bytes']:,} UTF-8 bytes; "
          f"checkpoint {r['checkpoint']} (step {r['step']})")


# --------------------------------------------------------------------------------------------- plot


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss curves, or overlay several runs' validation curves",
                       description="One run: train and validation loss against steps and tokens, with the "
                                   "learning rate beneath, from RUN/metrics.jsonl (default RUN/loss.png). Several "
                                   "runs (or --x): their validation curves on one plot. --metric bpb draws bits "
                                   "per byte instead, which compares runs with different tokenizers.",
                       epilog="examples:\n  gptforge plot runs/demo\n"
                              "  gptforge plot runs/a runs/b --x seconds --out compare.png\n"
                              "  gptforge plot runs/char runs/gpt2 runs/bpe --metric bpb --out tokenizers.png",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the --out of gptforge train)")
    p.add_argument("--x", choices=("steps", "tokens", "seconds"), default=None,
                   help="overlay the runs' validation loss against this (default with several runs: seconds)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/loss.png; compare.png for an overlay)")
    p.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    p.add_argument("--metric", choices=("loss", "bpb"), default="loss",
                   help="loss: nats/token; bpb: bits per byte of text, comparable across tokenizers (runs "
                        "logged before bits per byte existed have none: evaluate them with gptforge eval)")
    p.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> None:
    from gptforge.plot import plot_run, plot_runs

    if len(args.runs) == 1 and args.x is None:
        print(plot_run(args.runs[0], args.out, log_y=args.log_y, metric=args.metric))
    else:
        print(plot_runs(args.runs, args.out or "compare.png", x=args.x or "seconds", log_y=args.log_y,
                        metric=args.metric))


# --------------------------------------------------------------------------------------------- generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained run",
        description="Sample text from a run directory (or a checkpoint directory inside one), with the KV cache. "
        "Example: gptforge generate runs/char --prompt 'ROMEO:' --temperature 0.8 --top-k 50 --seed 1337",
    )
    p.add_argument("run", help="run directory, or a checkpoint directory inside one")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to write per sample (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; higher = more random (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples (default: random)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to write, as one batch (default 1)")
    p.add_argument("--stream", action="store_true", help="print the first sample as it is written")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                   help="which checkpoint of the run (default latest)")
    p.add_argument("--stop-at-eot", action="store_true", help="end a sample at <|endoftext|> (gpt2 tokenizer)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto = cuda > mps > cpu (default auto)")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from gptforge.generate import check_sampling, load

    # Check the settings before loading the model, so a typo fails fast.
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.num_samples, args.seed)
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = open(args.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise GptforgeError(f"cannot read prompt file {args.prompt_file!r} ({e.__class__.__name__}); "
                                "pass a readable UTF-8 text file") from None
    try:  # bytes of the command line that are not UTF-8 arrive as lone surrogates
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GptforgeError(f"the prompt is not valid UTF-8 (a stray byte at character {e.start}); pass UTF-8 "
                            "text, or use --prompt-file") from None
    gen = load(args.run, which=args.checkpoint, device=args.device)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, num_samples=args.num_samples,
                    stop_at_eot=args.stop_at_eot)
    if args.stop_at_eot and getattr(gen.tokenizer, "eot_id", None) is None:
        raise GptforgeError(f"--stop-at-eot: the {gen.tokenizer.spec} tokenizer of {gen.run_dir} has no end-of-text "
                            "token; drop --stop-at-eot (samples run for --max-new-tokens)")
    gen.encode_prompt(prompt)  # unknown characters fail here, before anything is printed
    if args.stream:
        # The first sample is printed as it is written, the others once the batch is done.
        texts = [""] * args.num_samples
        header = "--- sample 1 ---\n" if args.num_samples > 1 else ""
        print(header + prompt, end="", flush=True)
        for pieces in gen.stream_batch(prompt, **settings):
            texts = [t + p for t, p in zip(texts, pieces, strict=True)]
            print(pieces[0], end="", flush=True)
        print()
        for i, text in enumerate(texts[1:], start=2):
            print(f"--- sample {i} ---\n{prompt}{text}")
        return
    for i, text in enumerate(gen.generate(prompt, **settings), start=1):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(prompt + text)


# --------------------------------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="web page to sample from a run (Gradio)",
        description="Serve a Gradio page that samples from a run. Example: gptforge serve runs/char --port 7860",
    )
    p.add_argument("run", help="run directory, or a checkpoint directory inside one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-new-tokens-limit", type=int, default=500,
                   help="most tokens one request may ask for (default 500)")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                   help="which checkpoint of the run (default latest)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto = cuda > mps > cpu (default auto)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from gptforge.web import serve

    serve(args.run, host=args.host, port=args.port, max_new_tokens_limit=args.max_new_tokens_limit,
          which=args.checkpoint, device=args.device)


# --------------------------------------------------------------------------------------------- export


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run as a Hugging Face model directory (transformers loads it as it is)",
        description="Write config.json, model.safetensors, generation_config.json, the tokenizer (tokenizer.json, "
        "tokenizer_config.json; for gpt2 also vocab.json and merges.txt), a README.md model card and loss.png into "
        "OUT. transformers' pipeline, AutoTokenizer and AutoModelForCausalLM load it; `hf upload` publishes it.",
        epilog="examples:\n  gptforge export runs/char hf/char\n  gptforge export runs/gpt2 hf/gpt2 --checkpoint best\n"
        "  hf upload YOUR_NAME/char-shakespeare hf/char",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="run directory, or a checkpoint directory inside one")
    p.add_argument("out", metavar="OUT", help="new or empty directory to write")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                   help="which checkpoint of RUN (default latest)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from gptforge.export import export_run

    out = export_run(args.run, args.out, which=args.checkpoint, force=args.force)
    print(f"wrote {out}: load it with transformers (pipeline('text-generation', model='{out}')), "
          f"publish it with `hf upload NAME {out}`")


# --------------------------------------------------------------------------------------------- export-space


def _add_export_space(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-space",
        help="write a folder ready to push as a Hugging Face Space",
        description="Write app.py, requirements.txt, README.md (Spaces header), the weights (safetensors), "
        "tokenizer and a copy of gptforge into OUT_DIR. Example: gptforge export-space runs/char space/",
    )
    p.add_argument("run", help="run directory, or a checkpoint directory inside one")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty directory to write the Space into")
    p.add_argument("--checkpoint", choices=("latest", "best"), default="latest",
                   help="which checkpoint of the run (default latest)")
    p.add_argument("--max-new-tokens-limit", type=int, default=500,
                   help="most tokens one request may ask for on the Space (default 500)")
    p.set_defaults(func=_run_export_space)


def _run_export_space(args: argparse.Namespace) -> None:
    from gptforge.web import export_space

    out = export_space(args.run, args.out_dir, which=args.checkpoint,
                       max_new_tokens_limit=args.max_new_tokens_limit)
    print(f"wrote {out}: try it with `python {out / 'app.py'}`, then push the folder to a Gradio Space")


# --------------------------------------------------------------------------------------------- sweep


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="hyperparameter search with Optuna",
        description="Search config overrides for the lowest validation loss (or bits per byte, --objective "
                    "val_bpb): each trial is a training run "
                    "in OUT/trials/NNNN; results go to OUT/trials.csv, OUT/best.toml and OUT/*.png. "
                    "See docs/tuning.md.",
        epilog="example: gptforge sweep --config configs/tinyshakespeare-char.toml --trials 12 "
               "--budget-per-trial 200steps --space 'optim.lr=log:1e-4..3e-3' --space 'model.dropout=0,0.1,0.2'")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="base config overrides applied to every trial")
    p.add_argument("--config", metavar="FILE", help="base config TOML (default: the built-in defaults; "
                                                   "not needed to continue a sweep)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=RANGE",
                   help="a searched field: log:1e-4..3e-3 (log-uniform), 0..0.2 or 2..8 (uniform float/int "
                        "by the literals), int:a..b, or a comma list 4,6,8 (categorical); repeatable")
    p.add_argument("--trials", type=int, metavar="N", help="total number of trials the study should hold")
    p.add_argument("--budget-per-trial", metavar="BUDGET",
                   help="stop each trial after e.g. 60s, 5m, 500steps or 2Mtokens (else the config's limits)")
    p.add_argument("--out", default=None, metavar="DIR", help="sweep directory (default sweeps/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: trials a kill left running are re-run")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel worker processes on this machine")
    p.add_argument("--storage", metavar="URL", help="Optuna storage URL shared by several machines, e.g. "
                                     "postgresql://user:pass@host/db (default sqlite:///OUT/study.db)")
    p.add_argument("--study", metavar="NAME", help="study name in the storage (default: the --out directory's name)")
    p.add_argument("--pruner", choices=["median", "halving", "none"], default="median",
                   help="stop hopeless trials early (default median)")
    p.add_argument("--startup-trials", type=int, default=2, metavar="K",
                   help="trials that finish before the median pruner starts pruning (default 2)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampler seed (default 0)")
    p.add_argument("--objective", choices=("val_loss", "val_bpb"), default=None,
                   help="what to minimise: val_loss (nats/token) or val_bpb (bits per byte, which compares "
                        "trials with different tokenizers) (default val_loss; a continued sweep keeps its own)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> None:
    import os
    from pathlib import Path

    from gptforge import sweep

    if args.worker is not None:  # a process started by --workers N: settings come from the study
        if args.out is None or args.study is None:
            raise GptforgeError("--worker needs --out and --study")
        storage = args.storage or os.environ.get("GPTFORGE_SWEEP_STORAGE")
        sweep.run_worker(args.out, args.study, storage, worker=args.worker)
        return
    out = args.out or str(Path("sweeps") / (Path(args.config).stem if args.config else "sweep"))
    sweep.sweep(args.config, args.space, args.trials, out, overrides=args.overrides,
                budget=args.budget_per_trial, resume=args.resume, workers=args.workers,
                storage=args.storage, study_name=args.study, pruner=args.pruner,
                startup_trials=args.startup_trials, seed=args.seed, objective=args.objective)


# --------------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line, like every other gptforge error (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"gptforge: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gptforge",
        description="Train GPT-style transformers from scratch, evaluate them honestly, and sample from them.",
    )
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_prepare, _add_train, _add_eval, _add_plot, _add_generate, _add_serve,
                _add_export, _add_export_space, _add_sweep):
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
    except BrokenPipeError:
        # `gptforge generate ... | head`: the reader left; exit quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
