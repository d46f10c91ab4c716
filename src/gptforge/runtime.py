"""Device, precision, distributed set-up and seeding: what training and evaluation ask of the machine.

    rt = setup_runtime(device="auto", dtype="auto")    # reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE
    with rt.autocast():
        _, loss = model(x, y)
    print0("only rank 0 prints this")
    rt.close()

One process: no process group. Under torchrun: NCCL on CUDA (one GPU per local rank), gloo on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gptforge.errors import GptforgeError
from gptforge.runs import pick_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


CPU_BF16_ENV = "GPTFORGE_CPU_BF16"


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matmul instructions (Linux /proc/cpuinfo flags).

    GPTFORGE_CPU_BF16=1 (or 0) overrides the answer, so that `train.dtype = "auto"` takes the bf16
    path on a CPU without the instructions (emulated: slow, but right for tiny test shapes) or the
    float32 path on one with them: the test suite runs both paths on either kind of CPU."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise GptforgeError(f"{CPU_BF16_ENV}={forced!r} is invalid; set it to 1 (bf16 path), 0 (float32) or unset it")
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA GPUs that have it, float16 on older ones; on the CPU bfloat16 where it
    has bf16 matmul instructions (AVX-512 BF16 or AMX), else float32; float32 on MPS.

    CPU bfloat16 autocast is ~1.4x faster than float32 on CPUs with bf16 units, but tens of times
    slower on CPUs without them (measured: AVX2-only EPYC), hence the check."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise GptforgeError(f"train.dtype = {name!r} is invalid; allowed: 'auto', {', '.join(map(repr, DTYPES))}")
    if name == "float16" and device.type == "cpu":
        raise GptforgeError("train.dtype = 'float16' needs a GPU (CPU autocast does not do float16 well); "
                            "use bfloat16 or float32 on the CPU")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for bf16/fp16 (weights stay float32); a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A GradScaler that only does something for float16, whose small range needs loss scaling."""
    enabled = dtype == torch.float16 and device.type == "cuda"
    return torch.amp.GradScaler(device.type if enabled else "cpu", enabled=enabled)


KEEP_FREED_MEMORY_ENV = "GPTFORGE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """On Linux (glibc), serve large blocks from malloc's heap and keep freed memory for reuse, instead
    of mapping every block over 32 MB afresh from the kernel and unmapping it when it is freed: a
    fresh mapping costs a page fault (~1 us) per 4 KB page the first time it is written. The
    GPT-2-vocabulary CPU step allocates and frees the 51 MB float32 gradients of the token embedding
    and several more such blocks each update. Afterwards the process keeps what it has freed (its
    resident memory stays at its peak), which is what a training process wants, so the Trainer asks for
    it on a CPU; other callers (evaluation, the Python API) keep glibc's defaults. Process-wide; returns
    whether it applied (False where the C library has no mallopt, e.g. macOS, or where
    GPTFORGE_KEEP_FREED_MEMORY=0 asks the C library's defaults to stay)."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "").strip() == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no such symbol; Windows has no CDLL(None)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    # No mmap'd blocks (glibc still falls back to mmap when the heap cannot grow), and no trimming of
    # the heap's free top below 2 GB (mallopt takes a C int).
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@dataclass
class Runtime:
    """Where and how this process computes."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks, in place (a no-op in one process)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Pick the device and precision, and join torchrun's process group when RANK is set."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world_size > 1:
        if dev.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise GptforgeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
                                    "use --nproc_per_node <= the GPU count")
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        elif dev.type == "mps":
            raise GptforgeError("distributed training on MPS is not supported; use train.device=cpu with torchrun")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        # TF32 matmuls: ~free speed on Ampere+ with no visible effect on training curves.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=dev, dtype=resolve_dtype(dtype, dev), rank=rank, local_rank=local_rank,
                   world_size=world_size)


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only (every process under torchrun runs the same code)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain containers (saveable with torch.save, loadable with
    weights_only=True): python's, numpy's, torch's CPU and CUDA generators."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
