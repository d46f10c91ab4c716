"""Token files: stream a corpus once into sharded, memory-mapped token files, then draw training
batches from them.

    from gptforge.data.tokens import prepare, BatchSampler
    data = prepare("tinyshakespeare", tokenizer="gpt2")             # cached in $GPTFORGE_CACHE_DIR/tokens/
    data = prepare("owt/", tokenizer="gpt2", out="data/owt")        # a folder of .jsonl.gz, any size
    sampler = BatchSampler(data.train, batch_size=8, block_size=256, seed=1337)
    x, y = sampler.next_batch()                                      # int64 (8, 256); y is x shifted by one

A prepared directory holds shards/NNNNN.bin (token files: a 32-byte header, then the tokens) with
shards/NNNNN.json beside each (its token count, document starts and the input chunks it came from),
tokenizer/ and meta.json, the index: shards and their token counts, dtype, tokenizer, source hash
and where validation starts. The splits are ranges of the concatenated shards: train is the first
`train_tokens`, val the rest. meta.json is written last: a directory without it (an interrupted
prepare) is never trusted, and one whose meta.json does not match the request is prepared again.
While a prepare runs, its shards grow in a work directory (`.KEY.partial` beside the cache entry,
`OUT/.partial` for --out), each written under a temporary name and renamed when complete, so an
interrupted prepare resumes from its finished shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptforge.data.corpus import Corpus, CorpusStream, cache_dir, open_corpus
from gptforge.data.tokenizers import (
    BPE_VOCAB_DEFAULT,
    Tokenizer,
    build_tokenizer,
    check_bpe_vocab_size,
    check_spec,
    load_tokenizer,
)
from gptforge.errors import GptforgeError

FORMAT_VERSION = 1  # of a token file's header
DATA_FORMAT_VERSION = 2  # of a prepared directory (2: shards/ and a meta.json index)
MAGIC = b"GPTFTOK\x00"
# magic, format version, dtype code (bytes per token), token count; padded to 32 bytes so the
# tokens that follow are aligned for any dtype.
_HEADER = struct.Struct("<8sIIQ")
HEADER_BYTES = 32
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


# --------------------------------------------------------------------------------------------- token files


def write_tokens(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write `tokens` with a header, via a temporary file and a rename (never half-written)."""
    path = Path(path)
    dtype = dtype_for(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, tokens.size).ljust(HEADER_BYTES, b"\0")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(tokens.astype(dtype, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_tokens(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a file written by `write_tokens`, as a read-only np.memmap."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise GptforgeError(f"cannot read token file {path}: {e.strerror}; prepare the data again") from None
    if len(head) < HEADER_BYTES:
        raise GptforgeError(f"token file {path} is truncated; prepare the data again")
    magic, version, code, count = _HEADER.unpack(head[: _HEADER.size])
    if magic != MAGIC:
        raise GptforgeError(f"{path} is not a gptforge token file; prepare the data again")
    if version != FORMAT_VERSION or code not in _DTYPES:
        raise GptforgeError(f"token file {path} has format {version}/dtype {code}, which this version "
                            "cannot read; prepare the data again")
    dtype = _DTYPES[code]
    if size != HEADER_BYTES + count * dtype.itemsize:
        raise GptforgeError(f"token file {path} is damaged ({size} bytes for {count} tokens); "
                            "prepare the data again")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


# --------------------------------------------------------------------------------------------- shards


class ShardedTokens:
    """Tokens [start, stop) of a list of memory-mapped shards, read as one 1-D array: `len(x)`,
    `x[a:b]` (a numpy array, also across a shard boundary), `x[i]`, `x[index_array]`, `np.asarray(x)`
    (the whole range in memory: only for small splits) and `x.tolist()`."""

    ndim = 1

    def __init__(self, shards: Sequence[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self.shards = list(shards)
        self.bounds = np.concatenate([[0], np.cumsum([len(s) for s in self.shards], dtype=np.int64)])
        total = int(self.bounds[-1])
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"range [{start}, {stop}) is outside the {total} tokens of the shards")
        self.dtype = self.shards[0].dtype if self.shards else np.dtype("<u2")

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    def _read(self, a: int, b: int) -> np.ndarray:
        """Global positions [a, b), concatenated across shards when they span several."""
        parts = []
        i = int(np.searchsorted(self.bounds, a, side="right")) - 1
        while a < b:
            lo, hi = int(self.bounds[i]), int(self.bounds[i + 1])
            take = min(b, hi)
            parts.append(np.asarray(self.shards[i][a - lo:take - lo]))
            a, i = take, i + 1
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                return self[min(a, b):max(a, b) + 1][::step] if step < 0 else self[a:b][::step]
            return self._read(self.start + a, self.start + max(a, b))
        if isinstance(key, (int, np.integer)):
            k = int(key) + (n if key < 0 else 0)
            if not 0 <= k < n:
                raise IndexError(f"index {int(key)} is out of range for {n} tokens")
            return self._read(self.start + k, self.start + k + 1)[0]
        index = np.asarray(key)
        if index.dtype.kind not in "iu":
            raise TypeError(f"ShardedTokens cannot be indexed with {index.dtype}")
        g = index.astype(np.int64)
        g = np.where(g < 0, g + n, g)
        if g.size and (g.min() < 0 or g.max() >= n):
            raise IndexError(f"an index is out of range for {n} tokens")
        g += self.start
        shard = np.searchsorted(self.bounds, g, side="right") - 1
        out = np.empty(g.shape, dtype=self.dtype)
        for s in np.unique(shard).tolist():  # windows rarely touch more than one or two shards
            mask = shard == s
            out[mask] = self.shards[s][g[mask] - self.bounds[s]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self):,} tokens in {len(self.shards)} shard(s), {self.dtype})"


def token_view(shards: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray | ShardedTokens:
    """Tokens [start, stop) of the shards: the memory map itself when one shard holds them all."""
    bounds = np.concatenate([[0], np.cumsum([len(s) for s in shards], dtype=np.int64)])
    i = int(np.searchsorted(bounds, start, side="right")) - 1
    if shards and i < len(shards) and stop <= bounds[i + 1]:
        return shards[i][start - int(bounds[i]):stop - int(bounds[i])]
    return ShardedTokens(shards, start, stop)


class _ShardWriter:
    """Writes shards/NNNNN.bin (a token file) and then NNNNN.json (what it holds and which chunks of
    the input it came from). Both go through a temporary name and a rename, the .json last: a shard
    is finished, and trusted by a resumed prepare, only when its .json exists."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int, request: str,
                 index: int, chunk_start: int) -> None:
        self.dir, self.dtype, self.shard_tokens, self.request = directory, dtype, shard_tokens, request
        self.index, self.chunk_start = index, chunk_start
        self.finished: list[dict] = []
        self._file = None

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tmp = self.dir / f".{self.index:05d}.bin.tmp{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._file.write(b"\0" * HEADER_BYTES)  # the header is written once the count is known
        self._count, self._docs, self._chars, self._codepoints = 0, [np.zeros(0, np.int64)], 0, set()

    def add(self, tokens: np.ndarray, docs: np.ndarray, chars: int, codepoints: np.ndarray, chunk: int) -> None:
        if not len(tokens):
            return  # input that held no text (blank lines, empty records): never an empty shard
        if self._file is None:
            self._open()
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._docs.append(docs + self._count)
        self._count += len(tokens)
        self._chars += chars
        self._codepoints.update(codepoints.tolist())
        if self._count >= self.shard_tokens:
            self.finish(chunk + 1)

    def finish(self, chunk_end: int) -> None:
        """Close the open shard (if any) as holding the input's chunks up to `chunk_end`."""
        if self._file is None:
            return
        f, self._file = self._file, None
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self._count).ljust(HEADER_BYTES, b"\0"))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        name = f"{self.index:05d}"
        os.replace(self._tmp, self.dir / f"{name}.bin")
        info = {"request": self.request, "tokens": self._count, "chunk_start": self.chunk_start,
                "chunk_end": chunk_end, "characters": self._chars, "codepoints": sorted(self._codepoints),
                "documents": np.concatenate(self._docs).tolist()}
        _write_json(self.dir / f"{name}.json", info)
        self.finished.append(_shard_summary(info, name))
        self.index, self.chunk_start = self.index + 1, chunk_end

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)


