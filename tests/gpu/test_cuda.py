"""What only a CUDA GPU can show: the same numbers as the CPU, mixed precision that trains, torch.compile,
fused AdamW, flash / memory-efficient attention, the KV cache, and checkpoints that move between devices.

Every test here carries `pytest.mark.gpu`. pyproject's addopts deselect them (`-m "not gpu"`), so `make test`
never runs them; `pytest -m gpu tests/gpu` (or `make gpu-check`) selects them, and on a machine without CUDA
they are then skipped with the reason "needs CUDA", never passed.

Models are tiny (2 layers, 64-128 wide, context 64) and runs a few dozen steps, so the whole file takes
about a minute on one GPU, most of it torch.compile.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from gptforge.config import load_config, resume_config
from gptforge.model import GPT, GPTConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = torch.device("cuda")
# bf16 keeps 8 bits of mantissa: two correct bf16 computations of a loss differ by up to ~1%.
BF16_REL = 2e-2


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def exact_fp32():
    """float32 matmuls in full float32 (no TF32), so CUDA can be compared with the CPU to ~1e-5.
    gptforge's runtime turns TF32 on for training; this puts back whatever was set before."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text) -> Path:
    """40,000 characters of Tiny Shakespeare: ~600 windows of 64, enough for 60 steps of 16 without
    the loss falling only because a few windows were memorised."""
    path = tmp_path_factory.mktemp("gpu-corpus") / "slice.txt"
    path.write_text(shakespeare_text[:40_000], encoding="utf-8")
    return path


@pytest.fixture
def config(corpus):
    """config(*overrides): a char-level 2-layer model on CUDA; every test names its dtype."""

    def make(*overrides: str):
        base = [f"data.corpus={corpus}", "data.tokenizer=char", "data.val_fraction=0.1", "model.preset=tiny",
                "model.n_layer=2", "model.n_head=2", "model.n_embd=128", "model.block_size=64",
                "model.dropout=0.0", "train.batch_size=16", "train.device=cuda", "train.log_every=1",
                "train.eval_every=1000", "train.eval_batches=2", "train.checkpoint_every=1000", "train.seed=1337",
                "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=5"]
        return load_config(None, [*base, *overrides])

    return make


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run, "train")}


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = dict(vocab_size=65, n_layer=2, n_head=2, n_embd=128, block_size=64, dropout=0.0)
    return GPT(GPTConfig(**{**fields, **overrides}))


def batch(vocab: int = 65, B: int = 8, T: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, vocab, (B, T + 1), generator=g)
    return buf[:, :-1], buf[:, 1:]


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("chunk", [512, 0], ids=["chunked-loss", "plain-loss"])
def test_cpu_and_cuda_float32_agree_on_loss_and_gradients(exact_fp32, chunk):
    cpu = tiny_gpt()
    cpu.loss_chunk_size = chunk
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x, y = batch()

    _, loss_cpu = cpu(x, y)
    loss_cpu.backward()
    _, loss_gpu = gpu(x.to(DEVICE), y.to(DEVICE))
    loss_gpu.backward()

    assert math.isfinite(loss_cpu.item()) and loss_cpu.item() > 3.0  # an untrained model: about ln(65)
    assert loss_gpu.item() == pytest.approx(loss_cpu.item(), rel=1e-5)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        g_cpu, g_gpu = p_cpu.grad, p_gpu.grad.cpu()
        scale = g_cpu.abs().max().item()
        assert scale > 0, f"{name} got no gradient"
        worst = (g_gpu - g_cpu).abs().max().item()
        assert worst <= 1e-4 * scale, f"{name}: CUDA and CPU gradients differ by {worst:.3g} (max |g| {scale:.3g})"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_lowers_the_loss(config, tmp_path, dtype):
    from gptforge.train.trainer import Trainer

    trainer = Trainer(config(f"train.dtype={dtype}", "train.max_steps=60"), tmp_path / "run")
    result = trainer.train()

    started = records(tmp_path / "run", "event")[0]
    assert started["event"] == "started" and started["device"].startswith("cuda") and started["dtype"] == dtype
    # fp16 needs loss scaling and gets it; bf16 has float32's range and must not pay for it.
    assert trainer.scaler.is_enabled() == (dtype == "float16")
    if dtype == "float16":
        assert math.isfinite(trainer.scaler.get_scale()) and trainer.scaler.get_scale() > 0
    assert trainer.optimizer.defaults.get("fused") is True  # the trainer's AdamW is the fused CUDA kernel
    steps = losses(tmp_path / "run")
    assert result.step == 60 and len(steps) == 60 and all(math.isfinite(v) for v in steps.values())
    first, last = steps[1], sum(steps[s] for s in range(56, 61)) / 5
    vocab = started["vocab_size"]
    assert math.log(vocab) - 0.5 < first < math.log(vocab) + 0.5  # starts near uniform over the characters
    assert last < first - 1.0, f"{dtype}: the loss went from {first:.3f} to {last:.3f} in 60 steps"


