"""Two CPU processes under torchrun (gloo), on one node or as two nodes, train exactly like one process with
the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.train.trainer import train


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _train_cmd(launch: list[str], config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "gptforge", "train", "--config",
            str(config), "--out", str(out)]


def _torchrun_two(cfg, tmp_path):
    """`gptforge train` under torchrun with two CPU (gloo) processes, into tmp_path/two; must succeed."""
    cfg.save(tmp_path / "ddp.toml")
    cmd = _train_cmd(["--standalone", "--nproc_per_node=2"], tmp_path / "ddp.toml", tmp_path / "two")
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_nodes(cfg, tmp_path) -> str:
    """Two torchrun launches on this machine acting as two nodes of one process each: c10d rendezvous
    on 127.0.0.1 (node 0 hosts it, as the README's commands do), gloo, into tmp_path/two. Each node
    has its own token cache (nothing shared but the run directory). Returns both nodes' stdout."""
    cfg.save(tmp_path / "ddp.toml")
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in (0, 1):
        launch = ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint={endpoint}", "--rdzv-id=two-nodes", f"--rdzv-conf=is_host={int(node == 0)}"]
        env = {**_env(), "GPTFORGE_CACHE_DIR": str(tmp_path / f"cache-node{node}")}
        procs.append(subprocess.Popen(_train_cmd(launch, tmp_path / "ddp.toml", tmp_path / "two"), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return "".join(outs)


@pytest.mark.parametrize(("optimizer", "nodes"), [("adamw", 1), ("muon", 1),
                                                  pytest.param("adamw", 2, marks=pytest.mark.slow)])
def test_two_processes_equal_one(tiny_config, tiny_corpus, tmp_path, read_metrics, optimizer, nodes):
    """Two processes on one node, or two nodes of one process each (--nnodes 2, c10d rendezvous)."""
    common = ["train.grad_accum_steps=2", "train.max_steps=4", "train.eval_every=2", "optim.warmup_steps=0",
              f"optim.name={optimizer}"]
    # One process, batch 4 = two ranks x batch 2 (each draws its rows of the same global batch).
    train(tiny_config("train.batch_size=4", *common), tmp_path / "one")

    cfg = tiny_config("train.batch_size=2", *common)
    stdout = _torchrun_two(cfg, tmp_path).stdout if nodes == 1 else _torchrun_two_nodes(cfg, tmp_path)

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
    assert stdout.count("stopped by max_steps") == 1
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
