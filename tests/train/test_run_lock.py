"""One trainer per run directory: while `gptforge train` writes a run, a second `train --resume RUN`
is refused with one line naming the first, and the first finishes unharmed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from gptforge import cli
from gptforge.io import RunLock

FIRST = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gptforge.config import load_config
    from gptforge.train.trainer import train

    cfg, run, gate = load_config(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def hold_at_the_first_evaluation(step, record):
        if step == 10:  # the checkpoint of step 5 exists: a resume would be possible
            (gate.parent / "ready").write_text("1")
            while not gate.exists():
                time.sleep(0.05)

    train(cfg, run, eval_hook=hold_at_the_first_evaluation)
""")


def test_a_second_trainer_of_a_running_run_is_refused(tiny_config, tmp_path, capsys, read_metrics):
    cfg = tiny_config("train.max_steps=12", "train.eval_every=10", "train.checkpoint_every=5")
    cfg.save(tmp_path / "cfg.toml")
    run, gate = tmp_path / "run", tmp_path / "gate"
    script = tmp_path / "first.py"
    script.write_text(FIRST)
    first = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cfg.toml"), str(run), str(gate)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "ready").exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run never reached its evaluation"
            time.sleep(0.05)
        metrics_before = (run / "metrics.jsonl").read_bytes()
        latest_before = (run / "checkpoints" / "latest" / "info.json").read_bytes()

        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--resume", str(run), "train.max_steps=20"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is being trained by another process" in err[0]
        assert f"pid {first.pid}" in err[0]
        # The refused one touched nothing.
        assert (run / "metrics.jsonl").read_bytes() == metrics_before
        assert (run / "checkpoints" / "latest" / "info.json").read_bytes() == latest_before
    finally:
        gate.write_text("go")
        out, err_first = first.communicate(timeout=240)
    assert first.returncode == 0, err_first[-2000:]
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 13))
    assert json.loads((run / "checkpoints" / "latest" / "info.json").read_text())["step"] == 12

    # Once the first has exited (the kernel drops its lock), the run resumes normally.
    cli.main(["train", "--resume", str(run), "train.max_steps=14"])
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 15))


def test_the_lock_is_dropped_when_its_holder_dies(tmp_path):
    """kill -9 leaves RUN/.lock behind but not the lock: flock dies with the process."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from gptforge.io import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); time.sleep(600)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="being trained by another process"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / RunLock.NAME).exists()
    lock = RunLock(tmp_path)
    lock.acquire()
    assert f"pid {os.getpid()}" in (tmp_path / RunLock.NAME).read_text()
    lock.release()
