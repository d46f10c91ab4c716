"""Every input the README documents, given a wrong value a user could type: one line on stderr naming the
problem, exit status 2, no traceback, nothing printed on stdout, and nothing already on disk changed.

One table for `prepare` (its inputs: text, JSON Lines, Parquet, `datasets` directories, `hf:` specs, and
its options), `generate`, `eval`, `plot`, `export`, `export-space`, `serve` and argparse's own errors.
Damaged run files are in the table too: each is refused, never read as something else.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from gptforge.cli import main

TEXT = "First Citizen: before we proceed any further, hear me speak.\n" * 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A char-level run of four updates, copied into each test's workspace."""
    import torch

    from gptforge.config import load_config
    from gptforge.train.trainer import train

    base = tmp_path_factory.mktemp("bad-input-run")
    (base / "corpus.txt").write_text(TEXT, encoding="utf-8")
    cfg = load_config(None, [f"data.corpus={base / 'corpus.txt'}", "data.tokenizer=char", "model.preset=tiny",
                             "model.n_layer=1", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
                             "train.device=cpu", "train.dtype=float32", "train.max_steps=4", "train.eval_every=2",
                             "train.eval_batches=1", "train.log_every=1", "optim.warmup_steps=0"])
    threads, cache = torch.get_num_threads(), os.environ.get("GPTFORGE_CACHE_DIR")
    torch.set_num_threads(1)
    os.environ["GPTFORGE_CACHE_DIR"] = str(base / "cache")  # copied with the rest into each workspace
    try:
        train(cfg, base / "run")
    finally:
        torch.set_num_threads(threads)
        if cache is None:
            os.environ.pop("GPTFORGE_CACHE_DIR")
        else:
            os.environ["GPTFORGE_CACHE_DIR"] = cache
    return base


def _write(rel: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def _remove(rel: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        shutil.rmtree(ws / rel)
    return setup


def _truncate(rel: str, keep: int) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        p = ws / rel
        p.write_bytes(p.read_bytes()[:keep])
    return setup


def _parquet(rel: str, column: str, values) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({column: values}), ws / rel)
    return setup


def _dataset(rel: str, damage: str | None = None) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        datasets = pytest.importorskip("datasets")
        d = ws / rel
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": [TEXT] * 3}),
                              "test": datasets.Dataset.from_dict({"body": [TEXT]})}).save_to_disk(str(d))
        if damage == "state":
            (d / "train" / "state.json").write_text("{not json")
    return setup


