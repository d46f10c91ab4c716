"""gptforge.runs: loading a run for inference, with nothing of the training package."""

from __future__ import annotations

import subprocess
import sys
import types

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


def test_pick_device_prefers_cuda_then_mps_then_cpu_and_names_what_is_missing(monkeypatch):
    """`auto` picks cuda > mps > cpu; a device named outright must be there, else one line says so. One
    machine has at most one of the accelerators, so torch's availability answers are set by hand here
    (mutation-testing survivors: the CUDA and MPS branches)."""
    no_cuda = "train.device = 'cuda' but torch sees no CUDA GPU; use train.device=auto or cpu"
    no_mps = "train.device = 'mps' but MPS is not available; use train.device=auto or cpu"

    def refused(preference: str) -> str:
        with pytest.raises(GptforgeError) as e:
            runs.pick_device(preference)
        return str(e.value)

    for cuda, mps, auto in ((True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert runs.pick_device() == runs.pick_device("auto") == torch.device(auto)
        assert runs.pick_device("cpu") == torch.device("cpu")
        assert (runs.pick_device("cuda") == torch.device("cuda")) if cuda else (refused("cuda") == no_cuda)
        assert (runs.pick_device("mps") == torch.device("mps")) if mps else (refused("mps") == no_mps)
    # A torch built without the MPS backend at all (torch.backends is a module wrapper that would find a
    # deleted attribute again, so it is replaced whole).
    monkeypatch.setattr(torch, "backends", types.SimpleNamespace())
    assert runs.pick_device("auto") == torch.device("cpu") and refused("mps") == no_mps
    for bad in ("tpu", "CPU", "cuda:0", ""):
        assert refused(bad) == f"train.device = {bad!r} is invalid; allowed: 'auto', 'cpu', 'cuda', 'mps'"


def test_unwrap_takes_off_ddp_and_compile_wrappers_in_any_order(tmp_path):
    """Checkpoints store the plain module: unwrap must see through DistributedDataParallel and
    torch.compile's OptimizedModule, however they are nested (a one-process gloo group, no torchrun)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gptforge.runs import unwrap

    model = torch.nn.Linear(3, 2)
    compiled = torch.compile(model)  # a wrapper only: nothing compiles until it is called
    assert unwrap(model) is model and unwrap(compiled) is model and compiled is not model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert unwrap(DDP(model)) is model
        assert unwrap(DDP(torch.compile(model))) is model
        assert unwrap(torch.compile(DDP(model))) is model
    finally:
        dist.destroy_process_group()
