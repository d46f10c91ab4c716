"""Reading a corpus piece by piece, and its identity: the sources' readers and hashes.

    from gptforge.data.corpus import open_corpus     # which sources a spec names: data/corpus.py
    stream = open_corpus("owt/")                     # a CorpusStream
    for text, new_doc, nbytes in stream.pieces(): ...
    stream.sha256                                    # meta.json's source_sha256 (stream_sha256)

`prepare` never holds a corpus in memory: it opens it as a CorpusStream and reads it piece by piece.
A piece is at most ~1 MB of text; a document is one or more pieces (the first is flagged new_doc),
cut only where GPT-2-style pre-tokenizers split anyway. Text files are one document each; a JSON
Lines line, a Parquet row or a datasets row is one document. This file owns the readers (text files,
standard input, JSON Lines, Parquet, `datasets` directories, the Hub) and the sources' hashes,
remembered for big files in $GPTFORGE_CACHE_DIR/source-hashes.json.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.data.dirs import cache_dir
from gptforge.data.tokenizers import _SAFE_CUT, split_for_batch
from gptforge.errors import GptforgeError

BLOCK_BYTES = 1 << 20
# A text file without a safe cut point (a newline between two non-space characters) for this long is
# cut anyway; only a handful of tokens around such a cut can differ from encoding it whole.
_MAX_CARRY_CHARS = 32 << 20
# Documents longer than this are cut (at safe points) so that no piece is huge.
_MAX_DOC_PIECE_CHARS = 4 << 20
# Files this large remember their sha256 in $GPTFORGE_CACHE_DIR/source-hashes.json, keyed by path,
# size, mtime and inode, so reusing a prepared 40 GB corpus does not read it all again.
_MEMO_MIN_BYTES = 64 << 20


def file_kind(path: Path) -> str:
    """How a file is read: "jsonl", "jsonl.gz", "parquet", else "text"."""
    name = path.name.lower()
    for kind in ("jsonl.gz", "jsonl", "parquet"):
        if name.endswith("." + kind):
            return kind
    return "text"


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


# --------------------------------------------------------------------------------------------- hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
