"""One logger for everything a run reports: console progress, RUN/metrics.jsonl, optional TensorBoard.

    from gptforge.train.metrics import MetricsLogger, device_peak_flops, mfu
    log = MetricsLogger(run_dir, total_steps=5000, tensorboard=False, resume_step=None)
    peak, source = device_peak_flops(torch.device("cpu"), torch.bfloat16)
    log.log_train(step, tokens=..., loss=..., lr=..., tokens_per_s=tps, mfu=mfu(model.flops_per_token(), tps, peak))
    log.log_eval(step, tokens=..., val_loss=..., train_loss=...)
    log.event("stopped", reason="max_steps")
    log.close()

metrics.jsonl is appended one flushed line per record, so a kill loses at most the line being written, and
`gptforge plot` can redraw any run afterwards. On ranks other than 0 pass enabled=False: every method is a
no-op there.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import GptforgeError
from gptforge.io import atomic_write_json, atomic_write_text, iter_jsonl

__all__ = ["MetricsLogger", "device_peak_flops", "gpu_peak_flops", "mfu"]


def _jsonable(value: Any) -> Any:
    # Trainers hand over numpy or 0-d torch scalars now and then; store their Python value.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metrics field of type {type(value).__name__} is not JSON-serialisable")


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    # 0-d tensors and numpy scalars become Python numbers once, for the file, the console and TensorBoard.
    return {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v for k, v in fields.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _truncate_after(path: Path, resume_step: int) -> None:
    """Keep only the records with step <= resume_step: later ones were written after the checkpoint the run
    resumes from and will be written again. A line cut short by a kill is dropped too."""
    if not path.exists():
        return
    kept = [line + "\n" for line, record in iter_jsonl(path)
            if not (_is_number(record.get("step")) and record["step"] > resume_step)]
    atomic_write_text(path, "".join(kept))  # a kill here leaves either the old file or the new one


class MetricsLogger:
    """Console progress + RUN/metrics.jsonl + optional TensorBoard (RUN/tb), behind one object.

    run_dir None logs to the console only; enabled=False (ranks != 0) makes every method a no-op;
    resume_step=N drops the records with step > N from an existing metrics.jsonl before appending.
    """

    def __init__(self, run_dir: Path | None, total_steps: int | None = None, enabled: bool = True,
                 tensorboard: bool = False, resume_step: int | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # What MFU is a fraction of, printed beside it ("vs measured GEMM" on a CPU, "vs datasheet peak").
        self.mfu_basis: str | None = None
        self.total_steps = total_steps
        # A run whose length is a time budget: the console shows its seconds against it and the ETA is
        # what is left of it (set by the trainer).
        self.time_budget: float | None = None
        self._file = None
        self._tb = None
        self._bar = None
        self._last_step = resume_step or 0
        # For the ETA on non-TTY consoles: the first logged (time, step) after start or resume.
        self._t0: float | None = None
        self._step0 = 0
        if not enabled:
            return
        if tensorboard:
            if self.run_dir is None:
                raise GptforgeError("TensorBoard logging needs a run directory; pass an output directory")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise GptforgeError(
                    "tensorboard is not installed; run `pip install gptforge[tb]` or turn tensorboard off"
                ) from e
            # purge_step hides events a killed run wrote after the checkpoint we resume from.
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "metrics.jsonl"
            if resume_step is not None:
                _truncate_after(path, resume_step)
                _truncate_after(self.run_dir / SAMPLES, resume_step)
            self._file = open(path, "a", encoding="utf-8")  # kept open for the run; flushed per line
        # A live bar only on a terminal; in a log file or a pipe a bar is noise, so print a line per call.
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", file=sys.stdout,
                             dynamic_ncols=True, smoothing=0.1)

    # ------------------------------------------------------------------------------------------ records

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()

    def _tb_scalars(self, prefix: str, step: int, fields: dict[str, Any]) -> None:
        if self._tb is None:
            return
        for key, value in fields.items():
            if _is_number(value) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def log_train(self, step: int, **fields: Any) -> None:
        """One training record: metrics.jsonl, the progress bar (or a line), TensorBoard train/<field>."""
        if not self.enabled:
            return
        self._last_step = step
        fields = _plain(fields)
        self._write({"kind": "train", "step": step, **fields})
        self._tb_scalars("train", step, fields)
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, step
        if self._bar is not None:
            self._bar.set_postfix_str(self._summary(fields), refresh=False)
            self._bar.update(max(0, step - self._bar.n))
        else:
            line = f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")
            parts = [line, self._summary(fields)]
            eta = self._eta(step, now)
            if self.time_budget is not None and "elapsed_s" in fields:
                parts.append(f"{fields['elapsed_s']:.0f}/{self.time_budget:.0f} s")
                eta = max(0.0, self.time_budget - fields["elapsed_s"])
            if eta is not None:
                parts.append(f"eta {_format_duration(eta)}")
            self._console(" | ".join(p for p in parts if p))

    def log_eval(self, step: int, **fields: Any) -> None:
        """One evaluation record: metrics.jsonl, a console line above the bar, TensorBoard eval/<field>."""
        if not self.enabled:
            return
        self._last_step = step
        fields = _plain(fields)
        self._write({"kind": "eval", "step": step, **fields})
        self._tb_scalars("eval", step, fields)
        shown = " | ".join(f"{k} {self._fmt(k, v)}" for k, v in fields.items() if k not in ("tokens", "elapsed_s"))
        self._console(f"eval step {step} | {shown}" if shown else f"eval step {step}")

    def event(self, name: str, **fields: Any) -> None:
        """Something that happened (resumed, stopped, checkpoint saved...): metrics.jsonl and a console line.
        It carries the step of the latest train/eval record unless `step` is given, so resume can trim it."""
        if not self.enabled:
            return
        fields = _plain(fields)
        step = fields.pop("step", self._last_step)
        self._write({"kind": "event", "event": name, "step": step, "time": time.time(), **fields})
        details = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._console(f"[{name}] step {step}" + (f" {details}" if details else ""))

    def sample(self, step: int, prompt: str, text: str, **fields: Any) -> None:
        """A sample written while training: RUN/samples.jsonl and the console (prompt + continuation)."""
        if not self.enabled:
            return
        if self.run_dir is not None:
            record = {"step": step, "prompt": prompt, "text": text, **_plain(fields)}
            with open(self.run_dir / SAMPLES, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._console(f"sample step {step} | {prompt}{text}")

    def print(self, msg: str) -> None:
        """A console line that does not break the progress bar."""
        if self.enabled:
            self._console(msg)

    def set_total_steps(self, total: int) -> None:
        """The run's length became known (a schedule sized to a time budget): for the ETA and the bar."""
        self.total_steps = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ console

    def _console(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, file=sys.stdout, flush=True)

    @staticmethod
    def _fmt(key: str, value: Any) -> str:
        if not _is_number(value):
            return str(value)
        if key == "lr":
            return f"{value:.2e}"
        if key == "mfu":
            return f"{100 * value:.1f}%"
        if key in ("tokens_per_s", "tokens"):
            return f"{value:,.0f}"
        if isinstance(value, int):
            return str(value)
        return f"{value:.4f}"

    def _summary(self, fields: dict[str, Any]) -> str:
        parts = []
        if "loss" in fields:
            parts.append(f"loss {self._fmt('loss', fields['loss'])}")
        if "lr" in fields:
            parts.append(f"lr {self._fmt('lr', fields['lr'])}")
        if "tokens_per_s" in fields:
            parts.append(f"{self._fmt('tokens_per_s', fields['tokens_per_s'])} tok/s")
        if "mfu" in fields:
            basis = f" {self.mfu_basis}" if self.mfu_basis else ""
            parts.append(f"mfu {self._fmt('mfu', fields['mfu'])}{basis}")
        return " | ".join(parts)

    def _eta(self, step: int, now: float) -> float | None:
        if not self.total_steps or self._t0 is None or step <= self._step0:
            return None
        rate = (step - self._step0) / max(now - self._t0, 1e-9)
        return max(0, self.total_steps - step) / rate


