"""Training: config in, run directory out.

    from gptforge.config import load_config
    from gptforge.train import train
    result = train(load_config("configs/tinyshakespeare-char.toml"), "runs/char")

Modules: runtime (device, precision, DDP, seeding), optim (optimizers, LR schedule), checkpoint
(atomic checkpoint writes, training state), metrics (logger, MFU), init (train.init), trainer (the loop).
"""

from __future__ import annotations

__all__ = ["TrainResult", "evaluate_run", "train"]


def __getattr__(name: str):
    # Imported on first use, so that importing a submodule (or the CLI's --help) does not load the loop.
    if name in __all__:
        from gptforge.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'gptforge.train' has no attribute {name!r}")
