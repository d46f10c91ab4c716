"""Device, precision and RNG handling."""

from __future__ import annotations

import platform
import random

import numpy as np
import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.train.runtime import (
    autocast,
    cpu_has_bf16,
    grad_scaler,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_runtime,
)


def test_device_and_dtype_resolution():
    from gptforge.runs import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(GptforgeError, match="no CUDA GPU"):
            pick_device("cuda")
    cpu = torch.device("cpu")
    # auto is bf16 only on CPUs with bf16 matmul units (e.g. Zen 4), float32 elsewhere.
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(GptforgeError, match="float16"):
        resolve_dtype("float16", cpu)
    rt = setup_runtime("cpu", "float32")
    assert (rt.rank, rt.world_size, rt.is_main, rt.distributed) == (0, 1, True, False)


def test_cpu_bf16_autocast_and_no_scaler():
    cpu = torch.device("cpu")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, torch.float32):
        assert (a @ b).dtype == torch.float32
    assert not grad_scaler(cpu, torch.bfloat16).is_enabled()


def test_rng_state_round_trips_through_weights_only_torch_load(tmp_path):
    seed_everything(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_cpu_bf16_detection_reads_cpuinfo_flags(monkeypatch, tmp_path):
    import gptforge.runtime as runtime

    monkeypatch.delenv(runtime.CPU_BF16_ENV, raising=False)
    real_read = runtime.Path.read_text

    def fake_cpuinfo(flags):
        def read_text(self, *a, **k):
            if str(self) == "/proc/cpuinfo":
                return f"processor : 0\nflags : fpu sse2 {flags}\n"
            return real_read(self, *a, **k)
        return read_text

    monkeypatch.setattr(runtime.Path, "read_text", fake_cpuinfo("avx2 avx512f avx512_bf16"))
    assert cpu_has_bf16() and resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(runtime.Path, "read_text", fake_cpuinfo("avx2"))
    assert not cpu_has_bf16() and resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_cpu_bf16_path_can_be_forced_either_way(monkeypatch):
    """GPTFORGE_CPU_BF16 decides what `auto` picks on the CPU whatever the CPU has, so the suite can run
    the bf16 path on an AVX2-only machine and the float32 path on an AVX-512 BF16 one."""
    from gptforge.train.runtime import CPU_BF16_ENV

    cpu = torch.device("cpu")
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert cpu_has_bf16() and resolve_dtype("auto", cpu) == torch.bfloat16
    assert setup_runtime("cpu", "auto").dtype == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert not cpu_has_bf16() and resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(GptforgeError, match="GPTFORGE_CPU_BF16='yes' is invalid"):
        resolve_dtype("auto", cpu)


def _faults_per_round(rounds: int) -> list[int]:
    """Minor page faults of each of `rounds` rounds that make and free two 64 MB tensors, as a step does."""
    import resource

    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(2048, 8192)
        b = a * 2
        b.sum(0)
        del a, b
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_cpu_training_keeps_freed_memory_for_the_next_large_blocks(monkeypatch, tmp_path, tiny_config):
    """Freed 64 MB blocks are reused by the next round's, not unmapped and faulted in again page by page
    (32,768 faults a round without; the GPT-2-vocabulary CPU step makes several such blocks an update).
    A CPU Trainer asks for it; setup_runtime alone (evaluation, the Python API) does not."""
    import gptforge.runtime as runtime
    import gptforge.train.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1) or True)
    setup_runtime("cpu", "float32")
    assert calls == []
    trainer.Trainer(tiny_config("train.max_steps=1"), tmp_path / "run")
    assert calls == [1]
    monkeypatch.undo()
    monkeypatch.setenv(runtime.KEEP_FREED_MEMORY_ENV, "0")  # the user's way to keep glibc's defaults
    assert runtime.keep_freed_memory() is False
    monkeypatch.delenv(runtime.KEEP_FREED_MEMORY_ENV)
    assert runtime.keep_freed_memory() is True
    fresh = 2 * (64 << 20) // 4096  # pages of one round's blocks
    settled = _faults_per_round(8)[4:]  # the heap grows over the first rounds, then holds them
    assert sum(settled) < len(settled) * fresh / 2, settled
