"""Training throughput: gptforge's GPT against Hugging Face's GPT2LMHeadModel, same config, batch and step.

    python benchmarks/train_throughput.py                  # the default configs; rewrites docs/benchmarks.md
    python benchmarks/train_throughput.py --quick          # a few steps of the default config only
    python benchmarks/train_throughput.py --configs small,gpt2 --dtypes float32,bfloat16 --steps 20 --no-write

For each (config, dtype, model) a fresh Python process builds the model and runs `--warmup` training steps,
then times `--steps` more. A fresh process per measurement keeps the peaks apart: the CPU figure is the
process's resident-set high-water mark (VmHWM in /proc/self/status, reset after the imports), the CUDA one
torch.cuda.max_memory_allocated(). Both models go through the same training step, built from gptforge's
own pieces as the trainer uses them (configure_optimizer's AdamW, the runtime's autocast and GradScaler,
gradient clipping), on the same random-token batches. MFU divides each model's achieved FLOP/s, counted
with gptforge's flops_per_token() for the config, by the device peak from device_peak_flops().
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCHMARKS_MD,
    machine_summary,
    peak_rss,
    reset_peak_rss,
    training_step,
    update_section,
)

GPT2_VOCAB = 50257

# Named shapes. `small` is the target: 6 layers, 6 heads, 384 wide, context 256, batch 8, GPT-2 vocab.
CONFIGS: dict[str, dict[str, int]] = {
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=8),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODELS = ("gptforge", "hf")


# ------------------------------------------------------------------------------------------ worker


def _build(model_name: str, shape: dict[str, int], device: torch.device):
    """The model and a function (x, y) -> loss computing its standard training loss."""
    arch = {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    if model_name == "gptforge":
        from gptforge.model import GPT, GPTConfig

        model = GPT(GPTConfig(vocab_size=GPT2_VOCAB, dropout=0.0, **arch)).to(device)
        return model, lambda x, y: model(x, y)[1]
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=arch["block_size"], n_embd=arch["n_embd"],
                           n_layer=arch["n_layer"], n_head=arch["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0)
    model = GPT2LMHeadModel(hf_config).to(device)
    # Hugging Face shifts the labels itself: labels=x trains on the same next-token targets as y (the
    # last position of each row has none, which is 1/block_size less work for it).
    return model, lambda x, y: model(input_ids=x, labels=x).loss


def flops_per_token(shape: dict[str, int]) -> float:
    """gptforge's count for the config (the same work for both models), from a weightless meta-device model."""
    from gptforge.model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=GPT2_VOCAB, **{k: shape[k] for k in
                                                        ("n_layer", "n_head", "n_embd", "block_size")}))
    return model.flops_per_token()


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    from gptforge.config import OptimConfig
    from gptforge.runtime import grad_scaler
    from gptforge.train.optim import configure_optimizer

    if spec["model"] == "hf":
        import transformers  # noqa: F401  (imported before the baseline so its RSS is not counted)

    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    shape = CONFIGS[spec["config"]]
    B, T = shape["batch_size"], shape["block_size"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as gptforge's runtime sets it
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    baseline = reset_peak_rss()

    torch.manual_seed(0)
    model, loss_fn = _build(spec["model"], shape, device)
    model.train()
    optimizer = configure_optimizer(model, OptimConfig(), device)
    scaler = grad_scaler(device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1234)  # the same batches for both models

    def step() -> float:
        # What Trainer.train_step does for one micro-batch, minus the data sampler.
        buf = torch.randint(0, GPT2_VOCAB, (B, T + 1), generator=gen)
        x, y = buf[:, :-1].to(device), buf[:, 1:].to(device)
        return float(training_step(loss_fn, x, y, optimizer, scaler, params, device, dtype))  # a sync point

    for _ in range(spec["warmup"]):
        step()
    times, loss = [], float("nan")
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        extra = peak
    else:
        peak = peak_rss()
        extra = peak - baseline
    total = sum(times)
    return {
        **spec,
        "tokens_per_s": B * T * len(times) / total,
        "ms_per_step": 1000 * statistics.median(times),
        "peak_bytes": peak,
        "peak_delta_bytes": extra,
        "params": sum(p.numel() for p in params),
        "final_loss": loss,
    }


# ------------------------------------------------------------------------------------------ driver


def run_isolated(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"worker {spec} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def table(results: list[dict], device: torch.device) -> str:
    mem = "peak GPU memory" if device.type == "cuda" else "peak RSS (growth over start)"
    rows = ["| config | model | dtype | tokens/s | ms/step | MFU | " + mem + " | tokens/s vs HF |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    by_key = {(r["config"], r["dtype"], r["model"]): r for r in results}
    for r in results:
        hf = by_key.get((r["config"], r["dtype"], "hf"))
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf and r["model"] != "hf" else ""
        memory = _gb(r["peak_bytes"]) if device.type == "cuda" else \
            f"{_gb(r['peak_bytes'])} (+{_gb(r['peak_delta_bytes'])})"
        name = "gptforge GPT" if r["model"] == "gptforge" else "HF GPT2LMHeadModel"
        rows.append(f"| {r['config']} | {name} | {r['dtype']} | {r['tokens_per_s']:,.0f} | "
                    f"{r['ms_per_step']:,.0f} | {100 * r['mfu']:.1f}% | {memory} | {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None, help=f"comma-separated, from: {', '.join(CONFIGS)} "
                   "(default: small on a CPU, small,gpt2 on a GPU)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--models", default="gptforge,hf", help="comma-separated: gptforge, hf")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10; 3 quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 quick)")
    p.add_argument("--repeats", type=int, default=1, help="measure each row this many times, models "
                   "alternating, and keep the fastest (for a machine shared with other work)")
    p.add_argument("--quick", action="store_true", help="a short run: the small config, 3 steps")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--force-bf16", action="store_true",
                   help="measure bf16 even on a CPU whose bf16 matmuls are much slower than float32")
    p.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/train_throughput.py", *(sys.argv[1:] if argv is None else argv)])

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    from gptforge.train.metrics import device_peak_flops

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    configs = (args.configs.split(",") if args.configs else
               ["small"] if args.quick or device.type != "cuda" else ["small", "gpt2"])
    steps = args.steps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    for name in configs:
        if name not in CONFIGS:
            p.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    machine = machine_summary(device)
    print(machine, flush=True)

    notes, peaks, dtypes = [], {}, []
    for d in args.dtypes.split(","):
        peaks[d] = device_peak_flops(device, DTYPES[d])
        print(f"peak {d}: {peaks[d][0] / 1e9:,.1f} GFLOP/s ({peaks[d][1]})", flush=True)
    for d in args.dtypes.split(","):
        slow = (device.type == "cpu" and d != "float32" and "float32" in peaks
                and peaks[d][0] < 0.5 * peaks["float32"][0])
        if slow and not args.force_bf16:
            notes.append(f"{d} skipped: this CPU's {d} matmuls run at {peaks[d][0] / 1e9:,.1f} GFLOP/s against "
                         f"{peaks['float32'][0] / 1e9:,.1f} for float32 (no native bf16 instructions: "
                         "AVX-512 BF16 or AMX), so bf16 autocast would be far slower; `--force-bf16` runs it")
            print(notes[-1], flush=True)
        else:
            dtypes.append(d)

    results = []
    for name in configs:
        for d in dtypes:
            # With --repeats the models alternate (A B A B), so a change in the machine's load hits both,
            # and each keeps its fastest repeat; memory is the highest peak seen.
            runs: dict[str, list[dict]] = {m: [] for m in args.models.split(",")}
            for _ in range(args.repeats):
                for model in runs:
                    spec = {"config": name, "dtype": d, "model": model, "device": str(device),
                            "steps": steps, "warmup": warmup}
                    t0 = time.perf_counter()
                    r = run_isolated(spec, args.timeout)
                    r["mfu"] = flops_per_token(CONFIGS[name]) * r["tokens_per_s"] / peaks[d][0]
                    runs[model].append(r)
                    print(f"{name:6s} {model:8s} {d:8s} {r['tokens_per_s']:8,.0f} tokens/s  "
                          f"{r['ms_per_step']:7,.0f} ms/step  mfu {100 * r['mfu']:5.1f}%  "
                          f"peak {_gb(r['peak_bytes'])}  loss {r['final_loss']:.3f}  "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
            for rs in runs.values():
                fastest = dict(max(rs, key=lambda r: r["tokens_per_s"]))
                for key in ("peak_bytes", "peak_delta_bytes"):
                    fastest[key] = max(r[key] for r in rs)
                results.append(fastest)

    shapes = "; ".join(f"`{n}`: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} wide, context "
                       f"{c['block_size']}, batch {c['batch_size']}" for n, c in CONFIGS.items() if n in configs)
    body = [
        "## Training throughput",
        "",
        f"`{command}` "
        f"({warmup} warm-up + {steps} timed steps per row, each row in a fresh process"
        + (f"; the fastest of {args.repeats} alternating repeats" if args.repeats > 1 else "") + ").",
        "",
        f"Machine: {machine}.",
        "",
        table(results, device),
        "",
        f"Configs: {shapes}; GPT-2 vocabulary ({GPT2_VOCAB:,}; gptforge pads its embedding to a multiple of 64).",
        "Both models take the same training step (gptforge's AdamW set-up, autocast, gradient clipping at 1.0) "
        "on the same random-token batches. tokens/s is the timed steps' tokens over their total time; "
        "ms/step is the median step. MFU counts gptforge's `flops_per_token()` for the config against "
        "the peak below.",
    ]
    body += [f"- Peak {d}: {peaks[d][0] / 1e9:,.1f} GFLOP/s ({peaks[d][1]})." for d in peaks]
    body += [f"- {n}" for n in notes]
    if device.type == "cpu":
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load > (os.cpu_count() or 1):
            body.append(f"- The CPU was shared (load average {load:.1f} on {os.cpu_count()} cores at the end): "
                        "tokens/s and the measured peak are both far below an idle machine's, so MFU is not "
                        "meaningful here; compare rows of the same run (the ratio column).")
        else:
            body.append("- Timings move by several percent from run to run; compare rows of the same run "
                        "(the ratio column).")
    text = "\n".join(body)
    print()
    print(text)
    if not args.no_write:
        update_section(BENCHMARKS_MD, "bench:train", text)
        print(f"\nwrote {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
