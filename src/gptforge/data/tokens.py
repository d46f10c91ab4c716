"""Token files: prepare a corpus once into memory-mapped files, then draw training batches from them.

    from gptforge.data.tokens import prepare, BatchSampler
    data = prepare("tinyshakespeare", tokenizer="gpt2")             # cached in $GPTFORGE_CACHE_DIR/tokens/
    sampler = BatchSampler(data.train, batch_size=8, block_size=256, seed=1337)
    x, y = sampler.next_batch()                                      # int64 (8, 256); y is x shifted by one

A prepared directory holds train.bin and val.bin (a 32-byte header, then the tokens), meta.json and
tokenizer/. meta.json is written last: a directory without it (an interrupted prepare) is never
trusted, and one whose meta.json does not match the request is prepared again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptforge.data.corpus import Corpus, cache_dir, load_corpus
from gptforge.data.tokenizers import (
    BPE_VOCAB_DEFAULT,
    Tokenizer,
    build_tokenizer,
    check_bpe_vocab_size,
    check_spec,
    load_tokenizer,
)
from gptforge.errors import GptforgeError

FORMAT_VERSION = 1
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


# --------------------------------------------------------------------------------------------- prepare


@dataclass
class Prepared:
    """A prepared corpus: token arrays (memory-mapped), meta.json's contents and the tokenizer."""

    dir: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray | None
    tokenizer: Tokenizer
    reused: bool = field(default=False)
    seconds: float = 0.0


def _cache_key(corpus: Corpus, spec: str, vocab_size: int | None, val_fraction: float,
               tokenizer_fingerprint: str | None) -> str:
    request = {"format": FORMAT_VERSION, "sha256": corpus.sha256, "tokenizer": spec,
               "vocab_size": vocab_size, "val_fraction": val_fraction, "fingerprint": tokenizer_fingerprint}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", corpus.name)[:40] or "corpus"
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


def _same_tokenizer_entry(corpus: Corpus, given: Tokenizer, bpe_vocab_size: int | None,
                          val_fraction: float, fingerprint: str) -> Prepared | None:
    requested = (bpe_vocab_size or BPE_VOCAB_DEFAULT) if given.spec == "bpe" else None
    d = cache_dir() / "tokens" / _cache_key(corpus, given.spec, requested, val_fraction, None)
    expect = {"format_version": FORMAT_VERSION, "source_sha256": corpus.sha256, "tokenizer": given.spec,
              "requested_vocab_size": requested, "val_fraction": val_fraction, "tokenizer_fingerprint": None}
    found = _load_prepared(d, expect)
    if found is None or _fingerprint(found.tokenizer) != fingerprint:
        return None
    return found


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


def _load_prepared(d: Path, expect: dict) -> Prepared | None:
    """The prepared data in `d` when meta.json matches `expect` and the files are intact, else None."""
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expect.items()):
        return None
    try:
        train = read_tokens(d / "train.bin")
        val = read_tokens(d / "val.bin") if meta.get("val_tokens") else None
        tok = load_tokenizer(d / "tokenizer")
    except GptforgeError:
        return None
    if len(train) != meta.get("train_tokens") or (val is not None and len(val) != meta["val_tokens"]):
        return None
    if tok.vocab_size != meta.get("vocab_size"):
        return None
    return Prepared(dir=d, meta=meta, train=train, val=val, tokenizer=tok, reused=True)


def _writable_dir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GptforgeError(f"cannot write to {d}: {e.strerror}; choose another --out directory "
                            "(or GPTFORGE_CACHE_DIR)") from None


