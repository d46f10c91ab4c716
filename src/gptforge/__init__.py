"""gptforge: train GPT-style transformers from scratch.

    from gptforge.train import train
    result = train(config, "runs/demo")     # see gptforge.train
    import gptforge
    gen = gptforge.load("runs/demo")        # see gptforge.generate
    print(gen.generate("ROMEO:", max_new_tokens=50))

Heavy modules (torch, tokenizers) are imported on first use, so `gptforge --help` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["GptforgeError", "__version__", "load"]

from gptforge.errors import GptforgeError


def __getattr__(name: str):
    if name == "load":
        from gptforge.generate import load

        return load
    raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
