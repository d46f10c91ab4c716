"""Corpora: named (data dir, cache, download with checksum), files, directories, stdin, bad input."""

from __future__ import annotations

import hashlib
import io
import sys

import pytest

from gptforge.data import corpus as corpus_mod
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
