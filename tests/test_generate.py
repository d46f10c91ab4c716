"""Generation: pure sampling functions, the KV-cache engine (tiny random models), gptforge.load and
the `generate` CLI on a tiny trained run."""

from __future__ import annotations

import json

import pytest
import torch

from gptforge.data.tokenizers import CharTokenizer, GPT2Tokenizer
from gptforge.errors import GptforgeError
from gptforge.generate import (
    Generator,
    SamplingSettings,
    _TextStream,
    check_sampling,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from gptforge.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nROMEO:\nBut soft! what light?\n"


def tiny_char_generator(block_size: int = 16, seed: int = 0) -> Generator:
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=tok.vocab_size))
    return Generator(model, tok)


# ----------------------------------------------------------------------------------------- sampling


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    # filters do not change greedy
    assert torch.equal(sample_next(logits, temperature=0.0, top_k=5, top_p=0.5), logits.argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))

    def draws(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([sample_next(logits, 1.0, generator=g) for _ in range(50)]).tolist()

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_never_samples_outside_the_k_largest():
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(2)).expand(4000, 200)
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    ids = sample_next(logits, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == allowed  # all five drawn, nothing else
    # ties at the k-th value must not let extra ids in
    tied = torch.zeros(1, 10)
    assert torch.isfinite(top_k_filter(tied, 3)).sum().item() == 3
    # k = 0 is "off", and k at or past the vocabulary keeps every id (found by `make mutate`)
    for k in (0, 200, 500):
        assert torch.equal(top_k_filter(logits[:2], k), logits[:2])
    top1 = top_k_filter(logits[:2], 1)  # k = 1 keeps the argmax alone
    assert torch.isfinite(top1).sum().item() == 2 and torch.equal(top1.argmax(-1), logits[:2].argmax(-1))


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log().expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {1, 3}  # 0.5 + 0.3 >= 0.7
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=g).tolist()) == {1, 2, 3}
    assert set(sample_next(logits, 1.0, top_p=0.3, generator=g).tolist()) == {1}  # top id always kept
    assert torch.equal(top_p_filter(logits[:1], 1.0), logits[:1])
    # with top-k as well: the nucleus is taken within the top-k
    assert set(sample_next(logits, 1.0, top_k=2, top_p=0.99, generator=g).tolist()) == {1, 3}


def test_top_p_one_is_off_and_a_nucleus_that_fills_exactly_stops_there():
    # p = 1 leaves every id, even ids whose probability rounds to 0 (the mass before them is then 1.0).
    logits = torch.tensor([[0.0, -200.0, -300.0], [-300.0, 0.0, -200.0]])
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # 0.5 + 0.25 is exactly 0.75 in floating point: the nucleus is full, the next id is out.
    exact = torch.tensor([[0.125, 0.5, 0.125, 0.25]]).log()
    kept = torch.isfinite(top_p_filter(exact, 0.75))
    assert kept.tolist() == [[False, True, False, True]]


def test_sample_next_divides_by_the_temperature_and_checks_its_settings():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, temperature=0.05, generator=g).tolist()) == {3}  # nearly greedy
    assert set(sample_next(logits, temperature=100.0, generator=g).tolist()) == {0, 1, 2, 3}  # nearly uniform
    by_default = sample_next(logits, generator=torch.Generator().manual_seed(5))  # temperature 1, no filters
    assert torch.equal(by_default, sample_next(logits, 1.0, None, 1.0, generator=torch.Generator().manual_seed(5)))
    one = sample_next(torch.zeros(1, 7), generator=g)
    assert one.shape == (1,) and 0 <= int(one) < 7  # one id per row, also for a single row
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0)):
        with pytest.raises(GptforgeError):
            sample_next(logits, **bad)


def test_make_rng_is_seeded_or_fresh():
    from gptforge.generate import make_rng

    a, b = make_rng(1234), make_rng(1234, "cpu")  # on the CPU by default
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    assert a.device.type == "cpu" and make_rng(1234).initial_seed() == 1234
    assert make_rng(None).initial_seed() != make_rng(None).initial_seed()  # OS entropy each time