def test_compile_matches_eager_and_saves_plain_weights(config, tmp_path):
    from safetensors import safe_open

    from gptforge import runs
    from gptforge.train.trainer import train

    common = ("train.dtype=bfloat16", "train.max_steps=8")

    train(config(*common, "train.compile=false"), tmp_path / "eager")
    train(config(*common, "train.compile=true"), tmp_path / "compiled")

    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == list(range(1, 9))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=BF16_REL), f"step {step}"

    def keys(run: Path) -> set[str]:
        with safe_open(str(run / "checkpoints" / "latest" / "model.safetensors"), framework="pt") as f:
            return set(f.keys())

    saved = keys(tmp_path / "compiled")
    assert saved and not any("_orig_mod" in k for k in saved)
    assert saved == keys(tmp_path / "eager")
    model, _, info = runs.load_model(tmp_path / "compiled", device="cpu")  # a plain GPT loads it strictly
    assert isinstance(model, GPT) and info["step"] == 8


def test_fused_adamw_steps_on_cuda():
    from gptforge.config import OptimConfig
    from gptforge.train.optim import configure_optimizer

    model = tiny_gpt().to(DEVICE)
    opt = configure_optimizer(model, OptimConfig(), DEVICE)
    assert opt.defaults.get("fused") is True
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch()
    model(x.to(DEVICE), y.to(DEVICE))[1].backward()
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)]
    assert all(moved)
    state = opt.state[next(model.parameters())]
    assert state["exp_avg"].device.type == "cuda"


def test_muon_steps_without_a_host_sync_and_skips_on_the_device():
    """MuonAdamW's update (batched Muon + fused AdamW) under CUDA's sync debug mode "error": with the
    trainer's found_inf flag it never waits for the GPU; found_inf = 1 leaves weights and both
    optimizers' state bit-identical; the Muon part follows torch.optim.Muon on the same gradients."""
    from gptforge.config import OptimConfig
    from gptforge.train.optim import MuonAdamW, configure_optimizer, muon_params, set_lr

    model, reference = tiny_gpt().to(DEVICE), tiny_gpt().to(DEVICE)
    cfg = OptimConfig(name="muon", lr=1e-3, muon_weight_decay=0.1)
    opt = configure_optimizer(model, cfg, DEVICE)
    assert isinstance(opt, MuonAdamW) and opt._step_supports_amp_scaling
    # The same pair with PyTorch's own Muon (one matrix at a time, its flag-less step) and the same AdamW.
    ref = MuonAdamW(torch.optim.Muon(muon_params(reference), lr=0.02, momentum=0.95, weight_decay=0.1),
                    configure_optimizer(reference, cfg, DEVICE).adamw)
    x, y = (t.to(DEVICE) for t in batch())

    def step(found_inf: float, poison: bool = False) -> None:
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
            m(x, y)[1].backward()
        if poison:
            next(iter(muon_params(model))).grad.fill_(float("nan"))
        flag = torch.full((), found_inf, device=DEVICE)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            set_lr(opt, 1e-3)
            opt.found_inf, opt.grad_scale = flag, None
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            del opt.found_inf, opt.grad_scale
        if found_inf == 0:
            ref.step()  # its learning rates are the construction's, the ones set_lr gives opt

    for _ in range(3):
        step(0.0)
    for p, q in zip(muon_params(model), muon_params(reference), strict=True):
        # bf16 Newton-Schulz: batched and per-matrix matmuls may round differently (~0.4% of an update)
        torch.testing.assert_close(p, q, rtol=0, atol=3 * 0.02 * 2e-2)
    weights = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    step(1.0, poison=True)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


