"""`gptforge prepare`: the summary for each tokenizer, and a one-line error (exit 2) for each bad input."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import pytest

from gptforge.cli import main
from gptforge.data.corpus import CORPORA, NamedCorpus, cache_dir
from gptforge.data.tokenizers import load_tokenizer
from gptforge.data.tokens import load_prepared


def run_ok(capsys, *argv: str) -> str:
    main(["prepare", *argv])
    return capsys.readouterr().out


def run_error(capsys, *argv: str, progress: bool = False) -> str:
    """Run `gptforge prepare ...`, expect exit 2 and return its one-line message (after any
    download progress bar when `progress`)."""
    with pytest.raises(SystemExit) as e:
        main(["prepare", *argv])
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    err = lines[-1]
    assert err.startswith("gptforge: error: ") and "Traceback" not in captured.err
    assert len(lines) == 1 or (progress and all(line.startswith("downloading") for line in lines[:-1]))
    assert captured.out == ""
    return err


def test_gpt2_summary_then_cache_reuse(capsys, data_dir, tmp_path):
    out = run_ok(capsys, "--corpus", "tinyshakespeare", "--tokenizer", "gpt2")
    assert "338,025" in out and "vocabulary 50,257" in out and "1,115,394" in out
    assert "304,223 train, 33,802 validation (uint16)" in out and "prepared" in out
    assert "1 document\n" in out and "the last 33,802 tokens (cut inside a document)" in out
    assert str(cache_dir() / "tokens") in out
    assert "reused" in run_ok(capsys, "--corpus", "tinyshakespeare", "--tokenizer", "gpt2")


def test_char_summary(capsys, data_dir, tmp_path):
    out = run_ok(capsys, "--tokenizer", "char", "--out", str(tmp_path / "char"))
    assert "vocabulary 65" in out and "(65 distinct)" in out and "1,115,394:" in out
    assert str(tmp_path / "char") in out
    assert len(load_prepared(tmp_path / "char").train) == 1_003_855


def test_bpe_trains_saves_reloads_and_round_trips(capsys, data_dir, tmp_path, shakespeare_text):
    out_dir = tmp_path / "bpe"
    out = run_ok(capsys, "--tokenizer", "bpe", "--bpe-vocab-size", "2000", "--out", str(out_dir))
    assert "tokenizer   bpe, vocabulary 2,000" in out
    tok = load_tokenizer(out_dir / "tokenizer")
    assert tok.vocab_size == 2000
    data = load_prepared(out_dir)
    assert tok.decode(data.train.tolist()) + tok.decode(data.val.tolist()) == shakespeare_text


def test_several_sources_and_stdin(capsys, tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta gamma\n" * 40, encoding="utf-8")
    b.write_text("delta epsilon\n" * 40, encoding="utf-8")
    out = run_ok(capsys, "--corpus", str(a), str(b), "--tokenizer", "char", "--block-size", "8",
                 "--out", str(tmp_path / "ab"))
    assert "a+b (2 sources," in out and f"{17 * 40 + 14 * 40:,} " in out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from a pipe\n" * 30)))
    out = run_ok(capsys, "--corpus", "-", "--tokenizer", "char", "--block-size", "8", "--val-fraction", "0",
                 "--out", str(tmp_path / "stdin"))
    assert "stdin (1 source," in out and "no validation split" in out


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--corpus", "--tokenizer", "--bpe-vocab-size", "--val-fraction", "--block-size", "--out",
                   "--text-field", "--val-tokens", "--bpe-sample-bytes", "--workers", ".jsonl", ".parquet"):
        assert option in text
    assert text.count("default") >= 5


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def assert_nothing_left(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []
    tokens = cache_dir() / "tokens"
    assert not tokens.exists() or list(tokens.iterdir()) == []


def test_missing_file(capsys, tmp_path, out):
    err = run_error(capsys, "--corpus", str(tmp_path / "missing.txt"), "--out", str(out))
    assert "missing.txt does not exist" in err
    assert_nothing_left(out)


def test_empty_file(capsys, tmp_path, out):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "empty.txt is empty" in run_error(capsys, "--corpus", str(tmp_path / "empty.txt"), "--out", str(out))
    assert_nothing_left(out)


def test_binary_file(capsys, tmp_path, out):
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04" + bytes(range(256)))
    err = run_error(capsys, "--corpus", str(tmp_path / "model.bin"), "--out", str(out))
    assert "looks binary (NUL byte at byte offset 4)" in err
    assert_nothing_left(out)


def test_non_utf8_file(capsys, tmp_path, out):
    (tmp_path / "latin1.txt").write_bytes("Ça va très bien\n".encode("latin-1"))
    err = run_error(capsys, "--corpus", str(tmp_path / "latin1.txt"), "--out", str(out))
    assert "not valid UTF-8 (byte 0xc7 at byte offset 0)" in err and "iconv" in err
    assert_nothing_left(out)


def test_unknown_corpus(capsys, out):
    err = run_error(capsys, "--corpus", "wikitext", "--out", str(out))
    assert "unknown corpus 'wikitext'; known corpora: tinyshakespeare" in err
    assert_nothing_left(out)


def test_unknown_tokenizer(capsys, out):
    err = run_error(capsys, "--tokenizer", "sentencepiece", "--out", str(out))
    assert "unknown tokenizer 'sentencepiece'; choose one of gpt2, char, bpe" in err
    assert_nothing_left(out)


@pytest.mark.parametrize("size", ["100", "70000"])
def test_bpe_vocab_size_out_of_range(capsys, out, size):
    err = run_error(capsys, "--tokenizer", "bpe", "--bpe-vocab-size", size, "--out", str(out))
    assert f"bpe vocabulary size {size} is out of range; choose 257..65536" in err
    assert_nothing_left(out)


def test_val_fraction_out_of_range(capsys, out):
    assert "val_fraction 1.0 is out of range" in run_error(capsys, "--val-fraction", "1", "--out", str(out))
    assert_nothing_left(out)


def test_corpus_too_short(capsys, tmp_path, out):
    (tmp_path / "short.txt").write_text("Just one short line of text.\n" * 20, encoding="utf-8")
    err = run_error(capsys, "--corpus", str(tmp_path / "short.txt"), "--tokenizer", "char", "--out", str(out))
    assert "too short: 522 training and 58 validation tokens" in err and "at least 257" in err
    assert_nothing_left(out)


def test_output_directory_not_writable(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("hello there " * 100, encoding="utf-8")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should go", encoding="utf-8")
    err = run_error(capsys, "--corpus", str(tmp_path / "a.txt"), "--tokenizer", "char", "--block-size", "8",
                    "--out", str(blocker / "out"))
    assert f"cannot write to {blocker / 'out'}" in err and "--out" in err
    assert blocker.read_text(encoding="utf-8").startswith("a file")


def test_download_checksum_mismatch(capsys, tmp_path, monkeypatch, out):
    fake = tmp_path / "input.txt"
    fake.write_bytes(b"<html>rate limited</html>\n")
    monkeypatch.delenv("GPTFORGE_DATA_DIR", raising=False)
    good_sha = CORPORA["tinyshakespeare"].sha256
    monkeypatch.setitem(CORPORA, "tinyshakespeare", NamedCorpus(url=fake.as_uri(), sha256=good_sha,
                                                                filename="input.txt"))
    err = run_error(capsys, "--corpus", "tinyshakespeare", "--out", str(out), progress=True)
    bad_sha = hashlib.sha256(fake.read_bytes()).hexdigest()
    assert f"has sha256 {bad_sha[:16]}" in err and "deleted" in err
    assert list((cache_dir() / "downloads" / "tinyshakespeare").iterdir()) == []
    assert_nothing_left(out)