def prepare(
    corpus: Corpus | str | Sequence[str] = "tinyshakespeare",
    tokenizer: str | Tokenizer = "gpt2",
    val_fraction: float = 0.1,
    out: str | os.PathLike | None = None,
    bpe_vocab_size: int | None = None,
    block_size: int | None = None,
) -> Prepared:
    """Tokenize `corpus` into train.bin/val.bin (+ meta.json, tokenizer/) and memory-map them.

    Cached in $GPTFORGE_CACHE_DIR/tokens/<key> (or written to `out`) and reused when the source's
    sha256, the tokenizer, its vocabulary size and `val_fraction` all match. The last `val_fraction`
    of the tokens is the validation split (0: none). With `block_size`, each split must hold at least
    one window of `block_size + 1` tokens.
    """
    start = time.perf_counter()
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise GptforgeError(f"val_fraction {val_fraction} is out of range; choose 0 <= fraction < 1 "
                            "(0 = no validation split)")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise GptforgeError(f"block size {block_size} is out of range; choose a positive integer")
    val_fraction = float(val_fraction)
    given = tokenizer if isinstance(tokenizer, Tokenizer) else None
    if given is not None and given.spec == "gpt2":
        # GPT-2's BPE is fixed, so a GPT-2 tokenizer object keys the cache like the name "gpt2".
        given, tokenizer = None, "gpt2"
    spec = given.spec if given is not None else check_spec(tokenizer)
    if bpe_vocab_size is not None and spec != "bpe":
        raise GptforgeError(f"a bpe vocabulary size only applies to --tokenizer bpe, not {spec!r}")
    if spec == "bpe" and given is None:
        bpe_vocab_size = check_bpe_vocab_size(BPE_VOCAB_DEFAULT if bpe_vocab_size is None else bpe_vocab_size)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)

    fingerprint = _fingerprint(given) if given is not None else None
    requested_vocab = bpe_vocab_size if spec == "bpe" and given is None else None
    key = _cache_key(corpus, spec, requested_vocab, val_fraction, fingerprint)
    d = Path(out).expanduser() if out is not None else cache_dir() / "tokens" / key
    expect = {"format_version": FORMAT_VERSION, "source_sha256": corpus.sha256, "tokenizer": spec,
              "requested_vocab_size": requested_vocab, "val_fraction": val_fraction,
              "tokenizer_fingerprint": fingerprint}

    found = _load_prepared(d, expect)
    if found is None and given is not None and out is None:
        # A run resumed with its saved char/bpe tokenizer: the entry built from the spec holds the
        # same tokens when its tokenizer is the same one.
        found = _same_tokenizer_entry(corpus, given, bpe_vocab_size, val_fraction, fingerprint)
    if found is not None:
        _check_length(found.meta["train_tokens"], found.meta["val_tokens"] if val_fraction else None,
                      block_size, f"corpus {corpus.name!r}")
        found.seconds = time.perf_counter() - start
        return found

    tok = given if given is not None else build_tokenizer(spec, corpus.text, requested_vocab)
    ids = tok.encode_to_array(corpus.text)
    n_val = int(len(ids) * val_fraction) if val_fraction > 0 else None
    n_train = len(ids) - (n_val or 0)
    _check_length(n_train, n_val, block_size, f"corpus {corpus.name!r} ({len(ids):,} {spec} tokens)")
    dtype = dtype_for(tok.vocab_size)

    meta = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus.name,
        "sources": corpus.sources,
        "source_sha256": corpus.sha256,
        "characters": len(corpus.text),
        "distinct_characters": len(set(corpus.text)),
        "tokenizer": spec,
        "requested_vocab_size": requested_vocab,
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "tokens": int(len(ids)),
        "val_fraction": val_fraction,
        "train_tokens": int(n_train),
        "val_tokens": int(n_val or 0),
        "key": key,
    }
    if out is not None:
        _write_prepared(d, tok, ids, n_train, meta, created=not d.exists())
    else:
        theirs = _publish_to_cache(d, tok, ids, n_train, meta, expect)
        if theirs is not None:  # another process (e.g. another rank) published the same key first
            theirs.seconds = time.perf_counter() - start
            return theirs
    train = read_tokens(d / "train.bin")
    val = read_tokens(d / "val.bin") if n_val else None
    return Prepared(dir=d, meta=meta, train=train, val=val, tokenizer=tok, reused=False,
                    seconds=time.perf_counter() - start)


_STALE_TMP_SECONDS = 6 * 3600


def _publish_to_cache(d: Path, tok: Tokenizer, ids: np.ndarray, n_train: int, meta: dict,
                      expect: dict) -> Prepared | None:
    """Write a cache entry under a private temporary name, then rename it into place, so readers
    only ever see complete entries. Returns the other entry when another process won the race."""
    tmp = d.parent / f".{d.name}.tmp{os.getpid()}"
    for old in d.parent.glob(f".{d.name}.tmp*") if d.parent.is_dir() else ():
        # Left by a killed prepare; a live one touches its directory far more often than this.
        if time.time() - old.stat().st_mtime > _STALE_TMP_SECONDS:
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    _write_prepared(tmp, tok, ids, n_train, meta, created=True)
    if d.exists():  # a stale entry: its meta.json did not match, or its files were damaged
        shutil.rmtree(d, ignore_errors=True)
    try:
        os.rename(tmp, d)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        theirs = _load_prepared(d, expect)
        if theirs is None:
            raise GptforgeError(f"cannot publish prepared data at {d}; remove it and prepare again") from None
        return theirs
    return None


def _write_prepared(d: Path, tok: Tokenizer, ids: np.ndarray, n_train: int, meta: dict,
                    created: bool) -> None:
    """Write the files of a prepared directory, meta.json last; on failure remove what we wrote."""
    _writable_dir(d)
    # Whatever was here is no longer trusted from this moment on.
    (d / "meta.json").unlink(missing_ok=True)
    tok_tmp = d / f".tokenizer.tmp{os.getpid()}"
    try:
        shutil.rmtree(tok_tmp, ignore_errors=True)
        tok.save(tok_tmp)
        shutil.rmtree(d / "tokenizer", ignore_errors=True)
        os.replace(tok_tmp, d / "tokenizer")
        write_tokens(d / "train.bin", ids[:n_train], tok.vocab_size)
        if meta["val_tokens"]:
            write_tokens(d / "val.bin", ids[n_train:], tok.vocab_size)
        else:
            (d / "val.bin").unlink(missing_ok=True)
        tmp = d / f".meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, d / "meta.json")
    except OSError as e:
        shutil.rmtree(tok_tmp, ignore_errors=True)
        for name in ("train.bin", "val.bin", "tokenizer", "meta.json"):
            p = d / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if created:
            shutil.rmtree(d, ignore_errors=True)
        raise GptforgeError(f"cannot write prepared data to {d}: {e.strerror}; free some space or "
                            "choose another --out directory") from None


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