def _shard_summary(info: dict, name: str) -> dict:
    """What is kept in memory of a finished shard (its document list is read again only for the split)."""
    return {"name": name, "tokens": info["tokens"], "chunk_end": info["chunk_end"],
            "characters": info["characters"], "codepoints": info["codepoints"],
            "documents": len(info["documents"])}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _finished_shards(directory: Path, request: str) -> list[dict]:
    """The finished shards of an interrupted prepare: the longest run from 00000 whose .json matches
    this request and whose .bin is whole. Everything after it is deleted."""
    done: list[dict] = []
    chunk_end = 0
    if directory.is_dir():
        while True:
            name = f"{len(done):05d}"
            info = _read_json(directory / f"{name}.json")
            if info is None or info.get("request") != request or info.get("chunk_start") != chunk_end:
                break
            try:
                if len(read_tokens(directory / f"{name}.bin")) != info.get("tokens"):
                    break
            except GptforgeError:
                break
            done.append(_shard_summary(info, name))
            chunk_end = info["chunk_end"]
        for p in directory.iterdir():
            if p.name[:5].isdigit() and int(p.name[:5]) >= len(done) or p.name.startswith("."):
                p.unlink(missing_ok=True)
    return done


# --------------------------------------------------------------------------------------------- encoding

# Text per unit of work for a worker: big enough that inter-process traffic is noise, small enough
# that the few chunks in flight cost little memory.
CHUNK_CHARS = 1 << 20
SHARD_TOKENS = 1 << 25        # 64 MiB of uint16 per shard
BPE_SAMPLE_BYTES = 64 << 20   # text a bpe tokenizer is trained on, at most
_IN_PROCESS_BYTES = 16 << 20  # smaller corpora are encoded without starting worker processes


