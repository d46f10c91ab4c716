"""Corpora: named (data dir, cache, download with checksum), files, directories, stdin, bad input."""

from __future__ import annotations

import hashlib
import io
import sys

import pytest

from gptforge.data import corpus as corpus_mod
from gptforge.data import stream as stream_mod
from gptforge.data.corpus import CORPORA, NamedCorpus, load_corpus
from gptforge.errors import GptforgeError

SHAKESPEARE_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_named_corpus_from_data_dir(data_dir):
    c = load_corpus("tinyshakespeare")
    assert c.name == "tinyshakespeare"
    assert len(c.text) == 1_115_394
    assert len(set(c.text)) == 65
    assert c.sha256 == SHAKESPEARE_SHA  # the file is ASCII, so text hash == file hash
    assert c.sources == [str(data_dir / "tinyshakespeare" / "input.txt")]


def test_file_files_directory_and_stdin(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "b.txt").write_text("beta\n", encoding="utf-8")
    (tmp_path / "c.md").write_text("not a txt file", encoding="utf-8")
    one = load_corpus(str(tmp_path / "a.txt"))
    assert (one.name, one.text) == ("a", "alpha")
    assert one.sha256 == hashlib.sha256(b"alpha").hexdigest()

    # Several sources: joined in order, with a newline where one does not end in one.
    several = load_corpus([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")])
    assert several.text == "beta\nalpha"
    both = load_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert both.text == "alpha\nbeta\n"

    # A directory: its .txt files in sorted order, nothing else.
    d = load_corpus(str(tmp_path))
    assert d.text == "alpha\nbeta\n"
    assert [s.rsplit("/", 1)[-1] for s in d.sources] == ["a.txt", "b.txt"]

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("from stdin ✓\n".encode())))
    s = load_corpus("-")
    assert (s.name, s.text) == ("stdin", "from stdin ✓\n")


def test_bom_is_dropped_and_unicode_kept(tmp_path):
    p = tmp_path / "u.txt"
    p.write_bytes("\ufeffcafe\u0301 👍\r\n".encode())
    assert load_corpus(str(p)).text == "cafe\u0301 👍\r\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\xef\xbb\xbf", "is empty"),
        (b"text\x00more", "NUL byte at byte offset 4"),
        (b"caf\xe9 au lait", "not valid UTF-8 (byte 0xe9 at byte offset 3)"),
    ],
)
def test_bad_files(tmp_path, content, message):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(GptforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_corpus(str(p))


def test_missing_unknown_and_empty_directory(tmp_path):
    with pytest.raises(GptforgeError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(GptforgeError, match="unknown corpus 'shakespear'; known corpora: tinyshakespeare"):
        load_corpus("shakespear")
    with pytest.raises(GptforgeError, match="no .txt files"):
        load_corpus(str(tmp_path))


def _serve_locally(monkeypatch, tmp_path, content: bytes, sha256: str) -> str:
    """Point tinyshakespeare at a local file:// URL and hide the data directory."""
    src = tmp_path / "remote" / "input.txt"
    src.parent.mkdir()
    src.write_bytes(content)
    url = src.as_uri()
    monkeypatch.delenv("GPTFORGE_DATA_DIR", raising=False)
    monkeypatch.setitem(CORPORA, "tinyshakespeare", NamedCorpus(url=url, sha256=sha256, filename="input.txt"))
    return url


def test_download_once_into_cache(tmp_path, monkeypatch):
    content = b"To be, or not to be\n"
    _serve_locally(monkeypatch, tmp_path, content, hashlib.sha256(content).hexdigest())
    c = load_corpus("tinyshakespeare")
    cached = corpus_mod.cache_dir() / "downloads" / "tinyshakespeare" / "input.txt"
    assert c.text == content.decode() and cached.read_bytes() == content
    assert c.sources == [str(cached)]
    # A second load uses the cache: the "server" is gone and nothing is fetched.
    (tmp_path / "remote" / "input.txt").unlink()
    assert load_corpus("tinyshakespeare").text == content.decode()
    assert [p.name for p in cached.parent.iterdir()] == ["input.txt"]  # no temporary files left


def test_download_with_wrong_checksum_deletes_the_file(tmp_path, monkeypatch):
    _serve_locally(monkeypatch, tmp_path, b"not shakespeare\n", SHAKESPEARE_SHA)
    with pytest.raises(GptforgeError, match="sha256 .* expected 86c4e6aa9db7c042.*deleted"):
        load_corpus("tinyshakespeare")
    downloads = corpus_mod.cache_dir() / "downloads" / "tinyshakespeare"
    assert list(downloads.iterdir()) == []


def test_offline_error_names_url_and_variable(tmp_path, monkeypatch):
    url = _serve_locally(monkeypatch, tmp_path, b"x", SHAKESPEARE_SHA)
    (tmp_path / "remote" / "input.txt").unlink()  # "offline": the URL cannot be fetched
    with pytest.raises(GptforgeError) as e:
        load_corpus("tinyshakespeare")
    assert url in str(e.value) and "GPTFORGE_DATA_DIR" in str(e.value)
    assert "\n" not in str(e.value)


def test_damaged_copy_in_data_dir_is_refused(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("tampered", encoding="utf-8")
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(tmp_path))
    with pytest.raises(GptforgeError, match="expected 86c4e6aa9db7c042"):
        load_corpus("tinyshakespeare")


def test_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch):
    _serve_locally(monkeypatch, tmp_path, b"x", SHAKESPEARE_SHA)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(blocker))
    with pytest.raises(GptforgeError, match="cannot write the download of 'tinyshakespeare'.*GPTFORGE_CACHE_DIR"):
        load_corpus("tinyshakespeare")


