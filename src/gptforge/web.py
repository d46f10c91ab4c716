"""A web page to sample from a run (Gradio), and its export as a Hugging Face Space.

    gptforge serve runs/char                      # http://127.0.0.1:7860
    gptforge export-space runs/char space/        # then: cd space && python app.py

    from gptforge.web import build_app
    build_app(gptforge.load("runs/char")).launch()

The page is a thin layer over `gptforge.generate.Generator`: every input is clamped by
`clamp_inputs` (a pure function) before it reaches the model, and requests go through Gradio's
queue one at a time, so concurrent visitors wait in line instead of being dropped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError
from gptforge.generate import Generator, SamplingSettings

MAX_NEW_TOKENS_LIMIT = 500  # default server limit on tokens per request
NUM_SAMPLES_LIMIT = 4
TEMPERATURE_MAX = 2.0
TOP_P_MIN = 0.01  # top-p must stay above 0; this is as close to greedy as the slider goes
EXAMPLE_PROMPTS = ("ROMEO:", "JULIET:\nO Romeo, ", "First Citizen:\n", "KING HENRY:\nOnce more")


# ----------------------------------------------------------------------------------------- inputs


def _number(value: Any, default: float) -> float:
    """A finite float from whatever the browser sent (None, "", "nan" and junk give `default`)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def clamp_inputs(
    max_new_tokens: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    seed: Any,
    num_samples: Any,
    *,
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    num_samples_limit: int = NUM_SAMPLES_LIMIT,
) -> SamplingSettings:
    """Turn raw web inputs into safe sampling settings; never raises.

    max new tokens to [1, max_new_tokens_limit], temperature to [0, 2], top-k to >= 0 (0 = off),
    top-p to (0, 1], number of samples to [1, num_samples_limit]; a blank seed means random.
    """
    n = int(_number(max_new_tokens, min(200, max_new_tokens_limit)))
    t = _number(temperature, 1.0)
    k = int(_number(top_k, 0))
    p = _number(top_p, 1.0)
    s = _number(seed, math.nan) if seed not in (None, "") else math.nan
    m = int(_number(num_samples, 1))
    return SamplingSettings(
        max_new_tokens=min(max(n, 1), max_new_tokens_limit),
        temperature=min(max(t, 0.0), TEMPERATURE_MAX),
        top_k=max(k, 0),
        top_p=min(max(p, TOP_P_MIN), 1.0),
        seed=None if math.isnan(s) else int(abs(s)) % 2**63,
        num_samples=min(max(m, 1), num_samples_limit),
    )


def format_samples(prompt: str, texts: list[str]) -> str:
    """The output box: prompt + continuation, samples separated by a numbered rule."""
    if len(texts) == 1:
        return prompt + texts[0]
    return "\n\n".join(f"──── sample {i} ────\n{prompt}{t}" for i, t in enumerate(texts, start=1))


# ----------------------------------------------------------------------------------------- model card


def _metrics(run_dir: Path | None) -> tuple[dict, list[dict]]:
    """The last train record and every eval record of the run's metrics.jsonl."""
    train: dict = {}
    evals: list[dict] = []
    path = None if run_dir is None else run_dir / "metrics.jsonl"
    if path is None or not path.is_file():
        return train, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if rec.get("kind") == "train":
            train = rec
        elif rec.get("kind") == "eval":
            evals.append(rec)
    return train, evals


