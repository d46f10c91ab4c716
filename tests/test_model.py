"""gptforge.model: shapes, causality, KV cache, padding, the chunked loss (Hugging Face parity: test_hf.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptforge.errors import GptforgeError
from gptforge.model import (
    GPT,
    PRESETS,
    Dropout,
    GPTConfig,
    LogitsBuffer,
    causal_attention,
    chunked_cross_entropy,
)

# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=100, n_head=3), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_head=-2), "n_head"),
        (dict(block_size=2.5), "block_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(attn_dropout=1.0), "attn_dropout"),
        (dict(attn_dropout=True), "attn_dropout"),
        (dict(bias="yes"), "bias"),
        (dict(tie_embeddings=1), "tie_embeddings"),
        (dict(pad_vocab_multiple=0), "pad_vocab_multiple"),
        (dict(activation="relu"), "activation"),
        (dict(activation=["gelu"]), "activation"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(GptforgeError, match=field):
        GPTConfig(**{**PRESETS["tiny"], **kwargs})


def test_the_activation_picks_the_mlps_gelu():
    """"gelu_tanh" (the default, GPT-2's) and "gelu" (exact) run their own GELU in every block's MLP."""
    torch.manual_seed(0)
    tanh = GPT(GPTConfig(**PRESETS["tiny"], vocab_size=50)).eval()
    assert tanh.config.activation == "gelu_tanh"
    exact = GPT(GPTConfig(**PRESETS["tiny"], vocab_size=50, activation="gelu")).eval()
    exact.load_state_dict(tanh.state_dict())
    mlp = tanh.transformer.h[0].mlp
    x = torch.randn(3, 64)
    with torch.no_grad():
        h = mlp.c_fc(x)
        assert torch.equal(mlp(x), mlp.c_proj(F.gelu(h, approximate="tanh")))
        assert torch.equal(exact.transformer.h[0].mlp(x), mlp.c_proj(F.gelu(h)))
        idx = torch.randint(0, 50, (2, 16))
        assert not torch.allclose(tanh(idx)[0], exact(idx)[0], atol=1e-6)


def test_presets_and_overrides():
    c = GPTConfig.from_preset("tiny", vocab_size=65, dropout=0.1)
    assert (c.n_layer, c.vocab_size, c.dropout, c.padded_vocab_size) == (2, 65, 0.1, 128)
    assert GPTConfig.from_preset("gpt2", pad_vocab_multiple=1).padded_vocab_size == 50257
    assert GPTConfig.from_preset("gpt2").padded_vocab_size == 50304
    with pytest.raises(GptforgeError, match="gpt2-medium") as e:
        GPTConfig.from_preset("gpt3")
    assert all(name in str(e.value) for name in PRESETS)
    with pytest.raises(GptforgeError, match="n_layers"):
        GPTConfig.from_preset("tiny", n_layers=3)
    assert isinstance(GPT.from_preset("tiny", vocab_size=65), GPT)


def _meta_model(name: str, **overrides) -> GPT:
    with torch.device("meta"):  # shapes only: counting gpt2-xl allocates nothing
        return GPT.from_preset(name, **overrides)


def test_parameter_counts():
    gpt2 = _meta_model("gpt2", vocab_size=50257, pad_vocab_multiple=1)
    assert gpt2.num_params() == 124_439_808
    assert gpt2.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768 == 85_056_000
    # Untied: the head is a second vocab x n_embd matrix, still not counted as non-embedding.
    untied = _meta_model("gpt2", vocab_size=50257, pad_vocab_multiple=1, tie_embeddings=False)
    assert untied.num_params() == 124_439_808 + 50257 * 768
    assert untied.num_params(non_embedding=True) == 85_056_000
    # The README's table: non-embedding parameters of every preset (GPT-2's vocabulary, no padding).
    expected = {
        "tiny": 100_096,
        "mini": 793_344,
        "small": 10_647_552,
        "base": 29_542_400,
        "gpt2": 85_056_000,
        "gpt2-medium": 302_311_424,
        "gpt2-large": 708_390_400,
        "gpt2-xl": 1_475_561_600,
    }
    # Totals with tied weights are the published GPT-2 sizes.
    assert _meta_model("gpt2-medium", pad_vocab_multiple=1).num_params() == 354_823_168
    assert _meta_model("gpt2-xl", pad_vocab_multiple=1).num_params() == 1_557_611_200
    assert {n: _meta_model(n).num_params(non_embedding=True) for n in PRESETS} == expected


def test_flops_per_token_counts_every_matmul():
    m = _meta_model("small", vocab_size=50257)  # the benchmark model in ../shared/NOTES.md
    L, C, V, T = 6, 384, 50304, 256
    assert m.flops_per_token() == 6 * (L * 12 * C * C + C * V) + 12 * L * C * T == 186_679_296


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT.from_preset("mini", vocab_size=65)
    std_proj = m.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.001
    assert abs(std_proj - 0.02 / (2 * 4) ** 0.5) < 0.0005
    assert m.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


# ------------------------------------------------------------------------------------ behaviour


def _tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT.from_preset("tiny", **{"vocab_size": 100, **overrides}).eval()


def test_causality():
    m = _tiny()
    idx = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        base, _ = m(idx)
        for t in (0, 17, 39):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 100
            logits, _ = m(changed)
            assert (logits[:, :t] - base[:, :t]).abs().max().item() <= 1e-6 if t else True
            assert (logits[:, t] - base[:, t]).abs().max().item() > 1e-4  # the change is visible at t


def test_kv_cache_matches_full_forward():
    m = _tiny()
    idx = torch.randint(0, 100, (3, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = m(idx)
        cache = m.new_kv_cache(3)
        parts = [m(idx[:, :10], kv_cache=cache)[0]]  # prefill into an empty cache
        parts.append(m(idx[:, 10:17], kv_cache=cache)[0])  # a multi-token chunk after cached keys
        for t in range(17, 64):  # then one token at a time
            parts.append(m(idx[:, t : t + 1], kv_cache=cache)[0])
        assert cache.pos == 64
        assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5
        with pytest.raises(GptforgeError, match="block_size"):
            m(idx[:, :1], kv_cache=cache)
        cache.reset()
        again, _ = m(idx[:, :30], kv_cache=cache)
        assert (again - full[:, :30]).abs().max().item() <= 1e-5
        small = m.new_kv_cache(3, max_len=8)
        with pytest.raises(GptforgeError, match="max_len"):
            m(idx[:, :9], kv_cache=small)


def test_last_only_is_the_last_position_of_the_full_logits():
    m = _tiny()
    idx = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = m(idx)
        last, _ = m(idx, last_only=True)
        cache = m.new_kv_cache(2)
        cached, _ = m(idx, kv_cache=cache, last_only=True)
    assert last.shape == cached.shape == (2, 1, 100)
    assert (last - full[:, -1:]).abs().max().item() <= 1e-6
    assert (cached - full[:, -1:]).abs().max().item() <= 1e-5
    assert cache.pos == 33


def test_kv_cache_greedy_tokens_identical(greedy):
    m = _tiny()
    prompt = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert greedy.cached(m, prompt, 40) == greedy.full(lambda ids: m(ids)[0], prompt, 40)


def test_too_long_input_is_refused():
    m = _tiny()
    with pytest.raises(GptforgeError, match="block_size"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_dropout_only_in_training():
    m = _tiny(dropout=0.2)
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(idx)[0], m(idx)[0])
        m.train()
        assert not torch.equal(m(idx)[0], m(idx)[0])


@pytest.mark.parametrize("chunk", [0, 7])
def test_padded_ids_get_no_probability(chunk):
    m = _tiny()  # vocab 100, padded to 128
    assert m.transformer.wte.weight.shape[0] == 128
    with torch.no_grad():
        m.transformer.wte.weight[100:] = 5.0  # would dominate the softmax if it were not excluded
    m.loss_chunk_size = chunk
    idx = torch.randint(0, 100, (2, 12))
    logits, _ = m(idx)
    assert logits.shape == (2, 12, 100)
    _, loss = m(idx, idx)
    ref = F.cross_entropy(logits.reshape(-1, 100), idx.reshape(-1))
    assert abs(loss.item() - ref.item()) <= 1e-5
    loss.backward()
    assert m.transformer.wte.weight.grad[100:].abs().max().item() == 0.0


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_plain_loss_and_gradients(tie):
    m = _tiny(tie_embeddings=tie).train()
    idx = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(6))
    targets[0, :4] = -1  # ignored positions
    results = {}
    for chunk in (0, 7, 64):  # plain; chunks that do not divide 60 rows; one chunk
        m.zero_grad()
        m.loss_chunk_size = chunk
        logits, loss = m(idx, targets)
        assert logits is None  # the same kind of result whichever path computed the loss
        loss.backward()
        results[chunk] = (loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()})
    for chunk in (7, 64):
        assert abs(results[chunk][0] - results[0][0]) <= 1e-5
        for name, g in results[0][1].items():
            assert (results[chunk][1][name] - g).abs().max().item() <= 1e-6, name


def test_chunked_cross_entropy_function_and_bf16():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 33, (50,), generator=g)
    t[3] = -1
    loss = chunked_cross_entropy(x, w, t, vocab_size=33, chunk=9)
    gx, gw = torch.autograd.grad(2.0 * loss, (x, w))  # a scaled upstream gradient
    ref = F.cross_entropy((x @ w.t())[:, :33], t, ignore_index=-1)
    rx, rw = torch.autograd.grad(2.0 * ref, (x, w))
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert (gx - rx).abs().max().item() <= 1e-5 and (gw - rw).abs().max().item() <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = chunked_cross_entropy(x, w, t, vocab_size=33, chunk=9)
        rb = F.cross_entropy((x @ w.t())[:, :33].float(), t, ignore_index=-1)
    assert lb.dtype == torch.float32
    assert lb.item() == pytest.approx(rb.item(), rel=2e-3)  # bf16 precision, as in the test below
    with torch.no_grad():  # evaluation: no gradients computed, same value
        assert abs(chunked_cross_entropy(x, w, t, 33, 9).item() - ref.item()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_buffer_is_reused_and_changes_nothing(dtype):
    """The CPU loss makes its logits chunks in a kept buffer: the same loss and gradients, bit for bit,
    as fresh tensors give, and the same memory from one call to the next (grown when a call needs more)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 33, (50,), generator=g)
    t[5] = -1
    buf = LogitsBuffer()

    def run(buffer, rows=50):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = chunked_cross_entropy(x[:rows], w, t[:rows], 33, chunk=16, logits_buffer=buffer)
        return (loss, *torch.autograd.grad(loss, (x, w)))

    plain = run(None)
    for _ in range(2):  # twice: the second call finds the buffer full of the first one's probabilities
        kept = run(buf)
        assert all(torch.equal(a, b) for a, b in zip(kept, plain, strict=True))
    assert buf.buffer.dtype == dtype and buf.buffer.numel() == 16 * 40  # one chunk of padded logits
    first = buf.buffer.data_ptr()
    run(buf, rows=10)  # a smaller chunk: the same memory
    assert buf.buffer.data_ptr() == first
    assert buf.get(17, 40, dtype).shape == (17, 40) and buf.buffer.numel() == 17 * 40  # grown
    assert buf.get(2, 3, torch.float64).dtype == torch.float64  # another dtype: a new buffer
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        chunked_cross_entropy(x.detach(), w.detach(), t, 33, chunk=16, logits_buffer=buf)
    assert buf.buffer.is_inference() and buf.buffer.dtype == dtype
    assert torch.equal(run(buf)[0], plain[0])  # outside inference mode again: a buffer it may write


