"""Corpora: which text a spec names. Named ones (downloaded once, checksummed, cached), text files,
JSON Lines, Parquet, `datasets` directories, the Hugging Face Hub, directories, stdin.

    from gptforge.data.corpus import load_corpus, open_corpus
    corpus = load_corpus("tinyshakespeare")          # or "notes.txt", ["a.txt", "b.txt"], "texts/", "-"
    print(corpus.name, len(corpus.text), corpus.sha256)
    stream = open_corpus("owt/", text_field="text")  # any size: .txt/.jsonl/.jsonl.gz/.parquet files
    for text, new_doc, nbytes in stream.pieces(): ...

`load_corpus` holds the whole text (small corpora); `open_corpus` streams it, which is what
`prepare` uses: this file resolves the specs into sources, data/stream.py reads and hashes them.

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

from gptforge.data.dirs import cache_dir, data_dir
from gptforge.data.stream import (
    CorpusStream,
    Source,
    _open_saved_dataset,
    _spool_stdin,
    file_kind,
    file_sha256,
    sha256_bytes,
    stream_sha256,
)
from gptforge.errors import GptforgeError

# The old import path of the names that moved to data/dirs.py and data/stream.py stays.
__all__ = ["CORPORA", "Corpus", "CorpusStream", "NamedCorpus", "Source", "cache_dir", "data_dir", "decode_text",
           "file_kind", "file_sha256", "load_corpus", "named_corpus_path", "open_corpus", "sha256_bytes",
           "stream_sha256"]


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


# --------------------------------------------------------------------------------------------- streaming
#
# open_corpus resolves the specs into Sources; data/stream.py reads and hashes them.

DIRECTORY_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _file_source(path: Path, label: str | None = None) -> Source:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise GptforgeError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    return Source(kind=file_kind(path), path=str(path), size=size, label=label or str(path))


def _stream_sources(spec: str, stream: CorpusStream) -> list[Source]:
    if spec == "-":
        spooled = _spool_stdin()
        stream.cleanup.append(spooled)
        return [Source(kind="text", path=str(spooled), size=spooled.stat().st_size, label="standard input")]
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition("@")
        if not name:
            raise GptforgeError(f"{spec!r} names no dataset; e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT")
        return [Source(kind="hub", path=name, label=spec, split=split or None)]
    path = Path(spec).expanduser()
    base, _, split = spec.rpartition(":")
    if not path.exists() and base and Path(base).expanduser().is_dir() and _is_saved_dataset(Path(base)):
        path, spec_split = Path(base).expanduser(), split  # DIR:SPLIT of a saved DatasetDict
    else:
        spec_split = None
    if path.is_dir():
        if _is_saved_dataset(path):
            ds = _open_saved_dataset(path, spec_split)
            files = [Path(f["filename"]) for f in ds.cache_files]
            return [Source(kind="datasets", path=str(path), size=sum(f.stat().st_size for f in files),
                           label=str(path), split=spec_split)]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(DIRECTORY_SUFFIXES))
        if not files:
            raise GptforgeError(f"directory {path} has no .txt, .jsonl, .jsonl.gz or .parquet files; give "
                                "such files or a directory holding them")
        return [_file_source(p) for p in files]
    if path.exists():
        return [_file_source(path)]
    if spec in CORPORA:
        return [_file_source(named_corpus_path(spec))]
    if _looks_like_a_name(spec):
        raise GptforgeError(
            f"unknown corpus {spec!r}; known corpora: {', '.join(sorted(CORPORA))} (or give a text, .jsonl, "
            ".jsonl.gz or .parquet file, a directory of them, a saved datasets directory, hf:NAME, or - for stdin)"
        )
    raise GptforgeError(f"corpus file {spec} does not exist; check the path")


def open_corpus(spec: str | Sequence[str] | Corpus, text_field: str = "text") -> CorpusStream:
    """A corpus opened for streaming: the same specs as `load_corpus`, plus .jsonl / .jsonl.gz /
    .parquet files (documents in `text_field`), a directory saved by `datasets` (`DIR` or `DIR:SPLIT`)
    and `hf:NAME[:CONFIG][@SPLIT]` streamed from the Hugging Face Hub. Nothing is read yet but the
    hashes of the files (`stream_sha256`)."""
    if isinstance(spec, Corpus):
        return CorpusStream(name=spec.name, text_field=text_field, sha256=spec.sha256, names=list(spec.sources),
                            sources=[Source(kind="memory", path=spec.name, size=len(spec.text.encode("utf-8")),
                                            text=spec.text, label=spec.name)])
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise GptforgeError("no corpus given; name one (e.g. tinyshakespeare) or give text files")
    if not isinstance(text_field, str) or not text_field:
        raise GptforgeError("the text field is empty; name the JSON field or column that holds the text")
    stream = CorpusStream(name=_corpus_name(specs), sources=[], text_field=text_field)
    try:
        for s in specs:
            stream.sources.extend(_stream_sources(s, stream))
        stream.sha256 = stream_sha256(stream.sources)
        stream.names = [_listed_name(s) for s in stream.sources]
    except BaseException:
        stream.close()
        raise
    return stream


def _listed_name(src: Source) -> str:
    """How meta.json's "sources" (and the cache key) name a source: "<stdin>", hf:NAME, or the file's or
    directory's absolute path (a relative path and its absolute one are the same source)."""
    if src.label == "standard input":
        return "<stdin>"
    if src.kind == "hub":
        return src.label
    path = str(Path(src.path).resolve())
    return f"{path}:{src.split}" if src.kind == "datasets" and src.split else path


def _corpus_name(specs: list[str]) -> str:
    def one(s: str) -> str:
        if s == "-":
            return "stdin"
        if s.startswith("hf:"):
            return s[3:].replace("/", "_")
        if s in CORPORA and not Path(s).exists():
            return s
        name = Path(s).expanduser().resolve().name if len(specs) == 1 else Path(s).name
        for suffix in (".jsonl.gz", ".jsonl", ".parquet", ".txt"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return Path(name).stem or "corpus"

    return "+".join(one(s) for s in specs)
