"""Old import path of token files, prepare() and BatchSampler, which now live one concern per file:

    data/shards.py    the on-disk format: token files, shards, ShardedTokens, Prepared, load_prepared
    data/encode.py    tokenizing a corpus stream into shards, in worker processes
    data/pipeline.py  prepare(): the request, the cache, the lock, resuming, the split, publishing
    data/sampler.py   BatchSampler

`from gptforge.data.tokens import prepare, BatchSampler` keeps working. Tunables (CHUNK_CHARS,
SHARD_TOKENS, BPE_SAMPLE_BYTES) are not re-exported: set them on the module that reads them.
"""

from __future__ import annotations

from gptforge.data.pipeline import prepare
from gptforge.data.sampler import BatchSampler
from gptforge.data.shards import (
    DATA_FORMAT_VERSION,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    Prepared,
    ShardedTokens,
    dtype_for,
    load_prepared,
    read_tokens,
    token_view,
    write_tokens,
)

__all__ = ["DATA_FORMAT_VERSION", "FORMAT_VERSION", "HEADER_BYTES", "MAGIC", "BatchSampler", "Prepared",
           "ShardedTokens", "dtype_for", "load_prepared", "prepare", "read_tokens", "token_view", "write_tokens"]