# ------------------------------------------------------------------------------------------ attention


def _loss_and_grads(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    return loss.item(), [p.grad.detach().float().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_training_attention_runs_on_the_fast_sdpa_kernels(backend):
    """With SDPA restricted to one kernel, a kernel that cannot take the call raises instead of falling back
    to the math one; so this proves the training path (causal, no mask, bf16, dropout) runs on it, and
    gives the math kernel's loss and gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_gpt().to(DEVICE)  # head_dim 64
    x, y = (t.to(DEVICE) for t in batch())
    with sdpa_kernel(SDPBackend.MATH):
        ref_loss, ref_grads = _loss_and_grads(model, x, y)
    with sdpa_kernel(getattr(SDPBackend, backend)):
        loss, grads = _loss_and_grads(model, x, y)
    assert loss == pytest.approx(ref_loss, rel=BF16_REL)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).norm().item() <= 0.05 * r.norm().item() + 1e-8

    dropout = tiny_gpt(dropout=0.1).to(DEVICE).train()
    with sdpa_kernel(getattr(SDPBackend, backend)):
        loss, _ = _loss_and_grads(dropout, x, y)
    assert math.isfinite(loss)


def test_kv_cache_decoding_runs_without_the_math_kernel(exact_fp32):
    """Cached decoding: prefill (causal), a chunk after cached keys (an explicit mask) and single tokens
    (no mask) all run with SDPA limited to the flash and memory-efficient kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_gpt().to(DEVICE).eval()
    idx = batch(B=2, T=40)[0].to(DEVICE)
    with torch.no_grad():
        full, _ = model(idx)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            for dtype in (torch.float32, torch.bfloat16):
                cache = model.new_kv_cache(batch_size=2)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    parts = [model(idx[:, :16], kv_cache=cache)[0], model(idx[:, 16:24], kv_cache=cache)[0]]
                    parts += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(24, 40)]
                cached = torch.cat(parts, dim=1).float()
                tol = 1e-3 if dtype == torch.float32 else 0.1
                assert (cached - full).abs().max().item() < tol, dtype


def test_kv_cache_equals_no_cache_on_cuda(exact_fp32):
    model = tiny_gpt().to(DEVICE).eval()
    idx = batch(B=2, T=48)[0].to(DEVICE)
    with torch.no_grad():
        full, _ = model(idx)  # (B, 48, V)
        cache = model.new_kv_cache(batch_size=2)
        parts = [model(idx[:, :20], kv_cache=cache)[0], model(idx[:, 20:30], kv_cache=cache)[0]]
        parts += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(30, 48)]
    cached = torch.cat(parts, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)

    # Greedy decoding: the same tokens with and without the cache, through the generation engine.
    from gptforge.data.tokenizers import CharTokenizer
    from gptforge.generate import Generator, SamplingSettings

    gen = Generator(model, CharTokenizer([chr(c) for c in range(32, 97)]))  # 65 characters: the vocabulary
    greedy = SamplingSettings(max_new_tokens=40, temperature=0.0)
    with_cache = gen.generate_ids([1, 2, 3], greedy, use_cache=True)
    without = gen.generate_ids([1, 2, 3], greedy, use_cache=False)
    assert with_cache == without and len(with_cache[0]) == 40


