"""gptforge.sweep: the space syntax, and real (tiny) sweeps: pruning, the files they write, a kill
-9 in the middle and --resume, and the best config training as is."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptforge.errors import GptforgeError
from gptforge.sweep import parse_budget, parse_space

# --------------------------------------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    "spec, kind, low, high, log, choices",
    [
        ("optim.lr=log:1e-4..3e-3", "float", 1e-4, 3e-3, True, ()),
        ("model.n_layer=2..6", "int", 2, 6, False, ()),
        ("model.dropout=0..0.2", "float", 0.0, 0.2, False, ()),
        ("model.n_embd=log:int:16..256", "int", 16, 256, True, ()),
        ("optim.beta2=float:1..2", "float", 1.0, 2.0, False, ()),
        ("model.n_head=4,6,8", "categorical", None, None, False, (4, 6, 8)),
        ("model.dropout=0,0.1", "categorical", None, None, False, (0, 0.1)),
        ("model.bias=true,false", "categorical", None, None, False, (True, False)),
        ("data.tokenizer=char,gpt2", "categorical", None, None, False, ("char", "gpt2")),
    ],
)
def test_parse_space(spec, kind, low, high, log, choices):
    p = parse_space(spec)
    assert (p.kind, p.low, p.high, p.log, p.choices) == (kind, low, high, log, choices)
    assert [type(c) for c in p.choices] == [type(c) for c in choices]


@pytest.mark.parametrize("spec", ["lr=1..2", "optim.lr=", "optim.lr=log:0..1", "optim.lr=2..1",
                                  "optim.lr=log:1,2", "optim.lr=a..b", "model.n_head=4,4",
                                  "model.n_layer=int:1.5..3"])
def test_parse_space_rejects(spec):
    with pytest.raises(GptforgeError, match="space"):
        parse_space(spec)


def test_parse_budget():
    assert parse_budget("60s") == ["train.max_time=60"]
    assert parse_budget("2m") == ["train.max_time=120"]
    assert parse_budget("500steps") == ["train.max_steps=500"]
    assert parse_budget("2Mtokens") == ["train.max_tokens=2000000"]
    assert parse_budget(None) == []
    with pytest.raises(GptforgeError, match="budget"):
        parse_budget("fast")


# --------------------------------------------------------------------------------------------- sweeps

BASE = """
[model]
preset = "tiny"
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32

[data]
corpus = "{corpus}"
tokenizer = "char"

[optim]
lr = 1e-2
min_lr = 1e-7  # below every lr the sweep tries: min_lr > lr is refused
warmup_steps = 0

