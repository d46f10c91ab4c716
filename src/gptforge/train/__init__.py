"""Training: config in, run directory out.

    import gptforge
    from gptforge.config import load_config
    result = gptforge.train(load_config("configs/tinyshakespeare-char.toml"), "runs/char")
    # the same as gptforge.train.trainer.train(...); see that module

Modules: runtime (device, precision, DDP, seeding), optim (AdamW groups, LR schedule), checkpoint
(run directory, atomic save/load, load_model), metrics (logger, MFU), trainer (the loop).
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    # `gptforge.train` is both this package and, as the top-level docstring promises, the train()
    # function: once the package is imported it shadows gptforge.__getattr__("train"), so calling
    # the package forwards to trainer.train.
    def __call__(self, *args: Any, **kwargs: Any):
        from gptforge.train.trainer import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
