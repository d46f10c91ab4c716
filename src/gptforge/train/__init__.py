"""Training: config in, run directory out.

    from gptforge.config import load_config
    from gptforge.train import train
    result = train(load_config("configs/tinyshakespeare-char.toml"), "runs/char")

Modules: optim (optimizers, LR schedule), checkpoint (atomic checkpoint writes, state.pt), metrics
(logger, MFU), init (train.init), plan (the config resolved once), auto (model.preset = "auto"),
prefetch (batches one step ahead), signals (Ctrl-C/SIGTERM), trainer (the loop) and the Trainer's
methods kept beside it: readback (what the loop reads from the device, and when), clock (the training
clock and time budget), state (the checkpointed training state), data (the run's data, rank 0 first)
and report (start event, train records, samples). The device set-up (gptforge.runtime) and
evaluation (gptforge.evaluate) live outside this package: evaluating or sampling a run never loads
it. `runtime` here re-exports gptforge.runtime.
"""

from __future__ import annotations

__all__ = ["TrainResult", "evaluate_run", "train"]


def __getattr__(name: str):
    # Imported on first use, so that importing a submodule (or the CLI's --help) does not load the loop.
    if name in __all__:
        from gptforge.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'gptforge.train' has no attribute {name!r}")
