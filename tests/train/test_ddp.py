"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global batch, and
agree on when to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge import runs
from gptforge.train.trainer import train

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _torchrun_two(cfg, tmp_path, script: str | None = None, check: bool = True):
    """`gptforge train` under torchrun with two CPU (gloo) processes, into tmp_path/two; must succeed
    unless check=False. `script`: Python source each rank runs instead of `-m gptforge` (it gets the
    same arguments and ends by calling gptforge.cli.main)."""
    cfg.save(tmp_path / "ddp.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if script is None:
        entry = ["-m", "gptforge"]
    else:
        (tmp_path / "rank.py").write_text(script, encoding="utf-8")
        entry = [str(tmp_path / "rank.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry,
           "train", "--config", str(tmp_path / "ddp.toml"), "--out", str(tmp_path / "two")]
    # A session of its own, so that a hang (ranks stuck in different collectives) can end every rank.
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    proc = subprocess.CompletedProcess(cmd, child.returncode, out, err)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_processes_equal_one(tiny_config, tiny_corpus, tmp_path, read_metrics, optimizer):
    common = ["train.grad_accum_steps=2", "train.max_steps=4", "train.eval_every=2", "optim.warmup_steps=0",
              f"optim.name={optimizer}"]
    # One process, batch 4 = two ranks x batch 2 (each draws its rows of the same global batch).
    train(tiny_config("train.batch_size=4", *common), tmp_path / "one")

    cfg = tiny_config("train.batch_size=2", *common)
    proc = _torchrun_two(cfg, tmp_path)

    one, two = read_metrics(tmp_path / "one", "train"), read_metrics(tmp_path / "two", "train")
    assert [r["step"] for r in two] == [1, 2, 3, 4] and [r["tokens"] for r in two] == [r["tokens"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    e_one, e_two = read_metrics(tmp_path / "one", "eval"), read_metrics(tmp_path / "two", "eval")
    for a, b in zip(e_one, e_two, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    # Rank 0 alone wrote the run: one started event, one stop line, one set of checkpoints.
    assert sum(e["event"] == "started" for e in read_metrics(tmp_path / "two", "event")) == 1
    assert proc.stdout.count("stopped by max_steps") == 1
    assert (tmp_path / "two" / "checkpoints" / "latest" / "state.pt").is_file()


def test_a_time_budget_under_ddp_sizes_one_schedule_for_both_ranks(tiny_config, tmp_path, read_metrics):
    """Sizing a max_time schedule is agreed on by every rank (at a sync step, rank 0's length), so two
    processes never wait on each other in different collectives."""
    cfg = tiny_config("train.batch_size=2", "train.max_steps=none", "train.max_time=6", "optim.schedule=wsd",
                      "train.log_every=5", "train.eval_every=100000", "train.checkpoint_every=100000")
    proc = _torchrun_two(cfg, tmp_path)
    events = read_metrics(tmp_path / "two", "event")
    sized = [e for e in events if e["event"] == "schedule_sized"]
    assert len(sized) == 1 and events[-1]["event"] == "stopped"
    assert proc.stdout.count("stopped by") == 1


# Rank 1 alone gets a SIGTERM during update 3, as from a scheduler preempting one machine.
_SIGTERM_RANK_1 = """
import os, signal, sys
from gptforge import cli
from gptforge.train.trainer import Trainer

real = Trainer.train_step

def train_step(self):
    if self.step == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self)

Trainer.train_step = train_step
cli.main(sys.argv[1:])
"""


def test_a_sigterm_on_one_rank_stops_every_rank_at_the_next_log_step(tiny_config, tmp_path, read_metrics):
    """The rank that got the signal asks the others through the next log step's all-reduce; they stop at
    the same step and latest is saved once, for that step (rank 0 writes it)."""
    cfg = tiny_config("train.batch_size=2", "train.max_steps=50", "train.log_every=5", "train.eval_every=100",
                      "train.checkpoint_every=100")
    proc = _torchrun_two(cfg, tmp_path, script=_SIGTERM_RANK_1, check=False)
    # torchrun ends the other rank once the first exits (130 here), so only what happens before the
    # collective save's barrier is certain: both ranks stopped at step 5 and rank 0 saved latest there.
    assert proc.returncode != 0 and "gptforge: interrupted" in proc.stderr, proc.stderr[-3000:]
    run = tmp_path / "two"
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 5]
    assert runs.read_info(run / "checkpoints" / "latest")["step"] == 5
    assert not (run / "checkpoints" / "step-0000005").exists()  # the interrupt's save, not a periodic one
