"""The run directory and its checkpoints, written atomically and loaded without running pickled code.

    save_model(run / "checkpoints" / "latest", model, {"step": 100, ...}, state=trainer_state)
    model, tokenizer, info = load_model("runs/demo")                  # checkpoints/latest
    model, tokenizer, info = load_model("runs/demo", which="best")
    model, tokenizer, info = load_model("runs/demo/checkpoints/step-0000500")

A checkpoint directory holds `model.safetensors` (the plain module's weights), `model_config.json`
(the GPTConfig), `info.json` (step, tokens, losses, time) and, for training checkpoints, `state.pt`
(optimizer, trainer, sampler and RNG state: tensors and plain containers only, read back with
`torch.load(weights_only=True)`).

Atomicity: a checkpoint is written into a temporary sibling directory, then swapped in by renames
(`latest` -> `latest.old`, temp -> `latest`, then `latest.old` is deleted). At every moment either
`latest` or `latest.old` is a complete checkpoint, and readers fall back to `.old`, so a kill at
any moment never leaves a damaged latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import GptforgeError

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
STATE = "state.pt"
INFO = "info.json"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{7,})$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_name(step: int) -> str:
    return f"step-{step:07d}"


# --------------------------------------------------------------------------------------------- save


def save_model(ckpt_dir: str | Path, model: torch.nn.Module, info: dict[str, Any],
               state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically: weights, model config, info and (optionally) the
    training state. `model` may be wrapped in DDP or torch.compile; the plain module is saved."""
    from safetensors.torch import save_model as st_save_model

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    plain = unwrap(model)
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # safetensors' save_model handles tied weights (the embedding shared with the LM head).
        st_save_model(plain, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MODEL_CONFIG).write_text(json.dumps(_model_config_dict(plain), indent=2) + "\n", encoding="utf-8")
        (tmp / INFO).write_text(json.dumps(_plain(info), indent=2) + "\n", encoding="utf-8")
        if state is not None:
            torch.save(state, tmp / STATE)
        for f in tmp.iterdir():  # on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as e:  # a full disk, a file size limit, a vanished directory: say so, keep the old one
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptforgeError(f"could not write checkpoint {ckpt_dir} ({_reason(e)}); {_last_good(ckpt_dir)}; "
                            "free some disk space and continue with gptforge train --resume RUN") from None
    _swap_in(tmp, ckpt_dir)
    return ckpt_dir


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}".rstrip(": ")


def _last_good(ckpt_dir: Path) -> str:
    """Where the last complete checkpoint is, after a failed save of `ckpt_dir`."""
    for d in (ckpt_dir, ckpt_dir.with_name(ckpt_dir.name + ".old")):
        if (d / WEIGHTS).is_file():
            try:
                step = json.loads((d / INFO).read_text(encoding="utf-8")).get("step")
            except (OSError, ValueError):
                step = None
            return f"the last good checkpoint is {d}" + (f" (step {step}), unchanged" if step is not None else "")
    return "no earlier checkpoint exists"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a complete checkpoint directory to `dst`, atomically (used for step-NNNNNNN and best)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptforgeError(f"could not copy checkpoint {src} to {dst} ({_reason(e)}); {_last_good(src)}; "
                            "free some disk space and continue with gptforge train --resume RUN") from None
    _swap_in(tmp, dst)
    return dst


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def prune_step_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints/step-NNNNNNN directories."""
    steps = sorted(d for d in (Path(run_dir) / CHECKPOINTS).glob("step-*") if STEP_DIR.match(d.name))
    for d in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------- load


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory from a run directory (+ `which`) or a checkpoint directory itself."""
    path = Path(path)
    if (path / WEIGHTS).is_file() or (path / MODEL_CONFIG).is_file():
        return path
    if not path.exists():
        old = path.with_name(path.name + ".old")
        if (old / WEIGHTS).is_file():  # a kill between the two renames of _swap_in
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
    return _read_json(Path(ckpt_dir) / INFO)


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
    """(GPT, Tokenizer, info) from a run directory or a checkpoint directory inside one.

    The model is in eval mode on `device`. Missing or damaged files and weights whose shapes do not
    match model_config.json raise GptforgeError."""
    from gptforge.data.tokenizers import load_tokenizer
    from gptforge.model import GPT, GPTConfig

    ckpt = resolve_checkpoint(path, which)
    fields = _read_json(ckpt / MODEL_CONFIG)
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


def load_state(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state (state.pt), loaded with weights_only=True: tensors and containers only."""
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        raise GptforgeError(f"{path} is missing; this checkpoint cannot be resumed (it holds weights only)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise GptforgeError(f"{path} is damaged or not a gptforge state ({type(e).__name__}: {str(e)[:200]}); "
                            "resume from another checkpoint") from None


# --------------------------------------------------------------------------------------------- helpers


def _model_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; save_model expects a gptforge GPT")
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptforgeError(f"{path} is missing; the checkpoint is incomplete (pick another one or retrain)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptforgeError(f"{path} is damaged ({type(e).__name__}); use another checkpoint") from None
    if not isinstance(value, dict):
        raise GptforgeError(f"{path} is damaged (not a JSON object); use another checkpoint")
    return value


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy/torch scalars -> Python numbers, non-finite floats kept as strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        obj = obj.item()
    if isinstance(obj, float) and obj != obj or obj in (float("inf"), float("-inf")):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
