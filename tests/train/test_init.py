"""train.init: starting from Hugging Face GPT-2 weights or another gptforge run gives exactly the
loss those weights give on the trainer's first batch; mismatches are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptforge.config import load_config
from gptforge.errors import GptforgeError


def _corpus(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(text[:20_000], encoding="utf-8")
    return path


def _first_batch(config, block_size: int, tokenizer):
    """The trainer's first training batch: its sampler is seeded with train.seed."""
    from gptforge.data.tokens import BatchSampler, prepare

    data = prepare(config.data.corpus, tokenizer=tokenizer, val_fraction=config.data.val_fraction,
                   block_size=block_size)
    return BatchSampler(data.train, config.train.batch_size, block_size, seed=config.train.seed).next_batch()


def _first_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 1)


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)  # GPT-2's vocabulary
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_init_from_huggingface_gives_the_hf_models_first_step_loss(tmp_path, shakespeare_text, hf_dir):
    from transformers import GPT2LMHeadModel

    from gptforge.cli import main

    corpus = _corpus(tmp_path, shakespeare_text)
    # model.block_size = 32 < the weights' 64: fine-tuning at a shorter context crops the positions.
    overrides = ["model.preset=tiny", f"data.corpus={corpus}", "model.block_size=32", "train.max_steps=1",
                 "train.batch_size=4"]
    main(["train", "--init", str(hf_dir), "--out", str(tmp_path / "run"), *overrides])  # as a user types it
    config = load_config(None, [*overrides, f"train.init={hf_dir}"])

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x, y = _first_batch(config, 32, "gpt2")
    with torch.no_grad():
        logits = hf(x).logits  # (B, T, 50257)
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert _first_loss(tmp_path / "run") == pytest.approx(expected, abs=1e-4)
    # The run describes itself: its config holds the architecture that came from the weights.
    saved = load_config(tmp_path / "run" / "config.toml")
    assert (saved.model.n_layer, saved.model.n_head, saved.model.n_embd, saved.model.block_size) == (2, 2, 32, 32)


def test_init_mismatches_are_one_line_errors(tmp_path, shakespeare_text, hf_dir):
    from gptforge.train.init import prepare_init

    corpus = _corpus(tmp_path, shakespeare_text)
    base = ["model.preset=tiny", f"data.corpus={corpus}", f"train.init={hf_dir}"]
    with pytest.raises(GptforgeError) as e:
        prepare_init(load_config(None, [*base, "model.n_layer=3", "model.n_embd=64", "model.n_head=2"]))
    message = str(e.value)
    assert "model.n_layer = 3 (weights: 2)" in message and "model.n_embd = 64 (weights: 32)" in message
    assert "model.n_head" not in message and "\n" not in message
    with pytest.raises(GptforgeError, match="block_size = 128"):
        prepare_init(load_config(None, [*base, "model.block_size=128"]))
    with pytest.raises(GptforgeError, match='data.tokenizer = "gpt2"'):
        prepare_init(load_config(None, [*base, "data.tokenizer=char"]))
    with pytest.raises(GptforgeError, match="neither a gptforge run"):
        prepare_init(load_config(None, [*base[:2], f"train.init={tmp_path}"]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_init_from_a_gptforge_run_keeps_its_weights_and_tokenizer(tmp_path, shakespeare_text, dtype):
    from gptforge.train.checkpoint import load_model
    from gptforge.train.runtime import autocast
    from gptforge.train.trainer import train

    corpus = _corpus(tmp_path, shakespeare_text)
    common = ["model.preset=tiny", "model.n_layer=1", "model.n_embd=32", "model.block_size=32",
              "data.tokenizer=char", "train.batch_size=4", "train.eval_every=100", "train.device=cpu",
              f"train.dtype={dtype}"]
    train(load_config(None, [*common, f"data.corpus={corpus}", "train.max_steps=3"]), tmp_path / "a")

    # Fine-tune on a slice with fewer distinct characters: ids must keep run a's meaning.
    other = tmp_path / "other.txt"
    other.write_text(shakespeare_text[:3_000], encoding="utf-8")
    config = load_config(None, [*common, f"data.corpus={other}", f"train.init={tmp_path / 'a'}",
                                "train.max_steps=1", "data.val_fraction=0.2"])
    train(config, tmp_path / "b")

    model, tokenizer, _ = load_model(tmp_path / "a")
    x, y = _first_batch(config, 32, tokenizer)
    with torch.no_grad(), autocast(torch.device("cpu"), getattr(torch, dtype)):  # the precision it trained in
        _, loss = model(x, y)
    assert _first_loss(tmp_path / "b") == pytest.approx(loss.item(), abs=1e-5)
    assert (tmp_path / "b" / "tokenizer").is_dir()
    _, tokenizer_b, _ = load_model(tmp_path / "b")
    assert tokenizer_b.vocab_size == tokenizer.vocab_size
    assert tokenizer_b.encode("ROMEO:") == tokenizer.encode("ROMEO:")


def test_init_shapes_come_before_the_schedule_length(tmp_path, shakespeare_text):
    """With train.max_tokens, the schedule's length depends on the block size, which comes from the
    init weights (32 here, not the tiny preset's 64): 2,048 tokens / (4 x 32) = 16 updates."""
    from gptforge.config import resume_config
    from gptforge.train.trainer import train

    corpus = _corpus(tmp_path, shakespeare_text)
    common = ["model.preset=tiny", "data.tokenizer=char", "train.batch_size=4", "train.dtype=float32",
              f"data.corpus={corpus}", "train.eval_every=100"]
    train(load_config(None, [*common, "model.n_layer=1", "model.n_embd=32", "model.block_size=32",
                             "train.max_steps=1"]), tmp_path / "a")
    result = train(load_config(None, [*common, f"train.init={tmp_path / 'a'}", "train.max_steps=none",
                                      "train.max_tokens=2048"]), tmp_path / "b")
    saved = resume_config(tmp_path / "b")
    assert saved.model.block_size == 32 and saved.optim.decay_steps == 16 and result.step == 16