def test_model_training_loss_on_cpu_uses_its_logits_buffer():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():  # evaluation (float32, twice a bf16 step's size) keeps no buffer
        m(idx, idx)
    torch.compile(m, backend="eager", fullgraph=True)(idx, idx)  # nor does a traced loss
    assert m.logits_buffer.buffer is None
    _, loss = m(idx, idx)
    assert m.logits_buffer.buffer is not None and m.logits_buffer.buffer.numel() == 16 * m.config.padded_vocab_size
    m.loss_chunk_size = 0  # the plain path gives the same loss
    assert m(idx, idx)[1].item() == pytest.approx(loss.item(), abs=1e-6)


def test_chunked_loss_makes_no_gradients_under_no_grad():
    """Evaluation (torch.no_grad) pays only for the logits: one matmul per chunk, not the three that
    training needs, although the weight requires grad. Counted with torch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    n, c, v = 64, 16, 128
    x = torch.randn(n, c, requires_grad=True)
    w = torch.randn(v, c, requires_grad=True)
    t = torch.randint(0, v, (n,))

    def flops(grad: bool) -> tuple[int, float]:
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            loss = chunked_cross_entropy(x, w, t, vocab_size=v, chunk=16)
        return counter.get_total_flops(), loss.item()

    eval_flops, eval_loss = flops(False)
    train_flops, train_loss = flops(True)
    assert eval_flops == 2 * n * c * v  # the logits only
    assert train_flops >= 2 * eval_flops  # and grad_x (grad_w's in-place addmm_ is not counted)
    assert eval_loss == train_loss


@pytest.mark.parametrize("vocab", [100, 20_000])  # one slice of grad_weight's vocabulary, and three
@pytest.mark.parametrize("scale", [1.0, 60.0])  # ordinary logits, and logits so large that most probabilities underflow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # float16: GPUs without bf16, with a GradScaler
def test_16bit_chunked_loss_matches_autocast_cross_entropy(scale, vocab, dtype):
    """The 16-bit path (softmax in the 16-bit kernel, log-sum-exp from the max probability) gives the
    loss and gradients of F.cross_entropy over the same 16-bit logits, to bf16 precision, and stays
    finite where target probabilities underflow."""
    g = torch.Generator().manual_seed(3)
    x = (scale * torch.randn(300, 32, generator=g)).requires_grad_()
    w = torch.randn(vocab + 30, 32, generator=g).div_(32**0.5).requires_grad_()
    t = torch.randint(0, vocab, (300,), generator=g)
    t[:7] = -1
    with torch.autocast("cpu", dtype=dtype):
        loss = chunked_cross_entropy(x, w, t, vocab_size=vocab, chunk=64)
        logits = (x @ w.t())[:, :vocab]  # 16-bit, as autocast makes them
    assert logits.dtype == dtype
    ref = F.cross_entropy(logits.float(), t, ignore_index=-1)
    gx, gw = torch.autograd.grad(loss, (x, w))
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=2e-3, abs=2e-3)
    for ours, theirs in ((gx, rx), (gw, rw)):
        assert (ours - theirs).abs().max().item() <= 2e-2 * theirs.abs().max().item()


def test_bf16_gradient_of_a_confident_target_keeps_its_digits():
    """With p_t near 1 (a well-trained model) the target's gradient p_t - 1 is small: computed from a bf16
    p_t it would be 0 or off by up to 100%; the 16-bit path takes it from the other probabilities."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 16, generator=g)
    w = torch.randn(40, 16, generator=g)
    t = torch.randint(0, 40, (64,), generator=g)
    x[0] = 0
    x[0, 0] = 10.0
    w[:, 0] = 0
    w[t[0], 0] = 1.2  # row 0: logit 12 for its target, 0 for the 39 others: p_t ~ 0.9998
    x, w = x.requires_grad_(), w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(x, w, t, vocab_size=40, chunk=64)
        logits = x @ w.t()
    (gx,) = torch.autograd.grad(loss, (x,))
    ref = F.cross_entropy(logits.float(), t)
    (rx,) = torch.autograd.grad(ref, (x,))
    assert gx[0].abs().max() > 0  # not rounded away
    assert torch.allclose(gx[0], rx[0], rtol=0.05, atol=1e-7)


