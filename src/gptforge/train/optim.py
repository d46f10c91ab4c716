"""The optimizers (AdamW, or Muon + AdamW) and the learning-rate schedule.

    opt = configure_optimizer(model, cfg.optim, device)
    set_lr(opt, lr_at(step, cfg.optim, total_steps))     # once per optimizer update

`optim.name = "muon"`: Muon (Newton-Schulz orthogonalised momentum: train/muon.py, torch.optim.Muon's
update, batched) on the transformer blocks' 2-D weights, and AdamW on what Muon is not meant for: the
token and position embeddings, the LM head, biases and LayerNorm gains. Each part has its own peak
learning rate (`optim.muon_lr`, `optim.lr`); the schedule scales both by the same factor.

Weight decay goes to every parameter with >= 2 dimensions: the linear layers' weights and, as in
nanoGPT, the token and position embeddings (they are matrices too). Biases and LayerNorm gains
(1-D) are not decayed: shrinking them towards 0 only fights the normalisation.
"""

from __future__ import annotations

import inspect
import math

import torch

from gptforge.config import OptimConfig
from gptforge.train.muon import Muon


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


def configure_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device):
    """AdamW over param_groups() (fused where the device supports it and cfg.fused is set), or for
    cfg.name == "muon" a MuonAdamW: Muon on the blocks' matrices, AdamW on the rest."""
    if cfg.name == "muon":
        hidden = muon_params(model)
        ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        muon = Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                                weight_decay=cfg.muon_weight_decay)
        for group in muon.param_groups:
            group["lr_scale"] = cfg.muon_lr / cfg.lr
        adamw = _adamw([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], cfg, device)
        return MuonAdamW(muon, adamw)
    return _adamw(param_groups(model, cfg.weight_decay), cfg, device)


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.fused and fused_available(device):
        try:
            return torch.optim.AdamW([dict(g) for g in groups], fused=True, **kwargs)
        except (RuntimeError, ValueError):  # e.g. a dtype or device this build's kernel does not cover
            pass
    return torch.optim.AdamW(groups, **kwargs)


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights inside the transformer blocks (attention and MLP projections): Muon's part.
    Embeddings and the LM head are matrices too, but look-up tables and the output layer are not
    what Muon's orthogonalised updates are for."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")]


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: what the trainer, GradScaler and checkpoints need of
    torch.optim.Optimizer (param_groups, step, zero_grad, state_dict, load_state_dict).

    Where both parts skip an update on the device (Muon always, AdamW when fused), so does the pair:
    `_step_supports_amp_scaling` is then true and step() hands the `found_inf` / `grad_scale` that
    GradScaler or the trainer set on it to both parts, so no flag is read back to the host."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def _step_supports_amp_scaling(self) -> bool:
        return all(getattr(opt, "_step_supports_amp_scaling", False) for opt in (self.muon, self.adamw))

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def step(self) -> None:
        flags = {k: getattr(self, k) for k in ("found_inf", "grad_scale") if hasattr(self, k)}
        for opt in (self.muon, self.adamw):
            for k, v in flags.items():
                setattr(opt, k, v)
            try:
                opt.step()
            finally:
                for k in flags:
                    delattr(opt, k)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def set_lr(optimizer, lr: float) -> None:
    """The schedule's learning rate for this update: `lr` for AdamW's groups, `lr` times the group's
    `lr_scale` (muon_lr / lr) for Muon's."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


def warmup_updates(cfg: OptimConfig, total_steps: int | None) -> int:
    """The warm-up's length in updates: optim.warmup_steps, clipped to half of a run of total_steps
    (a longer one would never reach the peak, let alone cool down). The trainer logs the clip."""
    if total_steps is None:
        return cfg.warmup_steps
    return min(cfg.warmup_steps, total_steps // 2)


def cooldown_start(cfg: OptimConfig, total_steps: int) -> int:
    """The first update of a "wsd" schedule's cool-down."""
    return max(warmup_updates(cfg, total_steps), total_steps - max(1, round(cfg.cooldown_fraction * total_steps)))


def lr_at(step: int, cfg: OptimConfig, total_steps: int | None) -> float:
    """Learning rate for optimizer update `step` (0-based) of a run whose length is in updates. Every
    schedule warms up linearly from lr/warmup to lr over warmup_updates() (warmup_steps, at most half
    the run); then
    - "cosine": cosine decay to min_lr at total_steps (held there after);
    - "wsd" (warmup-stable-decay, a trapezoid): lr until the last `cooldown_fraction` of total_steps,
      then a straight line down to min_lr, reached exactly on the last update (total_steps - 1);
    - "constant": lr.
    With total_steps None every schedule holds lr after the warm-up. A run whose length is a time
    budget takes lr_at_time instead."""
    warmup = warmup_updates(cfg, total_steps)
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant" or total_steps is None:
        return cfg.lr
    if step >= total_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        decay_start = cooldown_start(cfg, total_steps)
        if step < decay_start:
            return cfg.lr
        done = (step - decay_start + 1) / (total_steps - decay_start)  # (0, 1], 1 on the last update
        return cfg.lr + done * (cfg.min_lr - cfg.lr)
    span = max(1, total_steps - warmup)
    progress = (step - warmup) / span
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


# A time-budget run's warm-up ends by this fraction of the budget at the latest, whatever
# optim.warmup_steps says (as a run of N updates clips its warm-up to N // 2).
WARMUP_MAX_FRACTION = 0.5


def warmup_clipped_by_time(step: int, progress: float, cfg: OptimConfig) -> bool:
    """Whether a time-budget run's warm-up is cut short at this update (the budget's half came first)."""
    return step + 1 < cfg.warmup_steps and progress >= WARMUP_MAX_FRACTION


def lr_at_time(step: int, progress: float, cfg: OptimConfig) -> float:
    """Learning rate for update `step` of a run whose length is a time budget, from `progress`, the
    fraction of the budget spent when this update ends (training seconds / train.max_time, clamped to
    [0, 1]). The budget is the schedule's clock (autoresearch's lr_multiplier(progress)):
    - warm-up: linear over the first optim.warmup_steps updates, and over at most the first half of
      the budget (WARMUP_MAX_FRACTION): the factor is the larger of the two ramps;
    - "cosine": from lr at progress 0 to min_lr at progress 1;
    - "wsd": lr until the last `cooldown_fraction` of the budget, then straight down to min_lr at 1;
    - "constant": lr.
    It reaches min_lr as the budget runs out, whatever the speed of the machine or a resume."""
    progress = min(1.0, max(0.0, progress))
    if cfg.schedule == "constant":
        shape = cfg.lr
    elif cfg.schedule == "wsd":
        start = 1.0 - cfg.cooldown_fraction
        done = 0.0 if progress <= start else (progress - start) / cfg.cooldown_fraction
        shape = cfg.lr + done * (cfg.min_lr - cfg.lr)
    else:
        shape = cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    if cfg.warmup_steps > 0:
        ramp = max((step + 1) / cfg.warmup_steps, progress / WARMUP_MAX_FRACTION)
        if ramp < 1.0:
            return shape * ramp
    return shape
