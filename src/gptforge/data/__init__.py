"""Data: corpora, tokenizers, token files and batch sampling.

    from gptforge.data import load_corpus, prepare, BatchSampler
    data = prepare(load_corpus("tinyshakespeare"), tokenizer="char", block_size=256)
    x, y = BatchSampler(data.train, batch_size=8, block_size=256).next_batch()
    big = prepare("owt/", tokenizer="gpt2", out="data/owt")   # .txt/.jsonl(.gz)/.parquet, streamed

Submodules are imported on first use, so `import gptforge.data` stays cheap.
"""

from __future__ import annotations

__all__ = ["BatchSampler", "Corpus", "Prepared", "ShardedTokens", "Tokenizer", "build_tokenizer", "load_corpus",
           "load_prepared", "load_tokenizer", "open_corpus", "prepare"]

_WHERE = {
    "Corpus": "corpus", "load_corpus": "corpus", "open_corpus": "corpus",
    "Tokenizer": "tokenizers", "build_tokenizer": "tokenizers", "load_tokenizer": "tokenizers",
    "BatchSampler": "sampler", "prepare": "pipeline",
    "Prepared": "shards", "ShardedTokens": "shards", "load_prepared": "shards",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"gptforge.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gptforge.data' has no attribute {name!r}")
