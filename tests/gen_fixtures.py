"""A tiny char-level run on a slice of Tiny Shakespeare, really trained, shared by the generation,
web and browser tests: trained once per test session into pytest's base temp directory, then reused.

tests/ is not a package and conftest.py is shared, so each test file loads this helper by path
(see the top of test_generate.py) and wraps `tiny_run` in a session fixture.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

SLICE_CHARS = 100_000  # enough text for ~60 steps of 16 x 64 tokens without much repetition
OVERRIDES = [
    "model.preset=tiny",  # 2 layers, 2 heads, 64 wide, context 64
    "data.tokenizer=char",
    "data.val_fraction=0.1",
    "optim.lr=5e-3",
    "optim.min_lr=5e-4",
    "optim.warmup_steps=10",
    "train.batch_size=16",
    "train.max_steps=120",
    "train.eval_every=60",
    "train.eval_batches=4",
    "train.checkpoint_every=60",
    "train.log_every=10",
    "train.device=cpu",
    "train.seed=1337",
]


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_tiny_run(base: Path, shakespeare_text: str) -> Path:
    """Train (once) and return BASE/shakespeare-char-tiny; a finished run is marked by BASE/done."""
    from gptforge.config import load_config
    from gptforge.train.trainer import train

    run = base / "shakespeare-char-tiny"
    if (base / "done").is_file():
        return run
    base.mkdir(parents=True, exist_ok=True)
    corpus = base / "shakespeare-slice.txt"
    corpus.write_text(shakespeare_text[:SLICE_CHARS], encoding="utf-8")
    config = load_config(None, [*OVERRIDES, f"data.corpus={corpus}"])
    # The session fixture runs before the per-test cache fixture: keep its cache inside BASE.
    # One thread: for a 0.1M-parameter model, syncing two threads costs more than it saves, and
    # far more on a machine whose cores are busy with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _env(GPTFORGE_CACHE_DIR=str(base / "cache")):
            train(config, run)
    finally:
        torch.set_num_threads(threads)
    (base / "done").write_text("ok\n")
    return run


def tiny_run(tmp_path_factory, shakespeare_text: str) -> Path:
    return make_tiny_run(tmp_path_factory.getbasetemp() / "gptforge-tiny-run", shakespeare_text)
