"""The training batches one micro-batch ahead of the loop (_Prefetcher), with a state_dict that resumes
at the first batch not yet trained on."""

from __future__ import annotations

from typing import Any

import torch


class _Prefetcher:
    """The training batches, one micro-batch ahead: the next one is drawn and copied to the device
    (from pinned memory, asynchronously, on CUDA) while the device still computes the current step.

    state_dict() is the sampler's position *before* the batch held in advance, so a checkpoint
    resumes at the first batch not yet trained on and resume stays exact."""

    def __init__(self, sampler: Any, device: torch.device) -> None:
        self.sampler, self.device = sampler, device
        self.pin = device.type == "cuda"
        self._next: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state_before_next: dict[str, Any] | None = None

    def _fetch(self) -> None:
        self._state_before_next = self.sampler.state_dict()
        x, y = self.sampler.next_batch()
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        self._next = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._next is None:
            self._fetch()
        batch = self._next
        self._fetch()
        return batch  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state_before_next) if self._next is not None else self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._next = self._state_before_next = None

