"""One command that checks gptforge on a CUDA GPU and writes down what it found (`make gpu-check`).

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out runs/gpu-check --data-dir ~/gptforge-data
    PYTHONPATH=src python3 benchmarks/gpu_check.py --dry-run          # every stage on the CPU, tiny shapes
    PYTHONPATH=src python3 benchmarks/gpu_check.py --stages tests --timeout-per-stage tests=200

Stages, in this order; `env` always runs first, `--stages` picks among the others:
  env         the card, driver, torch, CUDA and cuDNN versions, and the dense bf16 peak MFU is measured against
  tests       `pytest -m gpu tests/gpu`: CPU/CUDA agreement, bf16 and fp16 training, compile, fused AdamW,
              flash/memory-efficient attention, KV cache, checkpoints across devices, resume
              (dry run: `pytest -m gpu --collect-only`, which proves they collect; they never run on a CPU)
  exercise    configs/gpt2-124m-memorize.toml end to end (`python -m gptforge train`, capped by
              train.max_time), then `gptforge eval --split train` and three samples
  throughput  the `gpt2` preset, context 1024, bf16: gptforge eager, Hugging Face's GPT2LMHeadModel (sdpa,
              eager) and gptforge under torch.compile, on the same batches: tokens/s, MFU, peak memory,
              compile seconds apart

Each stage runs its work in subprocesses with a time limit (its own, `--timeout-per-stage`, and what is left
of `--budget`), and OUT/report.json and OUT/report.md are rewritten after every stage, so a stage that fails,
hangs or is killed leaves the earlier stages' results. Each subprocess's output is in OUT/logs/. The exit
status is 0 only when every stage is ok.

`--dry-run` runs every stage's code path on the CPU with tiny shapes (float32, torch.compile with its
"eager" backend) in about a minute: CI runs it, so the script is known to work before a GPU is lent.
It needs only torch and this checkout (`PYTHONPATH=src`, no `pip install -e`); the throughput stage also
needs transformers. The data (tinyshakespeare/input.txt, gpt2/gpt2.tiktoken) comes from --data-dir or
GPTFORGE_DATA_DIR.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The exercise comes before throughput: it is the figure the docs most lack, and it compiles the same
# model first (torch's compile caches may then make the compiled throughput row quicker to start).
STAGES = ("env", "tests", "exercise", "throughput")
# Seconds per stage: at most, on one H100 (the whole check is meant to fit ~8 minutes, --budget), and in a
# dry run on a 2-core CPU. A stage also never gets more than what is left of the budget.
GPU_TIMEOUTS = {"env": 60.0, "tests": 150.0, "exercise": 270.0, "throughput": 150.0}
DRY_TIMEOUTS = {"env": 60.0, "tests": 60.0, "exercise": 90.0, "throughput": 90.0}
GPU_BUDGET, DRY_BUDGET = 460.0, 240.0
MIN_STAGE_S = 15.0  # a stage with less time than this left is skipped, not started
EXERCISE_CONFIG = "configs/gpt2-124m-memorize.toml"
EXERCISE_PROMPT = "First Citizen:"  # the text's first line: a memorised model goes on with the play


class StageTimeout(Exception):
    """A stage's subprocess ran past the stage's time limit (it was killed)."""


class StageFailed(Exception):
    """A stage ran to the end but what it checks is not so (failing tests, a target not reached...)."""


# ------------------------------------------------------------------------------------------ running


@dataclass
class Context:
    """What a stage gets: where to write, the data, the mode, and its deadline. A stage puts what it
    found into `result` as it goes, so a stage cut short still reports what it got that far."""

    stage: str
    out: Path
    data_dir: Path | None
    dry_run: bool
    deadline: float  # time.monotonic() by which the stage must be done
    env: dict[str, str]
    python: str = sys.executable
    result: dict[str, Any] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], name: str, timeout: float | None = None, check: bool = True) -> tuple[int, str]:
        """Run cmd from the repository root with its output in OUT/logs/<stage>-<name>.log; return
        (exit status, output). Past `timeout` (never later than the stage's deadline) its whole process
        group gets SIGTERM (gptforge train then saves and exits), then SIGKILL, and StageTimeout is raised."""
        limit = self.remaining() if timeout is None else min(timeout, self.remaining())
        if limit <= 1:
            raise StageTimeout(f"no time left to start {name}")
        log = self.out / "logs" / f"{self.stage}-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs.append(str(log.relative_to(self.out)))
        with open(log, "w", encoding="utf-8") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                raise StageTimeout(f"{name} ran past its {limit:.0f} s limit and was stopped (see {log.name})") from None
            except BaseException:  # Ctrl-C or SIGTERM to the check: take the children down with it
                _stop_group(proc)
                raise
        output = log.read_text(encoding="utf-8", errors="replace")
        if check and rc != 0:
            tail = "\n".join(output.strip().splitlines()[-8:])
            raise StageFailed(f"{name} exited with status {rc}:\n{tail}")
        return rc, output

    def worker(self, kind: str, spec: dict[str, Any], name: str, timeout: float | None = None) -> dict[str, Any]:
        """Run this script's `--worker kind` in a fresh process and return the JSON it prints."""
        cmd = [self.python, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)]
        _, output = self.run(cmd, name, timeout)
        for line in reversed(output.splitlines()):
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise StageFailed(f"{name} printed no RESULT line")


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Stage:
    name: str
    run: Callable[[Context], None]
    timeout_s: float
    needs_cuda: bool = True


