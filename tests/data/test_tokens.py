"""Token files, prepare() caching and invalidation, and BatchSampler."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge.data import encode, pipeline
from gptforge.data.corpus import cache_dir, load_corpus
from gptforge.data.shards import _ShardWriter
from gptforge.data.tokenizers import build_tokenizer, load_tokenizer
from gptforge.data.tokens import HEADER_BYTES, MAGIC, BatchSampler, prepare, read_tokens, write_tokens
from gptforge.errors import GptforgeError

# --------------------------------------------------------------------------------------------- token files


@pytest.mark.parametrize(("vocab_size", "dtype", "code"), [(65, np.uint16, 2), (65536, np.uint16, 2),
                                                           (65537, np.uint32, 4), (100_000, np.uint32, 4)])
def test_header_and_dtype(tmp_path, vocab_size, dtype, code):
    ids = np.array([0, 1, vocab_size - 1, 7], dtype=np.int64)
    p = tmp_path / "t.bin"
    write_tokens(p, ids, vocab_size)
    raw = p.read_bytes()
    assert raw[:8] == MAGIC
    version, dtype_code, count = struct.unpack("<IIQ", raw[8:24])
    assert (version, dtype_code, count) == (1, code, 4)
    assert len(raw) == HEADER_BYTES + 4 * np.dtype(dtype).itemsize
    back = read_tokens(p)
    assert isinstance(back, np.memmap) and back.dtype == dtype
    assert back.tolist() == ids.tolist()
    assert [q.name for q in tmp_path.iterdir()] == ["t.bin"]  # no temporary file left


def test_damaged_token_files_are_refused(tmp_path):
    p = tmp_path / "t.bin"
    write_tokens(p, np.arange(100), 100)
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(GptforgeError, match="damaged"):
        read_tokens(p)
    p.write_bytes(b"junk" * 20)
    with pytest.raises(GptforgeError, match="not a gptforge token file"):
        read_tokens(p)
    with pytest.raises(ValueError):
        write_tokens(p, np.array([5, 100]), 100)  # an id outside the vocabulary is a bug


# --------------------------------------------------------------------------------------------- prepare


def test_prepare_gpt2_shakespeare(data_dir):
    data = prepare("tinyshakespeare", tokenizer="gpt2", block_size=1024)
    m = data.meta
    assert data.dir.parent == cache_dir() / "tokens"
    assert (m["tokens"], m["vocab_size"], m["eot_id"], m["dtype"]) == (338_025, 50257, 50256, "uint16")
    assert (m["train_tokens"], m["val_tokens"]) == (338_025 - 33_802, 33_802)  # val = last 10%
    assert m["source_sha256"].startswith("86c4e6aa9db7") and m["characters"] == 1_115_394
    assert len(data.train) == m["train_tokens"] and len(data.val) == m["val_tokens"]
    assert isinstance(data.train, np.memmap) and not data.reused  # one shard: the memory map itself
    # The split is at the end: train + val is the one-shot encoding, in order.
    text = load_corpus("tinyshakespeare").text
    ids = data.tokenizer.encode(text)
    assert data.train[:50].tolist() == ids[:50] and data.val[-50:].tolist() == ids[-50:]
    assert sorted(p.name for p in data.dir.iterdir()) == ["meta.json", "shards", "tokenizer"]
    assert json.loads((data.dir / "meta.json").read_text()) == m
    assert m["shards"] == [{"file": "shards/00000.bin", "tokens": 338_025, "documents": 1}]
    assert m["documents"] == 1 and m["val_split"] == {"by": "tokens", "documents": 0}  # one document: cut


def test_cache_reuse_and_invalidation(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    first = prepare(str(src), tokenizer="char")
    again = prepare(str(src), tokenizer="char")
    assert again.reused and again.dir == first.dir
    assert again.train.tolist() == first.train.tolist()

    # Anything in the key changes the directory and prepares again, never reusing stale tokens.
    assert not prepare(str(src), tokenizer="char", val_fraction=0.2).reused
    assert not prepare(str(src), tokenizer="bpe", bpe_vocab_size=300).reused
    assert not prepare(str(src), tokenizer="bpe", bpe_vocab_size=301).reused
    src.write_text("a different corpus! " * 60, encoding="utf-8")
    changed = prepare(str(src), tokenizer="char")
    assert not changed.reused and changed.dir != first.dir
    assert changed.tokenizer.decode(changed.train[:20].tolist()) == "a different corpus! "


def test_cache_entries_appear_whole_when_another_process_publishes_first(tmp_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("to be or not to be " * 40, encoding="utf-8")
    real_rename = pipeline.os.rename

    def other_process_wins(a, b):
        shutil.copytree(a, b)  # another rank published the same entry a moment before us
        return real_rename(a, b)

    monkeypatch.setattr(pipeline.os, "rename", other_process_wins)
    data = prepare(str(src), tokenizer="char")
    monkeypatch.setattr(pipeline.os, "rename", real_rename)
    assert data.reused and data.tokenizer.decode(data.train[:6].tolist()) == "to be "
    assert [p.name for p in (cache_dir() / "tokens").iterdir()] == [data.dir.name]  # no temp dirs left

    # A stale entry (damaged meta.json) is replaced whole.
    (data.dir / "meta.json").write_text("{", encoding="utf-8")
    again = prepare(str(src), tokenizer="char")
    assert not again.reused and again.dir == data.dir
    assert [p.name for p in (cache_dir() / "tokens").iterdir()] == [data.dir.name]
    assert prepare(str(src), tokenizer="char").reused


# A child that prepares the corpus sys.argv[1] into the shared cache. "first" holds the prepare lock until
# the Linux kernel shows "second" blocked on it (/proc/locks); "second" starts once "first" holds the lock.
_PREPARE_CHILD = """
import json, sys, time
from pathlib import Path
from gptforge.data import pipeline