# --------------------------------------------------------------------------------------------- streaming

import gzip  # noqa: E402
import json  # noqa: E402

from gptforge.data.corpus import open_corpus  # noqa: E402

DOCS = ["first document\nwith two lines\n", "second ✓ document", "", "third document, the last"]


def _documents(stream) -> list[str]:
    """The documents a stream yields, rebuilt from its pieces."""
    docs: list[str] = []
    for text, new_doc, _ in stream.pieces():
        if new_doc:
            docs.append(text)
        elif text:
            docs[-1] += text
    return docs


def write_jsonl(path, docs=DOCS, field="text"):
    lines = [json.dumps({field: d, "id": i}) for i, d in enumerate(docs)]
    data = ("\n".join(lines) + "\n\n").encode()  # a trailing blank line is allowed
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_parquet(path, docs=DOCS, field="text", row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.parquet"])
def test_records_are_documents(tmp_path, name):
    path = tmp_path / name
    write_parquet(path) if name.endswith(".parquet") else write_jsonl(path)
    stream = open_corpus(str(path))
    assert _documents(stream) == [d for d in DOCS if d]  # an empty document is skipped
    assert stream.name == "docs" and stream.names == [str(path)]
    assert stream.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # one file: its bytes
    assert sum(consumed for _, _, consumed in stream.pieces()) == path.stat().st_size  # progress adds up


def test_text_field_and_a_directory_of_mixed_files(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.txt").write_text("plain text file", encoding="utf-8")
    write_jsonl(d / "b.jsonl", ["json one", "json two"], field="content")
    write_parquet(d / "c.parquet", ["parquet one"], field="content")
    (d / "notes.md").write_text("not read", encoding="utf-8")
    stream = open_corpus(str(d), text_field="content")
    assert _documents(stream) == ["plain text file", "json one", "json two", "parquet one"]
    assert [p.rsplit("/", 1)[-1] for p in stream.names] == ["a.txt", "b.jsonl", "c.parquet"]
    hashes = "".join(hashlib.sha256(p.read_bytes()).hexdigest() + "\n" for p in sorted(d.glob("[abc].*")))
    assert stream.sha256 == hashlib.sha256(hashes.encode()).hexdigest()


def test_a_saved_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["hello there", "general kenobi"], "n": [1, 2]})
    ds.save_to_disk(str(tmp_path / "one"))
    stream = open_corpus(str(tmp_path / "one"))
    assert _documents(stream) == ["hello there", "general kenobi"] and stream.name == "one"
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"text": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert _documents(open_corpus(str(tmp_path / "dict"))) == ["hello there", "general kenobi"]  # train
    test_split = open_corpus(f"{tmp_path / 'dict'}:test")
    assert _documents(test_split) == ["held out"]
    assert test_split.sha256 != open_corpus(str(tmp_path / "dict")).sha256
    with pytest.raises(GptforgeError, match="has no column 'body' \\(columns: text, n\\)"):
        list(open_corpus(str(tmp_path / "one"), text_field="body").pieces())


