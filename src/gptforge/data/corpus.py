"""Corpora: named ones (downloaded once, checksummed, cached), text files, JSON Lines, Parquet,
`datasets` directories, the Hugging Face Hub, directories, stdin.

    from gptforge.data.corpus import load_corpus, open_corpus
    corpus = load_corpus("tinyshakespeare")          # or "notes.txt", ["a.txt", "b.txt"], "texts/", "-"
    print(corpus.name, len(corpus.text), corpus.sha256)
    stream = open_corpus("owt/", text_field="text")  # any size: .txt/.jsonl/.jsonl.gz/.parquet files
    for text, new_doc, nbytes in stream.pieces(): ...

`load_corpus` holds the whole text (small corpora); `open_corpus` streams it, which is what
`prepare` uses.

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


# --------------------------------------------------------------------------------------------- streaming
#
# `prepare` never holds a corpus in memory: it opens it as a CorpusStream and reads it piece by piece.
# A piece is at most ~1 MB of text; a document is one or more pieces (the first is flagged new_doc).
# Text files are one document each; a JSON Lines line, a Parquet row or a datasets row is one document.

BLOCK_BYTES = 1 << 20
# A text file without a safe cut point (a newline between two non-space characters) for this long is
# cut anyway; only a handful of tokens around such a cut can differ from encoding it whole.
_MAX_CARRY_CHARS = 32 << 20
# Documents longer than this are cut (at safe points) so that no piece is huge.
_MAX_DOC_PIECE_CHARS = 4 << 20
# Files this large remember their sha256 in $GPTFORGE_CACHE_DIR/source-hashes.json, keyed by path,
# size, mtime and inode, so reusing a prepared 40 GB corpus does not read it all again.
_MEMO_MIN_BYTES = 64 << 20

DIRECTORY_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def file_kind(path: Path) -> str:
    """How a file is read: "jsonl", "jsonl.gz", "parquet", else "text"."""
    name = path.name.lower()
    for kind in ("jsonl.gz", "jsonl", "parquet"):
        if name.endswith("." + kind):
            return kind
    return "text"


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


@dataclass(frozen=True)
class Source:
    """One input of a corpus: a file (`kind` text, jsonl, jsonl.gz, parquet), a Hugging Face dataset
    saved with `save_to_disk` (`datasets`), one named on the Hub (`hub`), or text held in memory."""

    kind: str
    path: str
    size: int = 0          # bytes on disk, for the progress bar (0 = unknown)
    label: str = ""        # how error messages name it
    split: str | None = None
    text: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.path


@dataclass
class CorpusStream:
    """A corpus read lazily. `sha256` identifies the bytes (see `stream_sha256`); `pieces()` yields
    (text, new_doc, input_bytes_consumed) for the progress bar."""

    name: str
    sources: list[Source]
    text_field: str = "text"
    sha256: str = ""
    names: list[str] = field(default_factory=list)  # meta.json's "sources": paths, "<stdin>", hf:NAME
    cleanup: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.sources)

    def pieces(self):
        for src in self.sources:
            yield from _read_source(src, self.text_field)

    def close(self) -> None:
        for p in self.cleanup:
            p.unlink(missing_ok=True)
        self.cleanup.clear()


def _last_safe_cut(text: str) -> int:
    """Index just after the last safe cut point of `text` (see tokenizers.split_for_batch), or -1."""
    from gptforge.data.tokenizers import _SAFE_CUT

    n = len(text)
    for window in (1 << 16, 1 << 20, n):
        start = max(0, n - window)
        last = -1
        for m in _SAFE_CUT.finditer(text, start):
            last = m.end()
        if last > 0:
            return last
        if start == 0:
            break
    return -1


def _cut_document(text: str):
    """A long document as pieces of about _MAX_DOC_PIECE_CHARS, cut where tokens do not change."""
    if len(text) <= _MAX_DOC_PIECE_CHARS:
        yield text
        return
    from gptforge.data.tokenizers import split_for_batch

    yield from split_for_batch(text, _MAX_DOC_PIECE_CHARS)


def _read_text_file(path: Path, label: str):
    """Stream a UTF-8 file as one document, checking it as `decode_text` does, with byte offsets."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, carry, first, any_text, pending_bytes = 0, "", True, False, 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise GptforgeError(f"corpus file {path} does not exist; check the path") from None
    except OSError as e:
        raise GptforgeError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    with f:
        while True:
            try:
                block = f.read(BLOCK_BYTES)
            except OSError as e:
                raise GptforgeError(f"cannot read {path}: {e.strerror}; check the file") from None
            final = not block
            nul = block.find(b"\x00")
            if nul >= 0:
                raise GptforgeError(f"{label} looks binary (NUL byte at byte offset {offset + nul}); "
                                    "give a UTF-8 text file")
            held = decoder.getstate()[0]
            try:
                text = decoder.decode(block, final)
            except UnicodeDecodeError as e:
                at = offset - len(held) + e.start
                raise GptforgeError(
                    f"{label} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte offset {at}); "
                    "convert it to UTF-8, e.g. with iconv"
                ) from None
            offset += len(block)
            pending_bytes += len(block)
            if first and text:
                # A UTF-8 byte-order mark is an encoding artefact, not text the model should learn.
                text = text.removeprefix("\ufeff")
                first = False
            buf = carry + text
            if final:
                if buf:
                    yield buf, not any_text, pending_bytes
                    any_text = True
                break
            cut = _last_safe_cut(buf) if len(buf) >= BLOCK_BYTES else -1
            if cut < 0 and len(buf) > _MAX_CARRY_CHARS:
                cut = len(buf)
            if cut > 0:
                yield buf[:cut], not any_text, pending_bytes
                any_text, pending_bytes, carry = True, 0, buf[cut:]
            else:
                carry = buf
    if not any_text:
        raise GptforgeError(f"{label} is empty; give a file with some text in it")


