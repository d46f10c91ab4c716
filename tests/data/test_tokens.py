"""Token files, prepare() caching and invalidation, and BatchSampler."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch

from gptforge.data import tokens as tokens_mod
from gptforge.data.corpus import cache_dir, load_corpus
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


def test_cache_entries_appear_whole_even_when_two_processes_race(tmp_path, monkeypatch):
    src = tmp_path / "c.txt"
    src.write_text("to be or not to be " * 40, encoding="utf-8")
    real_rename = tokens_mod.os.rename

    def other_process_wins(a, b):
        shutil.copytree(a, b)  # another rank published the same entry a moment before us
        return real_rename(a, b)

    monkeypatch.setattr(tokens_mod.os, "rename", other_process_wins)
    data = prepare(str(src), tokenizer="char")
    monkeypatch.setattr(tokens_mod.os, "rename", real_rename)
    assert data.reused and data.tokenizer.decode(data.train[:6].tolist()) == "to be "
    assert [p.name for p in (cache_dir() / "tokens").iterdir()] == [data.dir.name]  # no temp dirs left

    # A stale entry (damaged meta.json) is replaced whole.
    (data.dir / "meta.json").write_text("{", encoding="utf-8")
    again = prepare(str(src), tokenizer="char")
    assert not again.reused and again.dir == data.dir
    assert [p.name for p in (cache_dir() / "tokens").iterdir()] == [data.dir.name]
    assert prepare(str(src), tokenizer="char").reused


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
    real_finish = tokens_mod._ShardWriter.finish

    def disk_full(self, chunk_end):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokens_mod._ShardWriter, "finish", disk_full)
    with pytest.raises(GptforgeError, match="No space left on device"):
        prepare(str(src), tokenizer="char", out=out)
    assert not out.exists()
    monkeypatch.setattr(tokens_mod._ShardWriter, "finish", real_finish)

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