def _gz_truncated(ws: Path) -> None:
    (ws / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello"}\n' * 100)[:30])


def _busy_port(ws: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    (ws / "port").write_text(str(s.getsockname()[1]))
    _busy_port.sockets.append(s)  # kept open until the test ends


_busy_port.sockets = []


# (id, argv with {ws} and {run} filled in, setup, what the one line must contain)
CASES: list[tuple[str, str, Callable[[Path], None] | None, str]] = [
    # --------------------------------------------------------------------------- prepare: sources
    ("missing file", "prepare --corpus {ws}/nope.txt --out {ws}/out", None, "does not exist"),
    ("unknown name", "prepare --corpus shakespeare --out {ws}/out", None, "unknown corpus 'shakespeare'"),
    ("empty text", "prepare --corpus {ws}/e.txt --out {ws}/out", _write("e.txt", ""), "is empty"),
    ("binary text", "prepare --corpus {ws}/b.txt --out {ws}/out", _write("b.txt", b"ab\x00cd"), "looks binary"),
    ("latin-1 text", "prepare --corpus {ws}/l.txt --out {ws}/out", _write("l.txt", b"caf\xe9 " * 50),
     "not valid UTF-8 (byte 0xe9"),
    ("empty directory", "prepare --corpus {ws}/d --out {ws}/out", _write("d/notes.md", "x"),
     "has no .txt, .jsonl"),
    ("jsonl: not JSON", "prepare --corpus {ws}/j.jsonl --out {ws}/out",
     _write("j.jsonl", '{"text": "a"}\n{"text": "b",\n'), "j.jsonl line 2 is not JSON"),
    ("jsonl: not UTF-8", "prepare --corpus {ws}/j.jsonl --out {ws}/out",
     _write("j.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n'), "j.jsonl line 2 is not JSON (not UTF-8)"),
    ("jsonl: an array", "prepare --corpus {ws}/j.jsonl --out {ws}/out", _write("j.jsonl", "[1, 2]\n"),
     "j.jsonl line 1 has no 'text' field"),
    ("jsonl: no such field", "prepare --corpus {ws}/j.jsonl --text-field body --out {ws}/out",
     _write("j.jsonl", '{"text": "a"}\n'), "line 1 has no 'body' field; name the field"),
    ("jsonl: a number", "prepare --corpus {ws}/j.jsonl --out {ws}/out", _write("j.jsonl", '{"text": 5}\n'),
     "field 'text' is a int, not text"),
    ("jsonl: a list", "prepare --corpus {ws}/j.jsonl --out {ws}/out", _write("j.jsonl", '{"text": ["a"]}\n'),
     "field 'text' is a list, not text"),
    ("jsonl: a lone surrogate", "prepare --corpus {ws}/j.jsonl --tokenizer char --out {ws}/out",
     _write("j.jsonl", '{"text": "ok \\ud800"}\n'), "j.jsonl line 1: 'text' holds a lone surrogate (U+D800)"),
    ("jsonl.gz: cut short", "prepare --corpus {ws}/cut.jsonl.gz --out {ws}/out", _gz_truncated,
     "cut.jsonl.gz is not a readable gzip file"),
    ("parquet: not parquet", "prepare --corpus {ws}/p.parquet --out {ws}/out", _write("p.parquet", "PAR1 junk"),
     "p.parquet is not a readable Parquet file"),
    ("parquet: no such column", "prepare --corpus {ws}/p.parquet --out {ws}/out",
     _parquet("p.parquet", "body", ["a"]), "p.parquet has no column 'text' (columns: body)"),
    ("parquet: numbers", "prepare --corpus {ws}/p.parquet --out {ws}/out", _parquet("p.parquet", "text", [1, 2]),
     "column 'text' holds int64, not text"),
    ("datasets: no such column", "prepare --corpus {ws}/ds --out {ws}/out", _dataset("ds"),
     "has no column 'text' (columns: body)"),
    ("datasets: no such split", "prepare --corpus {ws}/ds:validation --text-field body --out {ws}/out",
     _dataset("ds"), "holds splits train, test; name one as"),
    ("datasets: damaged", "prepare --corpus {ws}/ds --text-field body --out {ws}/out", _dataset("ds", "state"),
     "cannot load the dataset saved in"),
    ("hf: no name", "prepare --corpus hf: --out {ws}/out", None, "'hf:' names no dataset"),
    ("stdin: nothing in it", "prepare --corpus - --out {ws}/out", None, "standard input is empty"),
    # --------------------------------------------------------------------------- prepare: options
    ("tokenizer", "prepare --corpus {ws}/corpus.txt --tokenizer gpt3", None, "unknown tokenizer 'gpt3'"),
    ("bpe vocabulary", "prepare --corpus {ws}/corpus.txt --tokenizer bpe --bpe-vocab-size 100", None,
     "bpe vocabulary size 100 is out of range"),
    ("bpe vocabulary, not a number", "prepare --bpe-vocab-size 4k", None,
     "argument --bpe-vocab-size: invalid int value: '4k'; see gptforge prepare --help"),
    ("bpe vocabulary with char", "prepare --corpus {ws}/corpus.txt --tokenizer char --bpe-vocab-size 300", None,
     "only applies to --tokenizer bpe"),
    ("bpe sample size", "prepare --corpus {ws}/corpus.txt --tokenizer bpe --bpe-sample-bytes lots", None,
     "size 'lots' is not understood"),
    ("bpe sample size 0", "prepare --corpus {ws}/corpus.txt --tokenizer bpe --bpe-sample-bytes 0", None,
     "bpe sample size 0 is out of range"),
    ("empty text field", "prepare --corpus {ws}/corpus.txt --text-field=", None, "the text field is empty"),
    ("val fraction 1", "prepare --corpus {ws}/corpus.txt --val-fraction 1", None, "val_fraction 1.0 is out of range"),
    ("val fraction nan", "prepare --corpus {ws}/corpus.txt --val-fraction nan", None, "val_fraction nan is out"),
    ("val tokens 0", "prepare --corpus {ws}/corpus.txt --val-tokens 0", None, "val_tokens 0 is out of range"),
    ("block size 0", "prepare --corpus {ws}/corpus.txt --block-size 0", None, "block size 0 is out of range"),
    ("block size too long", "prepare --corpus {ws}/corpus.txt --tokenizer char --block-size 100000 --out {ws}/out",
     None, "is too short"),
    ("workers -1", "prepare --corpus {ws}/corpus.txt --workers -1", None, "workers -1 is out of range"),
    ("out is a file", "prepare --corpus {ws}/corpus.txt --tokenizer char --out {ws}/corpus.txt", None,
     "cannot write to"),
    # --------------------------------------------------------------------------- generate
    ("generate: no run", "generate {ws}/nope", None, "does not exist; pass a run directory"),
    ("generate: not a run", "generate {ws}/empty", _write("empty/x", ""), "has no 'latest' checkpoint"),
    ("generate: no best", "generate {run} --checkpoint best", _remove("run/checkpoints/best"),
     "no 'best' checkpoint"),
    ("generate: checkpoint name", "generate {run} --checkpoint worst", None,
     "argument --checkpoint: invalid choice: 'worst'"),
    ("generate: temperature", "generate {run} --temperature -1", None, "temperature must be a finite number >= 0"),
    ("generate: temperature inf", "generate {run} --temperature inf", None, "got inf"),
    ("generate: temperature text", "generate {run} --temperature hot", None, "invalid float value: 'hot'"),
    ("generate: top-k", "generate {run} --top-k -1", None, "top-k must be >= 0"),
    ("generate: top-p 0", "generate {run} --top-p 0", None, "top-p must be in (0, 1]"),
    ("generate: top-p nan", "generate {run} --top-p nan", None, "top-p must be in (0, 1]"),
    ("generate: max new tokens", "generate {run} --max-new-tokens -1", None, "max new tokens must be >= 0"),
    ("generate: samples 0", "generate {run} --num-samples 0", None, "number of samples must be >= 1"),
    ("generate: a billion samples", "generate {run} --num-samples 1000000000", None,
     "ask for fewer --num-samples or --max-new-tokens"),
    ("generate: a trillion tokens", "generate {run} --max-new-tokens 1000000000000", None,
     "ask for fewer --num-samples or --max-new-tokens"),
    ("generate: seed", "generate {run} --seed 100000000000000000000", None, "does not fit in 64 bits"),
    ("generate: unknown characters", "generate {run} --prompt 東京", None, "does not know"),
    ("generate: prompt file missing", "generate {run} --prompt-file {ws}/nope.txt", None, "cannot read prompt file"),
    ("generate: prompt file binary", "generate {run} --prompt-file {ws}/p.bin", _write("p.bin", b"\xff\xfe"),
     "cannot read prompt file"),
    ("generate: prompt and prompt file", "generate {run} --prompt a --prompt-file {ws}/corpus.txt", None,
     "not allowed with argument"),
    ("generate: stop at eot with char", "generate {run} --stop-at-eot", None, "has no end-of-text token"),
    ("generate: device", "generate {run} --device tpu", None, "argument --device: invalid choice: 'tpu'"),
    # --------------------------------------------------------------------------- eval
    ("eval: no run", "eval {ws}/nope", None, "does not exist"),
    ("eval: split", "eval {run} --split test", None, "argument --split: invalid choice: 'test'"),
    ("eval: batch size 0", "eval {run} --batch-size 0", None, "--batch-size 0 is out of range"),
    ("eval: batch size -3", "eval {run} --batch-size -3", None, "--batch-size -3 is out of range"),
    ("eval: dtype", "eval {run} --dtype float8", None, "argument --dtype: invalid choice"),
    ("eval: float16 on a CPU", "eval {run} --device cpu --dtype float16", None, "float16"),
    # --------------------------------------------------------------------------- plot
    ("plot: no run", "plot {ws}/nope", None, "is not a directory"),
    ("plot: no metrics", "plot {ws}/empty", _write("empty/x", ""), "metrics.jsonl not found"),
    ("plot: metrics that are not metrics", "plot {ws}/junk", _write("junk/metrics.jsonl", b"\xff\x00 junk\n[1]\n"),
     "has no train or eval records"),
    ("plot: overlay with a run without evaluations", "plot {run} {ws}/junk2",
     _write("junk2/metrics.jsonl", '{"kind": "train", "step": 1, "loss": 4.0}\n'), "has no validation loss"),
    ("plot: x axis", "plot {run} --x epochs", None, "argument --x: invalid choice: 'epochs'"),
    ("plot: out is a directory", "plot {run} --out {ws}/empty", _write("empty/x", ""), "give a path ending in .png"),
    ("plot: out is not a PNG", "plot {run} --out {ws}/loss.pdf", None, "plots are written as PNG"),
    ("plot: overlay out is not a PNG", "plot {run} {run} --out {ws}/cmp.svg", None, "plots are written as PNG"),
    ("plot: out cannot be written", "plot {run} --out /proc/loss.png", None, "cannot write /proc/loss.png"),
    # --------------------------------------------------------------------------- export, export-space
    ("export: no run", "export {ws}/nope {ws}/hf", None, "does not exist"),
    ("export: out not empty", "export {run} {ws}/full", _write("full/keep.txt", "mine"), "exists and is not empty"),
    ("export: out is a file", "export {run} {ws}/corpus.txt", None, "exists and is not a directory"),
    ("export: checkpoint name", "export {run} {ws}/hf --checkpoint newest", None, "invalid choice: 'newest'"),
    ("export: only one argument", "export {run}", None, "the following arguments are required: OUT"),
    ("export-space: out not empty", "export-space {run} {ws}/full", _write("full/keep.txt", "mine"),
     "is not an empty directory"),
    ("export-space: limit 0", "export-space {run} {ws}/space --max-new-tokens-limit 0", None,
     "--max-new-tokens-limit must be >= 1"),
    ("export-space: no run", "export-space {ws}/nope {ws}/space", None, "does not exist"),
    # --------------------------------------------------------------------------- serve
    ("serve: no run", "serve {ws}/nope", None, "does not exist"),
    ("serve: port -1", "serve {run} --port -1", None, "--port -1 is not a TCP port"),
    ("serve: port 70000", "serve {run} --port 70000", None, "--port 70000 is not a TCP port"),
    ("serve: port text", "serve {run} --port http", None, "argument --port: invalid int value: 'http'"),
    ("serve: unknown host", "serve {run} --host no-such-host.invalid", None,
     "--host 'no-such-host.invalid' is not an address"),
    ("serve: port in use", "serve {run} --port {port}", _busy_port, "Address already in use"),
    ("serve: limit 0", "serve {run} --max-new-tokens-limit 0", None, "--max-new-tokens-limit must be >= 1"),
    # --------------------------------------------------------------------------- damaged run files
    ("damaged weights", "generate {run}", _truncate("run/checkpoints/latest/model.safetensors", 1000),
     "model.safetensors is damaged"),
    ("damaged model config", "eval {run}", _write("run/checkpoints/latest/model_config.json", "{"),
     "model_config.json is damaged"),
    ("damaged info", "export {run} {ws}/hf", _write("run/checkpoints/latest/info.json", "{"), "info.json is damaged"),
    ("damaged tokenizer", "generate {run}", _write("run/tokenizer/gptforge_tokenizer.json", "{"),
     "gptforge_tokenizer.json is damaged"),
    ("damaged config", "eval {run}", _write("run/config.toml", "[data\n"), "config.toml is not valid TOML"),
    ("damaged data identity", "eval {run}", _write("run/data.json", "{"), "data.json is damaged"),
    # --------------------------------------------------------------------------- argparse
    ("no command", "", None, "the following arguments are required: COMMAND"),
    ("unknown command", "fit", None, "argument COMMAND: invalid choice: 'fit'"),
    ("unknown option", "generate {run} --temprature 0.5", None, "unrecognized arguments: --temprature 0.5"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content's sha256 ("dir" for directories)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("argv", "setup", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, setup, message, trained, tmp_path, capsys, monkeypatch):
    import io
    import sys

    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    try:
        if setup is not None:
            setup(ws)
        port = (ws / "port").read_text() if (ws / "port").is_file() else ""
        args = [a.format(ws=ws, run=ws / "run", port=port) for a in argv.split()]
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))  # `--corpus -` with nothing piped
        monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(ws / "cache"))  # the run's token cache, as a user has it
        before = _snapshot(ws)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        captured = capsys.readouterr()
    finally:
        while _busy_port.sockets:
            _busy_port.sockets.pop().close()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert e.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("gptforge: error: "), captured.err
    assert message in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""
    assert _snapshot(ws) == before  # nothing already there changed (the cache included), nothing was left behind
