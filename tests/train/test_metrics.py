"""MetricsLogger (jsonl, console, TensorBoard, resume), the peak-FLOP/s table and MFU."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.train.metrics import MetricsLogger, device_peak_flops, gpu_peak_flops, mfu


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_records_and_console_lines(tmp_path, capsys):
    log = MetricsLogger(tmp_path / "run", total_steps=10)
    log.log_train(1, tokens=64, loss=4.5, lr=torch.tensor(3e-4), tokens_per_s=1234.5, mfu=0.125)
    # Each line is flushed as it is written, before close: a kill loses nothing already logged.
    assert _records(tmp_path / "run")[0]["loss"] == 4.5
    log.log_train(2, tokens=128, loss=4.0, lr=3e-4, tokens_per_s=1300.0)
    log.log_eval(2, tokens=128, val_loss=4.2, train_loss=4.1)
    log.event("stopped", reason="max_steps")
    log.print("hello")
    log.close()

    recs = _records(tmp_path / "run")
    assert [r["kind"] for r in recs] == ["train", "train", "eval", "event"]
    assert recs[0] == {"kind": "train", "step": 1, "tokens": 64, "loss": 4.5, "lr": pytest.approx(3e-4),
                       "tokens_per_s": 1234.5, "mfu": 0.125}
    assert recs[2] == {"kind": "eval", "step": 2, "tokens": 128, "val_loss": 4.2, "train_loss": 4.1}
    # An event carries the step of the latest record so that resume can trim it.
    assert recs[3]["event"] == "stopped" and recs[3]["step"] == 2 and recs[3]["reason"] == "max_steps"

    out = capsys.readouterr().out  # not a TTY under pytest: one line per call, no bar
    lines = out.splitlines()
    assert lines[0].startswith("step 1/10 | loss 4.5000 | lr 3.00e-04 | 1,234 tok/s | mfu 12.5%")
    assert "eta" in lines[1]
    assert "eval step 2" in out and "val_loss 4.2000" in out
    assert "[stopped] step 2 reason=max_steps" in out and "hello" in lines


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=6)
    for step in range(1, 6):
        log.log_train(step, loss=10.0 - step)
    log.log_eval(4, val_loss=5.5)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # a line cut short by a kill

    log = MetricsLogger(tmp_path, total_steps=6, resume_step=3)
    log.event("resumed")
    log.log_train(4, loss=0.5)
    log.close()
    recs = _records(tmp_path)
    assert [(r["kind"], r["step"]) for r in recs] == [
        ("train", 1), ("train", 2), ("train", 3), ("event", 3), ("train", 4)]
    assert recs[-1]["loss"] == 0.5


def test_disabled_logger_does_nothing(tmp_path, capsys):
    log = MetricsLogger(tmp_path / "run", total_steps=5, enabled=False, tensorboard=True)
    log.log_train(1, loss=1.0)
    log.log_eval(1, val_loss=1.0)
    log.event("x")
    log.print("not shown")
    log.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""


def test_console_only_without_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with MetricsLogger(None) as log:
        log.log_train(7, loss=2.0)
    assert "step 7 | loss 2.0000" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    log = MetricsLogger(tmp_path, total_steps=4)
    log.log_train(2, loss=3.25, lr=1e-3, tokens_per_s=999.0)
    log.log_eval(2, val_loss=3.5)
    log.close()
    out = term.getvalue()
    assert "2/4" in out and "loss 3.2500" in out and "999 tok/s" in out
    assert "eval step 2 | val_loss 3.5000\n" in out


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, tensorboard=True)
    log.log_train(1, loss=3.0, lr=1e-3, note="text is not a scalar")
    log.log_train(2, loss=2.5, lr=1e-3)
    log.log_eval(2, val_loss=2.75)
    log.close()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/val_loss")] == [(2, 2.75)]
    assert "train/note" not in acc.Tags()["scalars"]


def test_missing_tensorboard_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(GptforgeError, match=r"pip install gptforge\[tb\]"):
        MetricsLogger(tmp_path, tensorboard=True)


def test_mfu_arithmetic():
    # 1 MFLOP/token at 1,000 tokens/s is 1 GFLOP/s: 10% of a 10 GFLOP/s device.
    assert mfu(1e6, 1000.0, 1e10) == pytest.approx(0.1)
    assert mfu(186.7e6, 2300.0, 430e9) == pytest.approx(0.9986, abs=1e-4)
    with pytest.raises(ValueError):
        mfu(1e6, 1.0, 0.0)


@pytest.mark.parametrize(
    ("name", "dtype", "tf32", "flops", "source"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, True, 989.4e12, "table: NVIDIA H100 80GB HBM3 bf16 dense"),
        ("NVIDIA H100 PCIe", torch.bfloat16, True, 756e12, "table: NVIDIA H100 PCIe bf16 dense"),
        ("NVIDIA H200", torch.float16, True, 989.4e12, "table: NVIDIA H200 fp16 dense"),
        ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156e12, "table: NVIDIA A100-SXM4-80GB tf32 dense"),
        ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5e12, "table: NVIDIA A100-SXM4-80GB fp32 dense"),
        ("NVIDIA A10G", torch.bfloat16, True, 70e12, "table: NVIDIA A10G bf16 dense"),
        ("NVIDIA A10", torch.bfloat16, True, 125e12, "table: NVIDIA A10 bf16 dense"),
        ("NVIDIA L4", torch.bfloat16, True, 121e12, "table: NVIDIA L4 bf16 dense"),
        ("Tesla T4", torch.bfloat16, True, 8.1e12, "table: Tesla T4 fp32 (no bf16 tensor cores)"),
        ("Tesla V100-PCIE-32GB", torch.float16, True, 112e12, "table: Tesla V100-PCIE-32GB fp16 dense"),
        ("Tesla V100-SXM2-16GB", torch.float32, True, 15.7e12, "table: Tesla V100-SXM2-16GB fp32 dense"),
        ("NVIDIA GeForce RTX 3090", torch.bfloat16, True, 71e12, "table: NVIDIA GeForce RTX 3090 bf16 dense"),
        ("NVIDIA GeForce RTX 4090", torch.float32, False, 82.6e12, "table: NVIDIA GeForce RTX 4090 fp32 dense"),
    ],
)
def test_peak_table_lookup_by_name(name, dtype, tf32, flops, source):
    assert gpu_peak_flops(name, dtype, tf32=tf32) == (pytest.approx(flops), source)


def test_unknown_gpus_are_not_guessed():
    assert gpu_peak_flops("NVIDIA L40S", torch.bfloat16) is None  # not an L4
    assert gpu_peak_flops("AMD Instinct MI300X", torch.bfloat16) is None


def test_cpu_peak_is_measured_once_per_machine_and_its_age_reported(monkeypatch, tmp_path):
    """MFU's CPU denominator is a GEMM rate measured once and cached on disk, so a busy moment at the
    start of one run does not inflate the MFU of every run after it; the source says how old it is."""
    import json
    import time

    import gptforge.train.metrics as metrics

    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(metrics, "_MEASURED", {})
    flops, source = device_peak_flops(torch.device("cpu"), torch.float32)
    assert flops > 1e8 and source.startswith("measured GEMM rate: CPU fp32 matmul ")
    assert "measured 0 min ago" in source and str(tmp_path / metrics.PEAK_CACHE) in source
    assert device_peak_flops("cpu", torch.float32) == (flops, source)  # cached in the process

    # A new process reads the file instead of measuring again: change the stored rate and age.
    path = tmp_path / metrics.PEAK_CACHE
    cached = json.loads(path.read_text())
    (machine,) = cached
    assert "fp32" in machine and f"threads={torch.get_num_threads()}" in machine
    cached[machine].update(flops=1.25e11, measured_at=time.time() - 2 * 3600)
    path.write_text(json.dumps(cached))
    monkeypatch.setattr(metrics, "_MEASURED", {})
    flops2, source2 = device_peak_flops("cpu", torch.float32)
    assert flops2 == 1.25e11 and "measured 2.0 h ago" in source2
