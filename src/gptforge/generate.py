"""Sampling from a trained run: pure sampling functions and a KV-cache generation engine.

    import gptforge
    gen = gptforge.load("runs/char")                     # latest checkpoint, best device
    print(gen.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=50, seed=1337)[0])
    for piece in gen.stream("JULIET:", max_new_tokens=100):
        print(piece, end="", flush=True)

The sampling functions take logits and return token ids (temperature 0 = greedy, top-k, top-p,
a seeded torch.Generator). `Generator` prefills the prompt into the KV cache, then decodes one
token at a time; past the model's context it slides the window (re-prefilling the last part of
the text), so it can write any number of tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import GptforgeError

# ----------------------------------------------------------------------------------------- sampling


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the `k` largest logits of each row (B, V); the others become -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    # scatter rather than `logits < kth value`: ties at the k-th value would let in more than k ids
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely ids whose probability reaches `p`.

    The most likely id is always kept, so a row never ends up empty.
    """
    if p >= 1.0:
        return logits
    sorted_logits, indices = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the ids ranked above each one
    drop = mass_before >= p  # the nucleus was already full before this id
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, sorted_logits)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logits (B, V) in, one token id per row (B,) out.

    temperature 0 is greedy (argmax, no randomness); top_k None/0 and top_p 1.0 switch those
    filters off. The draw uses `generator`, so a seeded generator gives reproducible tokens.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    max_new_tokens: int = 0,
    num_samples: int = 1,
    seed: int | None = None,
) -> None:
    """Raise GptforgeError for settings that have no meaning (the CLI turns it into exit 2)."""
    if not 0 <= temperature < math.inf:  # also catches NaN
        raise GptforgeError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise GptforgeError(f"top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GptforgeError(f"top-p must be in (0, 1] (1 = off), got {top_p}")
    if max_new_tokens < 0:
        raise GptforgeError(f"max new tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise GptforgeError(f"number of samples must be >= 1, got {num_samples}")
    if seed is not None and not -(1 << 63) <= seed < 1 << 64:
        raise GptforgeError(f"seed {seed} does not fit in 64 bits; choose one in [-2**63, 2**64)")


def _memory_bytes(device: torch.device) -> int | None:
    """The memory a batch on `device` may use at most: the GPU's, else this machine's (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def make_rng(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device`: seeded when `seed` is given, from OS entropy when None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


# ----------------------------------------------------------------------------------------- streaming text


class _TextStream:
    """Turns one sequence's new token ids into text pieces that are only yielded once they decode cleanly.

    A byte-level BPE token can hold half of a multi-byte character; decoding it alone gives U+FFFD.
    We decode all of the sequence's ids so far and hold back a trailing U+FFFD until later tokens
    complete the character (or the sequence ends), so the pieces join to exactly decode(all ids).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(ids) already handed out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        piece = text[self.emitted :]
        self.emitted = max(self.emitted, len(text))
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece


# ----------------------------------------------------------------------------------------- engine


@dataclass
class SamplingSettings:
    """What to sample; validated once by `check()`."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    num_samples: int = 1
    stop_at_eot: bool = False

    def check(self) -> SamplingSettings:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens, self.num_samples, self.seed)
        return self


class Generator:
    """A model and its tokenizer, ready to sample: `generate(prompt) -> list[str]`, `stream(prompt)`.

    Built by `gptforge.load(run_dir)`, or directly from a GPT and a Tokenizer. `info` is the
    checkpoint's info.json (step, losses) and `run_dir` the run it came from, for model cards.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        info: dict | None = None,
        run_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.block_size: int = model.config.block_size
        # Ids the model may emit: its real vocabulary (padded ids are already cut off by forward)
        # and no further than the tokenizer can decode.
        self.vocab_limit: int = min(model.config.vocab_size, tokenizer.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------ text API

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids; an empty prompt starts from <|endoftext|> (or a newline for char tokenizers)."""
        ids = self.tokenizer.encode(prompt) if prompt else []
        if ids:
            return ids
        eot = getattr(self.tokenizer, "eot_id", None)
        if eot is not None:
            return [eot]
        try:
            return self.tokenizer.encode("\n")
        except GptforgeError:
            return [0]

    def generate(self, prompt: str = "", **settings: Any) -> list[str]:
        """Continuations of `prompt` (without the prompt itself), one per sample.

        Keyword settings: max_new_tokens=200, temperature=1.0, top_k=None, top_p=1.0, seed=None,
        num_samples=1, stop_at_eot=False, use_cache=True.
        """
        use_cache = settings.pop("use_cache", True)
        ids = self.generate_ids(self.encode_prompt(prompt), SamplingSettings(**settings), use_cache)
        return [self.tokenizer.decode(row) for row in ids]

    def stream(self, prompt: str = "", **settings: Any) -> Iterator[str]:
        """Text pieces of one continuation as they are written; joined they equal `generate(...)[0]`."""
        if settings.get("num_samples", 1) != 1:
            raise GptforgeError("stream() writes one sample; use stream_batch() for several")
        for pieces in self.stream_batch(prompt, **settings):
            if pieces[0]:
                yield pieces[0]

    def stream_batch(self, prompt: str = "", **settings: Any) -> Iterator[list[str]]:
        """One list of text pieces (one per sample, maybe empty) each time any sample grows."""
        use_cache = settings.pop("use_cache", True)
        s = SamplingSettings(**settings).check()
        prompt_ids = self.encode_prompt(prompt)
        self._check_fits(s, len(prompt_ids))
        streams = [_TextStream(self.tokenizer) for _ in range(s.num_samples)]
        for tokens, done in self._decode_loop(prompt_ids, s, use_cache):
            pieces = [st.push(t) if not d else "" for st, t, d in zip(streams, tokens, done, strict=True)]
            if any(pieces):
                yield pieces
        tail = [st.flush() for st in streams]
        if any(tail):
            yield tail

    # ------------------------------------------------------------------------------ token API

    def generate_ids(
        self, prompt_ids: Sequence[int], settings: SamplingSettings | None = None, use_cache: bool = True
    ) -> list[list[int]]:
        """New token ids for each sample (an <|endoftext|> that stopped a sample is left out)."""
        s = (settings or SamplingSettings()).check()
        self._check_fits(s, len(prompt_ids))
        rows: list[list[int]] = [[] for _ in range(s.num_samples)]
        for tokens, done in self._decode_loop(prompt_ids, s, use_cache):
            for row, t, d in zip(rows, tokens, done, strict=True):
                if not d:
                    row.append(t)
        return rows

    def _check_fits(self, s: SamplingSettings, prompt_len: int) -> None:
        """Refuse a batch that cannot fit in this machine's memory (e.g. --num-samples 1000000000)
        before allocating any of it: per sample, the tokens (as a tensor and as Python ints), the KV
        cache and a row of logits."""
        c = self.model.config
        weight = next(self.model.parameters())
        per_sample = ((prompt_len + s.max_new_tokens) * 64 + 2 * c.n_layer * c.block_size * c.n_embd
                      * weight.element_size() + c.vocab_size * 8)
        need = s.num_samples * per_sample
        limit = _memory_bytes(weight.device)
        if limit and need > limit:
            raise GptforgeError(
                f"{s.num_samples:,} sample(s) of {prompt_len + s.max_new_tokens:,} tokens need about "
                f"{need / 2**30:,.1f} GiB, more than the {limit / 2**30:,.1f} GiB of this {weight.device.type}; "
                "ask for fewer --num-samples or --max-new-tokens")

    @torch.inference_mode()
    def _decode_loop(
        self, prompt_ids: Sequence[int], s: SamplingSettings, use_cache: bool
    ) -> Iterator[tuple[list[int], list[bool]]]:
        """Yield (token of each sample, whether that sample has stopped) per decode step; a stopped
        sample's token (its <|endoftext|>, then filler) is not part of its text.

        The context window is [start, L) of the tokens so far. With the cache, only tokens not yet
        in it are fed; without, the whole window is recomputed each step (same window, same tokens:
        the cache only saves work). When the window would pass block_size, it restarts from the last
        `keep` tokens, which are re-prefilled in one forward pass: the model has learned absolute
        positions, so cached keys cannot simply be shifted along.
        """
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise GptforgeError("the prompt is empty after tokenizing; give at least one token")
        if max(prompt_ids) >= self.vocab_limit or min(prompt_ids) < 0:
            raise GptforgeError(f"prompt ids must be in [0, {self.vocab_limit}); the tokenizer and model disagree")
        B, T0, N = s.num_samples, len(prompt_ids), s.max_new_tokens
        block = self.block_size
        keep = max(1, block - max(1, block // 4))  # slide by a quarter of the context at a time
        device = self.device
        rng = make_rng(s.seed, device)
        eot = getattr(self.tokenizer, "eot_id", None) if s.stop_at_eot else None

        idx = torch.empty((B, T0 + N), dtype=torch.long, device=device)  # (B, all tokens)
        idx[:, :T0] = torch.tensor(prompt_ids, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache = self.model.new_kv_cache(B) if use_cache else None
        start = 0  # the window's first position in idx
        for L in range(T0, T0 + N):  # L = tokens so far
            if L - start > block:
                start = L - keep
                if cache is not None:
                    cache.reset()
            if cache is not None:
                logits, _ = self.model(idx[:, start + cache.pos : L], kv_cache=cache, last_only=True)
            else:
                logits, _ = self.model(idx[:, start:L], last_only=True)
            logits = logits[:, -1, : self.vocab_limit]  # (B, V)
            nxt = sample_next(logits, s.temperature, s.top_k, s.top_p, generator=rng)  # (B,)
            if eot is not None:
                nxt = nxt.masked_fill(done, eot)  # finished samples keep feeding <|endoftext|>
                done = done | (nxt == eot)  # the <|endoftext|> itself is not part of the text
            idx[:, L] = nxt
            yield nxt.tolist(), done.tolist()
            if bool(done.all()):
                return


# ----------------------------------------------------------------------------------------- load


def load(run_dir: str | os.PathLike, which: str = "latest", device: str = "auto") -> Generator:
    """`gptforge.load("runs/char")`: the run's `latest` (or `best`) checkpoint, ready to sample.

    `run_dir` is a run directory or a checkpoint directory inside one; `device` is "auto"
    (cuda > mps > cpu), "cpu", "cuda" or "mps". Missing or damaged files raise GptforgeError.
    """
    from gptforge.runs import load_model, resolve_checkpoint, run_dir_of

    model, tokenizer, info = load_model(run_dir, which=which, device=device)
    return Generator(model, tokenizer, info=info, run_dir=run_dir_of(resolve_checkpoint(run_dir, which)))
