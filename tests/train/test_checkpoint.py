"""Checkpoints: round trips, atomic swaps, and clear errors for missing, damaged or mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

from gptforge import runs
from gptforge.data.tokenizers import build_tokenizer
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.train import checkpoint as ckpt


@pytest.fixture
def run(tmp_path):
    """A minimal run directory: a char tokenizer and one latest checkpoint of a tiny model."""
    tok = build_tokenizer("char", text="hello world")
    tok.save(tmp_path / "tokenizer")
    model = GPT.from_preset("tiny", n_layer=1, vocab_size=tok.vocab_size)
    state = {"optimizer": {"x": torch.ones(2)}, "trainer": {"step": 7}}
    ckpt.save_model(tmp_path / "checkpoints" / "latest", model, {"step": 7, "val_loss": float("nan")}, state=state)
    return tmp_path, model


def test_round_trip_from_run_or_checkpoint_dir(run):
    run_dir, model = run
    for path, which in ((run_dir, "latest"), (run_dir / "checkpoints" / "latest", "best")):
        loaded, tok, info = runs.load_model(path, which=which)
        assert info["step"] == 7 and info["val_loss"] == "nan" and tok.vocab_size == model.config.vocab_size
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    # tied embedding saved once and still tied after loading
    assert loaded.lm_head is None or loaded.lm_head.weight is loaded.transformer.wte.weight
    state = ckpt.load_state(run_dir / "checkpoints" / "latest")
    assert state["trainer"]["step"] == 7 and torch.equal(state["optimizer"]["x"], torch.ones(2))


def test_save_replaces_latest_and_leaves_no_temporaries(run):
    run_dir, model = run
    ckpt.save_model(run_dir / "checkpoints" / "latest", model, {"step": 8})
    assert runs.read_info(run_dir / "checkpoints" / "latest")["step"] == 8
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest"]


def test_a_kill_between_the_renames_falls_back_to_the_old_copy(run):
    run_dir, _ = run
    latest = run_dir / "checkpoints" / "latest"
    latest.rename(latest.with_name("latest.old"))  # what a kill after the first rename leaves
    assert runs.load_model(run_dir)[2]["step"] == 7


def test_missing_and_damaged_files_are_clear_errors(run, tmp_path_factory):
    run_dir, _ = run
    latest = run_dir / "checkpoints" / "latest"
    with pytest.raises(GptforgeError, match="no 'best' checkpoint.*available: latest"):
        runs.load_model(run_dir, which="best")
    with pytest.raises(GptforgeError, match="does not exist"):
        runs.load_model(tmp_path_factory.mktemp("x") / "nothing")
    data = (latest / ckpt.WEIGHTS).read_bytes()
    (latest / ckpt.WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(GptforgeError, match="damaged"):
        runs.load_model(run_dir)
    (latest / ckpt.STATE).write_bytes(b"not a torch file")
    with pytest.raises(GptforgeError, match="state.pt is damaged"):
        ckpt.load_state(latest)


def test_shape_mismatch_is_a_clear_error(run):
    run_dir, _ = run
    cfg_path = run_dir / "checkpoints" / "latest" / ckpt.MODEL_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["n_embd"] *= 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(GptforgeError, match="does not fit the model"):
        runs.load_model(run_dir)


def test_state_with_pickled_code_is_refused(run):
    latest = run[0] / "checkpoints" / "latest"
    torch.save({"evil": GptforgeError("x")}, latest / ckpt.STATE)  # an arbitrary object, not tensors
    with pytest.raises(GptforgeError, match="damaged or not a gptforge state"):
        ckpt.load_state(latest)


def test_a_save_that_dies_half_way_leaves_the_old_latest_intact(run, monkeypatch):
    run_dir, model = run

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped while writing state.pt

    monkeypatch.setattr(torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_model(run_dir / "checkpoints" / "latest", model, {"step": 9}, state={"x": torch.ones(1)})
    assert runs.load_model(run_dir)[2]["step"] == 7
    assert ckpt.load_state(run_dir / "checkpoints" / "latest")["trainer"]["step"] == 7
    monkeypatch.undo()
    ckpt.save_model(run_dir / "checkpoints" / "latest", model, {"step": 9}, state={"x": torch.ones(1)})
    assert runs.read_info(run_dir / "checkpoints" / "latest")["step"] == 9  # the leftover temp dir is no obstacle