def test_a_text_file_streams_in_pieces_that_tokenize_like_the_whole(data_dir, shakespeare_text, monkeypatch):
    from gptforge.data.tokenizers import GPT2Tokenizer

    monkeypatch.setattr(stream_mod, "BLOCK_BYTES", 4096)
    pieces = list(open_corpus("tinyshakespeare").pieces())
    assert len(pieces) > 200 and [new for _, new, _ in pieces].count(True) == 1  # one document
    assert "".join(text for text, _, _ in pieces) == shakespeare_text
    tok = GPT2Tokenizer()
    ids = [i for a in tok.encode_batch_arrays([text for text, _, _ in pieces]) for i in a.tolist()]
    assert ids == tok.encode(shakespeare_text) and len(ids) == 338_025


def test_utf8_checks_survive_block_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_mod, "BLOCK_BYTES", 16)
    p = tmp_path / "u.txt"
    p.write_bytes("\ufeff".encode() + "é".encode() * 20 + b"\nok")  # 2-byte characters cut by blocks
    assert "".join(t for t, _, _ in open_corpus(str(p)).pieces()) == "é" * 20 + "\nok"
    p.write_bytes(b"x" * 40 + b"\xff" + b"y" * 10)
    with pytest.raises(GptforgeError, match=r"not valid UTF-8 \(byte 0xff at byte offset 40\)"):
        list(open_corpus(str(p)).pieces())
    p.write_bytes(b"x" * 37 + b"\x00")
    with pytest.raises(GptforgeError, match="NUL byte at byte offset 37"):
        list(open_corpus(str(p)).pieces())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "fine"}\n{"text": broken}\n', r"bad.jsonl line 2 is not JSON \(Expecting value\)"),
        (b'{"text": "fine"}\n\n{"body": "x"}\n', r"bad.jsonl line 3 has no 'text' field.*--text-field"),
        (b'{"text": 42}\n', r"field 'text' is a int, not text"),
        (b'[1, 2]\n', r"bad.jsonl line 1 has no 'text' field"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(GptforgeError, match=message):
        list(open_corpus(str(p)).pieces())


def test_bad_parquet_and_gzip(tmp_path):
    p = write_parquet(tmp_path / "t.parquet", field="body")
    with pytest.raises(GptforgeError, match=r"t.parquet has no column 'text' \(columns: body, n\).*--text-field"):
        list(open_corpus(str(p)).pieces())
    with pytest.raises(GptforgeError, match=r"column 'n' holds int64, not text"):
        list(open_corpus(str(p), text_field="n").pieces())
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(GptforgeError, match="junk.parquet is not a readable Parquet file"):
        list(open_corpus(str(tmp_path / "junk.parquet")).pieces())
    gz = write_jsonl(tmp_path / "t.jsonl.gz", ["a document " * 200] * 50)
    gz.write_bytes(gz.read_bytes()[:-30])  # truncated download
    with pytest.raises(GptforgeError, match="t.jsonl.gz is not a readable gzip file"):
        list(open_corpus(str(gz)).pieces())


def test_source_hashes_are_remembered_for_big_files(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_mod, "_MEMO_MIN_BYTES", 10)
    p = tmp_path / "big.txt"
    p.write_text("some text that counts as big here", encoding="utf-8")
    first = corpus_mod.file_sha256(p)
    memo = json.loads((corpus_mod.cache_dir() / "source-hashes.json").read_text())
    assert list(memo.values()) == [first] == [hashlib.sha256(p.read_bytes()).hexdigest()]
    p.write_text("other text, another size entirely", encoding="utf-8")  # new size and mtime: hashed again
    assert corpus_mod.file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest() != first


def test_a_text_file_keeps_its_hash_and_several_files_are_not_their_merge(tmp_path):
    """Runs record source_sha256: one text file keeps the identity it had before streaming (its text's
    sha256); several files hash their boundaries too, so one file holding their joined text differs."""
    (tmp_path / "a.txt").write_bytes("\ufeffno newline at the end ✓".encode())
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("third", encoding="utf-8")
    one = str(tmp_path / "a.txt")
    assert open_corpus(one).sha256 == load_corpus(one).sha256 == hashlib.sha256("no newline at the end ✓"
                                                                                 .encode()).hexdigest()
    several = [str(tmp_path / "c.txt"), one]
    merged = tmp_path / "merged" / "m.txt"
    merged.parent.mkdir()
    merged.write_text(load_corpus(several).text, encoding="utf-8")
    assert open_corpus(several).sha256 not in (open_corpus(str(merged)).sha256, load_corpus(several).sha256)
    assert open_corpus(several).sha256 != open_corpus(list(reversed(several))).sha256
    assert open_corpus(str(tmp_path)).sha256 == open_corpus([one, str(tmp_path / "b.txt"), several[0]]).sha256
