"""The training loop on a tiny real model: loss falls, resume is exact, stops, Ctrl-C, NaN, eval."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from gptforge import cli, runs
from gptforge.config import resume_config
from gptforge.errors import GptforgeError
from gptforge.train import checkpoint as ckpt
from gptforge.train.trainer import Trainer, evaluate_run, train


def test_loss_falls_and_run_dir_is_complete(tiny_config, tmp_path, read_metrics):
    run = tmp_path / "run"
    result = train(tiny_config("train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=20",
                               "train.keep_last=1"), run)
    assert (result.step, result.tokens, result.stopped_by) == (40, 40 * 4 * 32, "max_steps")
    losses = [r["loss"] for r in read_metrics(run, "train")]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it learns
    assert math.log(60) - 0.5 < losses[0] < math.log(60) + 0.5  # starts near uniform over the characters
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [20, 40] and all("val_loss" in e and "train_loss" in e for e in evals)
    events = read_metrics(run, "event")
    assert events[-1]["event"] == "stopped" and events[-1]["reason"] == "max_steps" and events[-1]["value"] == 40

    # The run directory of docs/design.md: config, tokenizer, metrics, latest/best/last-k checkpoints.
    assert (run / "config.toml").is_file() and (run / "tokenizer").is_dir()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "latest", "step-0000040"]  # keep_last=1 pruned step-0000020
    for f in ("model.safetensors", "model_config.json", "state.pt", "info.json"):
        assert (run / "checkpoints" / "latest" / f).is_file()
    model, tok, info = runs.load_model(run)
    assert info["step"] == 40 and info["train_loss"] == pytest.approx(losses[-1])
    assert model.config.vocab_size == tok.vocab_size and not model.training

    # The saved config is the resolved one: the LR schedule's length is frozen into it.
    again = resume_config(run)
    assert again.optim.decay_steps == 40 and again.model.n_embd == 32 and again.train.max_steps == 40


# The CPU's two precision paths: bf16 autocast is native on CPUs with AVX-512 BF16 and emulated (slow,
# fine at these shapes) on AVX2-only ones, so both run everywhere.
DTYPES = ["float32", "bfloat16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_resume_is_exact(tiny_config, tmp_path, read_metrics, step_calls, starts, dtype):
    # Dropout > 0, random windows and 2 micro-steps: RNG, sampler and optimizer state all matter.
    common = ("model.dropout=0.2", "data.sampling=random", "train.grad_accum_steps=2", "optim.decay_steps=8",
              "train.eval_every=3", f"train.dtype={dtype}")
    train(tiny_config("train.max_steps=8", *common), tmp_path / "once")
    train(tiny_config("train.max_steps=4", *common), tmp_path / "twice")
    step_calls.clear()
    result = train(resume_config(tmp_path / "twice", ["train.max_steps=8"]), tmp_path / "twice", resume=True)
    assert result.step == 8
    # The resumed process started at the checkpoint's step and computed only the updates after it: a
    # "resume" that started again from step 0 with the same seed would log the same losses below.
    assert step_calls == [4, 5, 6, 7]
    assert starts(tmp_path / "twice") == [("started", 0), ("resumed", 4)]
    once = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "once", "train")]
    twice = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "twice", "train")]
    assert once == twice  # bit-identical on the CPU, in either precision
    ev_once = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "once", "eval")}
    ev_twice = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "twice", "eval")}
    assert set(ev_once) == {3, 6, 8} and all(ev_twice[s] == v for s, v in ev_once.items())


def test_resume_continues_from_the_checkpoint_not_from_scratch(tiny_config, tmp_path, read_metrics, starts):
    """Weights changed by hand in checkpoints/latest: a real resume trains on from them, so its losses
    leave those of the uninterrupted run; a run that started again from step 0 would repeat them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    common = ("optim.decay_steps=8", "train.eval_every=100")
    train(tiny_config("train.max_steps=8", *common), tmp_path / "once")
    train(tiny_config("train.max_steps=4", *common), tmp_path / "twice")
    weights = tmp_path / "twice" / "checkpoints" / "latest" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in tensors.items()}, weights, metadata=meta)
    train(resume_config(tmp_path / "twice", ["train.max_steps=8"]), tmp_path / "twice", resume=True)
    once = [r["loss"] for r in read_metrics(tmp_path / "once", "train")]
    twice = [r["loss"] for r in read_metrics(tmp_path / "twice", "train")]
    assert len(twice) == 8 and twice[:4] == once[:4]  # the records before the checkpoint are kept
    assert all(a != b for a, b in zip(once[4:], twice[4:], strict=True))
    assert starts(tmp_path / "twice") == [("started", 0), ("resumed", 4)]


