"""Ctrl-C and SIGTERM while training (_StopRequest): a flag the loop checks between steps, so the step
finishes and the checkpoint it saves is consistent."""

from __future__ import annotations

import signal
import threading
from typing import Any


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between steps (so the step finishes and the
    checkpoint is consistent); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