def _documents(texts, label: str, field_name: str):
    """Pieces of a stream of (document, input bytes) pairs; empty documents are skipped."""
    for text, consumed in texts:
        if text is None or text == "":
            if consumed:
                yield "", False, consumed
            continue
        if not isinstance(text, str):
            raise GptforgeError(f"{label}: field {field_name!r} is a {type(text).__name__}, not text; "
                                "choose a text field with --text-field")
        for i, piece in enumerate(_cut_document(text)):
            yield piece, i == 0, consumed if i == 0 else 0


def _read_jsonl(path: Path, label: str, text_field: str, gz: bool):
    import gzip
    import json
    import zlib

    def lines():
        try:
            raw = open(path, "rb")
        except OSError as e:
            raise GptforgeError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
        with raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            last = 0
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):  # noqa: B007 (used after the loop)
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                        raise GptforgeError(f"{label} line {lineno} is not JSON ({why}); fix or remove "
                                            "that line") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        raise GptforgeError(f"{label} line {lineno} has no {text_field!r} field; name the "
                                            "field that holds the text with --text-field") from None
                    value = obj[text_field]
                    if isinstance(value, str) and not value.isascii():
                        try:
                            value.encode("utf-8")
                        except UnicodeEncodeError as e:  # JSON may escape a lone surrogate: \ud800
                            raise GptforgeError(f"{label} line {lineno}: {text_field!r} holds a lone surrogate "
                                                f"(U+{ord(value[e.start]):04X}), which is not text; fix or remove "
                                                "that line") from None
                    pos = raw.tell()
                    yield value, pos - last
                    last = pos
                if raw.tell() > last:
                    yield None, raw.tell() - last  # blank lines at the end: still input read
            except (OSError, EOFError, zlib.error) as e:
                raise GptforgeError(f"{label} is not a readable gzip file ({e or type(e).__name__}) after "
                                    f"line {lineno}; check the file") from None

    yield from _documents(lines(), label, text_field)


