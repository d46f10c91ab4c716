"""gptforge: train GPT-style transformers from scratch.

    import gptforge
    run = gptforge.train(config)            # see gptforge.train
    gen = gptforge.load("runs/demo")        # see gptforge.generate
    print(gen.generate("ROMEO:", max_new_tokens=50))

Heavy modules (torch, tokenizers) are imported lazily so `gptforge --help` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["GptforgeError", "__version__", "load", "train"]

from gptforge.errors import GptforgeError


def __getattr__(name: str):
    if name == "train":
        from gptforge.train.trainer import train

        return train
    if name == "load":
        from gptforge.generate import load

        return load
    raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