# ------------------------------------------------------------------------------------------ checkpoints


def test_a_cuda_checkpoint_resumes_on_the_cpu_and_back(config, tmp_path):
    """float32, no dropout: the CPU continues the CUDA run (to TF32 tolerance), then CUDA continues the CPU's."""
    from gptforge.train.trainer import train

    common = ("train.dtype=float32", "optim.decay_steps=12")
    train(config(*common, "train.max_steps=12"), tmp_path / "once")
    run = tmp_path / "moved"
    train(config(*common, "train.max_steps=4"), run)
    result = train(resume_config(run, ["train.max_steps=8", "train.device=cpu"]), run, resume=True)
    assert result.step == 8
    result = train(resume_config(run, ["train.max_steps=12", "train.device=cuda"]), run, resume=True)
    assert result.step == 12

    events = [e for e in records(run, "event") if e["event"] in ("started", "resumed")]
    assert [(e["event"], e["device"].split(":")[0], e["step"]) for e in events] == [
        ("started", "cuda", 0), ("resumed", "cpu", 4), ("resumed", "cuda", 8)]
    once, moved = losses(tmp_path / "once"), losses(run)
    assert sorted(moved) == list(range(1, 13))
    # TF32 on CUDA against full float32 on the CPU: close, not bit-identical.
    for step in once:
        assert moved[step] == pytest.approx(once[step], rel=1e-2), f"step {step}"
    assert moved[12] < moved[1] - 0.5  # the moved run kept learning


def test_resume_on_cuda_continues_with_the_same_losses(config, tmp_path):
    from gptforge.train.trainer import train

    common = ("train.dtype=bfloat16", "model.dropout=0.1", "optim.decay_steps=20")
    train(config(*common, "train.max_steps=20"), tmp_path / "once")
    train(config(*common, "train.max_steps=10"), tmp_path / "twice")
    result = train(resume_config(tmp_path / "twice", ["train.max_steps=20"]), tmp_path / "twice", resume=True)
    assert result.step == 20

    once, twice = losses(tmp_path / "once"), losses(tmp_path / "twice")
    assert sorted(once) == sorted(twice) == list(range(1, 21))
    for step in once:
        assert twice[step] == pytest.approx(once[step], rel=BF16_REL), f"step {step}"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_updates_between_log_steps_never_wait_for_the_gpu(config, tmp_path, monkeypatch, optimizer):
    """CUDA's sync debug mode reports every host synchronisation: none happens inside an update
    (train_step) or the non-finite watch, in bf16 with the fused AdamW (or batched Muon + fused AdamW)
    and prefetched batches. Mode "warn" rather than "error", so a failure names every place that
    synchronises, not only the first."""
    from gptforge.train.trainer import Trainer, train

    syncs: list[str] = []

    @contextlib.contextmanager
    def reported(where):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
                syncs.extend(f"{where}: {w.filename}:{w.lineno}" for w in caught
                             if "called a synchronizing CUDA operation" in str(w.message))

    def strict(method):
        real = getattr(Trainer, method)

        def wrapped(self, *a, **k):
            with reported(method):
                return real(self, *a, **k)

        monkeypatch.setattr(Trainer, method, wrapped)

    with reported("check"):  # the capture itself: a read-back is reported
        torch.ones(1, device="cuda").item()
    assert syncs and all(s.startswith("check: ") for s in syncs), "sync debug mode reported nothing"
    syncs.clear()
    strict("train_step")
    strict("_watch_finite")
    result = train(config("train.dtype=bfloat16", "train.max_steps=12", "train.log_every=6",
                          "train.grad_accum_steps=2", f"optim.name={optimizer}"), tmp_path / "run")
    assert result.step == 12 and math.isfinite(result.train_loss)
    assert not syncs, "host synchronisations inside an update:\n" + "\n".join(sorted(set(syncs)))
