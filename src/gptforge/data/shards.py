"""The on-disk token format: token files, the shards of a prepared directory, and reading one back.

    from gptforge.data.shards import load_prepared, read_tokens
    data = load_prepared("data/owt")                     # meta.json, shards/ and tokenizer/; no source
    ids = read_tokens("data/owt/shards/00000.bin")       # one token file, a read-only np.memmap

A token file is a 32-byte header (magic, format version, bytes per token, token count), then the
tokens: uint16 where the vocabulary fits, else uint32. A prepared directory holds shards/NNNNN.bin
(token files) with shards/NNNNN.json beside each (its token count, document starts and the input
chunks it came from), tokenizer/ and meta.json, the index: shards and their token counts, dtype,
tokenizer, source hash and where validation starts. The splits are ranges of the concatenated
shards: train is the first `train_tokens`, val the rest, each read as one array (ShardedTokens).
Making such a directory is data/pipeline.py's (prepare); this file writes and reads the files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptforge.data.tokenizers import Tokenizer, load_tokenizer
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


# --------------------------------------------------------------------------------------------- prepared directories


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