@dataclass
class Options:
    out: Path
    data_dir: Path | None
    dry_run: bool = False
    budget_s: float = GPU_BUDGET
    command: str = ""


def run_check(stages: list[Stage], opts: Options) -> dict[str, Any]:
    """Run the stages in order and return the report; OUT/report.json and .md are rewritten before the first
    stage and after each one. A stage that raises is marked failed (StageTimeout: timeout) and the next one
    runs; stages that need CUDA are skipped once the env stage found none (outside a dry run)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    for scratch in ("logs", "exercise-run"):  # this check's own scratch from an earlier run
        shutil.rmtree(opts.out / scratch, ignore_errors=True)
    start = time.monotonic()
    report: dict[str, Any] = {
        "title": "gptforge GPU check", "dry_run": opts.dry_run, "command": opts.command,
        "started_utc": _utc_now(), "budget_s": opts.budget_s, "data_dir": str(opts.data_dir or ""),
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "environment": {}, "ok": False,
        "stages": [{"name": s.name, "status": "pending", "seconds": None} for s in stages],
    }
    env = _child_env(opts)
    write_report(report, opts.out, start)
    skip_reason = None
    for stage, entry in zip(stages, report["stages"], strict=True):
        left = opts.budget_s - (time.monotonic() - start)
        limit = min(stage.timeout_s, left)
        if skip_reason and stage.needs_cuda:
            entry.update(status="skipped", error=skip_reason)
        elif limit < MIN_STAGE_S:
            entry.update(status="skipped", error=f"out of time: {max(left, 0):.0f} s of the {opts.budget_s:.0f} s "
                                                 "budget left (--budget)")
        if entry["status"] == "skipped":
            write_report(report, opts.out, start)
            continue
        ctx = Context(stage=stage.name, out=opts.out, data_dir=opts.data_dir, dry_run=opts.dry_run,
                      deadline=time.monotonic() + limit, env=env)
        entry.update(status="running", timeout_s=round(limit, 1))
        write_report(report, opts.out, start)
        print(f"[gpu-check] {stage.name}: running (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            stage.run(ctx)
            entry["status"] = "ok"
        except StageTimeout as e:
            entry.update(status="timeout", error=str(e))
        except KeyboardInterrupt:
            entry.update(status="interrupted", error="interrupted (Ctrl-C or SIGTERM)",
                         seconds=round(time.monotonic() - t0, 2), result=ctx.result, logs=ctx.logs)
            write_report(report, opts.out, start)
            raise
        except StageFailed as e:
            entry.update(status="failed", error=str(e))
        except Exception as e:  # a bug or an environment the stage did not expect: keep where it came from
            entry.update(status="failed", error=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc(limit=6).splitlines()[-12:])
        entry.update(seconds=round(time.monotonic() - t0, 2), result=ctx.result, logs=ctx.logs)
        if stage.name == "env":
            report["environment"] = ctx.result
            # Only a working env stage that saw no GPU skips the rest; if it broke, the rest still try.
            if not opts.dry_run and entry["status"] == "ok" and ctx.result.get("cuda_available") is False:
                skip_reason = "torch sees no CUDA GPU here (the env stage); on a CPU use --dry-run"
        print(f"[gpu-check] {stage.name}: {entry['status']} in {entry['seconds']:.1f} s"
              + (f": {entry['error'].splitlines()[0]}" if entry.get("error") else ""), flush=True)
        write_report(report, opts.out, start)
    report["ok"] = all(e["status"] == "ok" for e in report["stages"])
    write_report(report, opts.out, start)
    return report


def _child_env(opts: Options) -> dict[str, str]:
    """The subprocesses' environment: this checkout's src/ first on PYTHONPATH (no install needed), the
    data directory, a cache inside OUT unless one is set, and unbuffered output for the logs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if opts.data_dir is not None:
        env["GPTFORGE_DATA_DIR"] = str(opts.data_dir)
    env.setdefault("GPTFORGE_CACHE_DIR", str(opts.out / "cache"))
    env["PYTHONUNBUFFERED"] = "1"
    if opts.dry_run:
        # Tiny models on a CPU that other work may be using: one thread each, or OpenMP threads spend far
        # longer waiting for each other than computing (measured: 7 s of training became 55 s).
        env["OMP_NUM_THREADS"] = "1"
    return env


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _need_data(ctx: Context, *files: str) -> Path:
    if ctx.data_dir is None:
        raise StageFailed("no data directory: pass --data-dir DIR or set GPTFORGE_DATA_DIR (it holds "
                          "tinyshakespeare/input.txt and gpt2/gpt2.tiktoken)")
    missing = [f for f in files if not (ctx.data_dir / f).is_file()]
    if missing:
        raise StageFailed(f"{ctx.data_dir} lacks {', '.join(missing)}; copy the data beside the checkout "
                          "(see docs/gpu.md) and pass --data-dir")
    return ctx.data_dir