def test_sequential_sampling_resumes_its_position(tiny_config, tmp_path, read_metrics, step_calls):
    common = ("data.sampling=sequential", "optim.schedule=constant")
    train(tiny_config("train.max_steps=6", *common), tmp_path / "once")
    train(tiny_config("train.max_steps=3", *common), tmp_path / "twice")
    step_calls.clear()
    train(resume_config(tmp_path / "twice", ["train.max_steps=6"]), tmp_path / "twice", resume=True)
    assert step_calls == [3, 4, 5]
    once = [r["loss"] for r in read_metrics(tmp_path / "once", "train")]
    assert once == [r["loss"] for r in read_metrics(tmp_path / "twice", "train")]
    assert all("epoch" in r for r in read_metrics(tmp_path / "once", "train"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stop_at_target_loss_on_the_whole_training_split(tiny_config, tmp_path, read_metrics, dtype):
    """The stop metric is computed as `gptforge eval` computes it (float32, eval mode) whatever the
    training precision, so a run that stops at a target shows an eval at or below it."""
    run = tmp_path / "run"
    result = train(tiny_config("train.max_steps=500", "train.stop_at_loss=3.3", "train.stop_metric=train_full",
                               "train.eval_every=5", "optim.schedule=constant", f"train.dtype={dtype}"), run)
    assert result.stopped_by == "stop_at_loss" and result.step < 500
    last_eval = read_metrics(run, "eval")[-1]
    assert last_eval["train_loss"] <= 3.3 and last_eval["step"] == result.step
    stop = read_metrics(run, "event")[-1]
    assert (stop["reason"], stop["metric"], stop["target"]) == ("stop_at_loss", "train_loss", 3.3)
    assert stop["value"] == pytest.approx(last_eval["train_loss"])
    # ... and the eval CLI's exact number over the same split agrees with it
    exact = evaluate_run(run, split="train")
    assert exact["tokens"] == last_eval["train_loss_tokens"]
    assert exact["loss"] == pytest.approx(last_eval["train_loss"], abs=1e-5) and exact["loss"] <= 3.3 + 1e-6
    assert result.eval_train_loss == last_eval["train_loss"]


def test_ctrl_c_saves_latest_and_resume_continues(tiny_config, tmp_path, read_metrics, step_calls, starts):
    run = tmp_path / "run"
    common = ("optim.decay_steps=6", "train.max_steps=6", "train.eval_every=3")

    def press_ctrl_c(step, record):
        os.kill(os.getpid(), signal.SIGINT)  # handled: the next step boundary saves latest and stops

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `cmd &` in a script
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*common), run, eval_hook=press_ctrl_c)
    assert runs.read_info(run / "checkpoints" / "latest")["step"] == 4
    assert read_metrics(run, "event")[-1]["reason"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored
    step_calls.clear()
    train(resume_config(run), run, resume=True)
    assert step_calls == [4, 5] and starts(run) == [("started", 0), ("resumed", 4)]
    train(tiny_config(*common), tmp_path / "ref")
    assert [r["loss"] for r in read_metrics(run, "train")] == [r["loss"] for r in read_metrics(tmp_path / "ref", "train")]


def test_cli_exits_130_on_sigterm_and_resumes(tiny_config, tmp_path, tiny_corpus, monkeypatch, starts):
    real_step = Trainer.train_step

    def step_then_ctrl_c(self):
        out = real_step(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # treated like Ctrl-C: finish the step, save, stop
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", str(run), f"data.corpus={tiny_corpus}", "data.tokenizer=char",
                  "model.preset=tiny", "model.n_layer=1", "train.max_steps=50", "train.batch_size=2"])
    assert e.value.code == 130
    assert runs.read_info(run / "checkpoints" / "latest")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.setattr(Trainer, "train_step", real_step)
    cli.main(["train", "--resume", str(run), "train.max_steps=3"])
    assert runs.read_info(run / "checkpoints" / "latest")["step"] == 3
    assert starts(run) == [("started", 0), ("resumed", 2)]  # continued from step 2, not started again
    with pytest.raises(SystemExit) as e:  # the model cannot change under a resumed run
        cli.main(["train", "--resume", str(run), "model.n_layer=2"])
    assert e.value.code == 2