@dataclass
class _Chunk:
    texts: list[str]
    eot_before: list[bool]   # an end-of-text token goes before this text (a new document, not the first)
    doc_start: list[bool]    # this text starts a document (after its separator newline, if it has one)
    lead: list[int]          # 1 where a separator newline was put before the text (char), else 0
    nbytes: int              # input bytes it came from (the progress bar counts these)


def _chunks(stream: CorpusStream, eot: bool):
    """The corpus as chunks of about CHUNK_CHARS. The same input always gives the same chunks, so a
    resumed prepare can skip what finished shards hold. Without an end-of-text token (char), a
    newline goes between documents where one does not already end in one."""
    texts, eots, starts, leads, size, nbytes = [], [], [], [], 0, 0
    first, last_char = True, "\n"
    for text, new_doc, consumed in stream.pieces():
        nbytes += consumed
        if text:
            lead = int(new_doc and not first and not eot and last_char != "\n")
            if lead:
                # The separator travels with the new document's first piece, but the document (and
                # a validation split of whole documents) starts after it.
                text = "\n" + text
            texts.append(text)
            leads.append(lead)
            eots.append(eot and new_doc and not first)
            starts.append(new_doc)
            first, last_char, size = False, text[-1], size + len(text)
        if size >= CHUNK_CHARS:
            yield _Chunk(texts, eots, starts, leads, nbytes)
            texts, eots, starts, leads, size, nbytes = [], [], [], [], 0, 0
    if texts or nbytes:
        yield _Chunk(texts, eots, starts, leads, nbytes)


def _codepoints(text: str) -> np.ndarray:
    """The distinct characters of `text`, as sorted code points."""
    if text.isascii():
        return np.flatnonzero(np.bincount(np.frombuffer(text.encode("ascii"), dtype=np.uint8), minlength=128))
    return np.flatnonzero(np.bincount(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)))


_WORKER: dict = {}
_LIBC: object = None


def _release_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps what megabyte-sized strings leave behind
    once its mmap threshold has grown, so without this a long text file's pieces make RSS creep up
    (~200 MB after 750 MB of text; flat ~90 MB with this every 16 chunks). A no-op off glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


def _exit_with_parent() -> None:
    """A worker whose parent was killed (kill -9: no chance to shut the pool down) would wait for
    work forever, holding the parent's output pipes open: exit as soon as it is orphaned."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="gptforge-parent-watch").start()


def _worker_init(tokenizer_dir: str, dtype: str) -> None:
    """Runs in each worker process: one thread each (the workers are the parallelism). Ctrl-C is the
    parent's to handle: it stops reading, lets the workers finish their chunk and keeps the shards."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from gptforge.data import tokenizers

    tokenizers.MAX_THREADS = 1
    _WORKER.update(tok=load_tokenizer(tokenizer_dir), dtype=np.dtype(dtype))


def _encode_chunk(texts: list[str], eot_before: list[bool], doc_start: list[bool], leads: list[int]):
    """(tokens, document starts, characters, distinct code points) of one chunk."""
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    _WORKER["calls"] = _WORKER.get("calls", 0) + 1
    if _WORKER["calls"] % 16 == 0:
        _release_memory()
    parts, docs, pos = [], [], 0
    eot = np.array([tok.eot_id if tok.eot_id is not None else 0], dtype=dtype)
    for ids, sep, start, lead in zip(tok.encode_batch_arrays(texts), eot_before, doc_start, leads, strict=True):
        if sep:
            parts.append(eot)
            pos += 1
        if start:
            # A char corpus joins documents with a newline put before the new one's text: one
            # character, one token, not part of the document.
            docs.append(pos + lead)
        parts.append(ids.astype(dtype, copy=False))
        pos += len(ids)
    chars = sum(len(t) for t in texts)
    seen = np.unique(np.concatenate([_codepoints(t) for t in texts])) if texts else np.zeros(0, np.int64)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return tokens, np.array(docs, dtype=np.int64), chars, seen


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    # disable=None: a bar only on a terminal, never in logs or captured output.
    return tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None if enabled is None else not enabled, file=sys.stderr, smoothing=0.1)


def _encode_all(stream: CorpusStream, tok: Tokenizer, work: Path, request: str, shard_tokens: int,
                workers: int, progress: bool | None) -> list[dict]:
    """Tokenize the corpus into work/shards, keeping the finished shards of an interrupted run."""
    from collections import deque

    shards_dir = work / "shards"
    done = _finished_shards(shards_dir, request)
    skip = done[-1]["chunk_end"] if done else 0
    dtype = dtype_for(tok.vocab_size)
    writer = _ShardWriter(shards_dir, dtype, shard_tokens, request, index=len(done), chunk_start=skip)
    pending: deque = deque()
    executor = None
    if workers > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the workers share nothing with a parent that may hold torch's or tokenizers' threads.
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(str(work / "tokenizer"), dtype.str))
    else:
        _WORKER.update(tok=tok, dtype=dtype)
    ci = -1
    try:
        with _progress(stream.total_bytes, "tokenizing", progress) as bar:
            for ci, chunk in enumerate(_chunks(stream, eot=tok.eot_id is not None)):
                bar.update(chunk.nbytes)
                if ci % 16 == 0:
                    _release_memory()
                if ci < skip:
                    continue
                if executor is None:
                    writer.add(*_encode_chunk(chunk.texts, chunk.eot_before, chunk.doc_start, chunk.lead), ci)
                    continue
                pending.append((ci, executor.submit(_encode_chunk, chunk.texts, chunk.eot_before, chunk.doc_start,
                                                    chunk.lead)))
                while len(pending) > 2 * workers:  # bounded: the reader never runs far ahead
                    i, fut = pending.popleft()
                    writer.add(*fut.result(), i)
            while pending:
                i, fut = pending.popleft()
                writer.add(*fut.result(), i)
        writer.finish(ci + 1)
    except BaseException:
        writer.abort()
        raise
    finally:
        if executor is not None:
            for _, fut in pending:
                fut.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
        _WORKER.clear()
    return done + writer.finished


