"""prepare(): a corpus streamed once into a prepared directory of token shards, cached and resumable.

    from gptforge.data.pipeline import prepare
    data = prepare("tinyshakespeare", tokenizer="gpt2")             # cached in $GPTFORGE_CACHE_DIR/tokens/
    data = prepare("owt/", tokenizer="gpt2", out="data/owt")        # a folder of .jsonl.gz, any size

This file owns the request (the checked arguments, the cache key, the fields meta.json must match),
reusing a cached entry, the lock and the work directory, the validation split, meta.json and
publishing. meta.json is written last: a directory without it (an interrupted prepare) is never
trusted, and one whose meta.json does not match the request is prepared again. While a prepare runs,
its shards grow in a work directory (`.KEY.partial` beside the cache entry, `OUT/.partial` for --out),
each written under a temporary name and renamed when complete, so an interrupted prepare resumes
from its finished shards. The encoding is data/encode.py's, the files' format data/shards.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gptforge.data.corpus import Corpus, open_corpus
from gptforge.data.dirs import cache_dir
from gptforge.data.encode import _build_tokenizer, _encode_all
from gptforge.data.shards import (
    DATA_FORMAT_VERSION,
    Prepared,
    _check_tokenizer,
    _meta_problem,
    _open_shards,
    _prepared,
    _read_json,
    _write_json,
    dtype_for,
)
from gptforge.data.stream import CorpusStream
from gptforge.data.tokenizers import (
    BPE_VOCAB_DEFAULT,
    Tokenizer,
    check_bpe_vocab_size,
    check_spec,
    load_tokenizer,
)
from gptforge.errors import GptforgeError

SHARD_TOKENS = 1 << 25        # 64 MiB of uint16 per shard
BPE_SAMPLE_BYTES = 64 << 20   # text a bpe tokenizer is trained on, at most
_IN_PROCESS_BYTES = 16 << 20  # smaller corpora are encoded without starting worker processes


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
