"""gptforge.runs: loading a run for inference, with nothing of the training package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptforge import runs
from gptforge.errors import GptforgeError


def test_inference_never_imports_the_training_package(tiny_run):
    """Sampling from a run, serving it and exporting it load gptforge.runs, not gptforge.train."""
    code = (
        "import sys, gptforge, gptforge.web, gptforge.hf, gptforge.runs\n"
        f"gen = gptforge.load({str(tiny_run)!r}, device='cpu')\n"
        "print(len(gen.generate('ROMEO:', max_new_tokens=5, seed=0)[0]))\n"
        "print(sorted(m for m in sys.modules if m.startswith('gptforge.train')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["5", "[]"]


def test_load_model_picks_the_device_and_the_checkpoint(tiny_run):
    model, tokenizer, info = runs.load_model(tiny_run, which="best", device="auto")
    assert next(model.parameters()).device == runs.pick_device("auto") and not model.training
    assert info["step"] > 0 and model.config.vocab_size == tokenizer.vocab_size
    latest = runs.resolve_checkpoint(tiny_run, "latest")
    assert latest == tiny_run / "checkpoints" / "latest" and runs.run_dir_of(latest) == tiny_run
    with pytest.raises(GptforgeError, match="checkpoint 'newest' is unknown"):
        runs.resolve_checkpoint(tiny_run, "newest")
    if not torch.cuda.is_available():
        with pytest.raises(GptforgeError, match="no CUDA GPU"):
            runs.pick_device("cuda")