# `gptforge train` in a child process whose update 3 waits on files the test writes, so that each Ctrl-C
# arrives while that update is running and after the one before it was handled (two SIGINTs sent at once
# could merge into one). Linux delivers a signal sent to a process to its main thread when that thread
# does not block it, and the handler runs before the thread reads the file written after the kill.
_CTRL_C_CHILD = """
import sys, time
from pathlib import Path
from gptforge import cli
from gptforge.train.trainer import Trainer

marks, real = Path(sys.argv[1]), Trainer.train_step

def wait_for(name):
    give_up = time.monotonic() + 300  # only so that a broken hand-shake fails instead of hanging
    while not (marks / name).exists():
        if time.monotonic() > give_up:
            sys.exit(f"never saw {name}")
        time.sleep(0.01)

def train_step(self):
    if self.step == 2:
        (marks / "in-step").touch()
        wait_for("first-sent")
        (marks / "first-handled").touch()
        wait_for("second-sent")
        (marks / "step-finished").touch()
    return real(self)

Trainer.train_step = train_step
cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_corpus, presses):
    """One Ctrl-C lets the running update finish, saves latest and exits 130; a second one during that
    update stops the process there: the update never finishes and nothing is saved."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    marks, run = tmp_path / "marks", tmp_path / "run"
    marks.mkdir()
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-c", _CTRL_C_CHILD, str(marks), "train", "--out", str(run),
           f"data.corpus={tiny_corpus}", "data.tokenizer=char", "model.preset=tiny", "model.n_layer=1",
           "train.batch_size=2", "train.max_steps=50", "train.log_every=1", "train.device=cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(name):
        give_up = time.monotonic() + 300  # only so that a hung child fails the test instead of hanging it
        while not (marks / name).exists():
            assert proc.poll() is None, f"the child exited before {name}: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < give_up, f"the child never wrote {name}"
            time.sleep(0.01)

    try:
        wait_for("in-step")
        proc.send_signal(signal.SIGINT)
        (marks / "first-sent").touch()
        wait_for("first-handled")
        if presses == 2:
            proc.send_signal(signal.SIGINT)
        (marks / "second-sent").touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "gptforge: interrupted" in err
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stops = [e for e in events if e["kind"] == "event" and e["event"] == "stopped"]
    if presses == 1:  # graceful: the update finished, was saved, and the stop was logged
        assert (marks / "step-finished").exists()
        assert runs.read_info(run / "checkpoints" / "latest")["step"] == 3
        assert [(e["reason"], e["step"]) for e in stops] == [("interrupted", 3)]
    else:  # at once: inside update 3, before it finished; no checkpoint, no stop record
        assert not (marks / "step-finished").exists()
        assert not (run / "checkpoints" / "latest").exists() and stops == []
        assert max(e["step"] for e in events if e["kind"] == "train") == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, read_metrics, monkeypatch):
    run = tmp_path / "run"
    real_step = Trainer.train_step

    def step_nan_at_5(self):
        loss, grad_norm, lr = real_step(self)
        return (torch.full_like(loss, float("nan")) if self.step == 4 else loss), grad_norm, lr

    monkeypatch.setattr(Trainer, "train_step", step_nan_at_5)
    with pytest.raises(GptforgeError, match=r"became nan at step 5.*step 4"):
        train(tiny_config("train.max_steps=10", "train.checkpoint_every=2"), run)
    latest = run / "checkpoints" / "latest"
    assert runs.read_info(latest)["step"] == 4
    model, _, _ = runs.load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert read_metrics(run, "event")[-1]["reason"] == "nan"


