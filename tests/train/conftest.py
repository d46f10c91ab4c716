"""Fixtures for the trainer tests: a few KB of Tiny Shakespeare in a temp file and tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptforge.config import load_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small run fastest on one thread; two OpenMP threads on a busy 2-core machine
    spend ~100x longer waiting on each other than computing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, shakespeare_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(shakespeare_text[:12_000], encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tiny_corpus):
    """make(*overrides) -> Config: char tokenizer, the `tiny` preset shrunk further, float32 on the CPU."""

    def make(*overrides: str):
        base = [f"data.corpus={tiny_corpus}", "data.tokenizer=char", "model.preset=tiny", "model.n_layer=1",
                "model.n_embd=32", "model.block_size=32", "train.batch_size=4", "train.device=cpu",
                "train.dtype=float32", "train.eval_batches=2", "train.log_every=1", "train.eval_every=1000",
                "train.checkpoint_every=1000", "optim.warmup_steps=2", "optim.lr=3e-3"]
        return load_config(None, [*base, *overrides])

    return make


@pytest.fixture
def read_metrics():
    """read_metrics(run_dir, kind) -> the metrics.jsonl records of that kind ("train", "eval", "event")."""

    def read(run_dir: Path, kind: str) -> list[dict]:
        lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    return read


@pytest.fixture
def step_calls(monkeypatch):
    """The value of trainer.step at each Trainer.train_step call from here on, in this process: a resumed
    run that really continues from step N calls it with N, N+1, ...; one that started again from 0 does not."""
    from gptforge.train.trainer import Trainer

    calls: list[int] = []
    real = Trainer.train_step

    def counted(self):
        calls.append(self.step)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", counted)
    return calls


@pytest.fixture
def starts():
    """starts(run_dir) -> [(event, step)] of the run's started/resumed/restarted events in metrics.jsonl."""

    def read(run_dir: Path) -> list[tuple[str, int]]:
        lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [(r["event"], r["step"]) for r in map(json.loads, lines)
                if r["kind"] == "event" and r["event"] in ("started", "resumed", "restarted")]

    return read