def _build_tokenizer(spec: str, stream: CorpusStream, vocab_size: int | None, sample_bytes: int,
                     progress: bool | None) -> Tokenizer:
    """gpt2 as is; char from one streaming pass over the characters; bpe trained on a bounded,
    seeded sample of the corpus (all of it when it is smaller than `sample_bytes`)."""
    from gptforge.data.tokenizers import BPETokenizer, CharTokenizer, split_for_batch

    if spec == "gpt2":
        return build_tokenizer("gpt2")
    if spec == "char":
        seen: set[int] = set()
        with _progress(stream.total_bytes, "characters", progress) as bar:
            for i, chunk in enumerate(_chunks(stream, eot=False)):
                bar.update(chunk.nbytes)
                if i % 16 == 0:
                    _release_memory()
                for t in chunk.texts:
                    seen.update(_codepoints(t).tolist())
        if not seen:
            raise GptforgeError(f"corpus {stream.name!r} holds no text; give some")
        return CharTokenizer([chr(c) for c in sorted(seen)])
    import heapq
    import random

    # Bottom-k sampling: every unit (<= 64K characters of one document) gets a seeded random key and
    # the sample is the units with the smallest keys that fit in sample_bytes, kept in corpus order.
    rng = random.Random(1337)
    heap: list[tuple[float, int, str, int]] = []  # (-key, index, text, bytes): a max-heap on the key
    total = 0
    index = 0
    with _progress(stream.total_bytes, "bpe sample", progress) as bar:
        for i, (text, _, consumed) in enumerate(stream.pieces()):
            bar.update(consumed)
            if i % 64 == 0:
                _release_memory()
            for unit in split_for_batch(text) if text else ():
                size = len(unit) if unit.isascii() else len(unit.encode("utf-8"))
                heapq.heappush(heap, (-rng.random(), index, unit, size))
                index += 1
                total += size
                while total > sample_bytes and len(heap) > 1:
                    total -= heapq.heappop(heap)[3]
    if not heap:
        raise GptforgeError(f"corpus {stream.name!r} holds no text; give some")
    sample = [unit for _, _, unit, _ in sorted(heap, key=lambda item: item[1])]
    del heap
    return BPETokenizer.train_from_texts(sample, vocab_size, length=len(sample))


# --------------------------------------------------------------------------------------------- prepare


@dataclass
class Prepared:
    """A prepared corpus: its tokens (memory-mapped shards; `train` and `val` read like 1-D token
    arrays, see ShardedTokens), meta.json's contents and the tokenizer."""

    dir: Path
    meta: dict
    train: np.ndarray | ShardedTokens
    val: np.ndarray | ShardedTokens | None
    tokenizer: Tokenizer
    reused: bool = field(default=False)
    seconds: float = 0.0


def _cache_key(name: str, sha256: str, spec: str, vocab_size: int | None, val_fraction: float | None,
               tokenizer_fingerprint: str | None, options: dict) -> str:
    request = {"format": DATA_FORMAT_VERSION, "sha256": sha256, "tokenizer": spec, "vocab_size": vocab_size,
               "val_fraction": val_fraction, "fingerprint": tokenizer_fingerprint, **options}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)[:40] or "corpus"
    return f"{name}-{spec}{vocab_size or ''}-{digest}"


