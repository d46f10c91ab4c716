"""Loading a run: what eval, generate, serve, export and train.init need from a run directory, and
nothing that trains.

    model, tokenizer, info = load_model("runs/demo")                  # checkpoints/latest, on the CPU
    model, tokenizer, info = load_model("runs/demo", which="best", device="auto")
    model, tokenizer, info = load_model("runs/demo/checkpoints/step-0000500")
    device = pick_device("auto")                                      # cuda > mps > cpu

A run directory (docs/design.md) holds `config.toml`, `tokenizer/`, `metrics.jsonl` and
`checkpoints/NAME/` with `model.safetensors` (the plain module's weights), `model_config.json` (the
GPTConfig), `info.json` (step, tokens, losses, time) and, for training checkpoints, `state.pt`
(written and read by gptforge.train.checkpoint). Weights are read with safetensors: loading a run
never runs pickled code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import GptforgeError
from gptforge.io import read_json

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
STATE = "state.pt"
INFO = "info.json"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{7,})$")


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` picks cuda > mps > cpu; a named device must be available."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise GptforgeError("train.device = 'cuda' but torch sees no CUDA GPU; use train.device=auto or cpu")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GptforgeError("train.device = 'mps' but MPS is not available; use train.device=auto or cpu")
    if preference not in ("cpu", "cuda", "mps"):
        raise GptforgeError(f"train.device = {preference!r} is invalid; allowed: 'auto', 'cpu', 'cuda', 'mps'")
    return torch.device(preference)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory from a run directory (+ `which`) or a checkpoint directory itself."""
    path = Path(path)
    if (path / WEIGHTS).is_file() or (path / MODEL_CONFIG).is_file():
        return path
    if not path.exists():
        old = path.with_name(path.name + ".old")
        if (old / WEIGHTS).is_file():  # a kill between the two renames of io.swap_in_dir
            return old
        raise GptforgeError(f"{path} does not exist; pass a run directory (e.g. runs/demo) or a checkpoint in one")
    if which not in ("latest", "best") and not STEP_DIR.match(which):
        raise GptforgeError(f"checkpoint {which!r} is unknown; use 'latest', 'best' or 'step-NNNNNNN'")
    ckpt = path / CHECKPOINTS / which
    if not (ckpt / WEIGHTS).is_file():
        old = ckpt.with_name(ckpt.name + ".old")
        if (old / WEIGHTS).is_file():
            return old
        available = sorted(d.name for d in (path / CHECKPOINTS).glob("*") if (d / WEIGHTS).is_file()) \
            if (path / CHECKPOINTS).is_dir() else []
        hint = f"available: {', '.join(available)}" if available else "train it first (gptforge train)"
        raise GptforgeError(f"{path} has no '{which}' checkpoint ({ckpt / WEIGHTS} is missing); {hint}")
    return ckpt


def run_dir_of(ckpt_dir: Path) -> Path:
    """RUN for RUN/checkpoints/NAME."""
    return ckpt_dir.parent.parent


def read_info(ckpt_dir: Path) -> dict[str, Any]:
    return _read_checkpoint_json(Path(ckpt_dir) / INFO)


def load_weights(model: torch.nn.Module, ckpt_dir: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into `model` (strict); damage or shape mismatch -> GptforgeError."""
    from safetensors.torch import load_model as st_load_model

    path = Path(ckpt_dir) / WEIGHTS
    if not path.is_file():
        raise GptforgeError(f"{path} is missing; the checkpoint is incomplete (pick another one or retrain)")
    try:
        st_load_model(unwrap(model), str(path), strict=True, device=str(device))
    except RuntimeError as e:  # shapes or names that do not match the model
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise GptforgeError(f"{path} does not fit the model in {MODEL_CONFIG} ({detail}); the checkpoint and "
                            "its config disagree") from None
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise GptforgeError(f"{path} is damaged ({type(e).__name__}: {str(e)[:200]}); use another checkpoint") from None


def load_model(path: str | Path, which: str = "latest", device: str | torch.device = "cpu"):
    """(GPT, Tokenizer, info) from a run directory or a checkpoint directory inside one; `device` may
    be "auto" (cuda > mps > cpu).

    The model is in eval mode on `device`. Missing or damaged files and weights whose shapes do not
    match model_config.json raise GptforgeError."""
    from gptforge.data.tokenizers import load_tokenizer
    from gptforge.model import GPT, GPTConfig

    ckpt = resolve_checkpoint(path, which)
    if isinstance(device, str):
        device = pick_device(device)
    fields = _read_checkpoint_json(ckpt / MODEL_CONFIG)
    try:
        config = GPTConfig(**fields)
    except TypeError as e:
        raise GptforgeError(f"{ckpt / MODEL_CONFIG} does not describe a GPTConfig ({e}); the file is damaged") from None
    run = run_dir_of(ckpt)
    tok_dir = run / "tokenizer"
    if not tok_dir.is_dir():
        raise GptforgeError(f"{tok_dir} is missing; {run} is not a complete run directory")
    tokenizer = load_tokenizer(tok_dir)
    model = GPT(config).to(device)
    load_weights(model, ckpt, device)
    model.eval()
    info = read_info(ckpt) if (ckpt / INFO).is_file() else {}
    return model, tokenizer, info



def _read_checkpoint_json(path: Path) -> dict[str, Any]:
    return read_json(path, hint="the checkpoint is incomplete or damaged (pick another one or retrain)")
