"""Helpers shared by the benchmark scripts: what machine ran them, peak memory, and writing results into
a marked section of docs/benchmarks.md without touching the other sections.

    from common import machine_summary, update_section
    update_section("docs/benchmarks.md", "bench:train", markdown_text)
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_summary(device: torch.device) -> str:
    """One markdown line naming the hardware and software a result came from."""
    flags = cpu_flags()
    isa = "AVX-512 BF16" if "avx512_bf16" in flags else ("AVX-512" if "avx512f" in flags else
                                                          ("AVX2" if "avx2" in flags else "no AVX2"))
    parts = [f"CPU: {cpu_model()}, {os.cpu_count()} cores ({isa})"]
    if device.type == "cuda":
        parts.insert(0, f"GPU: {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        parts.append(f"load average at start {load}")
    except OSError:
        pass
    parts.append(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return "; ".join(parts)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's RSS high-water mark (Linux >= 4.0) and return the current RSS in bytes.
    Needs a fresh process per measurement anyway: freed memory is not always returned to the OS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak includes what came before; the caller reports the delta over the baseline
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    """Highest resident set size of this process since start (or the last reset), in bytes."""
    return _status_kb("VmHWM") * 1024


def update_section(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace what lies between `<!-- name -->` and `<!-- /name -->` in `path` (appending the markers
    when missing, creating the file when needed), leaving every other section as it was."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else f"{title}\n"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def training_step(loss_fn, x: torch.Tensor, y: torch.Tensor, optimizer, scaler, params, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """One update as Trainer.train_step makes it for one micro-batch (autocast, GradScaler, clipping at
    1.0, the optimizer's step); the loss comes back detached, on the device (reading it is a sync)."""
    from gptforge.runtime import autocast

    with autocast(device, dtype):
        loss = loss_fn(x, y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