def _fingerprint(tok: Tokenizer) -> str:
    """A hash of a given tokenizer's saved files, so another tokenizer never reuses its tokens."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        h = hashlib.sha256()
        for p in sorted(Path(d).iterdir()):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _check_length(n_train: int, n_val: int | None, block_size: int | None, where: str) -> None:
    """Enough tokens for one training window and (when split) one validation window."""
    need = (block_size or 1) + 1  # a window of inputs plus the next token as its last target
    if n_train < need or (n_val is not None and n_val < need):
        val = f" and {n_val:,} validation" if n_val is not None else ""
        # Only the validation split short: a larger fraction may be all it takes.
        hint = " or a larger validation fraction" if n_train >= need else ""
        raise GptforgeError(
            f"{where} is too short: {n_train:,} training{val} tokens, but each split needs at least "
            f"{need:,} (block size {block_size or 1} + 1); give more text or a smaller block size{hint}"
        )


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _meta_problem(meta: dict) -> str | None:
    """What makes a meta.json's index unusable (a damaged or hand-edited file), or None."""
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and _is_count(e.get("tokens")) for e in shards):
        return "its list of shards is damaged"
    for k in ("tokens", "train_tokens", "val_tokens", "vocab_size"):
        if not _is_count(meta.get(k)):
            return f"its {k} {meta.get(k)!r} is not a count"
    held = sum(e["tokens"] for e in shards)
    if meta["tokens"] != held:
        return f"it says {meta['tokens']:,} tokens, its shards {held:,}"
    if meta["train_tokens"] + meta["val_tokens"] != meta["tokens"]:
        return (f"its {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation tokens are not its "
                f"{meta['tokens']:,} tokens")
    if meta.get("dtype") != dtype_for(meta["vocab_size"]).name:
        return f"its dtype {meta.get('dtype')!r} is not the one for a vocabulary of {meta['vocab_size']:,}"
    return None


def _open_shards(d: Path, meta: dict) -> list[np.ndarray]:
    """The shards named in meta.json, memory-mapped; GptforgeError naming a damaged meta.json, or a
    missing or damaged shard (one whose header disagrees with its size or with meta.json)."""
    problem = _meta_problem(meta)
    if problem is not None:
        raise GptforgeError(f"{d / 'meta.json'} is damaged ({problem}); prepare the data again")
    shards = []
    for entry in meta["shards"]:
        arr = read_tokens(d / entry["file"])
        if len(arr) != entry["tokens"]:
            raise GptforgeError(f"token file {d / entry['file']} holds {len(arr):,} tokens, meta.json says "
                                f"{entry['tokens']:,}; prepare the data again")
        if arr.dtype.name != meta["dtype"]:
            raise GptforgeError(f"token file {d / entry['file']} holds {arr.dtype.name} tokens, meta.json says "
                                f"{meta['dtype']}; prepare the data again")
        shards.append(arr)
    return shards


def _check_tokenizer(d: Path, meta: dict, tok: Tokenizer) -> None:
    if tok.vocab_size != meta["vocab_size"] or tok.spec != meta.get("tokenizer"):
        raise GptforgeError(f"{d / 'meta.json'} says a {meta.get('tokenizer')} vocabulary of {meta['vocab_size']:,}, "
                            f"but {d / 'tokenizer'} is {tok.spec} with {tok.vocab_size:,}; prepare the data again")


def load_prepared(directory: str | os.PathLike) -> Prepared:
    """A prepared directory as it is (no source needed); GptforgeError when it is incomplete or damaged."""
    d = Path(directory)
    meta = _read_json(d / "meta.json")
    if meta is None or meta.get("format_version") != DATA_FORMAT_VERSION or "shards" not in meta:
        raise GptforgeError(f"{d} holds no complete prepared data (meta.json missing, damaged or of another "
                            "format); run gptforge prepare")
    shards = _open_shards(d, meta)
    tok = load_tokenizer(d / "tokenizer")
    _check_tokenizer(d, meta, tok)
    return _prepared(d, meta, shards, tok, reused=True)


def _prepared(d: Path, meta: dict, shards: list[np.ndarray], tok: Tokenizer, reused: bool) -> Prepared:
    b, n = meta["train_tokens"], meta["tokens"]
    val = token_view(shards, b, n) if meta["val_tokens"] else None
    return Prepared(dir=d, meta=meta, train=token_view(shards, 0, b), val=val, tokenizer=tok, reused=reused)


def _load_prepared(d: Path, expect: dict) -> Prepared | None:
    """The prepared data in `d` when meta.json matches `expect` and the files are intact, else None
    (then it is prepared again: the source is at hand). A shard that cannot be read at all (an I/O or
    permission error) is a GptforgeError: preparing again would not fix that."""
    meta = _read_json(d / "meta.json")
    if meta is None or any(meta.get(k) != v for k, v in expect.items()):
        return None
    if _meta_problem(meta) is None:
        for entry in meta["shards"]:
            p = d / entry["file"]
            if p.exists() and not os.access(p, os.R_OK) or p.is_dir():
                raise GptforgeError(f"cannot read token file {p}; check its permissions, or delete {d} and "
                                    "prepare again")
    try:
        shards = _open_shards(d, meta)
        tok = load_tokenizer(d / "tokenizer")
        _check_tokenizer(d, meta, tok)
    except GptforgeError as e:
        print(f"gptforge: {e.args[0].split('; prepare')[0]}; preparing it again", file=sys.stderr)
        return None
    return _prepared(d, meta, shards, tok, reused=True)


def _writable_dir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GptforgeError(f"cannot write to {d}: {e.strerror}; choose another --out directory "
                            "(or GPTFORGE_CACHE_DIR)") from None


