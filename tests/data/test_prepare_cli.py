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
from gptforge.errors import GptforgeError


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


def test_jsonl_line_that_is_not_json(capsys, tmp_path, out):
    src = tmp_path / "web.jsonl"
    src.write_text('{"text": "a fine document"}\n' * 3 + '{"text": "cut off mid-\n', encoding="utf-8")
    err = run_error(capsys, "--corpus", str(src), "--out", str(out))
    assert f"{src} line 4 is not JSON (Invalid control character" in err
    assert_nothing_left(out)


def test_jsonl_line_without_the_text_field(capsys, tmp_path, out):
    src = tmp_path / "web.jsonl"
    src.write_text('{"content": "ab"}\n', encoding="utf-8")
    err = run_error(capsys, "--corpus", str(src), "--tokenizer", "char", "--out", str(out))
    assert f"{src} line 1 has no 'text' field; name the field that holds the text with --text-field" in err
    assert_nothing_left(out)
    # The same file read with the right field prepares.
    ok = run_ok(capsys, "--corpus", str(src), "--text-field", "content", "--tokenizer", "char", "--block-size",
                "1", "--val-fraction", "0", "--out", str(out))
    assert "1 document" in ok


def test_parquet_without_the_column(capsys, tmp_path, out):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "fw.parquet"
    pq.write_table(pa.table({"content": ["x"], "url": ["u"]}), src)
    err = run_error(capsys, "--corpus", str(src), "--out", str(out))
    assert f"{src} has no column 'text' (columns: content, url)" in err and "--text-field" in err
    assert_nothing_left(out)


def test_an_error_mid_corpus_leaves_nothing_and_keeps_older_data(capsys, tmp_path, out, monkeypatch):
    from gptforge.data import encode

    good = tmp_path / "good.txt"
    good.write_text("hello there " * 100, encoding="utf-8")
    run_ok(capsys, "--corpus", str(good), "--tokenizer", "char", "--block-size", "8", "--out", str(out))
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.setattr(encode, "CHUNK_CHARS", 64)  # several chunks: the bad line comes after shards
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine and long enough to fill a chunk of sixty-four characters"}\n' * 20
                   + "not json\n", encoding="utf-8")
    err = run_error(capsys, "--corpus", str(bad), "--tokenizer", "char", "--block-size", "8", "--out", str(out))
    assert "bad.jsonl line 21 is not JSON" in err
    assert sorted(p.name for p in out.rglob("*")) == before  # the earlier data is untouched, no .partial
    assert "reused" in run_ok(capsys, "--corpus", str(good), "--tokenizer", "char", "--block-size", "8",
                              "--out", str(out))


def test_damaged_shards(capsys, tmp_path, out):
    src = tmp_path / "a.txt"
    src.write_text("to be or not to be " * 200, encoding="utf-8")
    args = ("--corpus", str(src), "--tokenizer", "char", "--block-size", "8", "--out", str(out))
    run_ok(capsys, *args)
    shard = out / "shards" / "00000.bin"
    # Truncated: the source is at hand, so it is prepared again (and says so).
    shard.write_bytes(shard.read_bytes()[:-7])
    main(["prepare", *args])
    captured = capsys.readouterr()
    assert "is damaged" in captured.err and "preparing it again" in captured.err and "prepared in" in captured.out
    assert len(load_prepared(out).train) == 3420
    # Unreadable (here: a directory where the file should be): one line, exit 2.
    shard.unlink()
    shard.mkdir()
    err = run_error(capsys, *args)
    assert f"cannot read token file {shard}" in err
    # Reading a damaged prepared directory directly is one clear error too.
    shard.rmdir()
    shard.write_bytes(b"GPTFTOK\x00 junk")
    with pytest.raises(GptforgeError, match="token file .*00000.bin is truncated"):
        load_prepared(out)


def test_hub_dataset_offline_is_one_clear_error(capsys, out, monkeypatch, data_dir):
    # Streaming from the Hub needs the internet (not tested here); offline it fails cleanly.
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # Read at import time, which an earlier test may have done: set the flags themselves too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    err = run_error(capsys, "--corpus", "hf:someone/no-such-dataset", "--out", str(out))
    assert "cannot stream hf:someone/no-such-dataset from the Hugging Face Hub" in err
    assert_nothing_left(out)