def test_the_readme_states_the_loss_chunk_size_the_model_uses():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    said = re.findall(r"run in chunks of ([\d,]+) rows", readme)
    assert len(said) == 1, "README.md must say once how many rows the LM-head loss takes at a time"
    assert int(said[0].replace(",", "")) == GPT(GPTConfig.from_preset("tiny", vocab_size=65)).loss_chunk_size


# The tests below were added for mutants that survived `make mutate` (docs/testing.md).


def test_kv_cache_buffers_follow_the_model_or_what_is_asked():
    m = _tiny()
    c = m.new_kv_cache(3, max_len=5)
    assert c.k.shape == c.v.shape == (2, 3, 2, 5, 32) and c.max_len == 5 and c.pos == 0 and c.batch_size == 3
    assert c.k.dtype == c.v.dtype == torch.float32 and c.k.device.type == "cpu"
    c16 = m.new_kv_cache(1, dtype=torch.bfloat16, device="meta")  # asked for: another dtype and device
    assert c16.k.dtype == c16.v.dtype == torch.bfloat16 and c16.k.device.type == c16.v.device.type == "meta"
    assert m.to(torch.bfloat16).new_kv_cache(1).v.dtype == torch.bfloat16  # by default: the model's own
    with torch.device("meta"):
        shapes_only = GPT.from_preset("tiny", vocab_size=100)
    assert shapes_only.new_kv_cache(1).k.device.type == "meta"