# ---------------------------------------------------------------------------------------------- MFU


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (0.35 means 35%)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return flops_per_token * tokens_per_s / peak_flops


SAMPLES = "samples.jsonl"

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets and whitepapers; fp16/bf16 with
# fp32 accumulation, which is what PyTorch uses (GeForce cards run that at half their fp16-accumulate rate).
# None: no tensor cores for that format, so the fp32 rate is the honest ceiling. First match wins, so the
# specific names come before the general ones.
_GPU_PEAKS: list[tuple[str, dict[str, float | None]]] = [
    (r"H100.*PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100.*NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("H100 80GB HBM3")
    (r"H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # A10G (AWS) has no NVIDIA datasheet; these are the figures commonly quoted for it.
    (r"A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bT4\b", {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1}),
    (r"V100.*PCIE", {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0}),
    (r"V100", {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}),  # SXM2
    (r"RTX 3090 Ti", {"bf16": 80.0, "fp16": 80.0, "tf32": 40.0, "fp32": 40.0}),
    (r"RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
]


def gpu_peak_flops(name: str, dtype: torch.dtype, tf32: bool = True) -> tuple[float, str] | None:
    """Peak FLOP/s of a known GPU, looked up by its torch.cuda.get_device_name(); None when unknown.
    float32 counts as TF32 when TF32 matmuls are allowed and the GPU has them."""
    precision = _PRECISION.get(dtype)
    if precision is None:
        return None
    for pattern, peaks in _GPU_PEAKS:
        if not re.search(pattern, name, flags=re.IGNORECASE):
            continue
        if precision == "fp32" and tf32 and peaks.get("tf32"):
            return peaks["tf32"] * 1e12, f"table: {name} tf32 dense"
        if peaks.get(precision) is None:
            return peaks["fp32"] * 1e12, f"table: {name} fp32 (no {precision} tensor cores)"
        return peaks[precision] * 1e12, f"table: {name} {precision} dense"
    return None


_MEASURED: dict[tuple[str, torch.dtype, int], tuple[float, str]] = {}


def _measure_matmul(device: torch.device, dtype: torch.dtype, n_max: int, seconds: float) -> tuple[float, int]:
    """Best rate of n x n matmuls over about `seconds`, and n. The best, not the mean, because the ceiling is
    what MFU divides by and other processes on the machine only ever make single products slower. n grows
    from 256 to n_max only while one product stays quick: on a CPU without native bf16/fp16 (no AVX-512
    BF16) a 2048 product takes tens of seconds, and the measurement must stay about a second."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def product(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype))

    with torch.no_grad():
        n = 256
        while True:
            a, b = product(n)
            a @ b  # warm-up: thread pools, kernels, caches
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            if n >= n_max or time.perf_counter() - t > 0.1:
                break
            n *= 2
        best, count, start = 0.0, 0, time.perf_counter()
        while True:
            t = time.perf_counter()
            a @ b
            sync()
            dt = time.perf_counter() - t
            best = max(best, 2 * n**3 / dt)
            count += 1
            if time.perf_counter() - start > seconds and count >= 3 or dt > seconds:
                return best, n


PEAK_CACHE = "peak_flops.json"


def _machine_key(device: torch.device, dtype: torch.dtype, label: str, n: int) -> str:
    """What a measured rate depends on: the chip, the precision, the threads torch uses, torch itself."""
    if device.type == "cpu":
        chip = "CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        chip += f" threads={torch.get_num_threads()}"
    else:
        chip = label
    return f"{chip} | {_PRECISION.get(dtype, str(dtype))} {n}x{n} | torch {torch.__version__}"


def _peak_cache_path() -> Path:
    env = os.environ.get("GPTFORGE_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "gptforge") / PEAK_CACHE


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def device_peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s for `dtype` matmuls on `device` and where the number came from: the datasheet table for
    known GPUs, else the rate of this machine's own GEMM (matrix multiply) measured once and cached.

    The measured rate is cached per machine (chip, precision, threads, torch version) in
    $GPTFORGE_CACHE_DIR/peak_flops.json, not re-measured at each start: a rate measured while other work
    runs comes out low and would inflate every MFU after it. The source string says how old it is."""
    device = torch.device(device)
    name = _PRECISION.get(dtype, str(dtype))
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        tf32 = torch.get_float32_matmul_precision() != "highest"
        known = gpu_peak_flops(gpu, dtype, tf32=tf32)
        if known is not None:
            return known
        label, n = gpu, 4096
    else:
        label, n = device.type.upper(), 2048
    key = (str(device), dtype, torch.get_num_threads())
    if key in _MEASURED:
        return _MEASURED[key]
    path, machine = _peak_cache_path(), _machine_key(device, dtype, label, n)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    entry = cached.get(machine)
    if not (isinstance(entry, dict) and _is_number(entry.get("flops")) and _is_number(entry.get("measured_at"))):
        flops, n = _measure_matmul(device, dtype, n, seconds=1.0)
        entry = {"flops": flops, "n": n, "measured_at": time.time()}
        cached[machine] = entry
        try:  # a read-only cache only costs a re-measurement next time
            atomic_write_json(path, cached, indent=1)
        except OSError:
            pass
    age = _age(max(0.0, time.time() - float(entry["measured_at"])))
    _MEASURED[key] = (float(entry["flops"]), f"measured GEMM rate: {label} {name} matmul {entry['n']}x{entry['n']}, "
                      f"measured {age} ago (cached in {path}; delete it to re-measure)")
    return _MEASURED[key]
