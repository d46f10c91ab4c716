"""gptforge export: a run becomes a directory transformers loads as it is. Greedy text through
`transformers.pipeline` equals gptforge's, AutoTokenizer's ids equal gptforge's, the directory
round-trips through `train --init`, and bad input fails in one line without leaving files behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.hf import load_pretrained, save_pretrained
from gptforge.model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = ("gpt2", "bpe", "char")
# Accents, combining marks, CJK, emoji (with zero-width joiners), tabs, CRLF and runs of spaces.
UNICODE = ("Café naïve — «déjà vu» Ångström ñandú e\u0301\n東京タワー 你好，世界！ こんにちは\r\n"
           "🙂🚀 👩\u200d👩\u200d👧 ß ﬁ 𝔘𝔫𝔦\t'tis  x   y\n\n")
PROMPT = "ROMEO:\nWhat"


def _random_unicode(n: int, seed: int = 0) -> str:
    """n characters drawn from many scripts, digits, punctuation, combining marks, emoji and
    whitespace of every kind (a seeded, long stress text for the byte-level tokenizers)."""
    import random

    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x391, 0x3C9), (0x410, 0x44F), (0x5D0, 0x5EA),
              (0x627, 0x64A), (0x905, 0x939), (0x3041, 0x3096), (0x4E00, 0x4FFF), (0xAC00, 0xAD00),
              (0x1F300, 0x1F64F), (0x1D400, 0x1D433)]
    spaces = [" ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\u200d", "'s", "'ll", "123"]
    out = []
    for _ in range(n):
        if rng.random() < 0.25:
            out.append(rng.choice(spaces))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _train(run: Path, corpus: Path, tokenizer: str, *extra: str) -> Path:
    from gptforge.train.trainer import train

    config = load_config(None, [
        f"data.corpus={corpus}", f"data.tokenizer={tokenizer}", "model.preset=tiny", "model.n_layer=1",
        "model.n_embd=32", "model.block_size=32", "train.batch_size=8", "train.device=cpu",
        "train.dtype=float32", "train.eval_every=20", "train.eval_batches=2", "train.log_every=10",
        "train.checkpoint_every=1000", "optim.lr=3e-3", "optim.warmup_steps=2", *extra])
    train(config, run)
    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text) -> Path:
    # The Unicode line in the text: the char vocabulary then holds every character of UNICODE.
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(UNICODE + shakespeare_text[:15_000] + UNICODE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> dict[str, Path]:
    """One run per tokenizer, trained for 40 steps (enough that greedy choices are not near-ties)."""
    base = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {spec: _train(base / spec, corpus, spec, "train.max_steps=40",
                             *(["data.bpe_vocab_size=400"] if spec == "bpe" else [])) for spec in SPECS}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    """Each run exported through the command line, as a user types it."""
    from gptforge.cli import main

    base = tmp_path_factory.mktemp("hf")
    for spec, run in runs.items():
        main(["export", str(run), str(base / spec)])
    return {spec: base / spec for spec in SPECS}


# --------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("spec", SPECS)
def test_pipeline_greedy_text_equals_gptforge_generate(spec, runs, exported):
    from gptforge.generate import load

    out = exported[spec]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "loss.png"} <= names
    gen = load(runs[spec], device="cpu")
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    ids = gen.encode_prompt(PROMPT)
    n = 32 - len(ids)  # GPT-2 cannot look past n_positions = block_size
    ours = gen.generate(PROMPT, max_new_tokens=n, temperature=0, stop_at_eot=True)[0]
    theirs = pipe(PROMPT, max_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert theirs == PROMPT + ours
    assert len(ours) > 0
    # The model itself, outside the pipeline: the same greedy ids.
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        hf_ids = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    assert gen.tokenizer.decode(hf_ids) == ours


@pytest.mark.parametrize("spec", SPECS)
def test_autotokenizer_ids_equal_gptforge(spec, runs, exported, shakespeare_text):
    from gptforge.data.tokenizers import load_tokenizer

    ours = load_tokenizer(runs[spec] / "tokenizer")
    theirs = transformers.AutoTokenizer.from_pretrained(exported[spec])
    texts = [UNICODE, shakespeare_text[:15_000]] if spec == "char" else \
        [UNICODE, _random_unicode(20_000), shakespeare_text[20_000:60_000]]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text)
        assert theirs.decode(ids) == text
    config = json.loads((exported[spec] / "config.json").read_text())
    assert config["vocab_size"] == ours.vocab_size == len(theirs)
    assert config["eos_token_id"] == ours.eot_id == theirs.eos_token_id  # 50256 for gpt2, None otherwise


def test_char_export_refuses_unknown_characters_like_gptforge(runs, exported):
    from gptforge.data.tokenizers import load_tokenizer

    text = "ROMEO: €"  # not a character of the corpus
    with pytest.raises(GptforgeError, match="does not know"):
        load_tokenizer(runs["char"] / "tokenizer").encode(text)
    with pytest.raises(Exception, match="UNK"):  # no unknown id the model never saw
        transformers.AutoTokenizer.from_pretrained(exported["char"])(text)


def test_gpt2_tokenizer_files_are_gpt2s(exported):
    out = exported["gpt2"]
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 50_001
    assert merges[1] == "Ġ t"  # GPT-2's first merge: " " + "t"
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50_257 and vocab["Ġthe"] == 262 and vocab["!"] == 0 and vocab["<|endoftext|>"] == 50256
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.model_max_length == 32


def test_model_card(runs, exported, corpus):
    card = (exported["char"] / "README.md").read_text(encoding="utf-8")
    header = card.split("---")[1]
    assert "library_name: transformers" in header and "pipeline_tag: text-generation" in header
    evals = [json.loads(line) for line in (runs["char"] / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if r["kind"] == "eval" and r["step"] == 40][-1]
    assert f"| validation loss | {last['val_loss']:.4f} |" in card
    assert f"| train loss | {last['train_loss']:.4f} |" in card
    # bits per byte beside them: over the UTF-8 bytes (the corpus has multi-byte characters), not characters
    assert f"| validation bits per byte | {last['val_bpb']:.4f} |" in card
    assert f"| train bits per byte | {last['train_bpb']:.4f} |" in card and "every token of the training" not in card
    assert "| steps | 40 " in card and "corpus.txt" in card and "![training and validation loss](loss.png)" in card
    assert str(corpus.parent) not in card and str(runs["char"].parent) not in card  # no local paths published
    assert (exported["char"] / "loss.png").read_bytes() == (runs["char"] / "loss.png").read_bytes()


def test_a_memorisation_runs_card_puts_the_validation_numbers_beside_its_training_loss(tmp_path):
    """A run stopped on the whole training split (stop_metric = train_full) says so, and shows what text
    it never saw costs: the validation loss and bits per byte of the same evaluation."""
    from gptforge.data.tokenizers import build_tokenizer
    from gptforge.hf import model_card
    from gptforge.model import GPT, GPTConfig

    run = tmp_path / "memorise"
    run.mkdir()
    record = {"kind": "eval", "step": 7, "tokens": 700, "val_loss": 3.25, "val_bpb": 4.6888, "train_loss": 0.0123,
              "train_bpb": 0.0177, "train_loss_tokens": 999, "train_loss_bytes": 999}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    tok = build_tokenizer("char", "abc")
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=3))
    card = model_card(model, tok, {"step": 7, "tokens": 700}, run, run / "checkpoints" / "latest", "m", False)
    for row in ("| train loss | 0.0123 |", "| validation loss | 3.2500 |", "| train bits per byte | 0.0177 |",
                "| validation bits per byte | 4.6888 |"):
        assert row in card
    assert "every token of the training split (the run trained to a loss on it: it memorises)" in card


def test_export_works_offline_with_the_runs_own_gpt2_ranks(runs, tmp_path, monkeypatch):
    from gptforge.data.tokenizers import GPT2Tokenizer
    from gptforge.hf import export_run

    expected = GPT2Tokenizer().encode(UNICODE)  # from $GPTFORGE_DATA_DIR's ranks
    assert (runs["gpt2"] / "tokenizer" / "gpt2.tiktoken").is_file()
    # No data directory and an empty tiktoken cache: only the run's tokenizer/gpt2.tiktoken is left.
    monkeypatch.delenv("GPTFORGE_DATA_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    out = export_run(runs["gpt2"], tmp_path / "out")
    assert transformers.AutoTokenizer.from_pretrained(out)(UNICODE)["input_ids"] == expected


# --------------------------------------------------------------------------------------------- round trip


def _first_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 1)


@pytest.mark.parametrize("spec", SPECS)
def test_init_from_an_export_equals_init_from_the_run(spec, runs, exported, corpus, tmp_path):
    from gptforge.cli import main
    from gptforge.data.tokenizers import load_tokenizer
    from gptforge.hf import tokenizer_from_hf

    recovered = tokenizer_from_hf(exported[spec])
    original = load_tokenizer(runs[spec] / "tokenizer")
    assert (recovered.spec, recovered.vocab_size) == (original.spec, original.vocab_size)
    assert recovered.encode(UNICODE) == original.encode(UNICODE)

    common = ["model.preset=tiny", f"data.corpus={corpus}", f"data.tokenizer={spec}", "train.max_steps=1",
              "train.batch_size=4", "train.dtype=float32", "train.device=cpu", "train.eval_every=100"]
    main(["train", "--init", str(exported[spec]), "--out", str(tmp_path / "from-export"), *common])
    main(["train", "--init", str(runs[spec]), "--out", str(tmp_path / "from-run"), *common])
    assert _first_loss(tmp_path / "from-export") == pytest.approx(_first_loss(tmp_path / "from-run"), abs=1e-5)
    again = load_tokenizer(tmp_path / "from-export" / "tokenizer")
    assert again.spec == spec and again.encode(UNICODE) == original.encode(UNICODE)


def test_a_bias_free_run_round_trips_with_bias_false(corpus, tmp_path):
    from gptforge.cli import main
    from gptforge.generate import load
    from gptforge.hf import export_run

    run = _train(tmp_path / "run", corpus, "char", "train.max_steps=5", "model.bias=false")
    out = export_run(run, tmp_path / "hf")  # GPT-2's layout has biases: written as zeros
    ours = load(run, device="cpu").generate(PROMPT, max_new_tokens=8, temperature=0)[0]
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    assert pipe(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"] == PROMPT + ours
    common = ["model.preset=tiny", "model.bias=false", f"data.corpus={corpus}", "data.tokenizer=char",
              "train.max_steps=1", "train.batch_size=4", "train.dtype=float32", "train.device=cpu"]
    main(["train", "--init", str(out), "--out", str(tmp_path / "from-export"), *common])
    main(["train", "--init", str(run), "--out", str(tmp_path / "from-run"), *common])
    assert _first_loss(tmp_path / "from-export") == pytest.approx(_first_loss(tmp_path / "from-run"), abs=1e-5)
    assert load_config(tmp_path / "from-export" / "config.toml").model.bias is False


def test_init_from_an_export_names_the_tokenizer_it_needs(exported, corpus):
    from gptforge.train.init import prepare_init

    config = load_config(None, [f"data.corpus={corpus}", "data.tokenizer=gpt2", f"train.init={exported['char']}"])
    with pytest.raises(GptforgeError, match='set data.tokenizer = "char"'):
        prepare_init(config)


# --------------------------------------------------------------------------------------------- bad input


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from gptforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


def test_export_refuses_a_non_empty_out_unless_forced(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _cli(capsys, "export", str(runs["char"]), str(out))
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    from gptforge.cli import main

    main(["export", str(runs["char"]), str(out), "--force", "--checkpoint", "best"])
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert "`best` of run" in (out / "README.md").read_text(encoding="utf-8")
    # An existing empty OUT (perhaps the shell's working directory) stays the same directory.
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    main(["export", str(runs["char"]), str(empty)])
    assert empty.stat().st_ino == inode and (empty / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no temporary directory left


def test_export_of_a_run_without_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, err = _cli(capsys, "export", str(tmp_path / "run"), str(tmp_path / "out"))
    assert code == 2 and err.startswith("gptforge: error: ") and err.count("\n") == 1 and "checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_export_leaves_nothing_half_written(runs, tmp_path, monkeypatch):
    import gptforge.export as hf  # export_run looks write_tokenizer up in gptforge.export

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "write_tokenizer", disk_full)  # after the weights are written
    with pytest.raises(GptforgeError, match="No space left on device.*unchanged"):
        hf.export_run(runs["char"], out, force=True)
    with pytest.raises(GptforgeError, match="could not write .*new"):
        hf.export_run(runs["char"], tmp_path / "new")
    # The old OUT is untouched, the new one never appears, and no temporary directory is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_tokenizers_gptforge_cannot_train_with_are_refused_in_one_line(tmp_path):
    from tokenizers import Tokenizer, models

    from gptforge.hf import tokenizer_from_hf

    assert tokenizer_from_hf(tmp_path) is None  # no tokenizer.json: GPT-2's is assumed, as before
    Tokenizer(models.WordLevel(vocab={"b": 0, "a": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(GptforgeError, match="not a gptforge char vocabulary"):
        tokenizer_from_hf(tmp_path)  # ids not in sorted character order
    Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0)).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(GptforgeError, match="Unigram tokenizer"):
        tokenizer_from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptforgeError, match="not a readable Hugging Face tokenizer"):
        tokenizer_from_hf(tmp_path)


# ------------------------------------------------------------------------------------ GPT-2 weights both ways

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


@pytest.mark.parametrize("shape", HF_SHAPES, ids=lambda s: "L{}-H{}-C{}-T{}-V{}-tie{}".format(*s))
def test_hf_parity_both_ways(shape, tmp_path, greedy):
    n_layer, n_head, n_embd, block_size, vocab_size, tie = shape
    hf = _hf_model(*shape)
    idx = torch.randint(0, vocab_size, (2, block_size), generator=torch.Generator().manual_seed(1))

    # HF -> ours
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    assert ours.config.tie_embeddings is tie and ours.config.block_size == block_size
    with torch.no_grad():
        ours_logits, _ = ours(idx)
        hf_logits = hf(idx).logits
    assert ours_logits.shape == hf_logits.shape == (2, block_size, vocab_size)
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-4
    prompt = idx[:1, :5]
    with torch.no_grad():
        hf_tokens = greedy.full(lambda ids: hf(ids).logits, prompt, 15)
        assert greedy.full(lambda ids: ours(ids)[0], prompt, 15) == hf_tokens
        assert greedy.cached(ours, prompt, 15) == hf_tokens

    # ours (freshly initialised, so different weights) -> HF
    torch.manual_seed(2)
    mine = GPT(GPTConfig(n_layer, n_head, n_embd, block_size, vocab_size, tie_embeddings=tie)).eval()
    save_pretrained(mine, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "gpt2"
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        diff = (mine(idx)[0] - hf2(idx).logits).abs().max().item()
        assert diff <= 1e-4
        assert greedy.full(lambda ids: hf2(ids).logits, prompt, 12) == greedy.cached(mine, prompt, 12)


@pytest.mark.parametrize("attn_dropout, attn_pdrop", [(None, 0.2), (0.0, 0.0)])
def test_export_writes_the_attention_dropout_apart(tmp_path, attn_dropout, attn_pdrop):
    """Hugging Face's GPT-2 has one rate per place (embd_pdrop, attn_pdrop, resid_pdrop): attn_dropout
    goes to attn_pdrop, `dropout` to the other two, and transformers reads them back."""
    m = GPT(GPTConfig(1, 2, 32, 16, 50, dropout=0.2, attn_dropout=attn_dropout))
    save_pretrained(m, tmp_path)
    cfg = transformers.GPT2Config.from_pretrained(tmp_path)
    assert (cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop) == (0.2, attn_pdrop, 0.2)


def test_export_without_biases_loads_in_hf(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(2, 2, 32, 16, 50, bias=False)).eval()
    assert not any(n.endswith("bias") for n, _ in m.named_parameters())
    save_pretrained(m, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        assert (m(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_from_pretrained_reads_pytorch_model_bin_and_overrides(tmp_path):
    hf = _hf_model(*HF_SHAPES[0])
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    m = load_pretrained(tmp_path, dropout=0.1, block_size=20).eval()
    assert (m.config.dropout, m.config.block_size) == (0.1, 20)
    idx = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (m(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
    with pytest.raises(GptforgeError, match="n_layer"):
        load_pretrained(tmp_path, n_layer=3)


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
        load_pretrained(tmp_path)
    assert not marker.exists()


def test_from_pretrained_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(GptforgeError, match="not a directory"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GptforgeError, match="JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8})
    )
    with pytest.raises(GptforgeError, match="neither model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(GptforgeError, match="safetensors"):
        load_pretrained(tmp_path)
    # A Hub name while offline: a one-line GptforgeError, not a traceback from huggingface_hub.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GptforgeError, match="Hugging Face Hub"):
        load_pretrained("gptforge-test/no-such-model")


@pytest.mark.parametrize("hf_name, ours", [("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_the_exact_and_the_tanh_gelu_round_trip_with_hf(hf_name, ours, tmp_path):
    """model.activation: Hugging Face's GPT-2 runs either GELU; each direction keeps the one trained."""
    hf = _hf_model(*HF_SHAPES[0])
    hf.config.activation_function = hf_name
    hf = transformers.GPT2LMHeadModel(hf.config).eval()  # rebuilt: the MLP's activation is chosen at build time
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_pretrained(tmp_path / "hf").eval()
    assert loaded.config.activation == ours
    idx = torch.randint(0, HF_SHAPES[0][4], (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (loaded(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4

    torch.manual_seed(3)
    mine = GPT(GPTConfig(2, 2, 32, 16, 50, activation=ours)).eval()
    save_pretrained(mine, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())["activation_function"]
    assert saved == ("gelu" if ours == "gelu" else "gelu_new")
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    x = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (mine(x)[0] - hf2(x).logits).abs().max().item() <= 1e-5
