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


# The tests below were added for mutants that survived `make mutate` (docs/testing.md).


def test_save_makes_missing_run_directories_and_a_pt_safetensors_file(tmp_path):
    from safetensors import safe_open

    model = GPT.from_preset("tiny", n_layer=1, vocab_size=11)
    latest = tmp_path / "new" / "run" / "checkpoints" / "latest"
    ckpt.save_model(latest, model, {"step": 1})
    with safe_open(str(latest / ckpt.WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers and other safetensors readers check


def test_load_state_maps_tensors_to_the_device_asked_for(run):
    """A state saved on one device resumes on another: map_location is passed through."""
    state = ckpt.load_state(run[0] / "checkpoints" / "latest", map_location="meta")
    assert state["optimizer"]["x"].device.type == "meta" and state["trainer"]["step"] == 7


def test_load_state_refuses_pickled_code_whatever_torch_defaults_to(run, monkeypatch):
    """weights_only=True is passed explicitly: an environment that makes torch.load unpickle anything
    by default (or a torch older than 2.6, whose default that was) does not open the door."""
    latest = run[0] / "checkpoints" / "latest"
    torch.save({"evil": GptforgeError("x")}, latest / ckpt.STATE)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(GptforgeError, match="damaged or not a gptforge state"):
        ckpt.load_state(latest)


def test_load_state_errors_name_the_file_the_cause_and_the_way_out(run):
    latest = run[0] / "checkpoints" / "latest"
    torch.save({"evil": GptforgeError("x")}, latest / ckpt.STATE)
    try:
        torch.load(latest / ckpt.STATE, weights_only=True)
    except Exception as e:  # torch's own refusal: long, so it is cut to 200 characters
        assert len(str(e)) > 200
        cause = f"({type(e).__name__}: {str(e)[:200]}); resume from another checkpoint"
    with pytest.raises(GptforgeError) as err:
        ckpt.load_state(latest)
    assert str(err.value) == f"{latest / ckpt.STATE} is damaged or not a gptforge state {cause}"
    (latest / ckpt.STATE).unlink()
    with pytest.raises(GptforgeError) as err:
        ckpt.load_state(latest)
    assert str(err.value) == (f"{latest / ckpt.STATE} is missing; this checkpoint cannot be resumed "
                              "(it holds weights only)")


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (OSError("quota exceeded for user X"), "OSError: quota exceeded for user X"),  # no strerror
    (ValueError("first line\nsecond line"), "ValueError: first line"),
    (ValueError("x" * 300), "ValueError: " + "x" * 200),
    (ValueError(), "ValueError"),
])
def test_a_failed_save_says_why_and_where_the_last_good_checkpoint_is(run, monkeypatch, error, reason):
    run_dir, model = run
    latest = run_dir / "checkpoints" / "latest"

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", fail)
    advice = "free some disk space and continue with gptforge train --resume RUN"
    with pytest.raises(GptforgeError) as err:
        ckpt.save_model(latest, model, {"step": 9}, state={"x": torch.ones(1)})
    assert str(err.value) == (f"could not write checkpoint {latest} ({reason}); the last good checkpoint is "
                              f"{latest} (step 7), unchanged; {advice}")
    assert runs.read_info(latest)["step"] == 7
    assert [p.name for p in latest.parent.iterdir()] == ["latest"]  # the temporary directory is gone


def test_the_last_good_checkpoint_after_a_failed_save(run, monkeypatch):
    run_dir, model = run
    latest = run_dir / "checkpoints" / "latest"
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))

    def message(ckpt_dir):
        with pytest.raises(GptforgeError) as err:
            ckpt.save_model(ckpt_dir, model, {"step": 9}, state={})
        return str(err.value).split("; ")[1]

    old = latest.with_name("latest.old")
    latest.rename(old)  # a kill between the two renames of the last save
    assert message(latest) == f"the last good checkpoint is {old} (step 7), unchanged"
    (old / ckpt.INFO).write_text("{damaged")
    assert message(latest) == f"the last good checkpoint is {old}"  # its step unknown
    assert message(run_dir / "checkpoints" / "best") == "no earlier checkpoint exists"
    assert not (run_dir / "checkpoints" / "best").exists()