def _read_parquet(path: Path, label: str, text_field: str, size: int):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise GptforgeError(f"{label}: reading .parquet needs pyarrow; pip install 'gptforge[data]' "
                            "(or pyarrow)") from None

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise GptforgeError(f"{label} is not a readable Parquet file ({e}); check the file") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise GptforgeError(f"{label} has no column {text_field!r} (columns: {', '.join(names)}); name the "
                            "text column with --text-field")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise GptforgeError(f"{label}: column {text_field!r} holds {kind}, not text; name the text column "
                            "with --text-field")
    rows = max(1, pf.metadata.num_rows)

    def texts():
        done = 0
        try:
            # Row groups are read in batches of rows: memory stays at one batch, however big the file.
            for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
                values = batch.column(0).to_pylist()
                share = size * (done + len(values)) // rows - size * done // rows
                done += len(values)
                for i, v in enumerate(values):
                    yield v, share if i == 0 else 0
        except (OSError, pa.ArrowException) as e:
            raise GptforgeError(f"{label} is damaged ({e}); check the file") from None

    yield from _documents(texts(), label, text_field)


def _open_saved_dataset(path: Path, split: str | None):
    """A `datasets` Dataset saved with save_to_disk (a DatasetDict: its `split`, default train)."""
    try:
        import datasets
    except ImportError:
        raise GptforgeError(f"{path} is a Hugging Face dataset; install the datasets package "
                            "(pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several kinds for damaged directories
        raise GptforgeError(f"cannot load the dataset saved in {path} ({type(e).__name__}: {e}); "
                            "check the directory") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        choice = split or ("train" if "train" in ds else (splits[0] if len(splits) == 1 else None))
        if choice not in ds:
            raise GptforgeError(f"{path} holds splits {', '.join(splits)}; name one as {path}:SPLIT")
        ds = ds[choice]
    return ds


def _read_saved_dataset(src: Source, text_field: str):
    ds = _open_saved_dataset(Path(src.path), src.split)
    if text_field not in ds.column_names:
        raise GptforgeError(f"{src.name} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                            "name the text column with --text-field")
    rows = max(1, len(ds))

    def texts():
        done = 0
        for batch in ds.select_columns([text_field]).iter(batch_size=1024):
            values = batch[text_field]
            share = src.size * (done + len(values)) // rows - src.size * done // rows
            done += len(values)
            for i, v in enumerate(values):
                yield v, share if i == 0 else 0

    yield from _documents(texts(), src.name, text_field)


def _read_hub(src: Source, text_field: str):
    """Stream a dataset from the Hugging Face Hub (online only; not covered by the offline tests)."""
    try:
        import datasets
    except ImportError:
        raise GptforgeError("hf: corpora need the datasets package (pip install datasets)") from None
    import logging

    # huggingface_hub logs a warning per retry of a failed request: the one-line error below says it.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    name, _, config = src.path.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=src.split or "train", streaming=True)
        def texts():
            for row in ds:
                if text_field not in row:
                    raise GptforgeError(f"{src.name} has no field {text_field!r} (fields: {', '.join(row)}); "
                                        "name the text field with --text-field")
                yield row[text_field], 0

        yield from _documents(texts(), src.name, text_field)
    except GptforgeError:
        raise
    except Exception as e:  # network and Hub errors come in many kinds
        raise GptforgeError(f"cannot stream {src.name} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                            "check the name and your connection") from None


def _read_source(src: Source, text_field: str):
    if src.kind == "memory":
        assert src.text is not None
        for i, piece in enumerate(_cut_document(src.text)):
            yield piece, i == 0, src.size if i == 0 else 0
    elif src.kind == "text":
        yield from _read_text_file(Path(src.path), src.name)
    elif src.kind in ("jsonl", "jsonl.gz"):
        yield from _read_jsonl(Path(src.path), src.name, text_field, gz=src.kind == "jsonl.gz")
    elif src.kind == "parquet":
        yield from _read_parquet(Path(src.path), src.name, text_field, src.size)
    elif src.kind == "datasets":
        yield from _read_saved_dataset(src, text_field)
    elif src.kind == "hub":
        yield from _read_hub(src, text_field)
    else:  # pragma: no cover - Source kinds are fixed above
        raise ValueError(src.kind)


def _file_source(path: Path, label: str | None = None) -> Source:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise GptforgeError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    return Source(kind=file_kind(path), path=str(path), size=size, label=label or str(path))


def _spool_stdin() -> Path:
    """Standard input copied to a temporary file, so it can be hashed and then streamed."""
    if sys.stdin is None or sys.stdin.isatty():
        raise GptforgeError("--corpus - reads standard input, but nothing is piped in; "
                            "e.g. cat book.txt | gptforge prepare --corpus -")
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".stdin.", suffix=".txt", dir=d)
    except OSError:
        fd, name = tempfile.mkstemp(prefix="gptforge-stdin.", suffix=".txt")
    with os.fdopen(fd, "wb") as out:
        while block := sys.stdin.buffer.read(BLOCK_BYTES):
            out.write(block)
    return Path(name)


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


def _memo(stamps: list, compute) -> str:
    """`compute()`, remembered in $GPTFORGE_CACHE_DIR/source-hashes.json under `stamps` (paths, sizes,
    mtimes, inodes) when the files are big, so reusing a prepared 40 GB corpus does not read it again."""
    import json

    big = sum(st[1] for st in stamps) >= _MEMO_MIN_BYTES
    if not big:
        return compute()
    memo_path = cache_dir() / "source-hashes.json"
    key = sha256_bytes(json.dumps(stamps).encode())
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(key), str):
        return memo[key]
    digest = compute()
    memo[key] = digest
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".{memo_path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo), encoding="utf-8")
        os.replace(tmp, memo_path)
    except OSError:
        pass  # only a speed-up
    return digest


def _stamp(path: str | os.PathLike) -> list:
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (remembered for big files while their size, mtime and inode stay)."""
    def compute() -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    return _memo([_stamp(path)], compute)


def _text_sha256(path: str) -> str:
    """sha256 of the UTF-8 text of a text file: its bytes without a leading byte-order mark. Computed
    on the bytes, never decoded (valid UTF-8 text is its own encoding)."""
    def compute() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            block = f.read(BLOCK_BYTES).removeprefix(b"\xef\xbb\xbf")
            while block:
                h.update(block)
                block = f.read(BLOCK_BYTES)
        return h.hexdigest()

    return _memo([_stamp(path)], compute)


def _source_sha256(src: Source) -> str:
    if src.kind == "text":
        try:
            return _text_sha256(src.path)
        except OSError as e:
            raise GptforgeError(f"cannot read {src.path}: {e.strerror}; check the path and its permissions") from None
    if src.kind == "datasets":
        ds = _open_saved_dataset(Path(src.path), src.split)
        lines = [f"split {src.split or ''}"] + [file_sha256(f["filename"]) for f in ds.cache_files]
        return sha256_bytes("\n".join(lines).encode())
    if src.kind == "hub":
        # Not the bytes (they are streamed, never all on this machine): the dataset's name and split.
        return sha256_bytes(f"hf:{src.path}@{src.split or 'train'}".encode())
    if src.kind == "memory":
        return sha256_bytes((src.text or "").encode("utf-8"))
    try:
        return file_sha256(src.path)
    except OSError as e:
        raise GptforgeError(f"cannot read {src.path}: {e.strerror}; check the path and its permissions") from None


def stream_sha256(sources: Sequence[Source]) -> str:
    """The corpus's identity, `source_sha256` in meta.json: for one source its hash, for several the
    sha256 of their hashes, one per line in reading order. So the files' order and boundaries (where a
    document ends: an end-of-text token with gpt2 and bpe) are part of it, and two files are never
    the same corpus as one file holding their text. A text file's hash is that of its UTF-8 text (a
    byte-order mark dropped), so Tiny Shakespeare's is the checksum of its download; a .jsonl,
    .jsonl.gz or .parquet file's that of its bytes; a saved `datasets` directory's that of its Arrow
    files' hashes and the split; a Hub dataset's (`hf:`) that of its name and split only (its bytes
    are never all here)."""
    hashes = [_source_sha256(s) for s in sources]
    if len(hashes) == 1:
        return hashes[0]
    return sha256_bytes("".join(h + "\n" for h in hashes).encode())
