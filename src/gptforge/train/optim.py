"""AdamW with weight decay on matrices only, and the learning-rate schedule.

    opt = configure_optimizer(model, cfg.optim, device)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg.optim, total_steps)     # once per optimizer update

Weight decay goes to every parameter with >= 2 dimensions: the linear layers' weights and, as in
nanoGPT, the token and position embeddings (they are matrices too). Biases and LayerNorm gains
(1-D) are not decayed: shrinking them towards 0 only fights the normalisation.
"""

from __future__ import annotations

import inspect
import math

import torch

from gptforge.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and vectors (not). Tied parameters appear once."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() de-duplicates tied weights
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_available(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for the device (CUDA, and CPU in recent torch)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device.type in ("cuda", "cpu", "mps")


def configure_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over param_groups(), fused where the device supports it and cfg.fused is set."""
    fused = cfg.fused and fused_available(device)
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    groups = param_groups(model, cfg.weight_decay)
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # e.g. a dtype or device this build's kernel does not cover
            groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, cfg: OptimConfig, total_steps: int | None) -> float:
    """Learning rate for optimizer update `step` (0-based). Every schedule warms up linearly from
    lr/warmup to lr over warmup_steps; then
    - "cosine": cosine decay to min_lr at total_steps (held there after);
    - "wsd" (warmup-stable-decay, a trapezoid): lr until the last `cooldown_fraction` of total_steps,
      then a straight line down to min_lr, reached exactly on the last update (total_steps - 1);
    - "constant": lr.
    With total_steps None (a time budget not yet sized) every schedule holds lr after the warm-up."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total_steps is None:
        return cfg.lr
    if step >= total_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        cooldown = max(1, round(cfg.cooldown_fraction * total_steps))
        decay_start = max(cfg.warmup_steps, total_steps - cooldown)
        if step < decay_start:
            return cfg.lr
        done = (step - decay_start + 1) / (total_steps - decay_start)  # (0, 1], 1 on the last update
        return cfg.lr + done * (cfg.min_lr - cfg.lr)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / span
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