def test_huge_learning_rate_is_caught(tiny_config, tmp_path):
    with pytest.raises(GptforgeError, match="(training loss|gradient norm) became"):
        train(tiny_config("train.max_steps=20", "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0"),
              tmp_path / "run")


def test_an_infinite_gradient_never_reaches_a_checkpoint(tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip_inf_at_3(params, max_norm):
        calls.append(1)
        norm = real_clip(params, max_norm)
        return torch.tensor(float("inf")) if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_inf_at_3)
    with pytest.raises(GptforgeError, match="gradient norm became inf at step 3"):
        train(tiny_config("train.max_steps=10", "train.checkpoint_every=1"), run)
    assert runs.read_info(run / "checkpoints" / "latest")["step"] == 2


def test_eval_hook_exception_propagates_after_saving(tiny_config, tmp_path):
    class Pruned(Exception):
        pass

    def prune(step, record):
        assert {"val_loss", "train_loss", "tokens", "step"} <= record.keys()
        raise Pruned

    with pytest.raises(Pruned):
        train(tiny_config("train.max_steps=10", "train.eval_every=2"), tmp_path / "run", eval_hook=prune)
    assert runs.read_info(tmp_path / "run" / "checkpoints" / "latest")["step"] == 2


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tiny_config, tmp_path):
    train(tiny_config("train.max_steps=1"), tmp_path / "run")
    with pytest.raises(GptforgeError, match="already holds a run"):
        train(tiny_config("train.max_steps=1"), tmp_path / "run")
    with pytest.raises(GptforgeError, match="no 'latest' checkpoint|does not exist"):
        train(tiny_config("train.max_steps=1"), tmp_path / "empty", resume=True)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tiny_config, tmp_path, read_metrics,
                                                                      monkeypatch, capsys):
    """`until gptforge train --resume RUN; do :; done` must finish even when the first attempt died
    before saving anything: the resume starts the run again with its saved config."""
    run = tmp_path / "run"
    common = ("train.max_steps=6", "train.eval_every=3", "model.dropout=0.1")
    real_step = Trainer.train_step

    def die_at_step_4(self):
        if self.step == 3:
            raise SystemExit(137)  # as abrupt as a kill: no checkpoint, no clean-up of the run directory
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", die_at_step_4)
    with pytest.raises(SystemExit):
        train(tiny_config(*common), run)
    assert (run / "config.toml").is_file() and not (run / "checkpoints" / "latest").exists()
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3]
    with pytest.raises(GptforgeError, match="saved no checkpoint yet; start it again with --resume"):
        train(tiny_config(*common), run)

    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    cli.main(["train", "--resume", str(run)])
    assert "saved no checkpoint before it stopped; starting it again from step 0" in capsys.readouterr().out
    train(tiny_config(*common), tmp_path / "ref")
    # The same losses as a run that was never interrupted, each step logged once.
    assert [(r["step"], r["loss"]) for r in read_metrics(run, "train")] == \
           [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "ref", "train")]
    assert [e["event"] for e in read_metrics(run, "event")][-2:] == ["restarted", "stopped"]