src, marks, role = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

def until(cond):
    give_up = time.monotonic() + 60  # only so that a missing lock fails the test instead of hanging it
    while not cond():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True

def second_is_waiting():
    pid = (marks / "second.pid").read_text()
    rows = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
    return any(len(r) > 5 and r[1] == "->" and r[2] == "FLOCK" and r[5] == pid for r in rows)

if role == "first":
    real = pipeline._encode_all
    def encode_all(*args, **kwargs):
        (marks / "first-holds-the-lock").touch()
        if until(lambda: (marks / "second.pid").exists()) and until(second_is_waiting):
            (marks / "second-waited").touch()
        return real(*args, **kwargs)
    pipeline._encode_all = encode_all
else:
    until(lambda: (marks / "first-holds-the-lock").exists())
data = pipeline.prepare(src, tokenizer="char")
print(json.dumps({"reused": data.reused, "dir": str(data.dir), "n": len(data.train), "head": data.train[:40].tolist()}))
"""


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux's /proc/locks to see a process wait")
def test_two_processes_preparing_the_same_data_take_turns(tmp_path):
    """Two real processes prepare the same corpus into one cache at once: the second waits on the lock
    while the first encodes, then takes the first one's entry; one entry, no work directory left."""
    src, marks = tmp_path / "c.txt", tmp_path / "marks"
    src.write_text("to be or not to be, that is the question " * 200, encoding="utf-8")
    marks.mkdir()
    repo_src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo_src, os.environ.get("PYTHONPATH")]))}
    procs = {}
    try:
        for role in ("first", "second"):
            procs[role] = subprocess.Popen([sys.executable, "-c", _PREPARE_CHILD, str(src), str(marks), role],
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        (marks / "second.pid").write_text(str(procs["second"].pid))
        outs = {role: p.communicate(timeout=300) for role, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for role, p in procs.items():
        assert p.returncode == 0, f"{role}: {outs[role][1][-3000:]}"
    first, second = (json.loads(outs[role][0].strip().splitlines()[-1]) for role in ("first", "second"))
    assert (marks / "second-waited").exists()  # they really overlapped: the second blocked on the lock
    assert (first["reused"], second["reused"]) == (False, True)  # encoded once, by the first
    assert first["dir"] == second["dir"] and first["n"] == second["n"] > 0 and first["head"] == second["head"]
    assert [p.name for p in (cache_dir() / "tokens").iterdir()] == [Path(first["dir"]).name]  # no work dirs


def test_out_dir_is_rewritten_when_meta_does_not_match(tmp_path):
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "out"
    a.write_text("abc " * 300, encoding="utf-8")
    b.write_text("xyz " * 300, encoding="utf-8")
    assert prepare(str(a), tokenizer="char", out=out).dir == out
    assert prepare(str(a), tokenizer="char", out=out).reused
    data = prepare(str(b), tokenizer="char", out=out)
    assert not data.reused and data.meta["source_sha256"] == load_corpus(str(b)).sha256
    assert data.tokenizer.decode(data.train[:4].tolist()) == "xyz "
    assert data.val is not None and data.meta["val_tokens"] == 120
    no_val = prepare(str(b), tokenizer="char", out=out, val_fraction=0)
    assert not no_val.reused and no_val.val is None and no_val.meta["val_tokens"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "shards", "tokenizer"]  # nothing stale


def test_interrupted_or_damaged_prepare_is_not_trusted(tmp_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("hello world, " * 200, encoding="utf-8")
    out = tmp_path / "out"

    # A crash while finishing a shard: an error, and nothing left that a later run would trust.
    real_finish = _ShardWriter.finish

    def disk_full(self, chunk_end):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_ShardWriter, "finish", disk_full)
    with pytest.raises(GptforgeError, match="No space left on device"):
        prepare(str(src), tokenizer="char", out=out)
    assert not out.exists()
    monkeypatch.setattr(_ShardWriter, "finish", real_finish)

    data = prepare(str(src), tokenizer="char", out=out)
    (out / "meta.json").unlink()  # as if killed before the last rename
    assert not prepare(str(src), tokenizer="char", out=out).reused
    data = prepare(str(src), tokenizer="char", out=out)
    assert data.reused
    shard = out / "shards" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    again = prepare(str(src), tokenizer="char", out=out)
    assert not again.reused and len(again.train) == again.meta["train_tokens"]


def test_val_fraction_zero_and_validation(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("some text " * 100, encoding="utf-8")
    data = prepare(str(src), tokenizer="char", val_fraction=0, out=tmp_path / "o")
    assert data.val is None and data.meta["val_tokens"] == 0 and len(data.train) == 1000
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(GptforgeError, match="val_fraction .* out of range"):
            prepare(str(src), tokenizer="char", val_fraction=bad)


def test_too_short_for_a_window(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("x" * 1000, encoding="utf-8")  # 900 train + 100 val char tokens
    assert prepare(str(src), tokenizer="char", block_size=99).meta["val_tokens"] == 100
    with pytest.raises(GptforgeError, match="too short: 900 training and 100 validation tokens.*at least 101"
                       ".*larger validation fraction"):
        prepare(str(src), tokenizer="char", block_size=100)  # same cache entry: checked on reuse too
    with pytest.raises(GptforgeError, match="too short: 1,000 training tokens.*at least 1,001.*block size$"):
        prepare(str(src), tokenizer="char", block_size=1000, val_fraction=0)
    with pytest.raises(GptforgeError, match="too short"):
        prepare(str(src), tokenizer="char", block_size=100, val_fraction=0.05, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_prepare_with_a_tokenizer_object(tmp_path, shakespeare_text):
    tok = build_tokenizer("char", shakespeare_text)
    src = tmp_path / "c.txt"
    src.write_text("First Citizen:\nBefore we proceed\n" * 20, encoding="utf-8")
    data = prepare(str(src), tokenizer=tok, val_fraction=0)
    assert data.meta["vocab_size"] == 65 and data.tokenizer.chars == tok.chars
    assert prepare(str(src), tokenizer=tok, val_fraction=0).reused
    # The corpus's own char tokenizer has a smaller alphabet: a different key, never the same tokens.
    own = prepare(str(src), tokenizer="char", val_fraction=0)
    assert not own.reused and own.meta["vocab_size"] < 65
    # A resumed run passes its saved tokenizer: when it is the one the spec built, that entry is reused.
    resumed = prepare(str(src), tokenizer=own.tokenizer, val_fraction=0)
    assert resumed.reused and resumed.dir == own.dir
    bpe = prepare(str(src), tokenizer="bpe", bpe_vocab_size=300, val_fraction=0)
    reloaded = load_tokenizer(bpe.dir / "tokenizer")
    assert prepare(str(src), tokenizer=reloaded, bpe_vocab_size=300, val_fraction=0).dir == bpe.dir
    gpt2 = prepare(str(src), tokenizer="gpt2", val_fraction=0)
    assert prepare(str(src), tokenizer=gpt2.tokenizer, val_fraction=0).dir == gpt2.dir


# --------------------------------------------------------------------------------------------- BatchSampler


def _tokens(n=1000):
    return np.arange(n, dtype=np.uint16)


def test_batches_are_windows_shifted_by_one():
    toks = _tokens()
    x, y = BatchSampler(toks, batch_size=4, block_size=16, seed=1).next_batch()
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == y.shape == (4, 16) and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row in x:  # each row is a contiguous window of the tokens
        assert row.tolist() == list(range(int(row[0]), int(row[0]) + 16))
    assert int(y.max()) <= 999


def test_random_mode_is_deterministic_and_resumable():
    toks = _tokens()
    a, b = BatchSampler(toks, 4, 8, seed=3), BatchSampler(toks, 4, 8, seed=3)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(p, b.next_batch()[0]) for p in batches_a)
    assert not torch.equal(BatchSampler(toks, 4, 8, seed=4).next_batch()[0], batches_a[0])

    s = BatchSampler(toks, 4, 8, seed=3)
    for _ in range(2):
        s.next_batch()
    state = s.state_dict()
    resumed = BatchSampler(toks, 4, 8, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is plain data
    for expected in batches_a[2:]:
        assert torch.equal(resumed.next_batch()[0], expected)
    with pytest.raises(GptforgeError, match="mode"):
        BatchSampler(toks, 4, 8, mode="sequential").load_state_dict(state)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_two_ranks_see_what_one_process_with_twice_the_batch_sees(mode):
    toks = _tokens(5000)
    single = BatchSampler(toks, 8, 16, mode=mode, seed=7)
    ranks = [BatchSampler(toks, 4, 16, mode=mode, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))


def test_sequential_walks_in_order_and_counts_epochs():
    toks = _tokens(41)  # (41 - 1) // 4 = 10 windows of 4 (+1 target)
    s = BatchSampler(toks, batch_size=3, block_size=4, mode="sequential")
    starts = []
    for _ in range(4):
        x, y = s.next_batch()
        starts += x[:, 0].tolist()
        assert torch.equal(y, x + 1)
    assert starts == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 0, 4]  # non-overlapping, wraps at the end
    assert s.epoch == 1
    state = s.state_dict()
    t = BatchSampler(toks, batch_size=3, block_size=4, mode="sequential")
    t.load_state_dict(state)
    assert t.epoch == 1 and t.next_batch()[0][:, 0].tolist() == [8, 12, 16]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(GptforgeError, match="cannot hold one window"):
        BatchSampler(_tokens(16), 2, 16)
    with pytest.raises(GptforgeError, match="rank 2 is out of range"):
        BatchSampler(_tokens(), 2, 8, rank=2, world_size=2)
    with pytest.raises(GptforgeError, match="unknown sampler mode"):
        BatchSampler(_tokens(), 2, 8, mode="shuffled")


def test_sampler_reads_a_prepared_memmap(tmp_path):
    p = tmp_path / "t.bin"
    write_tokens(p, np.arange(70_000) % 65_537, 65_537)  # uint32 file
    x, y = BatchSampler(read_tokens(p), 2, 32, seed=0).next_batch()
    assert x.dtype == torch.int64 and torch.equal(y[:, :-1], x[:, 1:])


# The tests below were added for mutants that survived `make mutate` (docs/testing.md).


def test_sampler_sizes_at_their_smallest_and_below():
    with pytest.raises(GptforgeError, match="batch size 0 and block size 8 must be positive"):
        BatchSampler(_tokens(), 0, 8)
    with pytest.raises(GptforgeError, match="batch size 2 and block size 0 must be positive"):
        BatchSampler(_tokens(), 2, 0)
    x, y = BatchSampler(_tokens(), 1, 1, seed=2).next_batch()  # one window of one token: allowed
    assert x.shape == y.shape == (1, 1) and int(y) == int(x) + 1
    # Exactly block size + 1 tokens hold one window, the whole array, in either mode.
    for mode in ("random", "sequential"):
        x, y = BatchSampler(_tokens(17), 2, 16, mode=mode).next_batch()
        assert x.tolist() == [list(range(16))] * 2 and y.tolist() == [list(range(1, 17))] * 2
    with pytest.raises(GptforgeError, match=r"cannot hold one window of block size 16 \(needs block size \+ 1\); "
                                            "give more text or a smaller block size"):
        BatchSampler(_tokens(16), 2, 16)


def test_random_starts_cover_every_window_and_no_more():
    toks = _tokens(40)
    s = BatchSampler(toks, 16, 8, seed=0)
    starts = set()
    for _ in range(40):
        x, y = s.next_batch()
        starts.update(x[:, 0].tolist())
    assert starts == set(range(40 - 8))  # 0 included, 31 (whose target is the last token) the largest


def test_random_batch_k_is_a_function_of_seed_and_k_alone():
    """What resume relies on: batch k of seed s is the same whether k batches were drawn before it or
    the sampler was loaded at step k; and no two steps repeat a batch."""
    toks = _tokens()
    s = BatchSampler(toks, 4, 8, seed=3)
    assert s.state_dict() == {"mode": "random", "seed": 3, "step": 0, "windows_seen": 0, "epoch": 0}
    batches = [s.next_batch()[0] for _ in range(4)]
    assert s.state_dict()["step"] == 4
    assert all(not torch.equal(a, b) for i, a in enumerate(batches) for b in batches[i + 1:])
    for k, expected in enumerate(batches):
        t = BatchSampler(toks, 4, 8, seed=0)
        t.load_state_dict({"mode": "random", "seed": 3, "step": k, "windows_seen": 0})
        assert torch.equal(t.next_batch()[0], expected), k
    default = BatchSampler(toks, 4, 8)  # the documented default seed is 0
    assert torch.equal(default.next_batch()[0], BatchSampler(toks, 4, 8, seed=0).next_batch()[0])


def test_sequential_windows_stay_inside_the_tokens_at_every_length():
    for n in range(9, 30):  # every remainder of (n - 1) % block_size
        s = BatchSampler(_tokens(n), 3, 4, mode="sequential")
        windows = (n - 1) // 4
        starts = []
        for _ in range(windows):  # three epochs' worth of windows
            x, y = s.next_batch()
            starts += x[:, 0].tolist()
            assert int(y.max()) <= n - 1 and torch.equal(y, x + 1)
        assert starts == [4 * (i % windows) for i in range(3 * windows)], n
        assert s.epoch == 3 and s.state_dict()["epoch"] == 3


def test_a_state_of_the_other_mode_is_refused_by_name():
    state = BatchSampler(_tokens(), 4, 8).state_dict()
    with pytest.raises(GptforgeError, match="^sampler state is for mode 'random', not 'sequential'; "
                                            "resume with the same data settings$"):
        BatchSampler(_tokens(), 4, 8, mode="sequential").load_state_dict(state)


# --------------------------------------------------------------------------------------------- shards, streaming

import gzip  # noqa: E402

from gptforge.data.tokens import ShardedTokens, load_prepared  # noqa: E402


def _jsonl(path, docs, field="text"):
    data = "".join(json.dumps({field: d}) + "\n" for d in docs).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _docs(shakespeare_text, n=40, size=2_000):
    """n different documents cut from Tiny Shakespeare."""
    return [shakespeare_text[i * size:(i + 1) * size].strip() for i in range(n)]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of ~1 KB of text, so that a few KB of corpus spread over several shards."""
    monkeypatch.setattr(encode, "CHUNK_CHARS", 1024)


def _expected_gpt2(tok, docs):
    """Each document's tokens, an end-of-text token between documents (none after the last)."""
    ids = []
    for i, d in enumerate(docs):
        ids += ([tok.eot_id] if i else []) + tok.encode(d)
    return ids


def test_documents_end_with_end_of_text_and_shards_round_trip(tmp_path, data_dir, shakespeare_text, small_chunks):
    docs = _docs(shakespeare_text)
    src = _jsonl(tmp_path / "docs.jsonl", docs)
    data = prepare(str(src), tokenizer="gpt2", shard_tokens=3_000, val_fraction=0.1, out=tmp_path / "o")
    m = data.meta
    expected = _expected_gpt2(data.tokenizer, docs)
    assert len(m["shards"]) >= 5 and all(s["tokens"] >= 3_000 for s in m["shards"][:-1])
    assert sum(s["tokens"] for s in m["shards"]) == m["tokens"] == len(expected)
    assert isinstance(data.train, ShardedTokens) and isinstance(data.val, ShardedTokens)
    assert data.train.tolist() + data.val.tolist() == expected  # train then val: the whole corpus in order
    assert expected.count(50256) == len(docs) - 1 and m["documents"] == len(docs)
    # Validation is whole documents from the end: it starts just after an end-of-text token.
    assert m["val_split"] == {"by": "documents", "documents": 4}
    assert data.train[-1] == 50256 and data.tokenizer.decode(data.val.tolist()).startswith(docs[-4])
    assert abs(m["val_tokens"] - 0.1 * m["tokens"]) < 0.05 * m["tokens"]
    # Reloaded without the source: the same tokens; each shard file is a token file of its own.
    again = load_prepared(tmp_path / "o")
    assert again.train.tolist() == data.train.tolist() and again.meta == m
    assert [len(read_tokens(tmp_path / "o" / s["file"])) for s in m["shards"]] == [s["tokens"] for s in m["shards"]]
    assert prepare(str(src), tokenizer="gpt2", shard_tokens=3_000, out=tmp_path / "o").reused


def test_val_tokens_and_char_streaming(tmp_path, shakespeare_text, small_chunks):
    docs = _docs(shakespeare_text, n=10)
    src = _jsonl(tmp_path / "docs.jsonl.gz", docs)
    data = prepare(str(src), tokenizer="char", val_tokens=2_000, shard_tokens=2_500)
    # No end-of-text token: documents are joined by a newline, as text files always were.
    joined = "\n".join(docs)
    assert data.tokenizer.decode(data.train.tolist() + data.val.tolist()) == joined
    assert data.meta["vocab_size"] == len(set(joined)) == data.meta["distinct_characters"]
    assert data.meta["characters"] == len(joined) and data.meta["eot_id"] is None
    # ~2,000 tokens as whole documents: the last one (its newline separator stays with train).
    assert data.meta["val_split"] == {"by": "documents", "documents": 1}
    assert data.tokenizer.decode(data.val.tolist()) == docs[-1] and data.meta["val_tokens"] == len(docs[-1])
    assert data.meta["requested_val_tokens"] == 2_000
    assert not prepare(str(src), tokenizer="char", val_tokens=3_000, shard_tokens=2_500).reused


class _Count:
    def __init__(self, monkeypatch):
        self.chunks = 0
        real = encode._encode_chunk

        def counting(*args):
            self.chunks += 1
            return real(*args)

        monkeypatch.setattr(encode, "_encode_chunk", counting)


@pytest.mark.parametrize("where", ["out", "cache"])
def test_an_interrupted_prepare_resumes_from_its_finished_shards(tmp_path, shakespeare_text, small_chunks,
                                                                  monkeypatch, where):
    docs = _docs(shakespeare_text)
    src = _jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "o" if where == "out" else None
    kwargs = dict(tokenizer="bpe", bpe_vocab_size=300, shard_tokens=4_000, out=out)
    reference = prepare(str(src), **{**kwargs, "out": tmp_path / "reference"})

    real_finish = _ShardWriter.finish
    finished = []

    def ctrl_c_after_three(self, chunk_end):
        if len(finished) == 3:
            raise KeyboardInterrupt
        real_finish(self, chunk_end)
        finished.append(self.index)

    monkeypatch.setattr(_ShardWriter, "finish", ctrl_c_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), **kwargs)
    monkeypatch.setattr(_ShardWriter, "finish", real_finish)
    work = out / ".partial" if out else next((cache_dir() / "tokens").glob(".*.partial"))
    assert sorted(p.name for p in (work / "shards").iterdir()) == [
        "00000.bin", "00000.json", "00001.bin", "00001.json", "00002.bin", "00002.json"]  # no half shard
    assert out is None or not (out / "meta.json").exists()

    # A half-written shard (as if killed mid-write) is not trusted: its .json never got written.
    (work / "shards" / "00002.json").unlink()
    # And a truncated one (a disk error) neither: only shard 00000 is kept.
    bin1 = work / "shards" / "00001.bin"
    bin1.write_bytes(bin1.read_bytes()[:-3])
    count = _Count(monkeypatch)
    data = prepare(str(src), **kwargs)
    resumed_chunks = count.chunks
    assert not data.reused and not work.exists()
    assert data.train.tolist() + data.val.tolist() == reference.train.tolist() + reference.val.tolist()
    assert data.meta["shards"] == reference.meta["shards"]
    # Only what the trusted shard did not hold was tokenized again, with the saved tokenizer.
    count.chunks = 0
    prepare(str(src), **{**kwargs, "out": tmp_path / "again"})
    assert 0 < resumed_chunks < count.chunks


def test_worker_processes_give_the_same_tokens(tmp_path, data_dir, shakespeare_text, small_chunks):
    src = _jsonl(tmp_path / "docs.jsonl", _docs(shakespeare_text, n=12))
    one = prepare(str(src), tokenizer="gpt2", workers=0, shard_tokens=2_000, out=tmp_path / "a")
    two = prepare(str(src), tokenizer="gpt2", workers=2, shard_tokens=2_000, out=tmp_path / "b")
    assert two.train.tolist() == one.train.tolist() and two.val.tolist() == one.val.tolist()
    assert {k: v for k, v in two.meta.items() if k != "key"} == {k: v for k, v in one.meta.items() if k != "key"}


def test_bpe_trains_on_a_bounded_seeded_sample(tmp_path, shakespeare_text, small_chunks):
    src = _jsonl(tmp_path / "docs.jsonl", _docs(shakespeare_text, n=40))
    full = prepare(str(src), tokenizer="bpe", bpe_vocab_size=400)
    sampled = prepare(str(src), tokenizer="bpe", bpe_vocab_size=400, bpe_sample_bytes="8kB")
    again = prepare(str(src), tokenizer="bpe", bpe_vocab_size=400, bpe_sample_bytes=8000, out=tmp_path / "o")
    assert sampled.meta["bpe_sample_bytes"] == 8000 and sampled.dir != full.dir
    assert again.tokenizer.hf.to_str() == sampled.tokenizer.hf.to_str()  # seeded: the same sample
    assert sampled.tokenizer.hf.to_str() != full.tokenizer.hf.to_str()
    # Trained on less text, it still encodes all of it, losslessly, separated by end-of-text.
    text = sampled.tokenizer.decode(sampled.train.tolist() + sampled.val.tolist())
    assert text == "<|endoftext|>".join(_docs(shakespeare_text, n=40))
    assert len(sampled.train) + len(sampled.val) > len(full.train) + len(full.val)  # fewer merges learned


def test_sharded_tokens_reads_like_an_array():
    shards = [np.arange(0, 5, dtype=np.uint16), np.arange(5, 12, dtype=np.uint16), np.arange(12, 20, dtype=np.uint16)]
    whole = np.arange(20)
    for start, stop in ((0, 20), (3, 17), (5, 12)):
        view, ref = ShardedTokens(shards, start, stop), whole[start:stop]
        assert len(view) == len(ref) and np.asarray(view).tolist() == ref.tolist()
        for a, b in ((0, 4), (1, 9), (-6, None), (None, -3), (4, 4), (0, 100), (8, 2)):
            assert view[a:b].tolist() == ref[a:b].tolist(), (start, stop, a, b)
        assert view[::3].tolist() == ref[::3].tolist() and view[-1] == ref[-1] and view[0] == ref[0]
        idx = np.array([[0, 1, len(ref) - 1], [2, len(ref) // 2, 3]])
        assert view[idx].tolist() == ref[idx].tolist()
        assert np.asarray(view[1:4], dtype=np.int64).dtype == np.int64
        with pytest.raises(IndexError):
            view[len(ref)]
    assert ShardedTokens(shards, 3, 17)[1:9].dtype == np.uint16


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_sampler_across_shards_matches_one_array_and_resumes_exactly(mode):
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 1000, size=n).astype(np.uint16) for n in (700, 300, 1000, 57)]
    whole = np.concatenate(shards)
    view = ShardedTokens(shards, 13, len(whole) - 5)
    a = BatchSampler(view, 8, 32, mode=mode, seed=5)
    b = BatchSampler(whole[13:-5], 8, 32, mode=mode, seed=5)
    batches = [a.next_batch() for _ in range(12)]  # sequential: more than one epoch
    for x, y in batches:
        bx, by = b.next_batch()
        assert torch.equal(x, bx) and torch.equal(y, by)
    state = BatchSampler(view, 8, 32, mode=mode, seed=5)
    for _ in range(7):
        state.next_batch()
    resumed = BatchSampler(view, 8, 32, mode=mode, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state.state_dict())))
    for x, y in batches[7:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_a_split_loss_across_shards_equals_one_array():
    from gptforge.model import GPT, GPTConfig
    from gptforge.train.runtime import setup_runtime
    from gptforge.train.trainer import split_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=100, dropout=0.0)).eval()
    rng = np.random.default_rng(1)
    shards = [rng.integers(0, 100, size=n).astype(np.uint16) for n in (50, 23, 80)]
    rt = setup_runtime("cpu", "float32")
    sharded = split_loss(model, ShardedTokens(shards, 10, 150), 16, 4, rt)
    flat = split_loss(model, np.concatenate(shards)[10:150], 16, 4, rt)
    assert sharded[1] == flat[1] == 139 and sharded[0] == pytest.approx(flat[0], abs=1e-6)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "datasets"])