[train]
batch_size = 8
max_steps = {steps}
eval_every = 5
eval_batches = 2
log_every = 100
checkpoint_every = 1000
"""


def _base(tmp_path: Path, shakespeare_text: str, steps: int = 10) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text[:20_000], encoding="utf-8")
    path = tmp_path / "base.toml"
    path.write_text(BASE.format(corpus=corpus.as_posix(), steps=steps), encoding="utf-8")
    return path


def _states(sweep_dir: Path) -> dict[int, tuple[str, dict, float | None]]:
    import optuna

    study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'study.db'}")
    return {t.number: (t.state.name, t.params, t.value) for t in study.trials}


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_sweep_prunes_skips_and_writes_results(tmp_path, shakespeare_text):
    from gptforge.cli import main
    from gptforge.config import load_config
    from gptforge.sweep import sweep

    base = _base(tmp_path, shakespeare_text)
    out = tmp_path / "sweeps" / "lr"
    # Enqueued so the outcome does not depend on the sampler: a good trial, then one whose lr is far
    # too low (its loss barely moves, so the median pruner must stop it at the step-5 evaluation),
    # then an invalid combination (n_embd=32 is not divisible by 3 heads); the 4th is sampled.
    result = sweep(base, ["optim.lr=log:1e-6..1e-2", "model.n_head=2,3"], 4, out, pruner="median",
                   startup_trials=1, enqueue=[{"optim.lr": 1e-2, "model.n_head": 2},
                                              {"optim.lr": 1e-6, "model.n_head": 2},
                                              {"optim.lr": 1e-2, "model.n_head": 3}])
    states = {r.number: r for r in result.rows}
    assert len(states) == 4
    assert states[0].state == "complete" and states[0].steps == 10
    assert states[1].state == "pruned" and states[1].steps == 5 and "pruned at step 5" in states[1].reason
    assert states[2].state == "skipped" and "divisible" in states[2].reason
    # The sampled 4th trial: its state must follow from its parameters, like the enqueued ones'.
    fourth = states[3]
    if fourth.params["model.n_head"] == 3:
        assert fourth.state == "skipped" and "divisible" in fourth.reason
    elif fourth.state == "pruned":
        assert fourth.steps == 5 and "pruned at step 5" in fourth.reason
    else:
        assert fourth.state == "complete" and fourth.steps == 10 and fourth.val_loss is not None
    assert result.best_value is not None and result.best_value <= states[0].val_loss
    assert (out / "trials" / "0000" / "checkpoints" / "best").is_dir()

    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows][:3] == ["complete", "pruned", "skipped"]
    assert set(rows[0]) >= {"number", "optim.lr", "model.n_head", "val_loss", "steps", "time_s", "state", "reason"}
    assert float(rows[0]["val_loss"]) == pytest.approx(states[0].val_loss, abs=1e-5)
    assert _is_png(out / "history.png") and _is_png(out / "params.png")

    # best.toml is a complete config with the winning values that `gptforge train` runs as is.
    best = load_config(result.best_config)
    assert best.optim.lr == pytest.approx(result.best_params["optim.lr"])
    assert best.model.n_head == result.best_params["model.n_head"]
    main(["train", "--config", str(result.best_config), "--out", str(tmp_path / "best-run")])
    assert (tmp_path / "best-run" / "checkpoints" / "latest").is_dir()


def test_sweep_killed_mid_way_resumes_without_losing_trials(tmp_path, shakespeare_text):
    from gptforge.sweep import sweep

    base = _base(tmp_path, shakespeare_text)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "gptforge", "sweep", "--config", str(base), "--space",
           "optim.lr=log:1e-3..1e-2", "--trials", "2", "--out", str(out), "--pruner", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # trials/0001 appears once trial 0 is finished and trial 1 has started training.
        give_up = time.monotonic() + 600  # only so that a hung sweep fails instead of hanging
        while not (out / "trials" / "0001").exists():
            assert proc.poll() is None, "the sweep exited before its second trial"
            assert time.monotonic() < give_up, "the sweep never started its second trial"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _states(out)
    assert before[0][0] == "COMPLETE" and before[1][0] == "RUNNING"

    # Continue with nothing but the directory: config, space and trial count come from the study.
    result = sweep(None, out=out, resume=True)
    after = _states(out)
    assert after[0] == before[0]  # the finished trial is kept, not re-run
    assert after[1][0] == "FAIL"  # the killed one is marked failed ...
    retry = [n for n, (_, params, _) in after.items() if n > 1 and params == before[1][1]]
    assert retry and after[retry[0]][0] == "COMPLETE"  # ... and its parameters run again
    assert len(after) == 3 and sum(state == "COMPLETE" for state, _, _ in after.values()) == 2
    assert {r.number: r.state for r in result.rows}[1] == "killed"


def test_sweep_cli_errors(tmp_path, capsys):
    from gptforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sweep", "--out", str(tmp_path / "none")])
    assert e.value.code == 2
    assert "--space" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--config", "x.toml", "--space", "optim.lr=3..1", "--trials", "2",
              "--out", str(tmp_path / "bad")])
    assert e.value.code == 2
    assert "low end" in capsys.readouterr().err


def test_a_sweep_over_tokenizers_minimises_bits_per_byte(tmp_path, shakespeare_text, capsys):
    """Losses per token of a char and a BPE model do not compare; --objective val_bpb ranks them by
    bits per byte, the trainer's val_bpb, and a continued sweep keeps its objective."""
    import json

    from gptforge.cli import main
    from gptforge.sweep import sweep

    base = _base(tmp_path, shakespeare_text)
    out = tmp_path / "sweeps" / "tok"
    result = sweep(base, ["data.tokenizer=char,bpe"], 2, out, overrides=["data.bpe_vocab_size=300"],
                   pruner="none", objective="val_bpb",
                   enqueue=[{"data.tokenizer": "char"}, {"data.tokenizer": "bpe"}])
    assert [r.state for r in result.rows] == ["complete", "complete"]
    for row in result.rows:
        lines = (out / "trials" / f"{row.number:04d}" / "metrics.jsonl").read_text().splitlines()
        evals = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
        assert row.val_loss == pytest.approx(min(e["val_bpb"] for e in evals), abs=1e-9)
        assert row.val_loss != pytest.approx(min(e["val_loss"] for e in evals), abs=1e-3)
    assert result.best_value == min(r.val_loss for r in result.rows)
    with open(out / "trials.csv", newline="") as f:
        assert "val_bpb" in next(csv.reader(f))
    assert "val bpb" in capsys.readouterr().out
    assert "(val bpb " in (out / "best.toml").read_text().splitlines()[0]
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--out", str(out), "--objective", "val_loss", "--trials", "3"])
    assert e.value.code == 2 and "minimises val_bpb, not val_loss" in capsys.readouterr().err