def test_resume_and_eval_refuse_a_changed_corpus(tiny_config, tmp_path, tiny_corpus, monkeypatch):
    """A run records the sha256 of its text and tokenizer; other data is refused with both hashes and
    the way out, not silently trained on. Relative corpus paths are saved absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(tiny_corpus.read_text(encoding="utf-8"), encoding="utf-8")
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=2", "data.corpus=corpus.txt"), run)
    assert resume_config(run).data.corpus == str(tmp_path / "corpus.txt")
    identity = __import__("json").loads((run / "data.json").read_text())
    assert len(identity["corpus_sha256"]) == 64 and len(identity["tokenizer_sha256"]) == 64

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the saved path still names the same file
    train(resume_config(run, ["train.max_steps=3"]), run, resume=True)
    assert evaluate_run(run, split="val")["step"] == 3

    text = (tmp_path / "corpus.txt").read_text(encoding="utf-8")
    (tmp_path / "corpus.txt").write_text(text[: len(text) // 2], encoding="utf-8")  # cut the corpus
    for attempt in (lambda: train(resume_config(run, ["train.max_steps=4"]), run, resume=True),
                    lambda: evaluate_run(run, split="val")):
        with pytest.raises(GptforgeError) as e:
            attempt()
        message = str(e.value)
        assert f"the corpus of {run} changed: sha256 {identity['corpus_sha256'][:16]} when it was trained" in message
        assert "--init" in message and "\n" not in message
    assert runs.read_info(run / "checkpoints" / "latest")["step"] == 3  # nothing was trained on it


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tiny_config, tmp_path):
    """A real write failure (a file-size limit makes the kernel refuse the write, as a full disk does):
    one line naming the last good checkpoint, exit 2, no partial files, latest unchanged."""
    import resource
    import subprocess
    import sys

    run = tmp_path / "run"
    train(tiny_config("train.max_steps=2", "train.checkpoint_every=1"), run)
    latest = run / "checkpoints" / "latest"
    before = {p.name: p.read_bytes() for p in latest.iterdir()}
    limit = min(p.stat().st_size for p in latest.iterdir() if p.name in ("model.safetensors", "state.pt")) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "gptforge", "train", "--resume", str(run), "train.max_steps=3"],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gptforge: error: could not write checkpoint")
    assert f"the last good checkpoint is {latest} (step 2), unchanged" in err[0]
    assert {p.name: p.read_bytes() for p in latest.iterdir()} == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "latest", "step-0000001",
                                                                        "step-0000002"]


def test_eval_cli_counts_every_token_but_the_first(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config("train.max_steps=2"), run)
    from gptforge.data.tokens import prepare

    tok = runs.load_model(run)[1]
    cfg = resume_config(run)
    data = prepare(cfg.data.corpus, tokenizer=tok, val_fraction=cfg.data.val_fraction)
    cli.main(["eval", str(run), "--split", "val", "--checkpoint", "best"])
    out = capsys.readouterr().out
    assert f"over {len(data.val) - 1:,} tokens" in out and "val loss" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path / "nothing")])
    assert e.value.code == 2


@pytest.mark.parametrize("limit, reason", [("train.max_tokens=1000", "max_tokens"), ("train.max_time=1.5", "max_time")])
def test_token_and_time_limits_stop_the_run(tiny_config, tmp_path, read_metrics, limit, reason):
    run = tmp_path / "run"
    result = train(tiny_config("train.max_steps=none", "optim.decay_steps=100", limit), run)
    assert result.stopped_by == reason
    stop = read_metrics(run, "event")[-1]
    assert (stop["event"], stop["reason"]) == ("stopped", reason)
    if reason == "max_tokens":  # 128 tokens per update: the first update at or past 1,000 tokens
        assert result.tokens == 1024 and result.step == 8 and stop["value"] == 1024
    else:
        assert stop["value"] >= 1.5 and 0 < result.step < 100_000


def test_the_final_line_pairs_like_with_like(tiny_config, tmp_path, tiny_corpus, capsys, read_metrics):
    """Eval-mode train and val losses side by side; the last update's loss (dropout on) named apart."""
    run = tmp_path / "run"
    cli.main(["train", "--out", str(run), f"data.corpus={tiny_corpus}", "data.tokenizer=char", "model.preset=tiny",
              "model.n_layer=1", "model.dropout=0.2", "train.max_steps=3", "train.batch_size=2",
              "train.dtype=float32"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ev, tr = read_metrics(run, "eval")[-1], read_metrics(run, "train")[-1]
    assert last.startswith("stopped by max_steps at step 3 ")
    assert (f"train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f} at the last evaluation (eval mode, float32); "
            f"last update's loss {tr['loss']:.4f} (dropout on)") in last
    assert f"; bits per byte: train {ev['train_bpb']:.4f}, val {ev['val_bpb']:.4f}; run in" in last


@pytest.mark.parametrize("cpu_bf16, expected", [("1", "bfloat16"), ("0", "float32")])
def test_dtype_auto_on_the_cpu_follows_its_bf16_units(tiny_config, tmp_path, read_metrics, monkeypatch,
                                                      cpu_bf16, expected):
    """`auto` trains in bf16 on a CPU with bf16 matmul units and in float32 on one without; both paths are
    forced here so that either kind of CPU runs both."""
    from gptforge.train.runtime import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, cpu_bf16)
    run = tmp_path / "run"
    result = train(tiny_config("train.dtype=auto", "train.max_steps=3"), run)
    started = read_metrics(run, "event")[0]
    assert started["dtype"] == expected and started["mfu_basis"] == "vs measured GEMM"
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)


