"""A golden run: the per-step losses of a fixed tiny float32 CPU run, recorded before refactors of the
trainer, must come out the same (to 1e-5: CPUs of another kind round float32 matmuls differently in
the last bits). Dropout, gradient accumulation and warm-up all take part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptforge.config import load_config
from gptforge.train.trainer import train

GOLDEN = Path(__file__).with_name("golden_losses.json")


def _config(corpus: Path, log_every: int):
    return load_config(None, [
        f"data.corpus={corpus}", "data.tokenizer=char", "model.preset=tiny", "model.n_layer=2", "model.n_embd=32",
        "model.block_size=32", "model.dropout=0.1", "train.batch_size=4", "train.grad_accum_steps=2",
        "train.device=cpu", "train.dtype=float32", "train.eval_batches=2", f"train.log_every={log_every}",
        "train.eval_every=10", "train.checkpoint_every=1000", "train.max_steps=20", "optim.warmup_steps=4",
        "optim.lr=3e-3", "train.seed=7"])


@pytest.mark.parametrize("log_every", [1, 3])
def test_golden_losses(tmp_path, shakespeare_text, read_metrics, log_every):
    """log_every=1 reads every step back; log_every=3 leaves most steps on the device: same numbers."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(shakespeare_text[:12_000], encoding="utf-8")
    train(_config(corpus, log_every), tmp_path / "run")
    golden = json.loads(GOLDEN.read_text())
    expected = {step: loss for step, loss in golden["train"]}
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run", "train")}
    assert set(got) == ({s for s in expected if s % log_every == 0} | {1, 20})
    assert all(got[s] == pytest.approx(expected[s], abs=1e-5) for s in got)
    evals = [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "run", "eval")]
    assert [s for s, _ in evals] == [s for s, _ in golden["eval"]]
    assert all(v == pytest.approx(g, abs=1e-5) for (_, v), (_, g) in zip(evals, golden["eval"], strict=True))