def test_sampling_settings_at_their_limits():
    check_sampling()  # the defaults are valid
    for ok in (dict(temperature=0.0), dict(temperature=1e-6), dict(top_k=0), dict(top_k=1), dict(top_p=1.0),
               dict(top_p=1e-9), dict(max_new_tokens=0), dict(num_samples=1), dict(seed=-(2**63)),
               dict(seed=2**64 - 1), dict(seed=0), dict(seed=None)):
        check_sampling(**ok)
    for bad, message in (
        (dict(temperature=float("inf")), r"^temperature must be a finite number >= 0 \(0 = greedy\), got inf$"),
        (dict(top_k=-1), r"^top-k must be >= 0 \(0 = off\), got -1$"),
        (dict(top_p=0.0), r"^top-p must be in \(0, 1\] \(1 = off\), got 0.0$"),
        (dict(top_p=1.0001), r"^top-p must be in \(0, 1\] \(1 = off\), got 1.0001$"),
        (dict(max_new_tokens=-1), r"^max new tokens must be >= 0, got -1$"),
        (dict(num_samples=0), r"^number of samples must be >= 1, got 0$"),
        (dict(seed=-(2**63) - 1), r"^seed -9223372036854775809 does not fit in 64 bits; choose one in \[-2\*\*63, 2\*\*64\)$"),
        (dict(seed=2**64), r"^seed 18446744073709551616 does not fit in 64 bits"),
    ):
        with pytest.raises(GptforgeError, match=message):
            check_sampling(**bad)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=-1),
     dict(num_samples=0), dict(temperature=float("nan"))],
)
def test_bad_sampling_settings_raise(kwargs):
    with pytest.raises(GptforgeError):
        check_sampling(**kwargs)


# ----------------------------------------------------------------------------------------- engine


def test_kv_cache_gives_the_same_tokens_as_recomputing():
    gen = tiny_char_generator(block_size=16)
    prompt = gen.tokenizer.encode("ROMEO:")
    for s in (SamplingSettings(max_new_tokens=40, temperature=0.0),
              SamplingSettings(max_new_tokens=40, temperature=1.0, seed=3, num_samples=3)):
        cached = gen.generate_ids(prompt, s, use_cache=True)
        plain = gen.generate_ids(prompt, s, use_cache=False)
        assert cached == plain
        assert all(len(row) == 40 for row in cached)


def test_sliding_window_generates_past_the_context():
    gen = tiny_char_generator(block_size=8)
    # greedy and sampled, from a prompt longer than the context, for 5x the context
    long_prompt = gen.tokenizer.encode(TEXT[:20])
    for s in (SamplingSettings(max_new_tokens=40, temperature=0.0),
              SamplingSettings(max_new_tokens=40, seed=1, num_samples=2)):
        cached = gen.generate_ids(long_prompt, s)
        assert cached == gen.generate_ids(long_prompt, s, use_cache=False)
        assert all(len(row) == 40 and all(0 <= t < gen.tokenizer.vocab_size for t in row) for row in cached)
    # right after a slide the next token is the model's greedy choice given the kept window only
    keep = 8 - 8 // 4
    ids = long_prompt + gen.generate_ids(long_prompt, SamplingSettings(max_new_tokens=1, temperature=0.0))[0]
    with torch.no_grad():
        logits, _ = gen.model(torch.tensor([long_prompt[-keep:]]))
    assert ids[-1] == int(logits[0, -1].argmax())


def test_seeded_generation_is_reproducible_and_seed_dependent():
    gen = tiny_char_generator()
    a = gen.generate("ROMEO:", max_new_tokens=30, seed=5, num_samples=2)
    assert a == gen.generate("ROMEO:", max_new_tokens=30, seed=5, num_samples=2)
    assert a != gen.generate("ROMEO:", max_new_tokens=30, seed=6, num_samples=2)
    assert a[0] != a[1]  # the samples of a batch differ