def test_each_input_format_prepares_and_trains(tmp_path, shakespeare_text, kind):
    from gptforge.config import load_config
    from gptforge.train.trainer import train

    docs = _docs(shakespeare_text, n=12)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"body": docs}), src, row_group_size=5)
    elif kind == "datasets":
        datasets = pytest.importorskip("datasets")
        src = tmp_path / "saved"
        datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(src))
    else:
        src = _jsonl(tmp_path / f"docs.{kind}", docs, field="body")
    cfg = load_config(None, ["model.preset=tiny", "model.block_size=32", "data.tokenizer=bpe",
                             "data.bpe_vocab_size=300", "data.text_field=body", "data.val_tokens=1000",
                             "train.batch_size=4", "train.max_steps=3", "train.eval_every=3",
                             "train.eval_batches=1", "train.log_every=1", "train.device=cpu",
                             "train.dtype=float32", f"data.corpus={src}"])
    result = train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.step == 3 and any("val_loss" in r for r in records)
    data = prepare(str(src), tokenizer="bpe", bpe_vocab_size=300, text_field="body", val_tokens=1000)
    assert data.reused and data.meta["documents"] == 12 and data.tokenizer.eot_id == 0
    assert data.meta["val_split"]["by"] == "documents"
    assert data.train.tolist().count(0) + data.val.tolist().count(0) == 11  # between documents


