"""Muon, batched and without host read-backs: the optimizer of the blocks' matrices.

    opt = Muon(matrices, lr=0.02, momentum=0.95, weight_decay=0.0)
    opt.found_inf = flag  # optional, a float tensor on the device: 1 skips this update there, as fused AdamW does
    opt.step()

The update is PyTorch's own `torch.optim.Muon` (2.9+): the same momentum buffer (`lerp` towards the
gradient), Nesterov look-ahead, quintic Newton-Schulz orthogonalisation in bfloat16 with its
coefficients, steps and eps, decoupled weight decay before the update, and `adjust_lr_fn`; the same
constructor and the same state (`momentum_buffer` per parameter), so the two load each other's
checkpoints. What differs is the cost: torch's steps one matrix at a time (some 22 small ops each),
this one stacks the matrices of one shape and orthogonalises the stack with batched matmuls, with
`torch._foreach_*` ops for the rest; and a `found_inf` flag (what GradScaler and the trainer hand a
fused AdamW) skips the update on the device, so nothing is read back to the host. A skipped update
leaves the weights and the momentum buffers bit-identical. tests/train/test_muon.py checks it against
torch.optim.Muon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic)
NS_STEPS = 5
EPS = 1e-7


def orthogonalize(x: torch.Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  steps: int = NS_STEPS, eps: float = EPS) -> torch.Tensor:
    """Newton-Schulz iterations towards the nearest semi-orthogonal matrix (US'V^T with S' roughly in
    [0.5, 1.5], not exactly UV^T), in bfloat16, of each matrix of a (k, m, n) stack: torch.optim.Muon's
    iteration, batched. Returns a new bfloat16 stack.

    torch's iterates on the transpose of a tall matrix (so that the Gram matrix is the smaller one);
    here a tall stack is iterated as it stands with the Gram matrix on the other side, X^T X, and
    X B for B X^T: the transpose of the same products, without copying the stack into the other layout."""
    a, b, c = coefficients
    tall = x.size(-2) > x.size(-1)
    x = x.to(torch.bfloat16)
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = torch.bmm(x.mT, x) if tall else torch.bmm(x, x.mT)        # the smaller Gram matrix
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)    # b A + c A^2 (symmetric)
        x = torch.baddbmm(x, x, gram_update, beta=a) if tall else torch.baddbmm(x, gram_update, x, beta=a)
    return x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-shape learning rate: "original" (the default, None) scales by
    sqrt(max(1, rows / cols)), "match_rms_adamw" by 0.2 sqrt(max(rows, cols))."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's algorithm and arguments (2-D parameters only), stepped a stack of
    same-shaped matrices at a time; takes a `found_inf` (and `grad_scale`) attribute like fused AdamW."""

    _step_supports_amp_scaling = True  # GradScaler and the trainer hand it found_inf instead of reading it back

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if len(ns_coefficients) != 3 or not 0 < ns_steps < 100:
            raise ValueError("ns_coefficients must be 3 numbers and ns_steps in [1, 99]")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": tuple(ns_coefficients), "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}  # torch.optim.Muon's keys: the checkpoints are interchangeable
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: "
                                     f"{p.size()}")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient (none where `found_inf` is set and non-zero)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        skip = None if found_inf is None else found_inf != 0  # a bool tensor on the device; never read here
        for group in self.param_groups:
            stacks: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("Muon does not support sparse gradients or complex parameters")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                stacks.setdefault((p.shape, p.dtype, p.device), []).append(p)
            for params in stacks.values():
                self._update(params, group, skip, grad_scale)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict, skip: torch.Tensor | None,
                grad_scale: torch.Tensor | None) -> None:
        """One update of same-shaped matrices: momentum, one batched orthogonalisation, decay, step."""
        lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if grad_scale is not None:  # GradScaler.step without an unscale_ first
            grads = torch._foreach_div(grads, grad_scale)
        if skip is not None:
            # A skipped update's gradient may hold inf/nan (that is why it is skipped); lerp of the
            # buffer towards itself leaves it exactly as it was, and its orthogonalisation is finite.
            grads = [torch.where(skip, buf, grad) for grad, buf in zip(grads, bufs, strict=True)]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs

        stack = torch.empty((len(params), *params[0].shape), dtype=torch.bfloat16, device=params[0].device)
        torch.stack(updates, out=stack)  # one copy, cast to bfloat16
        ortho = orthogonalize(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
        ortho = ortho.to(params[0].dtype)  # torch adds the bf16 update to the weights in their dtype too
        if skip is not None:
            ortho.mul_(torch.where(skip, 0.0, 1.0))  # exact either way, and finite (see above)
        if weight_decay != 0:
            decay = 1 - lr * weight_decay
            torch._foreach_mul_(params, decay if skip is None else torch.where(skip, 1.0, decay))
        torch._foreach_add_(params, list(ortho.unbind(0)),
                            alpha=-adjusted_lr(lr, group["adjust_lr_fn"], params[0].shape))
