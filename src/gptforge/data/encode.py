"""Tokenizing a corpus stream into shards: the stream cut into chunks of ~1 MB of text, encoded by
worker processes (in this process for small inputs) while the reader stays at most 2 x workers chunks
ahead, and written in order into shards; and the pass over the stream that builds a char or bpe
tokenizer first. prepare() (data/pipeline.py) calls both; the shard files are data/shards.py's.

`_worker_init` and `_encode_chunk` run in spawned worker processes, which import them from this
module by name: they stay at module level.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptforge.data.shards import _finished_shards, _ShardWriter, dtype_for
from gptforge.data.stream import CorpusStream
from gptforge.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from gptforge.errors import GptforgeError

# Text per unit of work for a worker: big enough that inter-process traffic is noise, small enough
# that the few chunks in flight cost little memory.
CHUNK_CHARS = 1 << 20


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