def test_copy_checkpoint_makes_or_replaces_a_complete_copy(run):
    run_dir, model = run
    latest = run_dir / "checkpoints" / "latest"
    dst = run_dir / "checkpoints" / ckpt.step_name(7)
    assert dst.name == "step-0000007"
    from gptforge.io import temp_sibling

    temp_sibling(dst).mkdir()  # what a copy killed half-way by this process id left
    (temp_sibling(dst) / "junk").write_text("x")
    assert ckpt.copy_checkpoint(latest, dst) == dst
    files = sorted(p.name for p in latest.iterdir())
    assert sorted(p.name for p in dst.iterdir()) == files
    assert all((dst / f).read_bytes() == (latest / f).read_bytes() for f in files)
    ckpt.save_model(latest, model, {"step": 8})
    ckpt.copy_checkpoint(latest, dst)  # over an existing copy
    assert runs.read_info(dst)["step"] == 8 and not (dst / ckpt.STATE).exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-0000007"]


def test_a_failed_copy_is_a_clear_error_and_leaves_nothing_behind(run):
    run_dir, _ = run
    missing, dst = run_dir / "checkpoints" / "best", run_dir / "checkpoints" / "step-0000007"
    with pytest.raises(GptforgeError) as err:
        ckpt.copy_checkpoint(missing, dst)
    assert str(err.value) == (f"could not copy checkpoint {missing} to {dst} (No such file or directory); "
                              "no earlier checkpoint exists; free some disk space and continue with "
                              "gptforge train --resume RUN")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest"]
    (run_dir / "checkpoints" / "latest" / "link").symlink_to(run_dir / "nowhere")  # fails after the copy began
    with pytest.raises(GptforgeError, match="could not copy checkpoint"):
        ckpt.copy_checkpoint(run_dir / "checkpoints" / "latest", dst)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest"]  # no half copy left


