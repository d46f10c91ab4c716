"""Corpora: named ones (downloaded once, checksummed, cached), text files, directories, stdin.

    from gptforge.data.corpus import load_corpus
    corpus = load_corpus("tinyshakespeare")          # or "notes.txt", ["a.txt", "b.txt"], "texts/", "-"
    print(corpus.name, len(corpus.text), corpus.sha256)

A named corpus is looked for in $GPTFORGE_DATA_DIR/<name>/<file> (read-only copies, e.g. for offline
machines and CI), then in the cache ($GPTFORGE_CACHE_DIR, default ~/.cache/gptforge) under
downloads/<name>/<file>, and only then downloaded (once) into the cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import GptforgeError


@dataclass(frozen=True)
class NamedCorpus:
    """A public text with a fixed checksum, so every machine trains on the same bytes."""

    url: str
    sha256: str
    filename: str
    description: str = ""


# Mutable on purpose: tests point an entry at a local file:// URL to simulate a bad download.
CORPORA: dict[str, NamedCorpus] = {
    "tinyshakespeare": NamedCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="input.txt",
        description="40,000 lines of Shakespeare (1.1 MB), the classic small corpus",
    ),
}


@dataclass
class Corpus:
    """The text to train on. `sha256` is of the UTF-8 text and keys every cache built from it."""

    name: str
    text: str
    sha256: str
    sources: list[str] = field(default_factory=list)


def data_dir() -> Path | None:
    """$GPTFORGE_DATA_DIR: a read-only directory of local copies, or None when unset."""
    env = os.environ.get("GPTFORGE_DATA_DIR")
    return Path(env).expanduser() if env else None


def cache_dir() -> Path:
    """$GPTFORGE_CACHE_DIR (default ~/.cache/gptforge): downloads and prepared token files."""
    env = os.environ.get("GPTFORGE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptforge"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 text from bytes, or a GptforgeError that names the first offending byte."""
    if not data:
        raise GptforgeError(f"{source} is empty; give a file with some text in it")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise GptforgeError(f"{source} looks binary (NUL byte at byte offset {nul}); give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptforgeError(
            f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}); "
            "convert it to UTF-8, e.g. with iconv"
        ) from None
    # A UTF-8 byte-order mark is an encoding artefact, not text the model should learn.
    text = text.removeprefix("\ufeff")
    if not text:
        raise GptforgeError(f"{source} is empty; give a file with some text in it")
    return text


def _read_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GptforgeError(f"corpus file {path} does not exist; check the path") from None
    except OSError as e:
        raise GptforgeError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    return decode_text(data, str(path))


def _download(name: str, entry: NamedCorpus, dest: Path) -> None:
    """Download `entry.url` to `dest` via a temporary file, checking the sha256 before the rename."""
    from tqdm.auto import tqdm

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise GptforgeError(f"cannot write the download of {name!r} to {dest.parent}: {e.strerror}; "
                            "set GPTFORGE_CACHE_DIR to a writable directory") from None
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(entry.url, timeout=30)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise GptforgeError(
                    f"cannot download corpus {name!r} from {entry.url} ({reason}); when offline, put a copy "
                    f"at $GPTFORGE_DATA_DIR/{name}/{entry.filename} and set GPTFORGE_DATA_DIR"
                ) from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}",
                          file=sys.stderr) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != entry.sha256:
            raise GptforgeError(
                f"download of {name!r} from {entry.url} has sha256 {digest.hexdigest()[:16]}..., expected "
                f"{entry.sha256[:16]}...; the bad file was deleted, try again later"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def named_corpus_path(name: str) -> Path:
    """Local path of a named corpus: the data directory, else the cache, else a fresh download."""
    entry = CORPORA[name]
    local = data_dir()
    if local is not None:
        path = local / name / entry.filename
        if path.is_file():
            actual = sha256_bytes(path.read_bytes())
            if actual != entry.sha256:
                raise GptforgeError(
                    f"{path} has sha256 {actual[:16]}..., expected {entry.sha256[:16]}...; replace it "
                    f"with the file from {entry.url}"
                )
            return path
    cached = cache_dir() / "downloads" / name / entry.filename
    if cached.is_file():
        if sha256_bytes(cached.read_bytes()) == entry.sha256:
            return cached
        cached.unlink()  # damaged or stale: download it again
    _download(name, entry, cached)
    return cached


def _looks_like_a_name(spec: str) -> bool:
    return os.sep not in spec and "/" not in spec and "." not in spec


def _expand(spec: str) -> list[tuple[str, str]]:
    """(source, text) pairs for one spec item."""
    if spec == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise GptforgeError("--corpus - reads standard input, but nothing is piped in; "
                                "e.g. cat book.txt | gptforge prepare --corpus -")
        return [("<stdin>", decode_text(sys.stdin.buffer.read(), "standard input"))]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise GptforgeError(f"directory {path} has no .txt files; give .txt files or a directory holding them")
        return [(str(p), _read_file(p)) for p in files]
    if path.exists():
        return [(str(path), _read_file(path))]
    if spec in CORPORA:
        p = named_corpus_path(spec)
        return [(str(p), _read_file(p))]
    if _looks_like_a_name(spec):
        raise GptforgeError(
            f"unknown corpus {spec!r}; known corpora: {', '.join(sorted(CORPORA))} (or give a text file, "
            "a directory of .txt files, or - for stdin)"
        )
    raise GptforgeError(f"corpus file {spec} does not exist; check the path")


def load_corpus(spec: str | Sequence[str]) -> Corpus:
    """Load a corpus: a name (`tinyshakespeare`), a file, a directory of .txt files (sorted), `-`
    for stdin, or a list of those. Several sources are joined with a newline between them where
    one does not already end in one."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise GptforgeError("no corpus given; name one (e.g. tinyshakespeare) or give text files")
    parts: list[tuple[str, str]] = []
    for s in specs:
        parts.extend(_expand(s))
    texts = []
    for i, (_, text) in enumerate(parts):
        texts.append(text)
        if i + 1 < len(parts) and not text.endswith("\n"):
            texts.append("\n")
    text = "".join(texts)
    if len(specs) == 1:
        s = specs[0]
        if s in CORPORA and not Path(s).exists():
            name = s
        elif s == "-":
            name = "stdin"
        else:
            name = Path(s).expanduser().resolve().stem or "corpus"
    else:
        name = "+".join("stdin" if s == "-" else (s if s in CORPORA else Path(s).stem) for s in specs)
    return Corpus(name=name, text=text, sha256=sha256_bytes(text.encode("utf-8")),
                  sources=[src for src, _ in parts])