def model_facts(gen: Generator) -> dict[str, Any]:
    """What the model card shows: the shape, and the numbers of the checkpoint being served.

    Losses come from the evaluation at the checkpoint's step in metrics.jsonl (train and val loss
    measured the same way), else from the checkpoint's info.json, else from the last records.
    """
    c = gen.model.config
    train, evals = _metrics(gen.run_dir)
    info = gen.info
    step = info.get("step", evals[-1]["step"] if evals else train.get("step"))
    at_step = [e for e in evals if e.get("step") == step]
    ev = at_step[-1] if at_step else {}
    last_ev = evals[-1] if evals else {}
    train_at_step = train if train.get("step") == step else {}  # the log's last record may be newer
    return {
        "run": gen.run_dir.name if gen.run_dir is not None else "model",
        "parameters": gen.model.num_params(),
        "layers": c.n_layer,
        "heads": c.n_head,
        "width": c.n_embd,
        "context": c.block_size,
        "tokenizer": gen.tokenizer.spec,
        "vocab_size": gen.tokenizer.vocab_size,
        "step": step,
        "tokens": info.get("tokens", ev.get("tokens", train_at_step.get("tokens"))),
        "train_loss": ev.get("train_loss", info.get("train_loss", last_ev.get("train_loss", train.get("loss")))),
        "val_loss": ev.get("val_loss", info.get("val_loss", last_ev.get("val_loss"))),
        # Bits per byte only from the evaluation at this step (runs before they were logged have none).
        "train_bpb": ev.get("train_bpb"),
        "val_bpb": ev.get("val_bpb"),
        "whole_train_split": ev.get("train_loss_tokens") is not None,
    }


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def model_card_markdown(gen: Generator) -> str:
    f = model_facts(gen)
    return "\n".join([
        "### Model card",
        f"| run | `{f['run']}` |",
        "|---|---|",
        f"| parameters | {f['parameters']:,} |",
        f"| shape | {f['layers']} layers, {f['heads']} heads, {f['width']} wide |",
        f"| context | {f['context']} tokens |",
        f"| tokenizer | {f['tokenizer']} ({f['vocab_size']:,} ids) |",
        f"| steps | {_fmt(f['step'], ',')} |",
        f"| tokens seen | {_fmt(f['tokens'], ',')} |",
        f"| train loss | {_fmt(f['train_loss'], '.4f')} |",
        f"| val loss | {_fmt(f['val_loss'], '.4f')} |",
        f"| train bits per byte | {_fmt(f['train_bpb'], '.4f')} |",
        f"| val bits per byte | {_fmt(f['val_bpb'], '.4f')} |",
        "",
        "Losses are mean cross-entropy in nats per token; bits per byte are the same nats over the UTF-8 "
        "bytes of the predicted tokens, / ln 2 (comparable across tokenizers)."
        + (" The train loss is over the whole training split, which this run trained to memorise; the val "
           "loss is text it never saw." if f["whole_train_split"] else ""),
    ])


def example_prompts(gen: Generator) -> list[str]:
    """The example prompts the tokenizer can encode (a char tokenizer may not know every letter)."""
    ok = []
    for prompt in EXAMPLE_PROMPTS:
        try:
            gen.tokenizer.encode(prompt)
        except GptforgeError:
            continue
        ok.append(prompt)
    return ok or [""]


# ----------------------------------------------------------------------------------------- app


