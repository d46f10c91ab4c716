"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gptforge.train.trainer import train


def _torchrun_two(cfg, tmp_path):
    """`gptforge train` under torchrun with two CPU (gloo) processes, into tmp_path/two; must succeed."""
    cfg.save(tmp_path / "ddp.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gptforge", "train", "--config", str(tmp_path / "ddp.toml"), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
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