def test_prune_keeps_the_newest_step_checkpoints_by_number(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    steps = [500, 8_000_000, 9_000_000, 10_000_000, 11_000_000]  # 7 and 8 digits: names sort differently
    for s in steps:
        (checkpoints / ckpt.step_name(s)).mkdir(parents=True)
    for other in ("latest", "best", "step-0000600.old", "step-12"):
        (checkpoints / other).mkdir()

    def left():
        return sorted(p.name for p in checkpoints.iterdir())

    for keep in (5, 10):  # as many as there are, or more: none goes
        ckpt.prune_step_checkpoints(tmp_path, keep_last=keep)
        assert len(left()) == 9
    (checkpoints / "step-0000001").write_text("not a checkpoint")  # a stray file is no reason to stop
    ckpt.prune_step_checkpoints(tmp_path, keep_last=2)
    assert left() == sorted(["step-0000001", "latest", "best", "step-0000600.old", "step-12",
                             "step-10000000", "step-11000000"])
    ckpt.prune_step_checkpoints(tmp_path, keep_last=0)
    assert left() == sorted(["step-0000001", "latest", "best", "step-0000600.old", "step-12"])


def test_info_is_written_as_plain_json(tmp_path):
    import numpy as np

    model = GPT.from_preset("tiny", n_layer=1, vocab_size=11)
    info = {"step": torch.tensor(5), "lr": 0.5, "tokens": np.int64(640), "loss": np.float32(1.5),
            "losses": [1.0, float("inf")], "pair": (float("-inf"), 2), "run": tmp_path / "run",
            3: float("nan"), "done": True, "note": None}
    ckpt.save_model(tmp_path / "latest", model, info)
    assert json.loads((tmp_path / "latest" / ckpt.INFO).read_text()) == {
        "step": 5, "lr": 0.5, "tokens": 640, "loss": 1.5, "losses": [1.0, "inf"], "pair": ["-inf", 2],
        "run": str(tmp_path / "run"), "3": "nan", "done": True, "note": None}


def test_save_model_needs_a_config_and_takes_any_config_object(tmp_path):
    from types import SimpleNamespace

    module = torch.nn.Linear(2, 2)
    # A programming error, said as one, not as a failed write with advice about disk space.
    with pytest.raises(TypeError) as e:
        ckpt.save_model(tmp_path / "runs" / "a", module, {})
    assert str(e.value) == "Linear has no .config; save_model expects a gptforge GPT"
    assert not (tmp_path / "runs").exists()  # nothing made
    module.config = SimpleNamespace(n_layer=1, note="plain attributes")  # no to_dict(): its attributes
    ckpt.save_model(tmp_path / "b", module, {})
    assert json.loads((tmp_path / "b" / ckpt.MODEL_CONFIG).read_text()) == {"n_layer": 1, "note": "plain attributes"}


def test_a_disk_too_full_for_the_temporary_directory_is_a_clear_error(run, monkeypatch):
    """The failure can come before the temporary directory exists: cleaning up must not fail then."""
    import errno
    import pathlib

    run_dir, model = run
    mkdir = pathlib.Path.mkdir

    def full(self, *args, **kwargs):
        if self.name.startswith(".latest.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", full)
    with pytest.raises(GptforgeError, match=r"could not write checkpoint .*latest \(No space left on device\)"):
        ckpt.save_model(run_dir / "checkpoints" / "latest", model, {"step": 8})
    assert runs.read_info(run_dir / "checkpoints" / "latest")["step"] == 7


def test_load_weights_is_strict_and_says_what_does_not_fit(run):
    """A checkpoint without a tensor the model has (here: the untied LM head) is refused, not loaded
    with that tensor left at its random initial values."""
    run_dir, _ = run
    cfg_path = run_dir / "checkpoints" / "latest" / ckpt.MODEL_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["tie_embeddings"] = False
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(GptforgeError, match="does not fit the model in model_config.json") as err:
        runs.load_model(run_dir)
    assert "lm_head.weight" in str(err.value)  # torch's own words name the tensor


def test_load_weights_on_its_own(run):
    run_dir, model = run
    latest = run_dir / "checkpoints" / "latest"
    fresh = GPT.from_preset("tiny", n_layer=1, vocab_size=model.config.vocab_size)
    runs.load_weights(fresh, latest)  # onto the CPU by default
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    (latest / ckpt.WEIGHTS).unlink()
    with pytest.raises(GptforgeError, match=r"model.safetensors is missing; the checkpoint is incomplete "
                                            r"\(pick another one or retrain\)$"):
        runs.load_weights(fresh, latest)


def test_resolve_checkpoint_by_run_name_step_or_directory(run, tmp_path_factory):
    run_dir, model = run
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / "latest"
    assert runs.resolve_checkpoint(run_dir) == latest  # "latest" by default
    assert runs.resolve_checkpoint(latest, which="best") == latest  # a checkpoint directory is itself
    ckpt.copy_checkpoint(latest, checkpoints / "step-0000007")
    ckpt.copy_checkpoint(latest, checkpoints / "best")
    (checkpoints / "step-0000009").mkdir()  # weights never written: not offered
    assert runs.resolve_checkpoint(run_dir, "step-0000007") == checkpoints / "step-0000007"
    assert runs.resolve_checkpoint(run_dir, "best") == checkpoints / "best"
    with pytest.raises(GptforgeError, match=r"^checkpoint 'step-7' is unknown; use 'latest', 'best' or 'step-NNNNNNN'$"):
        runs.resolve_checkpoint(run_dir, "step-7")
    with pytest.raises(GptforgeError) as err:
        runs.resolve_checkpoint(run_dir, "step-0000008")
    assert str(err.value) == (f"{run_dir} has no 'step-0000008' checkpoint ({checkpoints / 'step-0000008' / ckpt.WEIGHTS} "
                              "is missing); available: best, latest, step-0000007")
    # A checkpoint directory named by its config alone is still taken as one (load_weights then says what is missing).
    (checkpoints / "step-0000009" / ckpt.MODEL_CONFIG).write_text("{}")
    assert runs.resolve_checkpoint(checkpoints / "step-0000009") == checkpoints / "step-0000009"


def test_resolve_checkpoint_falls_back_to_old_and_says_what_is_missing(run, tmp_path_factory):
    run_dir, _ = run
    latest = run_dir / "checkpoints" / "latest"
    latest.rename(latest.with_name("latest.old"))  # a kill between the two renames of a save
    assert runs.resolve_checkpoint(latest) == latest.with_name("latest.old")  # named directly
    assert runs.resolve_checkpoint(run_dir) == latest.with_name("latest.old")  # through the run
    nothing = tmp_path_factory.mktemp("x") / "nothing"
    with pytest.raises(GptforgeError, match=r"^.*nothing does not exist; pass a run directory \(e.g. runs/demo\) "
                                            r"or a checkpoint in one$"):
        runs.resolve_checkpoint(nothing)
    empty = tmp_path_factory.mktemp("empty-run")  # a run directory with no checkpoints/ yet
    with pytest.raises(GptforgeError, match=r"has no 'latest' checkpoint .*; train it first \(gptforge train\)$"):
        runs.resolve_checkpoint(empty)


def test_load_model_says_which_part_of_the_run_is_missing_or_wrong(run):
    run_dir, model = run
    latest = run_dir / "checkpoints" / "latest"
    loaded, _, _ = runs.load_model(run_dir, device=torch.device("cpu"))  # a torch.device as well as a name
    assert not loaded.training and next(loaded.parameters()).device.type == "cpu"
    (latest / ckpt.INFO).unlink()
    assert runs.load_model(run_dir)[2] == {}  # info.json is optional
    cfg = json.loads((latest / ckpt.MODEL_CONFIG).read_text())
    (latest / ckpt.MODEL_CONFIG).write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(GptforgeError, match=r"model_config.json does not describe a GPTConfig \(.*n_layers.*\); "
                                            "the file is damaged$"):
        runs.load_model(run_dir)
    (latest / ckpt.MODEL_CONFIG).write_text("[1, 2]")
    with pytest.raises(GptforgeError, match=r"model_config.json .*; the checkpoint is incomplete or damaged "
                                            r"\(pick another one or retrain\)$"):
        runs.load_model(run_dir)
    (latest / ckpt.MODEL_CONFIG).write_text(json.dumps(cfg))
    import shutil

    shutil.rmtree(run_dir / "tokenizer")
    with pytest.raises(GptforgeError, match=rf"tokenizer is missing; {run_dir} is not a complete run directory$"):
        runs.load_model(run_dir)


def test_weight_errors_quote_the_start_of_the_cause_on_one_line(run):
    from safetensors.torch import load_file

    run_dir, model = run
    latest = run_dir / "checkpoints" / "latest"
    wide = GPT.from_preset("tiny", n_layer=1, vocab_size=model.config.vocab_size, n_embd=128)
    try:
        wide.load_state_dict(load_file(str(latest / ckpt.WEIGHTS)), strict=False)
    except RuntimeError as e:  # torch's own report: one line per tensor, thousands of characters
        lines = str(e).strip().splitlines()
    assert len(lines) > 3 and len(" ".join(line.strip() for line in lines[:3])) > 300
    with pytest.raises(GptforgeError) as err:
        runs.load_weights(wide, latest)
    detail = " ".join(line.strip() for line in lines[:3])[:300]  # its first three lines, at most 300 characters
    assert str(err.value) == (f"{latest / ckpt.WEIGHTS} does not fit the model in model_config.json ({detail}); "
                              "the checkpoint and its config disagree")
    data = (latest / ckpt.WEIGHTS).read_bytes()
    (latest / ckpt.WEIGHTS).write_bytes(data[: len(data) // 2])
    try:
        load_file(str(latest / ckpt.WEIGHTS))
    except Exception as e:
        cause = f"{type(e).__name__}: {e}"
    assert cause.startswith("SafetensorError: ")
    with pytest.raises(GptforgeError) as err:
        runs.load_weights(model, latest)
    assert str(err.value) == f"{latest / ckpt.WEIGHTS} is damaged ({cause}); use another checkpoint"