@contextlib.contextmanager
def _locked(d: Path):
    """An exclusive lock on directory `d` (created if needed): two processes preparing the same data
    take turns; the second then finds the first one's result."""
    d.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; ranks are serialised by the trainer anyway
        yield
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _parse_size(value: int | str) -> int:
    """Bytes from 64000000, "64MB" (10^6) or "64MiB" (2^20)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(value).lower())
    if m is None:
        raise GptforgeError(f"size {value!r} is not understood; give bytes, e.g. 64000000, 64MB or 1GiB")
    power = " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def _choose_split(shards_dir: Path, shards: list[dict], n: int, target: int) -> tuple[int, str]:
    """Where validation starts: at the document boundary nearest to n - target when one lies within
    half the target of it (whole documents), else at exactly n - target (inside a document)."""
    want = n - target
    best = None
    offset = n
    for s in reversed(shards):
        offset -= s["tokens"]
        if offset + s["tokens"] < want - target // 2:
            break
        if offset > want + target // 2:
            continue
        info = _read_json(shards_dir / f"{s['name']}.json") or {}
        for start in info.get("documents", []):
            g = offset + start
            if 0 < g < n and abs(g - want) <= target // 2 and (best is None or abs(g - want) < abs(best - want)):
                best = g
    return (best, "documents") if best is not None else (want, "tokens")


def prepare(
    corpus: Corpus | str | Sequence[str] = "tinyshakespeare",
    tokenizer: str | Tokenizer = "gpt2",
    val_fraction: float = 0.1,
    out: str | os.PathLike | None = None,
    bpe_vocab_size: int | None = None,
    block_size: int | None = None,
    *,
    text_field: str = "text",
    val_tokens: int | None = None,
    bpe_sample_bytes: int | str | None = None,
    shard_tokens: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> Prepared:
    """Tokenize `corpus` into shards of token files (+ meta.json, tokenizer/) and memory-map them.

    The corpus is streamed: text files, .jsonl/.jsonl.gz and .parquet files (the `text_field` of
    each record is a document), `datasets` directories and `hf:NAME` (see `corpus.open_corpus`).
    Memory stays bounded whatever its size. Documents are separated by the tokenizer's end-of-text
    token where it has one (gpt2, bpe); `workers` processes tokenize (default: one per CPU, none
    for inputs under 16 MB). `bpe` trains on a seeded sample of at most `bpe_sample_bytes` (64 MB).

    Cached in $GPTFORGE_CACHE_DIR/tokens/<key> (or written to `out`) and reused when the source's
    sha256, the tokenizer and the options all match. An interrupted prepare keeps its finished
    shards and the next one continues from them. Validation is the end of the corpus: `val_tokens`
    tokens, else `val_fraction` of them (0: none), as whole documents when a document boundary lies
    near the cut. With `block_size`, each split must hold at least one window of `block_size + 1`.
    """
    start = time.perf_counter()
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise GptforgeError(f"val_fraction {val_fraction} is out of range; choose 0 <= fraction < 1 "
                            "(0 = no validation split)")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise GptforgeError(f"block size {block_size} is out of range; choose a positive integer")
    if val_tokens is not None and (not isinstance(val_tokens, int) or val_tokens < 1):
        raise GptforgeError(f"val_tokens {val_tokens} is out of range; choose a positive number of tokens")
    if shard_tokens is not None and (not isinstance(shard_tokens, int) or shard_tokens < 1):
        raise GptforgeError(f"shard_tokens {shard_tokens} is out of range; choose a positive integer")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise GptforgeError(f"workers {workers} is out of range; choose 0 (no worker processes) or more")
    # val_tokens, when given, decides the split alone: the fraction must not change the cache key.
    val_fraction = float(val_fraction) if val_tokens is None else None
    given = tokenizer if isinstance(tokenizer, Tokenizer) else None
    gpt2 = None
    if given is not None and given.spec == "gpt2":
        # GPT-2's BPE is fixed, so a GPT-2 tokenizer object keys the cache like the name "gpt2"; it is
        # still the one used, so a run's own copy of the ranks needs no data directory or network.
        gpt2, given, tokenizer = given, None, "gpt2"
    spec = given.spec if given is not None else check_spec(tokenizer)
    if bpe_vocab_size is not None and spec != "bpe":
        raise GptforgeError(f"a bpe vocabulary size only applies to --tokenizer bpe, not {spec!r}")
    if spec == "bpe" and given is None:
        bpe_vocab_size = check_bpe_vocab_size(BPE_VOCAB_DEFAULT if bpe_vocab_size is None else bpe_vocab_size)
    sample = _parse_size(BPE_SAMPLE_BYTES if bpe_sample_bytes is None else bpe_sample_bytes)
    if sample < 1:
        raise GptforgeError(f"bpe sample size {bpe_sample_bytes} is out of range; choose a positive size")

    stream = open_corpus(corpus, text_field)
    try:
        fingerprint = _fingerprint(given) if given is not None else None
        requested_vocab = bpe_vocab_size if spec == "bpe" and given is None else None
        # The sources listed key the data too: meta.json never names a file that is not what was read.
        options = {"text_field": text_field, "requested_val_tokens": val_tokens, "sources": stream.names,
                   "bpe_sample_bytes": sample if spec == "bpe" and given is None else None}
        key = _cache_key(stream.name, stream.sha256, spec, requested_vocab, val_fraction, fingerprint, options)
        d = Path(out).expanduser() if out is not None else cache_dir() / "tokens" / key
        expect = {"format_version": DATA_FORMAT_VERSION, "source_sha256": stream.sha256, "tokenizer": spec,
                  "requested_vocab_size": requested_vocab, "val_fraction": val_fraction,
                  "tokenizer_fingerprint": fingerprint, **options}

        found = _load_prepared(d, expect)
        if found is None and given is not None and out is None:
            # A run resumed with its saved char/bpe tokenizer: the entry built from the spec holds the
            # same tokens when its tokenizer is the same one.
            requested = (bpe_vocab_size or BPE_VOCAB_DEFAULT) if spec == "bpe" else None
            opts = {**options, "bpe_sample_bytes": sample if spec == "bpe" else None}
            spec_dir = cache_dir() / "tokens" / _cache_key(stream.name, stream.sha256, spec, requested,
                                                           val_fraction, None, opts)
            theirs = _load_prepared(spec_dir, {**expect, "requested_vocab_size": requested,
                                               "tokenizer_fingerprint": None, **opts})
            if theirs is not None and _fingerprint(theirs.tokenizer) == fingerprint:
                found = theirs
        if found is None:
            if workers is None:
                small = stream.total_bytes < _IN_PROCESS_BYTES and all(s.kind != "hub" for s in stream.sources)
                workers = 0 if small else min(os.cpu_count() or 1, 8)
            found = _prepare_new(stream, d, out is not None, key, spec, given or gpt2, requested_vocab, sample,
                                 expect, val_fraction, val_tokens, block_size, shard_tokens or SHARD_TOKENS,
                                 workers, progress)
        else:
            n_val = found.meta["val_tokens"] if val_fraction or val_tokens else None
            _check_length(found.meta["train_tokens"], n_val, block_size, f"corpus {stream.name!r}")
        found.seconds = time.perf_counter() - start
        return found
    finally:
        stream.close()


_OURS = ("meta.json", "shards", "tokenizer", "train.bin", "val.bin", ".prepare.json")


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _prepare_new(stream: CorpusStream, d: Path, is_out: bool, key: str, spec: str, given: Tokenizer | None,
                 requested_vocab: int | None, sample: int, expect: dict, val_fraction: float | None,
                 val_tokens: int | None, block_size: int | None, shard_tokens: int, workers: int,
                 progress: bool | None) -> Prepared:
    """Build the data in a work directory (`out/.partial`, or `.KEY.partial` beside the cache entry),
    then publish it. On an error the work directory is removed; on Ctrl-C it stays to be resumed."""
    if is_out:
        created = not d.exists()
        _writable_dir(d)
        work = d / ".partial"
    else:
        created = False
        _writable_dir(d.parent)
        work = d.parent / f".{d.name}.partial"
    request = hashlib.sha256(json.dumps({**expect, "shard_tokens": shard_tokens}, sort_keys=True).encode()).hexdigest()
    try:
        with _locked(work):
            if not is_out:
                theirs = _load_prepared(d, expect)
                if theirs is not None:  # another process prepared it while we waited for the lock
                    shutil.rmtree(work, ignore_errors=True)
                    return theirs
            state = _read_json(work / ".prepare.json")
            tok = None
            if state is not None and state.get("request") == request:
                try:
                    tok = load_tokenizer(work / "tokenizer")
                except GptforgeError:
                    tok = None
            if tok is None:  # a fresh start: nothing here belongs to this request
                for name in _OURS:
                    _remove(work / name)
                tok = given if given is not None else _build_tokenizer(spec, stream, requested_vocab, sample,
                                                                       progress)
                tmp = work / f".tokenizer.tmp{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tok.save(tmp)
                os.replace(tmp, work / "tokenizer")
                _write_json(work / ".prepare.json", {"request": request, "expect": expect})
            shards = _encode_all(stream, tok, work, request, shard_tokens, workers, progress)
            n = sum(s["tokens"] for s in shards)
            if val_tokens is not None or val_fraction:
                target = val_tokens if val_tokens is not None else int(n * (val_fraction or 0))
                target = min(target, n)
                b, by = _choose_split(work / "shards", shards, n, target) if 0 < target < n else (n - target,
                                                                                                  "tokens")
                n_val: int | None = n - b
            else:
                b, by, n_val = n, "none", None
            _check_length(b, n_val, block_size, f"corpus {stream.name!r} ({n:,} {spec} tokens)")
            meta = _meta(stream, spec, requested_vocab, tok, expect, shards, n, b, by, key, work / "shards")
            _write_json(work / "meta.json", meta)
            (work / ".prepare.json").unlink()
            return _publish(work, d, is_out, expect, meta, tok)
    except KeyboardInterrupt:
        raise  # finished shards stay in the work directory; the next prepare continues from them
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        if is_out and created and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
        if isinstance(e, OSError):
            raise GptforgeError(f"cannot write prepared data to {d}: {e.strerror}; free some space or "
                                "choose another --out directory") from None
        raise


def _meta(stream: CorpusStream, spec: str, requested_vocab: int | None, tok: Tokenizer, expect: dict,
          shards: list[dict], n: int, b: int, by: str, key: str, shards_dir: Path) -> dict:
    codepoints: set[int] = set()
    for s in shards:
        codepoints.update(s["codepoints"])
    val_docs = 0
    if by == "documents":
        offset = n
        for s in reversed(shards):
            offset -= s["tokens"]
            if offset + s["tokens"] <= b:
                break
            info = _read_json(shards_dir / f"{s['name']}.json") or {}
            val_docs += sum(1 for start in info.get("documents", []) if offset + start >= b)
    return {
        **expect,
        "corpus": stream.name,
        "sources": stream.names,
        "characters": sum(s["characters"] for s in shards),
        "distinct_characters": len(codepoints),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype_for(tok.vocab_size).name,
        "tokens": n,
        "documents": sum(s["documents"] for s in shards),
        "train_tokens": b,
        "val_tokens": n - b,
        "val_split": {"by": by, "documents": val_docs},
        "shards": [{"file": f"shards/{s['name']}.bin", "tokens": s["tokens"], "documents": s["documents"]}
                   for s in shards],
        "key": key,
    }


def _publish(work: Path, d: Path, is_out: bool, expect: dict, meta: dict, tok: Tokenizer) -> Prepared:
    """Move a finished work directory into place; meta.json, the mark of complete data, comes last."""
    if is_out:
        (d / "meta.json").unlink(missing_ok=True)  # whatever was here is no longer trusted
        for name in _OURS:
            if name != "meta.json":
                _remove(d / name)
        os.replace(work / "shards", d / "shards")
        os.replace(work / "tokenizer", d / "tokenizer")
        os.replace(work / "meta.json", d / "meta.json")
        shutil.rmtree(work, ignore_errors=True)
    else:
        if d.exists():  # a stale entry: its meta.json did not match, or its files were damaged
            shutil.rmtree(d, ignore_errors=True)
        try:
            os.rename(work, d)
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
            theirs = _load_prepared(d, expect)
            if theirs is None:
                raise GptforgeError(f"cannot publish prepared data at {d}; remove it and prepare again") from None
            return theirs
    return _prepared(d, meta, _open_shards(d, meta), tok, reused=False)


# --------------------------------------------------------------------------------------------- batches


class BatchSampler:
    """Training windows from a token array, reproducible from (seed, position) and resumable.

    Each `next_batch()` draws one global batch of `batch_size * world_size` windows and returns this
    rank's `batch_size` rows, so N ranks with batch B see exactly what one process with batch N*B sees.
    `random`: window starts drawn uniformly, a pure function of (seed, step). `sequential`:
    non-overlapping windows in order, wrapping at the end; `epoch` counts the wraps.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, mode: str = "random",
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if mode not in ("random", "sequential"):
            raise GptforgeError(f"unknown sampler mode {mode!r}; choose random or sequential")
        if batch_size < 1 or block_size < 1:
            raise GptforgeError(f"batch size {batch_size} and block size {block_size} must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise GptforgeError(f"rank {rank} is out of range for world size {world_size}")
        if len(tokens) < block_size + 1:
            raise GptforgeError(f"{len(tokens):,} tokens cannot hold one window of block size {block_size} "
                                "(needs block size + 1); give more text or a smaller block size")
        self.tokens = tokens
        self.batch_size, self.block_size = batch_size, block_size
        self.mode, self.seed = mode, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0          # global batches drawn so far
        self.windows_seen = 0  # sequential mode: global windows consumed so far
        self._offsets = np.arange(block_size + 1, dtype=np.int64)
        self.num_windows = (len(tokens) - 1) // block_size  # non-overlapping windows (sequential)

    @property
    def epoch(self) -> int:
        """Completed passes over the tokens (sequential mode; 0 in random mode)."""
        return self.windows_seen // self.num_windows if self.mode == "sequential" else 0

    def _global_starts(self) -> np.ndarray:
        n = self.batch_size * self.world_size
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, self.step])
            return rng.integers(0, len(self.tokens) - self.block_size, size=n, dtype=np.int64)
        index = (self.windows_seen + np.arange(n, dtype=np.int64)) % self.num_windows
        self.windows_seen += n
        return index * self.block_size

    def next_batch(self):
        """(x, y): int64 CPU tensors of shape (batch_size, block_size), y = x shifted by one token."""
        import torch

        starts = self._global_starts()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.step += 1
        buf = self.tokens[starts[:, None] + self._offsets].astype(np.int64)  # (B, T+1), fancy indexing
        # Contiguous, as callers flatten them with .view(-1); copied in numpy, which is ~10x faster
        # than torch's .contiguous() for this on a CPU.
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        return x, y

    def state_dict(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "step": self.step, "windows_seen": self.windows_seen,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise GptforgeError(f"sampler state is for mode {state.get('mode')!r}, not {self.mode!r}; "
                                "resume with the same data settings")
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self.windows_seen = int(state["windows_seen"])
