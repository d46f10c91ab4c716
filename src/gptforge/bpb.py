"""Bits per byte: a loss that compares across tokenizers.

    from gptforge.bpb import bits_per_byte, byte_table, target_bytes
    table = byte_table(tokenizer)                 # UTF-8 bytes of each id (special tokens: 0)
    n_bytes = target_bytes(y, table)              # bytes of the predicted tokens of a batch (y = -1 ignored)
    bpb = bits_per_byte(mean_loss * n_tokens, n_bytes)

A loss in nats per token depends on how much text a token holds: a char model's 1.5 and a GPT-2 BPE
model's 3.5 say nothing about which predicts the text better. Divided by the bytes those tokens
spell, and converted from nats to bits, it does: bits per byte = total nats over the predicted
tokens / (UTF-8 bytes of those tokens x ln 2). Exact, not an average ratio of bytes per token.

Special tokens (<|endoftext|>) stand for no text and count 0 bytes; their nats are counted, so a
corpus of many short documents pays for predicting where documents end. For ASCII text a char
model's bits per byte is its loss / ln 2.
"""

from __future__ import annotations

import math

import torch

from gptforge.data.tokenizers import Tokenizer

__all__ = ["bits_per_byte", "byte_table", "target_bytes"]


def byte_table(tokenizer: Tokenizer) -> torch.Tensor:
    """The tokenizer's bytes per id as an int64 CPU tensor (a copy: the tokenizer's array is read-only)."""
    return torch.tensor(tokenizer.byte_lengths())


def target_bytes(y: torch.Tensor, table: torch.Tensor) -> int:
    """UTF-8 bytes of the targets of a batch (any shape); targets of -1 (padding) count nothing."""
    y = y.detach().to("cpu", torch.int64)
    return int(table[y[y != -1]].sum())


def bits_per_byte(total_nats: float, n_bytes: int) -> float | None:
    """total nats / (bytes x ln 2); None for no bytes (nothing but special tokens was predicted)."""
    if n_bytes <= 0:
        return None
    return total_nats / (n_bytes * math.log(2))