def build_app(
    gen: Generator,
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    num_samples_limit: int = NUM_SAMPLES_LIMIT,
):
    """The Gradio Blocks page for `gen`, with its queue on (returns gradio.Blocks; not launched)."""
    try:
        import gradio as gr
    except ImportError:
        raise GptforgeError("the web page needs gradio; pip install 'gptforge[web]'") from None

    def run(prompt, max_new_tokens, temperature, top_k, top_p, seed, num_samples) -> Iterator[str]:
        s = clamp_inputs(max_new_tokens, temperature, top_k, top_p, seed, num_samples,
                         max_new_tokens_limit=max_new_tokens_limit, num_samples_limit=num_samples_limit)
        prompt = prompt or ""
        texts = [""] * s.num_samples
        try:
            yield format_samples(prompt, texts)
            for pieces in gen.stream_batch(prompt, **asdict(s)):
                texts = [t + p for t, p in zip(texts, pieces, strict=True)]
                yield format_samples(prompt, texts)
        except GptforgeError as e:
            raise gr.Error(str(e)) from None

    def count(limit: int, value: int, label: str, elem_id: str):
        """A slider from 1 to `limit`; a limit of 1 leaves nothing to choose (and a slider needs two values)."""
        if limit <= 1:
            return gr.Number(value=1, precision=0, label=label, interactive=False, elem_id=elem_id)
        return gr.Slider(1, limit, value=value, step=1, label=label, elem_id=elem_id)

    facts = model_facts(gen)
    loss_png = gen.run_dir / "loss.png" if gen.run_dir is not None else None
    with gr.Blocks(title=f"gptforge: {facts['run']}", analytics_enabled=False) as demo:
        gr.Markdown(f"# gptforge · {facts['run']}\nA GPT trained from scratch with gptforge. "
                    "Type a prompt and press **Generate**.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, value=example_prompts(gen)[0], elem_id="prompt")
                with gr.Row():
                    max_new = count(max_new_tokens_limit, min(200, max_new_tokens_limit), "Max new tokens",
                                    "max-new-tokens")
                    temperature = gr.Slider(0.0, TEMPERATURE_MAX, value=0.8, step=0.05,
                                            label="Temperature (0 = greedy)", elem_id="temperature")
                with gr.Row():
                    top_k = gr.Slider(0, min(200, gen.vocab_limit), value=0, step=1, label="Top-k (0 = off)",
                                      elem_id="top-k")
                    top_p = gr.Slider(TOP_P_MIN, 1.0, value=1.0, step=0.01, label="Top-p (1 = off)",
                                      elem_id="top-p")
                with gr.Row():
                    seed = gr.Number(value=1337, precision=0, label="Seed (blank = random)", elem_id="seed")
                    num_samples = count(num_samples_limit, 1, "Samples", "num-samples")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                output = gr.Textbox(label="Output", lines=14, max_lines=40, interactive=False, elem_id="output")
                gr.Examples(examples=[[p] for p in example_prompts(gen)], inputs=[prompt], label="Example prompts")
            with gr.Column(scale=2):
                gr.Markdown(model_card_markdown(gen), elem_id="model-card")
                if loss_png is not None and loss_png.is_file():
                    gr.Image(value=str(loss_png), label="Loss curves", interactive=False, elem_id="loss-plot")
        inputs = [prompt, max_new, temperature, top_k, top_p, seed, num_samples]
        button.click(run, inputs=inputs, outputs=output, api_name="generate")
    # One request at a time: generation already uses every core; the rest wait in the queue.
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def _check_limit(max_new_tokens_limit: int) -> None:
    if max_new_tokens_limit < 1:
        raise GptforgeError(f"--max-new-tokens-limit must be >= 1, got {max_new_tokens_limit}")


def _check_bind(host: str, port: int) -> None:
    """Refuse, before loading anything, an address this machine cannot listen on (Gradio would say
    "Cannot find empty port" for an unknown host, and raise OverflowError for a port out of range)."""
    import socket

    if not 1 <= port <= 65535:
        raise GptforgeError(f"--port {port} is not a TCP port; choose one in 1..65535 (default 7860)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise GptforgeError(f"--host {host!r} is not an address ({getattr(e, 'strerror', None) or e}); give an "
                            "address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it
        try:
            s.bind(addr)
        except OSError as e:
            raise GptforgeError(f"cannot serve on {host}:{port} ({e.strerror or e}); pick another --port or "
                                "--host") from None


def serve(
    run_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    which: str = "latest",
    device: str = "auto",
) -> None:
    """`gptforge serve RUN`: load the run's checkpoint and serve the page until interrupted."""
    from gptforge.generate import load

    _check_limit(max_new_tokens_limit)
    _check_bind(host, port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline server
    gen = load(run_dir, which=which, device=device)
    demo = build_app(gen, max_new_tokens_limit=max_new_tokens_limit)
    try:
        demo.launch(server_name=host, server_port=port, ssr_mode=False, show_error=False, quiet=True,
                    prevent_thread_lock=True)
    except OSError as e:  # Gradio says so when the port is taken or the address cannot be bound
        why = " ".join(str(e).split())  # Gradio's messages run over several lines
        raise GptforgeError(f"cannot serve on {host}:{port} ({why}); pick another --port or --host") from None
    print(f"gptforge: serving {gen.run_dir} on http://{host}:{port} (Ctrl-C stops)", flush=True)
    demo.block_thread()


# ----------------------------------------------------------------------------------------- Space export

_APP_PY = '''"""A Hugging Face Space that samples from a GPT trained with gptforge (written by `gptforge export-space`).

Run it locally with `python app.py`; on Spaces it starts by itself.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the bundled copy of gptforge comes first

from gptforge.generate import load  # noqa: E402
from gptforge.web import build_app  # noqa: E402

demo = build_app(load(HERE / {run_name!r}, device="auto"), max_new_tokens_limit={limit})

if __name__ == "__main__":
    demo.launch(ssr_mode=False)
'''

_README = """---
title: {title}
emoji: 🪶
colorFrom: indigo
colorTo: gray
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: mit
---

# {title}

A GPT trained from scratch with gptforge, exported with
`gptforge export-space`. The page streams samples from the model; `{run_name}/` holds its weights
(safetensors), config and tokenizer, and `gptforge/` the code that runs it.

{card}
"""

# What app.py needs at run time (gradio itself comes with the Space's sdk_version).
_REQUIREMENTS = ["torch>=2.4", "numpy>=1.24", "tiktoken>=0.7", "tokenizers>=0.19", "safetensors>=0.4",
                 "tqdm>=4.66", "matplotlib>=3.8"]


def export_space(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    which: str = "latest",
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
) -> Path:
    """`gptforge export-space RUN OUT_DIR`: a folder that runs as a Hugging Face Space as it is.

    OUT_DIR gets app.py, requirements.txt, README.md (with the Spaces YAML header), RUN_NAME/ (the
    checkpoint's safetensors weights, model config and info, the tokenizer, config.toml,
    metrics.jsonl and loss.png) and gptforge/ (a copy of this package). OUT_DIR must not exist
    or be empty. Returns OUT_DIR.
    """
    import gradio

    import gptforge
    from gptforge.generate import load
    from gptforge.runs import resolve_checkpoint

    _check_limit(max_new_tokens_limit)
    gen = load(run_dir, which=which, device="cpu")  # fails early on a damaged run
    run = gen.run_dir
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptforgeError(f"{out} exists and is not an empty directory; choose a new OUT_DIR")
    ckpt_src = resolve_checkpoint(run_dir, which)
    out.mkdir(parents=True, exist_ok=True)
    run_out = out / run.name  # keeps the run's name, which the model card shows
    ckpt = run_out / "checkpoints" / "latest"
    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "model_config.json", "info.json"):  # not state.pt: optimizer state
        shutil.copy2(ckpt_src / name, ckpt / name)
    gen.tokenizer.save(run_out / "tokenizer")
    for name in ("config.toml", "metrics.jsonl", "loss.png"):
        if (run / name).is_file():
            shutil.copy2(run / name, run_out / name)
    shutil.copytree(Path(gptforge.__file__).parent, out / "gptforge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "app.py").write_text(_APP_PY.format(run_name=run.name, limit=int(max_new_tokens_limit)), encoding="utf-8")
    (out / "requirements.txt").write_text("\n".join(_REQUIREMENTS) + "\n", encoding="utf-8")
    title = f"gptforge {run.name}"
    (out / "README.md").write_text(
        _README.format(title=title, run_name=run.name, gradio_version=gradio.__version__,
                       card=model_card_markdown(gen)),
        encoding="utf-8",
    )
    return out
