"""Bits per byte: byte tables of the three tokenizers, and the arithmetic over real evaluations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gptforge.bpb import bits_per_byte, byte_table, target_bytes
from gptforge.data.tokenizers import build_tokenizer
from gptforge.model import GPT, GPTConfig
from gptforge.train.runtime import setup_runtime
from gptforge.train.trainer import split_loss, split_windows

UNICODE = "naïve café — 日本語, emoji 👍🏽 and a ZWJ family 👨‍👩‍👧, Ωμέγα.\r\n\ttabs\x07 bell "


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return build_tokenizer("bpe", shakespeare_text[:100_000] + UNICODE, vocab_size=400)


def _model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size, dropout=0.0)).eval()


@pytest.mark.parametrize("spec", ["gpt2", "bpe", "char"])
def test_a_tokenizers_bytes_per_id_sum_to_the_utf8_length_of_the_text(spec, gpt2, bpe, shakespeare_text):
    text = shakespeare_text[:3000] + UNICODE * 3
    tok = {"gpt2": gpt2, "bpe": bpe, "char": build_tokenizer("char", text)}[spec]
    table = tok.byte_lengths()
    assert table.shape == (tok.vocab_size,) and table.dtype == np.int64
    ids = tok.encode(text)
    assert int(table[ids].sum()) == len(text.encode("utf-8")) > len(text)
    if tok.eot_id is not None:  # <|endoftext|> stands for no text
        assert table[tok.eot_id] == 0 and (table > 0).sum() == tok.vocab_size - 1


def test_target_bytes_ignores_padding():
    table = torch.tensor([1, 2, 3, 0])
    y = torch.tensor([[0, 1, 2, 3], [2, 2, -1, -1]])
    assert target_bytes(y, table) == 1 + 2 + 3 + 0 + 3 + 3
    assert bits_per_byte(12 * math.log(2), 4) == pytest.approx(3.0)
    assert bits_per_byte(1.0, 0) is None


def test_a_char_model_over_ascii_text_has_bpb_equal_to_nats_over_ln2(shakespeare_text):
    text = shakespeare_text[:2000]
    assert text.isascii()
    tok = build_tokenizer("char", text)
    tokens = np.array(tok.encode(text), dtype=np.uint16)
    r = split_loss(_model(tok.vocab_size), tokens, 16, 8, setup_runtime("cpu", "float32"),
                   token_bytes=byte_table(tok))
    assert r.tokens == r.bytes == len(text) - 1
    assert r.bpb == pytest.approx(r.loss / math.log(2), rel=1e-12)


def test_a_char_model_over_multibyte_text_divides_by_bytes_not_characters(shakespeare_text):
    text = (shakespeare_text[:600] + UNICODE) * 3
    tok = build_tokenizer("char", text)
    tokens = np.array(tok.encode(text), dtype=np.uint16)
    r = split_loss(_model(tok.vocab_size), tokens, 16, 8, setup_runtime("cpu", "float32"),
                   token_bytes=byte_table(tok))
    predicted = text[1:]  # every character but the first
    assert r.tokens == len(predicted) and r.bytes == len(predicted.encode("utf-8")) > r.tokens
    assert r.bpb == pytest.approx(r.loss * r.tokens / (r.bytes * math.log(2)), rel=1e-12)
    assert r.bpb < r.loss / math.log(2)  # more bytes than characters: fewer bits per byte than per character


def test_gpt2_bytes_of_the_predicted_windows_match_the_decoded_text(gpt2, shakespeare_text):
    """The exact split evaluation's byte count is that of the decoded target text, counted apart."""
    text = shakespeare_text[:1500] + UNICODE + shakespeare_text[1500:2500]
    ids = gpt2.encode(text)
    tokens = np.array(ids, dtype=np.uint16)
    r = split_loss(_model(gpt2.vocab_size), tokens, 16, 8, setup_runtime("cpu", "float32"),
                   token_bytes=byte_table(gpt2))
    targets = gpt2.decode(ids[1:])
    assert "\ufffd" not in targets
    assert r.tokens == len(ids) - 1 and r.bytes == len(targets.encode("utf-8"))
    # window by window too: the byte count follows the windows' targets, padding excluded
    per_window = sum(len(gpt2.enc.decode_bytes(row[row != -1].tolist())) for _, y in split_windows(tokens, 16, 8)
                     for row in y)
    assert per_window == r.bytes
