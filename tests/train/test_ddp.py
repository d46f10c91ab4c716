"""Two CPU processes under torchrun (gloo), on one node or as two nodes, train exactly like one process with
the same global batch, and agree on when to stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge import runs
from gptforge.train.trainer import train

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _train_cmd(launch: list[str], config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "gptforge", "train", "--config",
            str(config), "--out", str(out)]


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


TIMED = """
import sys
from gptforge.config import load_config
from gptforge.train.trainer import Trainer, train

class Clock:  # each update takes 0.125 s on rank 0 and 0.375 s on rank 1 (a busier machine)
    now = 100.0
    def __call__(self):
        return self.now

clock, real_step = Clock(), Trainer.train_step

def step(self):
    out = real_step(self)
    clock.now += 0.125 if self.rt.rank == 0 else 0.375
    return out

Trainer.train_step = step
train(load_config(sys.argv[1]), sys.argv[2], clock=clock)
"""


def test_a_time_budget_under_ddp_follows_one_clock_on_both_ranks(tiny_config, tmp_path, read_metrics):
    """The LR of a time-budget run comes from the clock the ranks agree on at sync steps (their mean),
    so the replicas take the same updates even when their own clocks differ, and both stop by max_time
    at the same step, with the LR at its floor. Each rank's clock is one the test controls."""
    cfg = tiny_config("train.batch_size=2", "train.max_steps=none", "train.max_time=6", "optim.schedule=wsd",
                      "optim.min_lr=3e-4", "optim.warmup_steps=2", "train.log_every=5",
                      "train.eval_every=100000", "train.checkpoint_every=100000")
    cfg.save(tmp_path / "cfg.toml")
    (tmp_path / "timed.py").write_text(TIMED)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "timed.py"), str(tmp_path / "cfg.toml"), str(tmp_path / "two")],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_metrics(tmp_path / "two", "event")
    assert events[-1]["event"] == "stopped" and events[-1]["reason"] == "max_time"
    assert proc.stdout.count("[stopped]") == 1 and events[-1]["value"] == 6.0  # rank 0 logs, the agreed clock
    records = read_metrics(tmp_path / "two", "train")
    # The agreed clock runs at the mean 0.25 s an update: the budget is spent after 24 updates.
    assert records[-1]["step"] == 24 and records[-1]["lr"] == pytest.approx(3e-4)
    assert records[-1]["elapsed_s"] == 6.0
    assert records[-2]["lr"] > 3e-4


ONE_RANK_NAN = """
import gc
import sys
import torch
import torch.distributed as dist
from gptforge.config import load_config
from gptforge.model import GPT
from gptforge.train.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1]), sys.argv[2])
rank, poison, real_forward = trainer.rt.rank, [False], GPT.forward

def forward(self, *args, **kwargs):
    logits, loss = real_forward(self, *args, **kwargs)
    if poison[0] and rank == 1 and loss is not None:
        loss = loss + torch.tensor(float("nan"))  # a non-finite loss whose gradients are finite
    return logits, loss

GPT.forward = forward
trainer.train_step()
poison[0] = True
before = [p.detach().clone() for p in trainer.raw_model.parameters()]
trainer.train_step()
changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
flat = torch.cat([p.detach().flatten() for p in trainer.raw_model.parameters()])
both = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(both, flat)
print(f"rank {rank} changed={changed} same={torch.equal(both[0], both[1])}", flush=True)
# Ends as the trainer's _finish does: together, and with DDP's hold on the process group dropped before
# it is destroyed (else gloo could abort at interpreter shutdown).
trainer.rt.barrier()
trainer.model = None
gc.collect()
trainer.rt.close()
"""


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_one_ranks_non_finite_loss_skips_the_update_on_every_rank(tiny_config, tmp_path, optimizer):
    """Rank 1's loss is NaN but the (all-reduced) gradients are finite: every rank must skip that
    update, or the replicas part (rank 0 would apply it, rank 1 not)."""
    cfg = tiny_config("train.batch_size=2", "train.max_steps=4", "optim.warmup_steps=0", f"optim.name={optimizer}")
    cfg.save(tmp_path / "cfg.toml")
    (tmp_path / "nan.py").write_text(ONE_RANK_NAN)
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "nan.py"), str(tmp_path / "cfg.toml"), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The two ranks print at once: their lines may interleave, so read the reports, not the lines.
    reports = sorted(re.findall(r"rank (\d) changed=(True|False) same=(True|False)", proc.stdout))
    assert reports == [("0", "False", "True"), ("1", "False", "True")], proc.stdout


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
