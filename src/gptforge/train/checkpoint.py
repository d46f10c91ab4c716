"""Writing checkpoints, atomically, and reading back the training state of one (loading a run's model
for inference is gptforge.runs).

    save_model(run / "checkpoints" / "latest", model, {"step": 100, ...}, state=trainer_state)
    state = load_state(run / "checkpoints" / "latest")               # torch.load(weights_only=True)

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
import shutil
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import GptforgeError
from gptforge.io import swap_in_dir, temp_sibling
from gptforge.runs import CHECKPOINTS, INFO, MODEL_CONFIG, STATE, STEP_DIR, WEIGHTS, unwrap

__all__ = ["CHECKPOINTS", "copy_checkpoint", "load_state", "prune_step_checkpoints", "save_model", "step_name"]


def step_name(step: int) -> str:
    return f"step-{step:07d}"


# --------------------------------------------------------------------------------------------- save


def save_model(ckpt_dir: str | Path, model: torch.nn.Module, info: dict[str, Any],
               state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically: weights, model config, info and (optionally) the
    training state. `model` may be wrapped in DDP or torch.compile; the plain module is saved."""
    from safetensors.torch import save_model as st_save_model

    ckpt_dir = Path(ckpt_dir)
    plain = unwrap(model)
    config = _model_config_dict(plain)  # a caller's mistake: a TypeError, not a failed write
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(ckpt_dir)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        # safetensors' save_model handles tied weights (the embedding shared with the LM head).
        st_save_model(plain, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MODEL_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
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
    swap_in_dir(tmp, ckpt_dir)
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
    tmp = temp_sibling(dst)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptforgeError(f"could not copy checkpoint {src} to {dst} ({_reason(e)}); {_last_good(src)}; "
                            "free some disk space and continue with gptforge train --resume RUN") from None
    swap_in_dir(tmp, dst)
    return dst


def prune_step_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints/step-NNNNNNN directories."""
    # By step number, not by name: step-10000000 (8 digits) is newer than step-9999999.
    steps = sorted((d for d in (Path(run_dir) / CHECKPOINTS).glob("step-*") if STEP_DIR.match(d.name)),
                   key=lambda d: int(STEP_DIR.match(d.name).group(1)))
    for d in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------- load


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
