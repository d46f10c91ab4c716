"""gptforge.model: GPT-2 parity with Hugging Face, causality, KV cache, padding, chunked loss, loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from gptforge.errors import GptforgeError
from gptforge.model import GPT, PRESETS, GPTConfig, chunked_cross_entropy

transformers = pytest.importorskip("transformers")

# (n_layer, n_head, n_embd, block_size, vocab_size, tie): n_head 3 and 5 are not powers of two,
# nor are block sizes 37 and 24.
HF_SHAPES = [
    (2, 3, 48, 37, 101, True),
    (1, 4, 32, 64, 64, True),
    (3, 5, 40, 24, 257, False),
]


def _hf_model(n_layer, n_head, n_embd, block_size, vocab_size, tie, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=block_size,
        vocab_size=vocab_size,
        tie_word_embeddings=tie,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # HF's init leaves biases and LayerNorms at 0/1; randomise them so they are really compared.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _greedy(step_logits, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation; step_logits(ids) -> (1, T, V) logits of the whole sequence."""
    ids = prompt.clone()
    for _ in range(n):
        nxt = step_logits(ids)[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, prompt.size(1) :].tolist()


def _greedy_cached(model: GPT, prompt: torch.Tensor, n: int) -> list[int]:
    cache = model.new_kv_cache(1)
    logits, _ = model(prompt, kv_cache=cache)
    out = []
    for _ in range(n):
        nxt = logits[0, -1].argmax().view(1, 1)
        out.append(nxt.item())
        logits, _ = model(nxt, kv_cache=cache)
    return out


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
        (dict(bias="yes"), "bias"),
        (dict(tie_embeddings=1), "tie_embeddings"),
        (dict(pad_vocab_multiple=0), "pad_vocab_multiple"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(GptforgeError, match=field):
        GPTConfig(**{**PRESETS["tiny"], **kwargs})


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


# ------------------------------------------------------------------------------------ HF parity


@pytest.mark.parametrize("shape", HF_SHAPES, ids=lambda s: "L{}-H{}-C{}-T{}-V{}-tie{}".format(*s))
def test_hf_parity_both_ways(shape, tmp_path):
    n_layer, n_head, n_embd, block_size, vocab_size, tie = shape
    hf = _hf_model(*shape)
    idx = torch.randint(0, vocab_size, (2, block_size), generator=torch.Generator().manual_seed(1))

    # HF -> ours
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.tie_embeddings is tie and ours.config.block_size == block_size
    with torch.no_grad():
        ours_logits, _ = ours(idx)
        hf_logits = hf(idx).logits
    assert ours_logits.shape == hf_logits.shape == (2, block_size, vocab_size)
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-4
    prompt = idx[:1, :5]
    with torch.no_grad():
        hf_tokens = _greedy(lambda ids: hf(ids).logits, prompt, 15)
        assert _greedy(lambda ids: ours(ids)[0], prompt, 15) == hf_tokens
        assert _greedy_cached(ours, prompt, 15) == hf_tokens

    # ours (freshly initialised, so different weights) -> HF
    torch.manual_seed(2)
    mine = GPT(GPTConfig(n_layer, n_head, n_embd, block_size, vocab_size, tie_embeddings=tie)).eval()
    mine.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "gpt2"
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        diff = (mine(idx)[0] - hf2(idx).logits).abs().max().item()
        assert diff <= 1e-4
        assert _greedy(lambda ids: hf2(ids).logits, prompt, 12) == _greedy_cached(mine, prompt, 12)


def test_export_without_biases_loads_in_hf(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(2, 2, 32, 16, 50, bias=False)).eval()
    assert not any(n.endswith("bias") for n, _ in m.named_parameters())
    m.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        assert (m(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_from_pretrained_reads_pytorch_model_bin_and_overrides(tmp_path):
    hf = _hf_model(*HF_SHAPES[0])
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    m = GPT.from_pretrained(tmp_path, dropout=0.1, block_size=20).eval()
    assert (m.config.dropout, m.config.block_size) == (0.1, 20)
    idx = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (m(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
    with pytest.raises(GptforgeError, match="n_layer"):
        GPT.from_pretrained(tmp_path, n_layer=3)


class _Evil:
    """Unpickling this would create a directory: proof that pickled code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_loading_never_unpickles_code(tmp_path):
    hf = _hf_model(*HF_SHAPES[1])
    hf.config.to_json_file(tmp_path / "config.json")
    marker = tmp_path / "pwned"
    state = dict(hf.state_dict())
    state["transformer.wte.weight"] = _Evil(str(marker))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(GptforgeError, match="weights_only"):
        GPT.from_pretrained(tmp_path)
    assert not marker.exists()


def test_from_pretrained_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(GptforgeError, match="not a directory"):
        GPT.from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GptforgeError, match="JSON"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8})
    )
    with pytest.raises(GptforgeError, match="neither model.safetensors"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(GptforgeError, match="safetensors"):
        GPT.from_pretrained(tmp_path)
    # A Hub name while offline: a one-line GptforgeError, not a traceback from huggingface_hub.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GptforgeError, match="Hugging Face Hub"):
        GPT.from_pretrained("gptforge-test/no-such-model")


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


def test_kv_cache_greedy_tokens_identical():
    m = _tiny()
    prompt = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _greedy_cached(m, prompt, 40) == _greedy(lambda ids: m(ids)[0], prompt, 40)


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
        assert (logits is None) == (chunk > 0)
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
    assert abs(lb.item() - rb.item()) <= 0.05 * rb.item()
    with torch.no_grad():  # evaluation: no gradients computed, same value
        assert abs(chunked_cross_entropy(x, w, t, 33, 9).item() - ref.item()) <= 1e-5


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