def test_kv_cache_lengths_from_one_to_block_size():
    m = _tiny()
    idx = torch.randint(0, 100, (1, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = m.new_kv_cache(1, max_len=1)  # the smallest cache holds a single position
        assert torch.allclose(m(idx[:, :1], kv_cache=one)[0], m(idx[:, :1])[0], atol=1e-6)
        assert m.new_kv_cache(1).max_len == m.new_kv_cache(1, max_len=64).max_len == 64
    for bad in (0, 65):
        with pytest.raises(GptforgeError, match=rf"^KV cache max_len={bad} must be in \[1, block_size=64\]$"):
            m.new_kv_cache(1, max_len=bad)


def test_chunked_loss_gradient_for_x_alone_or_the_weight_alone():
    """The hidden states need a gradient when the head is frozen, and the reverse (fine-tuning the head
    alone): each input gets its own, as F.cross_entropy gives."""
    g = torch.Generator().manual_seed(8)
    x0, w0 = torch.randn(30, 16, generator=g), torch.randn(40, 16, generator=g)
    t = torch.randint(0, 33, (30,), generator=g)
    for grad_x in (True, False):
        x, w = x0.clone().requires_grad_(grad_x), w0.clone().requires_grad_(not grad_x)
        (ours,) = torch.autograd.grad(chunked_cross_entropy(x, w, t, 33, chunk=7), x if grad_x else w)
        (ref,) = torch.autograd.grad(F.cross_entropy((x @ w.t())[:, :33], t), x if grad_x else w)
        assert (ours - ref).abs().max().item() <= 1e-5


def test_too_long_inputs_are_refused_with_the_numbers():
    m = _tiny()
    with pytest.raises(GptforgeError, match=r"^sequence of 65 positions is longer than the model's block_size 64; "
                                            r"crop the input to the last 64 tokens$"):
        m(torch.zeros(1, 65, dtype=torch.long))
    cache = m.new_kv_cache(1, max_len=8)
    with torch.no_grad():
        m(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
        with pytest.raises(GptforgeError, match=r"^KV cache holds 8 positions, 9 needed; make a larger cache "
                                                r"with model.new_kv_cache\(max_len=...\)$"):
            m(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
        full = m.new_kv_cache(1)
        m(torch.zeros(1, 60, dtype=torch.long), kv_cache=full)
        with pytest.raises(GptforgeError, match=r"^sequence of 66 positions"):  # 60 cached + 6 new
            m(torch.zeros(1, 6, dtype=torch.long), kv_cache=full)


def test_the_first_block_sees_token_plus_position_embeddings():
    """GPT-2's input: wte[token] + wpe[position], from position 0 (or the cache's position) on. The other
    tests compare the model with itself (cached and not), which a sign error here would pass."""
    m = _tiny()
    seen = []
    m.transformer.h[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    idx = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    wte, wpe = m.transformer.wte.weight.detach(), m.transformer.wpe.weight.detach()
    with torch.no_grad():
        m(idx)
        cache = m.new_kv_cache(2)
        m(idx[:, :4], kv_cache=cache)
        m(idx[:, 4:], kv_cache=cache)
    assert torch.equal(seen[0], wte[idx] + wpe[:9])
    assert torch.equal(seen[1], wte[idx[:, :4]] + wpe[:4]) and torch.equal(seen[2], wte[idx[:, 4:]] + wpe[4:9])


def test_cached_chunks_of_every_length_after_a_one_token_prefill():
    """Queries after cached keys see exactly keys 0..their own position: after a prefill of one token,
    for chunks of one, two and more tokens (mutation survivors: `start > 1`, `T > 2`)."""
    m = _tiny()
    idx = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full, _ = m(idx)
        cache, parts, at = m.new_kv_cache(2), [], 0
        for n in (1, 1, 2, 1, 3, 4):
            parts.append(m(idx[:, at : at + n], kv_cache=cache)[0])
            at += n
    assert at == cache.pos == 12
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_a_kv_cache_of_another_dtype_than_the_queries():
    """The cache's keys and values are read back in the queries' dtype: a float32 cache under bf16
    autocast (as the comment in CausalSelfAttention says), and a float32 cache asked for a bf16 model, whose
    logits are then exactly those of the model's own bf16 cache (bf16 values survive a float32 store)."""
    m = _tiny()
    idx = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full, _ = m(idx)
            cache = m.new_kv_cache(2)
            parts = [m(idx[:, :8], kv_cache=cache)[0]] + [m(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(8, 20)]
        assert cache.k.dtype == torch.float32
        assert (torch.cat(parts, dim=1).float() - full.float()).abs().max().item() <= 2e-2 * full.abs().max().item()
        m16 = m.to(torch.bfloat16)
        logits = {}
        for dtype in (torch.bfloat16, torch.float32):
            cache = m16.new_kv_cache(2, dtype=dtype)
            parts = [m16(idx[:, :8], kv_cache=cache)[0]] + [m16(idx[:, t : t + 1], kv_cache=cache)[0]
                                                           for t in range(8, 20)]
            logits[dtype] = torch.cat(parts, dim=1)
    assert logits[torch.float32].dtype == torch.bfloat16
    assert torch.equal(logits[torch.float32], logits[torch.bfloat16])


def test_attention_dropout_falls_on_the_attention_weights_in_training():
    """`dropout` drops attention weights as well as the residual outputs (GPT-2's attn_pdrop): with the
    residual dropout held off, a training forward still differs from evaluation, and repeats with the seed."""
    torch.manual_seed(0)
    attn = GPT.from_preset("tiny", vocab_size=100, dropout=0.5).transformer.h[0].attn
    x = torch.randn(2, 16, attn.n_embd, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        plain = attn.eval()(x)
        attn.train()
        attn.resid_dropout.eval()  # only the attention weights' dropout left
        torch.manual_seed(1)
        dropped = attn(x)
        torch.manual_seed(1)
        assert torch.equal(attn(x), dropped)
    assert (dropped - plain).abs().max().item() > 1e-3


@pytest.mark.parametrize("attn_dropout, attention_dropped", [(None, True), (0.0, False), (0.5, True)])
def test_attn_dropout_sets_the_attention_weights_rate_apart_from_dropout(attn_dropout, attention_dropped):
    """attn_dropout=None drops the attention weights at `dropout`'s rate (GPT-2's); 0 drops none of them
    while the residual dropout stays on; a rate of its own applies with `dropout` itself 0."""
    dropout = 0.0 if attn_dropout == 0.5 else 0.5
    config = GPTConfig.from_preset("tiny", vocab_size=100, dropout=dropout, attn_dropout=attn_dropout)
    assert config.attn_dropout_p == (dropout if attn_dropout is None else attn_dropout)
    torch.manual_seed(0)
    attn = GPT(config).transformer.h[0].attn
    assert attn.resid_dropout.p == dropout
    x = torch.randn(2, 16, attn.n_embd, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        plain = attn.eval()(x)
        attn.train()
        attn.resid_dropout.eval()  # only the attention weights' dropout left
        trained = attn(x)
    assert ((trained - plain).abs().max().item() > 1e-3) == attention_dropped


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_drops_its_rate_at_every_position_and_keeps_the_expectation(p):
    """The CPU mask takes three 16-bit lanes of each 64-bit draw: every lane (position mod 3) and every
    position mod 4 (a fourth lane would never drop) loses p of its elements, the kept ones are scaled so
    the mean stays 1, and the gradient is the same mask and scale."""
    torch.manual_seed(0)
    n = 600_001  # not a multiple of 3: the last draw's spare lanes are cut off
    x = torch.ones(n, requires_grad=True)
    y = Dropout(p).train()(x)
    rate = round(p * 65536) / 65536
    kept = y != 0
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.all(y[kept] == 65536 / (65536 - round(p * 65536)))
    for lanes in (3, 4):
        for lane in range(lanes):
            dropped = 1 - kept[lane::lanes].double().mean().item()
            sigma = math.sqrt(rate * (1 - rate) / (n / lanes))
            assert abs(dropped - rate) < 5 * sigma, (lanes, lane, dropped)
    assert abs(y.double().mean().item() - 1) < 5 * math.sqrt(rate / (1 - rate) / n)
    neighbours = torch.corrcoef(torch.stack([kept[:-1].double(), kept[1:].double()]))[0, 1].item()
    assert abs(neighbours) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def test_cpu_dropout_follows_torchs_seed_and_is_off_in_eval_and_at_zero():
    x = torch.randn(4, 33, 7, dtype=torch.bfloat16)
    d = Dropout(0.2).train()
    torch.manual_seed(5)
    a = d(x)
    torch.manual_seed(5)
    assert torch.equal(d(x), a) and a.dtype == torch.bfloat16
    assert not torch.equal(d(x), a)  # the generator moved on
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_the_model_drops_through_its_own_dropout_everywhere_but_inside_attention():
    model = GPT.from_preset("tiny", vocab_size=100, dropout=0.1)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2 * model.config.n_layer + 1 and all(type(m) is Dropout for m in drops)


@pytest.mark.parametrize("make", [lambda: torch.ones(5, 7, 11).transpose(0, 2),  # not contiguous, 385 = 3k + 1
                                  lambda: torch.ones(0, 3), lambda: torch.ones(2, 2)])
def test_cpu_dropout_of_any_shape_and_layout(make):
    x = make()
    y = Dropout(0.5).train()(x)
    assert y.shape == x.shape and set(y.unique().tolist()) <= {0.0, 2.0}
    if x.numel() > 100:
        assert 0.3 < (y == 0).double().mean().item() < 0.7


def test_cpu_dropout_rates_that_round_to_none_or_all_use_torchs_dropout():
    x = torch.ones(1000)
    torch.manual_seed(0)
    ours = Dropout(2 ** -18).train()(x)  # 0 of 65,536 after rounding: torch's dropout at p itself
    state = torch.get_rng_state()
    torch.manual_seed(0)
    assert torch.equal(ours, F.dropout(x, 2 ** -18, training=True)) and torch.equal(torch.get_rng_state(), state)
    y = Dropout(1 - 2 ** -18).train()(x)  # 65,536 of 65,536 after rounding: no division by zero
    assert (y == 0).sum() > 990


def test_cpu_dropout_compiles_into_one_graph():
    """Under torch.compile the mask is torch's own dropout (its random_ would break the graph)."""
    compiled = torch.compile(Dropout(0.5).train(), backend="eager", fullgraph=True)
    y = compiled(torch.ones(4000))
    assert set(y.unique().tolist()) == {0.0, 2.0} and 0.4 < (y == 0).double().mean().item() < 0.6


def test_attention_in_evaluation_is_causal_softmax_attention_written_out():
    """Evaluation computes exactly softmax(q k^T / sqrt(hs)) v under a causal mask, head by head, with no
    dropout however large the configured one (mutmut survivor: dropout_p 1.0 in eval mode; the cache and
    chunked-loss tests compare the model with itself)."""
    torch.manual_seed(0)
    attn = GPT.from_preset("tiny", vocab_size=100, dropout=0.5).transformer.h[0].attn.eval()
    B, T, C, H = 2, 7, attn.n_embd, attn.n_head
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        torch.testing.assert_close(attn(x), attn.c_proj(y), atol=1e-5, rtol=1e-5)


def test_chunked_loss_with_one_valid_target_or_none():
    """The mean is over the valid targets: with one, its gradient is that target's whole gradient; with
    none, the loss is nan (as F.cross_entropy's) and the gradients are zero, not nan."""
    g = torch.Generator().manual_seed(12)
    x0, w0 = torch.randn(10, 16, generator=g), torch.randn(40, 16, generator=g)
    t = torch.full((10,), -1)
    t[4] = 17
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = chunked_cross_entropy(x, w, t, 33, chunk=3)
    gx, gw = torch.autograd.grad(loss, (x, w))
    ref = F.cross_entropy((x @ w.t())[:, :33], t, ignore_index=-1)
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert (gx - rx).abs().max().item() <= 1e-5 and (gw - rw).abs().max().item() <= 1e-5
    none = chunked_cross_entropy(x, w, torch.full((10,), -1), 33, chunk=3)
    gx, gw = torch.autograd.grad(none, (x, w))
    assert none.isnan().item() and F.cross_entropy(x @ w.t(), torch.full((10,), -1), ignore_index=-1).isnan().item()
    assert gx.abs().max().item() == gw.abs().max().item() == 0.0


def test_bf16_weight_gradient_across_the_vocabulary_slices():
    """grad_weight's bf16 products are summed a slice of 8,192 vocabulary rows at a time: the rows on
    either side of each boundary (targets there) get their gradient, none is skipped or counted twice."""
    g = torch.Generator().manual_seed(13)
    vocab = 2 * 8192 + 10
    x = torch.randn(64, 16, generator=g).requires_grad_()
    w = torch.randn(vocab + 6, 16, generator=g).div_(4).requires_grad_()
    edges = torch.tensor([0, 8191, 8192, 8193, 16383, 16384, 16385, vocab - 1])
    t = edges.repeat(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(x, w, t, vocab_size=vocab, chunk=32)
        logits = (x @ w.t())[:, :vocab]
    ref = F.cross_entropy(logits.float(), t)
    (gw,) = torch.autograd.grad(loss, (w,))
    (rw,) = torch.autograd.grad(ref, (w,))
    for row in edges.tolist():
        assert (gw[row] - rw[row]).abs().max().item() <= 2e-2 * rw[row].abs().max().item(), row
    assert (gw - rw).abs().max().item() <= 2e-2 * rw.abs().max().item()


def test_bf16_loss_of_each_row_keeps_float32_digits():
    """Under bf16 on a CPU each row's loss is -log p_t, in float32 from the bf16 probability: within a
    few thousandths of F.cross_entropy over the same bf16 logits, where a bf16 log-softmax rounds a loss
    near 10 to steps of 1/16."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(32, 16, generator=g)
    w = 0.75 * torch.randn(1000, 16, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    ours, theirs = [], []
    for i in range(32):  # one row at a time: its own loss, from the same bf16 logits on both sides
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours.append(chunked_cross_entropy(x[i : i + 1], w, t[i : i + 1], vocab_size=1000).item())
            logits = x[i : i + 1] @ w.t()
        theirs.append(F.cross_entropy(logits.float(), t[i : i + 1]).item())
    assert 6 < sum(theirs) / 32 < 20  # losses where bf16 steps are 1/32 to 1/8
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= 6e-3  # log of a bf16 p: <= 2**-8


def test_bf16_rows_whose_target_probability_underflows_get_their_exact_loss():
    """A bf16 p_t underflows to 0 for a loss over ~87 nats (-log p_t would be inf): those rows' loss is
    recomputed from their logits, the others' is -log p_t, each row within bf16 precision of
    F.cross_entropy over the same bf16 logits; the gradients stay those of the reference."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(16, 8, generator=g)
    w = torch.randn(300, 8, generator=g)
    t = torch.randint(0, 290, (16,), generator=g)
    x[::2] *= 40  # logits of hundreds: even rows' targets get losses far over 87 nats, odd rows' are ordinary
    x, w = x.requires_grad_(), w.requires_grad_()
    ours, theirs = [], []
    for i in range(16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours.append(chunked_cross_entropy(x[i : i + 1], w, t[i : i + 1], vocab_size=290).item())
            logits = (x[i : i + 1] @ w.t())[:, :290]
        theirs.append(F.cross_entropy(logits.float(), t[i : i + 1]).item())
    assert sum(loss > 100 for loss in theirs[::2]) >= 4  # the fallback's rows are there
    for a, b in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, rel=1e-2, abs=6e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(x, w, t, vocab_size=290, chunk=5)
        ref = F.cross_entropy((x @ w.t())[:, :290].float(), t)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    gx, gw = torch.autograd.grad(loss, (x, w))
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert (gx - rx).abs().max() <= 2e-2 * rx.abs().max() and (gw - rw).abs().max() <= 2e-2 * rw.abs().max()


def test_chunked_loss_backward_hands_over_its_weight_gradient_without_a_copy():
    """The weight gradient, made in the forward, is scaled in place by the backward (a copy of it was the
    bf16 step's peak memory), so the backward allocates far less than one gradient; a second backward
    through the same graph (retain_graph) would scale it twice, and is refused with a clear error."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(16)
    x = torch.randn(64, 32, generator=g).requires_grad_()
    w = torch.randn(20_000, 32, generator=g).requires_grad_()
    t = torch.randint(0, 20_000, (64,), generator=g)
    ref = F.cross_entropy(x @ w.t(), t)
    (rw,) = torch.autograd.grad(ref, (w,))
    loss = chunked_cross_entropy(x, w, t, vocab_size=20_000)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        (gw,) = torch.autograd.grad(loss, (w,), retain_graph=True)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    gradient_bytes = w.numel() * 4  # float32
    assert allocated < gradient_bytes / 4  # a scaled copy would be all of it
    assert torch.allclose(gw, rw, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="once"):
        torch.autograd.grad(loss, (w,))


def _graph_names(t: torch.Tensor) -> set[str]:
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("shape", [(2, 3, 64, 16), (1, 2, 33, 8)])
def test_bf16_cpu_attention_is_sdpa_forward_with_a_float32_backward(shape):
    """causal_attention on bf16 CPU tensors that need gradients: the output is SDPA's, bit for bit (the
    same bf16 flash kernel), and the gradients, from the float32 backward kernel, are at least as close
    to a float64 reference as SDPA's bf16 backward gives."""
    g = torch.Generator().manual_seed(17)
    base = [torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(3)]
    grad = torch.randn(*shape, generator=g).to(torch.bfloat16)
    ref = [b.double().requires_grad_() for b in base]
    F.scaled_dot_product_attention(*ref, is_causal=True).backward(grad.double())
    errors = {}
    for name, fn in (("ours", causal_attention), ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))):
        qkv = [b.clone().requires_grad_() for b in base]
        out = fn(*qkv)
        out.backward(grad)
        errors[name] = [((t.grad.double() - r.grad).norm() / r.grad.norm()).item() for t, r in zip(qkv, ref, strict=True)]
        assert all(t.grad.dtype == torch.bfloat16 for t in qkv)
        if name == "ours":
            assert "_CPUBf16CausalAttentionBackward" in _graph_names(out)
            ours_out = out.detach()
        else:
            assert torch.equal(ours_out, out.detach())
    for ours, sdpa in zip(errors["ours"], errors["sdpa"], strict=True):
        assert ours <= 1.2 * sdpa + 1e-4 and ours < 1e-2


def test_model_uses_the_float32_attention_backward_only_for_bf16_training_on_a_cpu():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50, dropout=0.0))
    idx = torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(idx, idx)
    assert "_CPUBf16CausalAttentionBackward" in _graph_names(loss)
    _, loss = m(idx, idx)  # float32: SDPA
    assert "_CPUBf16CausalAttentionBackward" not in _graph_names(loss)
    m_drop = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50, dropout=0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m_drop(idx, idx)  # attention dropout: SDPA's own
    assert "_CPUBf16CausalAttentionBackward" not in _graph_names(loss)


def test_a_bf16_cpu_training_loss_compiles_as_one_graph():
    """The bf16 CPU loss's underflow rows are data-dependent; a traced loss takes the other form, so
    torch.compile (train.compile) still sees one graph, forward and backward."""
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    idx = torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = torch.compile(m, backend="eager", fullgraph=True)(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and m.transformer.wte.weight.grad is not None