def test_val_tokens_alone_keys_the_split(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("some text " * 300, encoding="utf-8")
    first = prepare(str(src), tokenizer="char", val_tokens=500, val_fraction=0.1)
    again = prepare(str(src), tokenizer="char", val_tokens=500, val_fraction=0.3)  # the fraction is ignored
    assert again.reused and again.dir == first.dir and len(again.val) == 500
    assert first.meta["val_fraction"] is None and first.meta["requested_val_tokens"] == 500


def test_a_corpus_object_prepares_like_its_file(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("in memory or on disk, the same tokens\n" * 40, encoding="utf-8")
    from_file = prepare(str(src), tokenizer="char", out=tmp_path / "a")
    from_memory = prepare(load_corpus(str(src)), tokenizer="char", out=tmp_path / "b")
    assert from_memory.train.tolist() == from_file.train.tolist() and from_memory.val.tolist() == from_file.val.tolist()
    assert from_memory.meta["source_sha256"] == from_file.meta["source_sha256"]
    assert from_memory.meta["sources"] == from_file.meta["sources"] == [str(src)]


def _split_then_merged(tmp_path):
    """texts/a.txt + texts/b.txt, and a function that rewrites them as texts/a.txt alone holding the same
    text, joined with the newline the text corpus puts between two files."""
    d = tmp_path / "texts"
    d.mkdir(parents=True)
    first, second = "First Citizen: we are accounted poor citizens. " * 8, "MENENIUS: what work's afoot? " * 8
    (d / "a.txt").write_text(first, encoding="utf-8")
    (d / "b.txt").write_text(second, encoding="utf-8")

    def merge():
        (d / "a.txt").write_text(first + "\n" + second, encoding="utf-8")
        (d / "b.txt").unlink()

    return d, merge


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_merged_files_are_not_the_split_files(tmp_path, data_dir, tokenizer):
    """Two files are two documents (an end-of-text token between them with gpt2): the same text as one
    file is another corpus, never served the two-file tokens, and its meta lists only the file there is."""
    d, merge = _split_then_merged(tmp_path)
    two = prepare(str(d), tokenizer=tokenizer, val_fraction=0, block_size=8)
    assert two.meta["documents"] == 2 and len(two.meta["sources"]) == 2
    merge()
    one = prepare(str(d), tokenizer=tokenizer, val_fraction=0, block_size=8)
    assert not one.reused and one.dir != two.dir
    assert one.meta["documents"] == 1 and one.meta["sources"] == [str((d / "a.txt").resolve())]
    assert one.train.tolist() == one.tokenizer.encode((d / "a.txt").read_text(encoding="utf-8"))
    if tokenizer == "gpt2":
        assert two.train.tolist().count(50256) == 1 and 50256 not in one.train.tolist()
    # The same in a directory of your choice (--out), which has no key in its name.
    out = tmp_path / "out"
    d2, merge2 = _split_then_merged(tmp_path / "again")
    prepare(str(d2), tokenizer=tokenizer, val_fraction=0, block_size=8, out=out)
    merge2()
    again = prepare(str(d2), tokenizer=tokenizer, val_fraction=0, block_size=8, out=out)
    assert not again.reused and again.meta["documents"] == 1 and len(again.meta["sources"]) == 1


def test_the_sources_listed_are_the_sources_read(tmp_path):
    """A file renamed (same bytes) is prepared again, so meta.json never names a file that is gone."""
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("to be or not to be " * 50, encoding="utf-8")
    first = prepare(str(d), tokenizer="char", block_size=8)
    (d / "a.txt").rename(d / "c.txt")
    second = prepare(str(d), tokenizer="char", block_size=8)
    assert not second.reused and second.meta["sources"] == [str((d / "c.txt").resolve())]
    assert second.train.tolist() == first.train.tolist()
    # A relative path names the same file as its absolute path: the same cache entry.
    import os

    os.chdir(tmp_path)
    try:
        assert prepare("texts", tokenizer="char", block_size=8).dir == second.dir
    finally:
        os.chdir("/")


def _lie_in_header(field: str, value):
    def damage(d):
        p = d / "shards" / "00000.bin"
        raw = bytearray(p.read_bytes())
        magic, version, code, count = struct.unpack("<8sIIQ", raw[:24])
        fields = {"magic": magic, "version": version, "code": code, "count": count}
        fields[field] = value(fields[field]) if callable(value) else value
        if field == "code" and fields["code"] == 4:  # a header that lies consistently: the size still fits
            fields["count"] //= 2
        raw[:24] = struct.pack("<8sIIQ", fields["magic"], fields["version"], fields["code"], fields["count"])
        p.write_bytes(bytes(raw))
    return damage


def _lie_in_meta(change):
    def damage(d):
        meta = json.loads((d / "meta.json").read_text())
        change(meta)
        (d / "meta.json").write_text(json.dumps(meta))
    return damage


def _truncate(n):
    def damage(d):
        p = d / "shards" / "00000.bin"
        p.write_bytes(p.read_bytes()[:n])
    return damage


DAMAGE = {
    "truncated in the header": (_truncate(20), "00000.bin is truncated"),
    "truncated in the tokens": (_truncate(-3), r"00000.bin is damaged \(\d+ bytes for 3800 tokens\)"),
    "count too large": (_lie_in_header("count", lambda c: c + 1), "00000.bin is damaged"),
    "count too small": (_lie_in_header("count", lambda c: c - 1), "00000.bin is damaged"),
    "dtype and count": (_lie_in_header("code", 4), "00000.bin holds 1,900 tokens, meta.json says 3,800"),
    "unknown dtype": (_lie_in_header("code", 3), "00000.bin has format 1/dtype 3"),
    "other version": (_lie_in_header("version", 9), "00000.bin has format 9/dtype 2"),
    "magic": (_lie_in_header("magic", b"NOTTOKS\x00"), "00000.bin is not a gptforge token file"),
    "meta: shard count": (_lie_in_meta(lambda m: m["shards"][0].update(tokens=3000)),
                          "meta.json is damaged .it says 3,800 tokens, its shards 3,000"),
    "meta: total": (_lie_in_meta(lambda m: m.update(tokens=3805)), "meta.json is damaged .it says 3,805 tokens"),
    "meta: train beyond the end": (_lie_in_meta(lambda m: m.update(train_tokens=3805)),
                                   "meta.json is damaged .its 3,805 train"),
    "meta: validation": (_lie_in_meta(lambda m: m.update(val_tokens=400)), "meta.json is damaged .its 3,420 train"),
    "meta: dtype": (_lie_in_meta(lambda m: m.update(dtype="uint32")), "meta.json is damaged .its dtype 'uint32'"),
    "meta: vocabulary": (_lie_in_meta(lambda m: m.update(vocab_size=99)), "meta.json says a char vocabulary of 99"),
    "meta: shard entry": (_lie_in_meta(lambda m: m["shards"][0].pop("file")), "meta.json is damaged .its list"),
    "meta: shards": (_lie_in_meta(lambda m: m.update(shards=5)), "meta.json is damaged .its list"),
    "meta: a count that is text": (_lie_in_meta(lambda m: m.update(train_tokens="3420")),
                                   "meta.json is damaged .its train_tokens '3420' is not a count"),
}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_shard_or_meta_is_refused_never_read(tmp_path, capsys, how):
    """Opened as it is (load_prepared), a damaged prepared directory is one error naming the file; with
    the source at hand, prepare says so and prepares it again, with the right tokens."""
    damage, message = DAMAGE[how]
    src = tmp_path / "a.txt"
    src.write_text("to be or not to be " * 200, encoding="utf-8")
    out = tmp_path / "out"
    good = prepare(str(src), tokenizer="char", block_size=8, out=out).train.tolist()
    damage(out)
    with pytest.raises(GptforgeError, match=message) as e:
        load_prepared(out)
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    again = prepare(str(src), tokenizer="char", block_size=8, out=out)
    err = capsys.readouterr().err
    assert not again.reused and again.train.tolist() == good and len(again.val) == 380
    assert "preparing it again" in err and str(out) in err and len(err.strip().splitlines()) == 1