def test_steps_between_log_steps_never_read_back_to_the_host(tiny_config, tmp_path, monkeypatch):
    """The device is never made to wait inside an update: train_step and the non-finite watch read
    nothing back (no .item(), float(), bool(), .tolist()); the host reads only at log, eval,
    checkpoint and last steps."""
    reads_forbidden = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def guarded(self, *a, _real=real, _name=name, **k):
            if reads_forbidden:
                raise AssertionError(f"Tensor.{_name} read back inside {reads_forbidden[-1]}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    def no_reads(method):
        real = getattr(Trainer, method)

        def wrapped(self, *a, **k):
            reads_forbidden.append(method)
            try:
                return real(self, *a, **k)
            finally:
                reads_forbidden.pop()

        monkeypatch.setattr(Trainer, method, wrapped)

    no_reads("train_step")
    no_reads("_watch_finite")
    synced = []
    real_read_back = Trainer._read_back

    def read_back(self, *a, **k):
        synced.append(self.step)
        return real_read_back(self, *a, **k)

    monkeypatch.setattr(Trainer, "_read_back", read_back)
    train(tiny_config("train.max_steps=12", "train.log_every=5", "train.eval_every=6", "train.checkpoint_every=100",
                      "train.grad_accum_steps=2"), tmp_path / "run")
    assert synced == [1, 5, 6, 10, 12]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_non_finite_update_is_skipped_on_the_device_and_reported_at_the_next_log_step(tiny_config, tmp_path,
                                                                                         monkeypatch, optimizer):
    """Between log steps the check stays on the device: the bad update is not applied, the run goes on
    to the next log step, then stops naming the step where it happened (fused AdamW, or Muon + AdamW:
    both take the flag as found_inf)."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip_inf_at_3(params, max_norm):
        calls.append(1)
        norm = real_clip(params, max_norm)
        return torch.full_like(norm, float("inf")) if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_inf_at_3)
    trainer = Trainer(tiny_config("train.max_steps=20", "train.log_every=8", "train.checkpoint_every=100",
                                  f"optim.name={optimizer}"), tmp_path / "run")
    assert trainer.optimizer._step_supports_amp_scaling  # the flag stays on the device
    weights = {}
    real_step_unless = Trainer._step_unless

    def step_unless(self, bad):
        before = {k: v.clone() for k, v in self.raw_model.state_dict().items()}
        real_step_unless(self, bad)
        weights[self.step + 1] = all(torch.equal(before[k], v) for k, v in self.raw_model.state_dict().items())

    monkeypatch.setattr(Trainer, "_step_unless", step_unless)
    with pytest.raises(GptforgeError, match=r"gradient norm became inf at step 3 \(that update was not applied\)"):
        trainer.train()
    assert trainer.step == 8  # found at the next log step
    assert weights[3] and not any(weights[s] for s in (1, 2, 4, 5, 6, 7, 8))  # only update 3 left them alone
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


@pytest.mark.slow
def test_compile_warm_up_is_reported_apart(tiny_config, tmp_path, read_metrics):
    """train.compile on the CPU (inductor): the first update compiles; its seconds are an event of
    their own and neither its tokens/s nor its MFU is logged; losses match eager, weights save plain."""
    from safetensors import safe_open

    common = ("train.max_steps=3", "model.n_layer=1")
    train(tiny_config(*common, "train.compile=true"), tmp_path / "compiled")
    train(tiny_config(*common), tmp_path / "eager")
    events = read_metrics(tmp_path / "compiled", "event")
    compiled = [e for e in events if e["event"] == "compiled"]
    assert len(compiled) == 1 and compiled[0]["step"] == 1 and isinstance(compiled[0]["seconds"], float)
    records = read_metrics(tmp_path / "compiled", "train")
    assert "tokens_per_s" not in records[0] and "mfu" not in records[0]
    assert all("tokens_per_s" in r and "mfu" in r for r in records[1:])
    eager = read_metrics(tmp_path / "eager", "train")
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in eager], abs=1e-4)
    with safe_open(tmp_path / "compiled" / "checkpoints" / "latest" / "model.safetensors", "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())


def test_muon_trains_checkpoints_and_resumes_exactly(tiny_config, tmp_path, read_metrics, step_calls, starts):
    """optim.name = muon: PyTorch's Muon on the blocks' matrices, AdamW on the rest, each with its own
    LR under one schedule; its state (both parts) is in the checkpoint, so resume is exact."""
    from gptforge.train.muon import Muon
    from gptforge.train.optim import MuonAdamW, muon_params, set_lr

    common = ("optim.name=muon", "optim.muon_lr=0.02", "model.dropout=0.1", "optim.decay_steps=30",
              "train.eval_every=10")
    result = train(tiny_config("train.max_steps=30", *common), tmp_path / "once")
    losses = [r["loss"] for r in read_metrics(tmp_path / "once", "train")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3 and math.isfinite(result.val_loss)

    train(tiny_config("train.max_steps=12", *common), tmp_path / "twice")
    state = ckpt.load_state(tmp_path / "twice" / "checkpoints" / "latest")
    assert set(state["optimizer"]) == {"muon", "adamw"} and state["optimizer"]["muon"]["state"]
    step_calls.clear()
    train(resume_config(tmp_path / "twice", ["train.max_steps=30"]), tmp_path / "twice", resume=True)
    assert [r["loss"] for r in read_metrics(tmp_path / "twice", "train")] == losses
    assert step_calls == list(range(12, 30))  # only the updates after the checkpoint were computed
    assert starts(tmp_path / "twice") == [("started", 0), ("resumed", 12)]

    trainer = Trainer(tiny_config("train.max_steps=1", *common), tmp_path / "look")
    opt = trainer.optimizer
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, Muon)
    hidden = {id(p) for p in muon_params(trainer.raw_model)}
    assert {id(p) for g in opt.muon.param_groups for p in g["params"]} == hidden
    assert trainer.raw_model.transformer.wte.weight in [p for g in opt.adamw.param_groups for p in g["params"]]
    set_lr(opt, 1.5e-3)  # half of optim.lr (3e-3): the schedule scales Muon's LR by the same factor
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(0.01)]
    assert {g["lr"] for g in opt.adamw.param_groups} == {1.5e-3}


def test_samples_are_written_at_each_evaluation_without_changing_the_training(tiny_config, tmp_path,
                                                                             read_metrics, capsys):
    """train.sample_every (default: each evaluation) writes a seeded sample from a fixed prompt to the
    console and RUN/samples.jsonl; it has its own RNG, so the losses equal a run without samples."""
    import json

    common = ("train.max_steps=8", "train.eval_every=4", "model.dropout=0.1", "train.sample_tokens=20")
    train(tiny_config(*common, "train.sample_prompt=ROMEO:"), tmp_path / "with")
    out = capsys.readouterr().out
    train(tiny_config(*common, "train.sample_every=0"), tmp_path / "without")
    samples = [json.loads(line) for line in (tmp_path / "with" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4, 8] and all(s["prompt"] == "ROMEO:" for s in samples)
    assert all(len(s["text"]) == 20 for s in samples)  # char level: one character per token
    assert f"sample step 8 | ROMEO:{samples[1]['text']}" in out
    assert not (tmp_path / "without" / "samples.jsonl").exists()
    assert [r["loss"] for r in read_metrics(tmp_path / "with", "train")] == \
           [r["loss"] for r in read_metrics(tmp_path / "without", "train")]

    # Every 3 updates instead, and the same seeded sample for the same weights (a resume rewrites none).
    train(tiny_config("train.max_steps=4", "optim.decay_steps=8", "train.eval_every=4", "model.dropout=0.1",
                      "train.sample_tokens=20", "train.sample_prompt=ROMEO:", "train.sample_every=3"),
          tmp_path / "every3")
    every3 = [json.loads(line) for line in (tmp_path / "every3" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in every3] == [3, 4] and every3[1]["text"] == samples[0]["text"]


def test_bits_per_byte_are_logged_beside_the_losses_and_eval_agrees(tiny_config, tmp_path, tiny_corpus, read_metrics,
                                                                     capsys):
    """Over text with multi-byte characters: the trainer's exact train_full number and `gptforge eval`
    agree on tokens, bytes and bits per byte; the random-window estimate divides by the bytes of its
    own windows' targets; a run that stops on the training split reports the validation numbers too."""
    import numpy as np

    from gptforge.data.tokens import BatchSampler

    text = tmp_path / "accents.txt"
    source = tiny_corpus.read_text(encoding="utf-8").replace("e", "é").replace("o", "ø✓")
    text.write_text(source, encoding="utf-8")
    run = tmp_path / "run"
    result = train(tiny_config(f"data.corpus={text}", "train.max_steps=50", "train.stop_at_loss=10",
                               "train.stop_metric=train_full", "train.eval_every=2"), run)
    assert result.stopped_by == "stop_at_loss" and result.step == 2
    ev = read_metrics(run, "eval")[-1]
    n_train = ev["train_loss_tokens"] + 1  # one character per token; the training split is the text's start
    assert ev["train_loss_bytes"] == len(source[1:n_train].encode("utf-8")) > ev["train_loss_tokens"]
    assert ev["train_bpb"] == pytest.approx(ev["train_loss"] * ev["train_loss_tokens"]
                                            / (ev["train_loss_bytes"] * math.log(2)), rel=1e-9)
    exact = evaluate_run(run, split="train")
    assert (exact["tokens"], exact["bytes"]) == (ev["train_loss_tokens"], ev["train_loss_bytes"])
    assert exact["bpb"] == pytest.approx(ev["train_bpb"], abs=1e-5)

    # The validation estimate: redraw its windows (seed + 1) and count their targets' bytes apart.
    cfg, tok = resume_config(run), runs.load_model(run)[1]
    val = np.array(tok.encode(source[n_train:]), dtype=np.int64)
    t = cfg.train
    sampler = BatchSampler(val, t.batch_size, cfg.model.block_size, mode="random", seed=t.seed + 1)
    ys = [sampler.next_batch()[1] for _ in range(t.eval_batches)]
    n_bytes = sum(len(tok.decode(row.tolist()).encode("utf-8")) for y in ys for row in y)
    n_tokens = t.eval_batches * t.batch_size * cfg.model.block_size
    assert n_bytes > n_tokens
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] * n_tokens / (n_bytes * math.log(2)), rel=1e-9)

    # Memorisation honesty: the stop names the validation loss and bits per byte beside the train loss.
    stop = read_metrics(run, "event")[-1]
    assert (stop["metric"], stop["value"]) == ("train_loss", ev["train_loss"])
    assert (stop["val_loss"], stop["val_bpb"]) == (ev["val_loss"], ev["val_bpb"])
    assert "val_bpb" in capsys.readouterr().out  # on the console as well
    cli.main(["eval", str(run), "--split", "train"])
    out = capsys.readouterr().out
    assert f"{exact['bpb']:.4f} bits/byte over their {exact['bytes']:,} UTF-8 bytes" in out