def _ones_model(vocab_size: int, n_embd: int = 16) -> GPT:
    """An untied model whose final hidden state is all ones, so each logit is its LM-head row's sum."""
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=n_embd, block_size=8, vocab_size=vocab_size,
                          tie_embeddings=False))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
    return model


def test_never_emits_padded_ids_or_ids_the_tokenizer_cannot_decode():
    tok = CharTokenizer.from_text(TEXT)
    model = _ones_model(tok.vocab_size + 10)  # the model knows 10 ids the tokenizer does not
    V, Vp, C = tok.vocab_size, model.config.padded_vocab_size, model.config.n_embd
    assert Vp > V + 10
    with torch.no_grad():
        model.lm_head.weight[V : V + 10] = 10.0 / C  # logit 10 for the ids the tokenizer lacks
        model.lm_head.weight[V + 10 :] = 100.0 / C  # logit 100 for the padded ids
    gen = Generator(model, tok)
    rows = gen.generate_ids(tok.encode("RO"), SamplingSettings(max_new_tokens=50, seed=0, num_samples=8))
    drawn = {t for row in rows for t in row}
    assert drawn <= set(range(V))
    assert len(drawn) > V // 2  # uniform over the real ids, not stuck on one


def test_stop_at_eot(data_dir):
    tok = GPT2Tokenizer()
    model = _ones_model(tok.vocab_size, n_embd=8)
    with torch.no_grad():
        model.lm_head.weight[tok.eot_id] = 3.0 / 8  # p(eot) ~ e^3 / (e^3 + 50256): rare but ...
    gen = Generator(model, tok)
    # ... greedy always picks it: with the stop the text is empty, without it is <|endoftext|> repeated
    assert gen.generate("Hi", max_new_tokens=5, temperature=0.0, stop_at_eot=True) == [""]
    assert gen.generate("Hi", max_new_tokens=2, temperature=0.0) == ["<|endoftext|><|endoftext|>"]
    with torch.no_grad():
        model.lm_head.weight[tok.eot_id] = 11.5 / 8  # p(eot) ~ 0.66 per sampled token
    rows = gen.generate_ids(tok.encode("Hi"), SamplingSettings(max_new_tokens=60, seed=0, num_samples=16,
                                                               stop_at_eot=True))
    assert all(tok.eot_id not in row and len(row) < 60 for row in rows)
    assert len({len(row) for row in rows}) > 1  # each sample stops on its own


def test_empty_prompt_starts_from_eot_or_newline(data_dir):
    gen = tiny_char_generator()
    assert gen.encode_prompt("") == gen.tokenizer.encode("\n")
    assert len(gen.generate("", max_new_tokens=5, seed=0)[0]) == 5
    gpt2 = GPT2Tokenizer()
    assert Generator(_ones_model(gpt2.vocab_size, n_embd=8), gpt2).encode_prompt("") == [gpt2.eot_id]


def test_unknown_characters_are_named():
    gen = tiny_char_generator()
    with pytest.raises(GptforgeError, match="☃"):
        gen.generate("ROMEO ☃", max_new_tokens=1)


# ----------------------------------------------------------------------------------------- streaming


def test_text_stream_holds_back_partial_multibyte_characters(data_dir):
    tok = GPT2Tokenizer()
    text = "naïve café 🙂 世界 👨‍👩‍👧"
    ids = tok.encode(text)
    assert len(ids) > len(tok.encode("naïve café")) + 4  # the emoji span several byte tokens
    stream = _TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_streaming_equals_non_streaming(data_dir):
    gen = tiny_char_generator(block_size=8)
    settings = dict(max_new_tokens=30, temperature=0.9, top_k=10, seed=11)
    assert "".join(gen.stream("ROMEO:", **settings)) == gen.generate("ROMEO:", **settings)[0]
    batch = [""] * 3
    for pieces in gen.stream_batch("ROMEO:", num_samples=3, **settings):
        batch = [b + p for b, p in zip(batch, pieces, strict=True)]
    assert batch == gen.generate("ROMEO:", num_samples=3, **settings)
    # a random GPT-2-vocabulary model writes byte tokens that split characters: still equal
    tok = GPT2Tokenizer()
    torch.manual_seed(0)
    gen2 = Generator(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=tok.vocab_size)), tok)
    text = "".join(gen2.stream("é", max_new_tokens=40, seed=3))
    assert text == gen2.generate("é", max_new_tokens=40, seed=3)[0]