# ------------------------------------------------------------------------------------------ env


def stage_env(ctx: Context) -> None:
    ctx.result.update(ctx.worker("env", {}, "env"))


def env_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(HERE))
    from common import cpu_model

    info: dict[str, Any] = {
        "python": platform.python_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    for pkg in ("transformers", "tiktoken", "tokenizers", "safetensors", "numpy"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:
            info[pkg] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    if torch.cuda.is_available():
        from gptforge.train.metrics import gpu_peak_flops

        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        name = torch.cuda.get_device_name(dev)
        info.update(gpu=name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
        peak = gpu_peak_flops(name, torch.bfloat16)
        info["bf16_peak_tflops"] = None if peak is None else round(peak[0] / 1e12, 1)
        info["bf16_peak_source"] = "not in the table: MFU uses a measured matmul rate" if peak is None else peak[1]
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,power.limit,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            fields = [f.strip() for f in smi.stdout.strip().splitlines()[0].split(",")]
            info.update(driver=fields[0], nvidia_smi=", ".join(fields[1:]))
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = None
    return info


# ------------------------------------------------------------------------------------------ tests


_TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def stage_tests(ctx: Context) -> None:
    _need_data(ctx, "tinyshakespeare/input.txt")
    if importlib.util.find_spec("pytest") is None:
        raise StageFailed(f"pytest is not installed for {ctx.python}; `pip install pytest` (it needs nothing else)")
    base = [ctx.python, "-m", "pytest", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"]
    if ctx.dry_run:
        # The tests must not run on a CPU (nothing here fakes a GPU): prove they are collected and selected.
        _, out = ctx.run([*base, "--collect-only", "-q"], "collect")
        ids = [line.strip() for line in out.splitlines() if line.startswith("tests/") and "::" in line]
        ctx.result.update(mode="collect-only (dry run)", collected=len(ids), tests=ids)
        if not ids:
            raise StageFailed("pytest -m gpu collected no tests")
        return
    junit = ctx.out / "gpu-tests.xml"
    junit.unlink(missing_ok=True)
    rc, out = ctx.run([*base, "-v", "-rfEs", f"--junitxml={junit}"], "pytest", check=False)
    tests = _junit_tests(junit) if junit.is_file() else [
        {"name": m.group(1), "outcome": m.group(2).lower()} for m in map(_TEST_LINE.match, out.splitlines()) if m]
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    ctx.result.update(exit_status=rc, counts=counts, tests=tests)
    bad = {k: v for k, v in counts.items() if k != "passed"}
    if rc != 0 or bad or not counts.get("passed"):
        raise StageFailed(f"pytest -m gpu exited {rc}: " + (", ".join(f"{v} {k}" for k, v in counts.items())
                                                              or "no test ran"))


def _junit_tests(path: Path) -> list[dict[str, Any]]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = case.find(child)
            if el is not None:
                outcome, message = name, (el.get("message") or "")[:300]
        t = {"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
             "seconds": round(float(case.get("time") or 0), 2)}
        if message:
            t["message"] = message
        tests.append(t)
    return tests


# ------------------------------------------------------------------------------------------ throughput


def stage_throughput(ctx: Context) -> None:
    if ctx.dry_run:
        shape = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4)
        common = dict(device="cpu", dtype="float32", warmup=1, steps=2, backend="eager")
    else:
        shape = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8)  # the gpt2 preset
        common = dict(device="cuda", dtype="bfloat16", warmup=3, steps=20, backend="inductor")
    ctx.result.update(shape=shape, dtype=common["dtype"], device=common["device"], warmup=common["warmup"],
                      steps=common["steps"], rows=[])
    # Compiled last: if compiling runs out of time, the eager rows are already in. A row that fails (no
    # transformers, say) is reported and the next one still runs; running out of time ends the stage.
    failed = []
    for model, compiled in (("gptforge", False), ("hf", False), ("gptforge", True)):
        spec = {**common, "shape": shape, "model": model, "compile": compiled}
        name = f"{model}-{'compiled' if compiled else 'eager'}"
        try:
            ctx.result["rows"].append(ctx.worker("throughput", spec, name))
        except StageFailed as e:
            ctx.result.setdefault("failed_rows", []).append({"model": model, "compile": compiled, "error": str(e)})
            failed.append(name)
    hf = next((r["tokens_per_s"] for r in ctx.result["rows"] if r["model"] == "hf"), None)
    for r in ctx.result["rows"]:
        if hf:
            r["vs_hf"] = round(r["tokens_per_s"] / hf, 3)
    if failed:
        raise StageFailed(f"{', '.join(failed)} failed; see failed_rows and their logs")


def throughput_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this fresh process: build, warm up (compiling, when asked), time `steps` updates with
    one synchronisation at the end. The step is the trainer's: autocast, GradScaler, clipping, fused AdamW."""
    import torch

    sys.path.insert(0, str(HERE))
    from common import peak_rss, reset_peak_rss, training_step
    from train_throughput import GPT2_VOCAB, flops_per_token

    from gptforge.config import OptimConfig
    from gptforge.runtime import DTYPES, grad_scaler
    from gptforge.train.metrics import device_peak_flops
    from gptforge.train.optim import configure_optimizer

    if spec["model"] == "hf":
        import transformers  # noqa: F401  (before the memory baseline)
    device, dtype, shape = torch.device(spec["device"]), DTYPES[spec["dtype"]], spec["shape"]
    B, T = shape["batch_size"], shape["block_size"]
    arch = {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as gptforge's runtime sets it
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    baseline = reset_peak_rss()
    torch.manual_seed(0)
    extra: dict[str, Any] = {}
    if spec["model"] == "gptforge":
        from gptforge.model import GPT, GPTConfig

        model = GPT(GPTConfig(vocab_size=GPT2_VOCAB, dropout=0.0, **arch)).to(device)
        forward = torch.compile(model, backend=spec["backend"]) if spec["compile"] else model

        def loss_of(x, y):
            return forward(x, y)[1]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=T, n_embd=arch["n_embd"], n_layer=arch["n_layer"],
                            n_head=arch["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").to(device)
        extra["attn_implementation"] = getattr(model.config, "_attn_implementation", None)

        def loss_of(x, y):
            # labels=x: Hugging Face shifts them itself, so it trains on the same next tokens as y.
            return model(input_ids=x, labels=x).loss
    model.train()
    optimizer = configure_optimizer(model, OptimConfig(), device)
    scaler = grad_scaler(device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1234)  # the same batches for every model
    batches = []
    for _ in range(spec["warmup"] + spec["steps"]):
        buf = torch.randint(0, GPT2_VOCAB, (B, T + 1), generator=gen)
        batches.append((buf[:, :-1].to(device), buf[:, 1:].to(device)))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(x, y) -> torch.Tensor:
        return training_step(loss_of, x, y, optimizer, scaler, params, device, dtype)

    t0 = time.perf_counter()
    step(*batches[0])
    sync()
    first_step_s = time.perf_counter() - t0
    for x, y in batches[1:spec["warmup"]]:
        step(x, y)
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step(x, y) for x, y in batches[spec["warmup"]:]]
    sync()
    timed_s = time.perf_counter() - t0
    step_s = timed_s / spec["steps"]
    tokens_per_s = B * T * spec["steps"] / timed_s
    peak, source = device_peak_flops(device, dtype)
    fpt = flops_per_token(shape)
    if device.type == "cuda":
        memory = {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "memory_kind": "max_memory_allocated"}
    else:
        memory = {"peak_memory_bytes": peak_rss() - baseline, "memory_kind": "RSS growth"}
    return {
        "model": spec["model"], "compile": spec["compile"],
        "backend": spec["backend"] if spec["compile"] else None, **extra,
        "tokens_per_s": round(tokens_per_s, 1), "ms_per_step": round(1000 * step_s, 2),
        "mfu": round(fpt * tokens_per_s / peak, 4), "peak_tflops": round(peak / 1e12, 2), "peak_source": source,
        "flops_per_token": fpt, **memory,
        "first_step_s": round(first_step_s, 2),
        # What the warm-up took beyond that many steady steps: compilation (and autotuning) when compiled.
        "compile_s": round(max(0.0, warmup_s - spec["warmup"] * step_s), 2) if spec["compile"] else None,
        "final_loss": round(float(losses[-1]), 4),
        "params": sum(p.numel() for p in params),
    }


# ------------------------------------------------------------------------------------------ exercise


def stage_exercise(ctx: Context) -> None:
    data = _need_data(ctx, "tinyshakespeare/input.txt", "gpt2/gpt2.tiktoken")
    run = ctx.out / "exercise-run"
    shutil.rmtree(run, ignore_errors=True)
    overrides: list[str] = []
    if ctx.dry_run:
        # The recipe's mechanism (sequential epochs, whole-text stop) on a model and text a CPU memorises
        # in seconds; the same shapes as tests/test_recipes.py's CPU stand-in.
        slice_file = ctx.out / "exercise-slice.txt"
        slice_file.write_text((data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:2000],
                              encoding="utf-8")
        overrides = ["model.preset=tiny", "model.n_embd=128", "model.n_head=4", "model.block_size=64",
                     f"data.corpus={slice_file}", "data.tokenizer=char", "train.batch_size=8",
                     "train.dtype=float32", "train.compile=false", "train.device=cpu", "train.max_steps=1500",
                     "train.eval_every=25", "train.log_every=5", "optim.lr=3e-3", "optim.warmup_steps=20"]
    # Time after training for the exact evaluation and the samples (each a fresh process loading the model).
    after = 25.0 if ctx.dry_run else 50.0
    startup = 10.0 if ctx.dry_run else 40.0  # imports, tokenizing, building; final evaluation and checkpoint
    max_time = ctx.remaining() - after - startup
    if max_time < 10:
        raise StageFailed(f"only {ctx.remaining():.0f} s left for the exercise; raise --budget or its timeout")
    overrides.append(f"train.max_time={max_time:.0f}")
    cmd = [ctx.python, "-m", "gptforge", "train", "--config", EXERCISE_CONFIG, "--out", str(run), *overrides]
    ctx.result.update(config=EXERCISE_CONFIG, overrides=overrides, max_time_s=round(max_time))
    t0 = time.monotonic()
    try:
        ctx.run(cmd, "train", timeout=ctx.remaining() - after)
    finally:
        ctx.result["train_wall_s"] = round(time.monotonic() - t0, 1)
        if (run / "metrics.jsonl").is_file():
            ctx.result.update(summarise_metrics(run / "metrics.jsonl"))
        if ctx.result.get("target") is None and (run / "config.toml").is_file():
            m = re.search(r"^stop_at_loss = ([0-9.eE+-]+)", (run / "config.toml").read_text(encoding="utf-8"),
                          flags=re.MULTILINE)
            ctx.result["target"] = float(m.group(1)) if m else None

    r = ctx.result
    _, out = ctx.run([ctx.python, "-m", "gptforge", "eval", str(run), "--split", "train"], "eval",
                     timeout=ctx.remaining() - after / 2)
    m = re.search(r"train loss ([0-9.]+) nats/token .*? over ([0-9,]+) tokens", out)
    if not m:
        raise StageFailed("could not read the loss from `gptforge eval`'s output")
    r["eval_train_loss"] = float(m.group(1))
    r["eval_tokens"] = int(m.group(2).replace(",", ""))
    if r.get("whole_text_train_loss") is not None:
        r["eval_difference"] = round(r["eval_train_loss"] - r["whole_text_train_loss"], 4) + 0.0  # no -0.0
        # The trainer's number is in the run's precision (bf16 autocast) and printed to 4 decimals by eval,
        # which computes in float32: they agree to bf16's precision, not bit for bit.
        r["eval_agrees"] = abs(r["eval_difference"]) <= max(0.01, 0.05 * r["whole_text_train_loss"])

    _, out = ctx.run([ctx.python, "-m", "gptforge", "generate", str(run), "--prompt", EXERCISE_PROMPT,
                      "--num-samples", "3", "--max-new-tokens", "60" if ctx.dry_run else "100",
                      "--temperature", "0.8", "--top-k", "40", "--seed", "1337"], "generate")
    samples = [s.strip("\n") for s in re.split(r"^--- sample \d+ ---$", out, flags=re.MULTILINE)[1:]]
    r["samples"] = samples
    r["sample_settings"] = f"prompt {EXERCISE_PROMPT!r}, temperature 0.8, top-k 40, seed 1337"

    problems = []
    if r.get("stopped_by") != "stop_at_loss":
        loss = r.get("whole_text_train_loss")
        problems.append(f"stopped by {r.get('stopped_by')} at whole-text loss "
                        f"{'?' if loss is None else round(loss, 4)} (target {r.get('target')})")
    if not r.get("eval_agrees"):
        problems.append(f"gptforge eval gave {r['eval_train_loss']} against the trainer's "
                        f"{r.get('whole_text_train_loss')}")
    if len(samples) != 3:
        problems.append(f"{len(samples)} samples instead of 3")
    if problems:
        raise StageFailed("; ".join(problems))


def summarise_metrics(path: Path) -> dict[str, Any]:
    """The exercise's numbers from RUN/metrics.jsonl (a line cut short by a kill is skipped)."""
    recs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    events = [r for r in recs if r.get("kind") == "event"]
    started = next((e for e in events if e.get("event") == "started"), {})
    stopped = next((e for e in reversed(events) if e.get("event") == "stopped"), {})
    out: dict[str, Any] = {
        "device": started.get("device"), "dtype": started.get("dtype"), "params": started.get("params"),
        "train_tokens": started.get("train_tokens"), "tokens_per_update": started.get("tokens_per_update"),
        "stopped_by": stopped.get("reason"), "stop_value": stopped.get("value"), "target": stopped.get("target"),
    }
    if train:
        last = train[-1]
        out["updates"] = last["step"]
        out["epochs_seen"] = last.get("epoch")  # the sampler's epoch counter when it stopped
        if started.get("train_tokens"):
            out["epochs"] = round(last.get("tokens", 0) / started["train_tokens"], 2)
        # The trainer's clock: evaluations and checkpoints included, the compile step not (that one is
        # timed apart in a "compiled" event).
        out["training_s"] = last.get("elapsed_s")
        eval_steps = {e["step"] for e in evals}
        # Seconds per update in steady state: between consecutive logged records with no evaluation in
        # between. The trainer logs step s, then evaluates at s, so an evaluation at s lands in (s, next].
        per_step = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                    for a, b in zip(train[:-1], train[1:], strict=True)
                    if b["step"] > a["step"] and not any(a["step"] <= s < b["step"] for s in eval_steps)
                    and "elapsed_s" in a and "elapsed_s" in b]
        if per_step:
            out["steady_s_per_update"] = round(statistics.median(per_step), 4)
        rates = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
        if rates:
            out["median_tokens_per_s"] = round(statistics.median(rates))
        mfus = [r["mfu"] for r in train[1:] if r.get("mfu")]
        if mfus:
            out["median_mfu"] = round(statistics.median(mfus), 4)
    eval_seconds = [e["eval_s"] for e in evals if isinstance(e.get("eval_s"), (int, float))]
    if eval_seconds:  # each whole-text evaluation (with the sample written beside it, if any)
        out["median_eval_s"] = round(statistics.median(eval_seconds), 3)
        out["n_evals"] = len(eval_seconds)
    compiled = next((e for e in events if e.get("event") == "compiled"), None)
    if compiled is not None and isinstance(compiled.get("seconds"), (int, float)):
        out["compile_s_reported"] = compiled["seconds"]
        if out.get("training_s") is not None:
            out["training_s_with_compile"] = round(out["training_s"] + compiled["seconds"], 1)
    if evals:
        out["whole_text_train_loss"] = evals[-1].get("train_loss")
        out["whole_text_tokens"] = evals[-1].get("train_loss_tokens")
        out["evaluations"] = [(e["step"], round(e["train_loss"], 4)) for e in evals if "train_loss" in e]
    return out


# ------------------------------------------------------------------------------------------ report


def write_report(report: dict[str, Any], out: Path, start: float) -> None:
    """OUT/report.json, then OUT/report.md, each written to a temporary name and renamed."""
    report["updated_utc"] = _utc_now()
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    _atomic_write(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    try:
        md = render_markdown(report)
    except Exception as e:  # the JSON holds the results; a rendering slip must not lose them
        md = f"# gptforge GPU check\n\nThe Markdown report could not be rendered ({type(e).__name__}: {e}); " \
             "see report.json.\n"
    _atomic_write(out / "report.md", md)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _gb(n: float | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f} GB"


def stage_summary(entry: dict[str, Any]) -> str:
    r = entry.get("result") or {}
    name = entry["name"]
    if name == "env" and r:
        return ", ".join(str(x) for x in (r.get("gpu") or "no CUDA GPU", f"torch {r.get('torch')}",
                                           f"CUDA {r.get('cuda_build')}") if x)
    if name == "tests" and r:
        if "collected" in r:
            return f"{r['collected']} GPU tests collected (not run: dry run)"
        return ", ".join(f"{v} {k}" for k, v in (r.get("counts") or {}).items())
    if name == "throughput" and r.get("rows"):
        return "; ".join(f"{_row_name(x)} {x['tokens_per_s']:,.0f} tokens/s" for x in r["rows"])
    if name == "exercise" and r:
        loss = r.get("whole_text_train_loss")
        parts = [f"stopped by {r.get('stopped_by')}", f"{r.get('updates')} updates",
                 f"whole-text loss {'?' if loss is None else round(loss, 4)}"]
        if "eval_train_loss" in r:
            parts.append(f"eval {r['eval_train_loss']}")
        return ", ".join(parts)
    return ""


def _row_name(row: dict[str, Any]) -> str:
    name = "gptforge GPT" if row["model"] == "gptforge" else "HF GPT2LMHeadModel"
    return name + (f" compiled ({row.get('backend')})" if row.get("compile") else " eager")


def render_markdown(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    lines = ["# gptforge GPU check", ""]
    if report.get("dry_run"):
        lines += ["**Dry run**: every stage's code path on the CPU with tiny shapes; no GPU figure below.", ""]
    lines += [f"`{report.get('command', '')}`, started {report.get('started_utc')}, updated "
              f"{report.get('updated_utc')} ({report.get('elapsed_s')} s of a {report.get('budget_s'):.0f} s budget). "
              f"Overall: **{'ok' if report.get('ok') else 'not ok'}**.", ""]
    if env:
        lines += ["| | |", "|---|---|"]
        for key, label in (("gpu", "GPU"), ("gpu_memory_gib", "GPU memory (GiB)"), ("capability", "compute capability"),
                           ("driver", "driver"), ("nvidia_smi", "nvidia-smi"), ("torch", "torch"),
                           ("cuda_build", "CUDA (torch build)"), ("cudnn", "cuDNN"),
                           ("bf16_peak_tflops", "dense bf16 peak (TFLOP/s)"), ("bf16_peak_source", "peak from"),
                           ("transformers", "transformers"), ("cpu", "CPU"), ("cpu_count", "CPU cores"),
                           ("python", "Python"), ("commit", "gptforge commit")):
            if env.get(key) is not None:
                lines.append(f"| {label} | {env[key]} |")
        lines.append("")
    lines += ["| stage | status | seconds | summary |", "|---|---|---:|---|"]
    for e in report["stages"]:
        secs = "" if e.get("seconds") is None else f"{e['seconds']:.1f}"
        summary = stage_summary(e) or (e.get("error") or "").splitlines()[0:1]
        if isinstance(summary, list):
            summary = summary[0] if summary else ""
        lines.append(f"| {e['name']} | {e['status']} | {secs} | {summary} |")
    for e in report["stages"]:
        if e.get("error"):
            lines += ["", f"**{e['name']}** {e['status']}:", "", "```", e["error"], "```"]
    by_name = {e["name"]: e for e in report["stages"]}
    lines += _md_tests(by_name.get("tests")) + _md_exercise(by_name.get("exercise"))
    lines += _md_throughput(by_name.get("throughput"))
    return "\n".join(lines) + "\n"


def _md_tests(e: dict[str, Any] | None) -> list[str]:
    r = (e or {}).get("result") or {}
    tests = r.get("tests") or []
    if not tests:
        return []
    out = ["", "## GPU tests", ""]
    if "collected" in r:
        return out + ["Collected by `pytest -m gpu tests/gpu --collect-only` (a dry run never runs them):", ""] + \
            [f"- `{t}`" for t in tests]
    out += ["| test | outcome | seconds |", "|---|---|---:|"]
    for t in tests:
        note = f" ({t['message'][:120]})" if t.get("message") else ""
        out.append(f"| `{t['name']}` | {t['outcome']}{note} | {t.get('seconds', '')} |")
    return out


def _md_throughput(e: dict[str, Any] | None) -> list[str]:
    r = (e or {}).get("result") or {}
    if not r.get("rows"):
        return []
    s = r["shape"]
    out = ["", "## Training throughput", "",
           f"{s['n_layer']} layers, {s['n_head']} heads, {s['n_embd']} wide, context {s['block_size']}, batch "
           f"{s['batch_size']}, {r['dtype']} on {r['device']}; {r['warmup']} warm-up + {r['steps']} timed updates "
           "(one synchronisation at the end), each row in a fresh process, the same batches for every model. "
           "The exercise stage compiled the same model before: torch's compile caches may shorten the compile "
           "seconds here (the exercise's own estimate is the cold figure).", "",
           "| model | tokens/s | ms/update | MFU | peak memory | first update (s) | compile (s) | vs HF |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        compile_s = "" if x.get("compile_s") is None else f"{x['compile_s']:.1f}"
        vs = f"{x['vs_hf']:.2f}x" if "vs_hf" in x else ""
        out.append(f"| {_row_name(x)} | {x['tokens_per_s']:,.0f} | {x['ms_per_step']:,.1f} | "
                   f"{100 * x['mfu']:.1f}% | {_gb(x.get('peak_memory_bytes'))} | {x['first_step_s']:.1f} | "
                   f"{compile_s} | {vs} |")
    for x in r.get("failed_rows") or []:
        out.append(f"| {_row_name(x)} | failed: {x['error'].splitlines()[0][:150]} | | | | | | |")
    first = r["rows"][0]
    out += ["", f"MFU: gptforge's `flops_per_token()` for this shape ({first['flops_per_token'] / 1e9:.3f} GFLOP) "
            f"x tokens/s over {first['peak_tflops']} TFLOP/s ({first['peak_source']}). Compile seconds: the warm-up "
            "beyond that many steady updates."]
    return out


def _md_exercise(e: dict[str, Any] | None) -> list[str]:
    r = (e or {}).get("result") or {}
    if not r:
        return []
    out = ["", "## The classic exercise: GPT-2 124M memorises Tiny Shakespeare", "",
           f"`python -m gptforge train --config {r.get('config')}` "
           + (f"with `{' '.join(r.get('overrides') or [])}`" if r.get("overrides") else "") + ".", ""]
    fields = (("device", "device"), ("dtype", "dtype"), ("params", "parameters"), ("stopped_by", "stopped by"),
              ("stop_value", "stop value"), ("target", "target (whole-text loss)"), ("updates", "updates"),
              ("epochs", "epochs (tokens seen / text tokens)"),
              ("whole_text_train_loss", "whole-text training loss (eval mode, trainer)"),
              ("whole_text_tokens", "tokens it covers"), ("eval_train_loss", "`gptforge eval --split train` (float32)"),
              ("eval_difference", "difference"),
              ("training_s", "training seconds (trainer's clock: evaluations in, the compile step out)"),
              ("compile_s_reported", "compile seconds (the first update, timed apart by the trainer)"),
              ("training_s_with_compile", "training seconds with the compile step"),
              ("steady_s_per_update", "seconds per update (steady)"), ("median_tokens_per_s", "tokens/s (median)"),
              ("median_mfu", "MFU (median)"), ("n_evals", "whole-text evaluations"),
              ("median_eval_s", "seconds per whole-text evaluation (median)"),
              ("train_wall_s", "wall seconds of `gptforge train`"))
    out += ["| | |", "|---|---|"]
    for key, label in fields:
        if r.get(key) is not None:
            out.append(f"| {label} | {r[key]} |")
    if r.get("samples"):
        out += ["", f"Samples ({r.get('sample_settings')}):", ""]
        for i, s in enumerate(r["samples"], 1):
            out += [f"Sample {i}:", "", "```", s, "```", ""]
    return out


# ------------------------------------------------------------------------------------------ main


STAGE_FUNCS: dict[str, Callable[[Context], None]] = {
    "env": stage_env, "tests": stage_tests, "exercise": stage_exercise, "throughput": stage_throughput}
WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "env": env_worker, "throughput": throughput_worker}


def parse_timeouts(text: str | None, defaults: dict[str, float]) -> dict[str, float]:
    """'300' (every stage) or 'tests=200,exercise=300' over the defaults."""
    timeouts = dict(defaults)
    if not text:
        return timeouts
    for item in text.split(","):
        name, sep, value = item.rpartition("=")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"--timeout-per-stage {text!r}: {value!r} is not a number of seconds") from None
        if seconds <= 0:
            raise ValueError(f"--timeout-per-stage {text!r}: seconds must be positive")
        if not sep:
            timeouts = {k: seconds for k in timeouts}
        elif name in timeouts:
            timeouts[name] = seconds
        else:
            raise ValueError(f"--timeout-per-stage {text!r}: unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return timeouts


def parse_stages(text: str | None) -> list[str]:
    """The stages to run, in the fixed order, env always first."""
    if not text:
        return list(STAGES)
    wanted = {s.strip() for s in text.split(",") if s.strip()}
    unknown = wanted - set(STAGES)
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s == "env" or s in wanted]


def default_data_dir() -> Path | None:
    env = os.environ.get("GPTFORGE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    guess = REPO.parent / "shared" / "data"
    return guess if guess.is_dir() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default: runs/gpu-check, or runs/gpu-check-dry-run with --dry-run)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory holding tinyshakespeare/input.txt and gpt2/gpt2.tiktoken (default: $GPTFORGE_DATA_DIR)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny shapes (about a minute)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {', '.join(STAGES[1:])} (env always runs)")
    p.add_argument("--timeout-per-stage", default=None, metavar="S|STAGE=S,...",
                   help="seconds a stage may take: one number for all, or per stage (defaults: "
                        + ", ".join(f"{k}={v:.0f}" for k, v in GPU_TIMEOUTS.items()) + "; dry run "
                        + ", ".join(f"{k}={v:.0f}" for k, v in DRY_TIMEOUTS.items()) + ")")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole check; later stages get what is left (default {GPU_BUDGET:.0f}, "
                        f"dry run {DRY_BUDGET:.0f})")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](json.loads(args.spec or "{}"))), flush=True)
        return 0

    try:
        names = parse_stages(args.stages)
        timeouts = parse_timeouts(args.timeout_per_stage, DRY_TIMEOUTS if args.dry_run else GPU_TIMEOUTS)
    except ValueError as e:
        p.error(str(e))
    out = args.out or REPO / "runs" / ("gpu-check-dry-run" if args.dry_run else "gpu-check")
    data_dir = args.data_dir.expanduser().resolve() if args.data_dir else default_data_dir()
    budget = args.budget or (DRY_BUDGET if args.dry_run else GPU_BUDGET)
    argv_shown = sys.argv[1:] if argv is None else argv
    opts = Options(out=out.resolve(), data_dir=data_dir, dry_run=args.dry_run, budget_s=budget,
                   command=shlex.join(["python", "benchmarks/gpu_check.py", *argv_shown]))
    stages = [Stage(n, STAGE_FUNCS[n], timeouts[n], needs_cuda=n != "env") for n in names]

    def on_term(signum, frame):  # SIGTERM (a scheduler's time limit): stop like Ctrl-C, report kept
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        report = run_check(stages, opts)
    except KeyboardInterrupt:
        print(f"[gpu-check] interrupted; the report so far is in {opts.out}/report.md", flush=True)
        return 130
    print(f"[gpu-check] {'ok' if report['ok'] else 'NOT OK'}: {opts.out / 'report.md'}, {opts.out / 'report.json'}",
          flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