# ----------------------------------------------------------------------------------------- load + CLI


def test_load_and_generate_from_a_run(tiny_run):
    import gptforge

    gen = gptforge.load(tiny_run, device="cpu")
    assert gen.info["step"] > 0
    out = gen.generate("ROMEO:", max_new_tokens=20, temperature=0.0)
    assert len(out) == 1 and len(out[0]) == 20  # char-level: one character per token
    best = gptforge.load(tiny_run / "checkpoints" / "best", device="cpu")
    assert best.run_dir == tiny_run


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from gptforge.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate(tiny_run, capsys, tmp_path):
    code, out, _ = _cli(capsys, "generate", str(tiny_run), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                        "--seed", "1", "--num-samples", "2", "--top-k", "20", "--top-p", "0.9")
    assert code == 0
    assert out.count("--- sample") == 2 and out.count("ROMEO:") >= 2
    # --stream prints the same text as the batch did, and --prompt-file reads the prompt
    (tmp_path / "p.txt").write_text("ROMEO:", encoding="utf-8")
    code, streamed, _ = _cli(capsys, "generate", str(tiny_run), "--prompt-file", str(tmp_path / "p.txt"),
                             "--max-new-tokens", "30", "--seed", "1", "--num-samples", "2", "--top-k", "20",
                             "--top-p", "0.9", "--stream")
    assert code == 0 and streamed == out
    code, greedy, _ = _cli(capsys, "generate", str(tiny_run), "--prompt", "ROMEO:", "--temperature", "0",
                           "--max-new-tokens", "10", "--checkpoint", "best")
    import gptforge

    best = gptforge.load(tiny_run, which="best", device="cpu")
    expected = best.generate("ROMEO:", max_new_tokens=10, temperature=0.0)[0]
    assert code == 0 and greedy == "ROMEO:" + expected + "\n" and len(expected) == 10


def _damaged_copy(tiny_run, tmp_path, how: str):
    import shutil

    run = tmp_path / how
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints" / "latest"
    if how == "truncated":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "shapes":
        cfg = json.loads((ckpt / "model_config.json").read_text())
        cfg["n_embd"] *= 2
        (ckpt / "model_config.json").write_text(json.dumps(cfg))
    elif how == "no-checkpoint":
        shutil.rmtree(run / "checkpoints")
    return run


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--top-p", "1.5"], "top-p"),
        (["--prompt", "ROMEO ☃"], "☃"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file"),
        # `--prompt $'RO\xffMEO'`: Python hands argv bytes that are not UTF-8 over as lone surrogates.
        (["--prompt", b"RO\xffMEO".decode("utf-8", "surrogateescape")], "the prompt is not valid UTF-8"),
    ],
)
def test_cli_bad_settings_exit_2_with_one_line(tiny_run, capsys, args, message):
    code, out, err = _cli(capsys, "generate", str(tiny_run), "--max-new-tokens", "5", *args)
    assert code == 2 and out == ""
    assert err.startswith("gptforge: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("how", ["missing", "truncated", "shapes", "no-checkpoint"])
def test_cli_bad_run_dir_exits_2_with_one_line(tiny_run, capsys, tmp_path, how):
    run = tmp_path / "nope" if how == "missing" else _damaged_copy(tiny_run, tmp_path, how)
    code, out, err = _cli(capsys, "generate", str(run), "--max-new-tokens", "5")
    assert code == 2 and out == ""
    assert err.startswith("gptforge: error: ") and err.count("\n") == 1
