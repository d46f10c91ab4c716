"""Tokenizers behind one interface: GPT-2's BPE (tiktoken), characters, and a BPE trained on the corpus.

    from gptforge.data.tokenizers import build_tokenizer, load_tokenizer
    tok = build_tokenizer("gpt2")                          # or ("char", text) / ("bpe", text, 4096)
    ids = tok.encode("ROMEO: hello")
    assert tok.decode(ids) == "ROMEO: hello"
    tok.save("runs/x/tokenizer"); tok = load_tokenizer("runs/x/tokenizer")

Every tokenizer is lossless: decode(encode(text)) == text for any text it accepts (gpt2 and bpe are
byte-level, so that is any text at all). A saved tokenizer is a directory of JSON files (for gpt2 also
GPT-2's ranks, gpt2.tiktoken, in tiktoken's text format), never a pickle.

`tok.byte_lengths()` is the UTF-8 length of every id (special tokens: 0), from which bits per byte
are counted (see gptforge.bpb).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptforge.data.dirs import data_dir
from gptforge.errors import GptforgeError

SPECS = ("gpt2", "char", "bpe")
META_FILE = "gptforge_tokenizer.json"
BPE_VOCAB_MIN, BPE_VOCAB_MAX = 257, 65536  # 256 byte symbols plus at least one merge; fits uint16
BPE_VOCAB_DEFAULT = 4096

# GPT-2's pre-tokenizer pattern (as tiktoken writes it): BPE merges never cross these pieces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
GPT2_RANKS_FILE = "gpt2.tiktoken"  # a saved gpt2 tokenizer's own copy of the ranks
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base, as tiktoken checks

# A lone newline between two non-space characters is a piece of its own under GPT-2's pattern, so
# cutting the text just after it changes no piece and no token: chunks can be encoded in parallel.
# Between two non-space characters, "\r\n" is two pieces, "\r" and "\n": cut between them.
# (Python's \s covers all of Unicode White_Space, which the Rust regexes use, plus U+001C..U+001F, so
# a character that \S matches here is never whitespace to the tokenizers.)
_SAFE_CUT = re.compile(r"\S\n(?=\S)|\S\r(?=\n\S)")
_CHUNK_CHARS = 1 << 16


def split_for_batch(text: str, chunk_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` at places where GPT-2-style pre-tokenizers
    (tiktoken's gpt2, Hugging Face's ByteLevel) split anyway, so encoding the pieces one by one
    gives exactly the tokens of encoding the whole. Text with no safe place stays whole."""
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        m = _SAFE_CUT.search(text, start + chunk_chars)
        if m is None:
            break
        cut = m.end()  # just after the newline (or the carriage return)
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


# Set to 1 in `prepare`'s worker processes: each is one of several, so none should spawn threads.
MAX_THREADS: int | None = None


def _threads() -> int:
    return MAX_THREADS or max(1, min(8, os.cpu_count() or 1))


class Tokenizer(ABC):
    """Text <-> token ids. `decode` never fails on an id below `vocab_size`."""

    spec: str
    vocab_size: int
    eot_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids as an array (the streaming `prepare` path; no list is kept per token)."""
        return [np.array(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def byte_lengths(self) -> np.ndarray:
        """int64 array of vocab_size: how many UTF-8 bytes of text each id stands for. Special tokens
        (<|endoftext|>) stand for no text and count 0. Summed over ids it is the byte length of their
        decoded text (without special tokens), which is what bits per byte divide by."""
        cached = getattr(self, "_byte_lengths", None)
        if cached is None:
            cached = self._byte_lengths = self._compute_byte_lengths()
            cached.flags.writeable = False  # shared by every caller
        return cached

    @abstractmethod
    def _compute_byte_lengths(self) -> np.ndarray: ...

    def encode_to_array(self, text: str) -> np.ndarray:
        """The whole text as one int64 array, encoded in parallel chunks where the tokenizer can."""
        chunks = split_for_batch(text)
        arrays = [np.zeros(0, dtype=np.int64)]
        # A few MB of text per batch: Python lists of ids cost ~40 bytes a token, so never hold
        # the whole corpus's ids as lists at once.
        group = 64
        for i in range(0, len(chunks), group):
            arrays.extend(np.array(ids, dtype=np.int64) for ids in self.encode_batch(chunks[i:i + group]))
        return np.concatenate(arrays)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer into `directory` (created if needed) as JSON."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"spec": self.spec, "vocab_size": self.vocab_size, "eot_id": self.eot_id, **self._meta()}
        _write_json(d / META_FILE, meta)

    def _meta(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- gpt2


def _gpt2_encoding():
    """GPT-2's encoding, built offline from $GPTFORGE_DATA_DIR/gpt2/gpt2.tiktoken when it is there."""
    local = data_dir()
    path = local / "gpt2" / "gpt2.tiktoken" if local is not None else None
    return _gpt2_encoding_from(str(path) if path is not None and path.is_file() else None)


def _read_gpt2_ranks(path: str) -> dict[bytes, int]:
    """GPT-2's ranks from a .tiktoken file (base64 token, space, rank per line), checked by sha256.
    Read here rather than with tiktoken.load, which copies every local file it reads into a temp cache."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise GptforgeError(f"cannot read GPT-2's BPE ranks {path} ({type(e).__name__})") from None
    if hashlib.sha256(raw).hexdigest() != GPT2_RANKS_SHA256:
        raise GptforgeError(f"{path} is not GPT-2's BPE ranks file (its sha256 differs); replace it with "
                            "r50k_base.tiktoken or delete it")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=4)
def _gpt2_encoding_from(path: str | None):
    # Cached: parsing the 50k merge ranks takes ~0.25 s and the encoding is immutable.
    import tiktoken

    if path is not None:
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=_read_gpt2_ranks(path),
                                 special_tokens={GPT2_EOT: 50256})
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises plain exceptions of several kinds when offline
        raise GptforgeError(
            f"cannot load GPT-2's BPE ({type(e).__name__}); when offline, put gpt2.tiktoken (from "
            "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken) at "
            "$GPTFORGE_DATA_DIR/gpt2/gpt2.tiktoken and set GPTFORGE_DATA_DIR"
        ) from None


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (50,257 ids; <|endoftext|> = 50256). Text is encoded as ordinary text:
    a literal "<|endoftext|>" in a corpus is just characters, never the special id.

    `ranks_file`: a gpt2.tiktoken to read (a saved tokenizer's own copy); else the data directory's,
    else tiktoken's download. `save` writes the ranks beside the metadata, so a run needs neither."""

    spec = "gpt2"

    def __init__(self, ranks_file: str | os.PathLike | None = None) -> None:
        self.enc = _gpt2_encoding_from(str(ranks_file)) if ranks_file is not None else _gpt2_encoding()
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=_threads())

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        if _threads() > 1 and len(texts) > 1:
            return super().encode_batch_arrays(texts)
        # One thread (a worker process): tiktoken's numpy encoder skips the Python list of ids. With no
        # special token allowed or disallowed, it encodes exactly as encode_ordinary does.
        return [self.enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # "replace": a cut through a multi-byte character (e.g. while streaming) must not raise.
        return self.enc.decode(list(ids), errors="replace")

    def _compute_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, rank in self.enc._mergeable_ranks.items():  # the special ids are not among them
            lengths[rank] = len(token)
        return lengths

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # Byte-identical to r50k_base.tiktoken (835 KB): generate, serve and Spaces then work offline.
        lines = [base64.b64encode(t) + b" %d\n" % r
                 for t, r in sorted(self.enc._mergeable_ranks.items(), key=lambda item: item[1])]
        tmp = d / f".{GPT2_RANKS_FILE}.tmp{os.getpid()}"
        tmp.write_bytes(b"".join(lines))
        os.replace(tmp, d / GPT2_RANKS_FILE)
        super().save(d)


# --------------------------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training text, in sorted order."""

    spec = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise GptforgeError("a char tokenizer needs a non-empty list of single characters")
        self.vocab_size = len(self.chars)
        self.eot_id = None
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)  # sorted

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise GptforgeError("cannot build a char tokenizer from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return self.encode_to_array(text).tolist()

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_to_array(t) for t in texts]

    def encode_to_array(self, text: str) -> np.ndarray:
        # Vectorised lookup: code points -> positions in the sorted alphabet (1 MB in ~10 ms).
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, cps)
        ids_clipped = np.minimum(ids, len(self._codepoints) - 1)
        unknown = self._codepoints[ids_clipped] != cps
        if unknown.any():
            bad = sorted({chr(c) for c in cps[unknown].tolist()})
            shown = ", ".join(repr(c) for c in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise GptforgeError(
                f"text has {len(bad)} character(s) the char tokenizer does not know: {shown}; "
                "build the tokenizer from text that contains them, or use the gpt2 or bpe tokenizer"
            )
        return ids_clipped

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def _compute_byte_lengths(self) -> np.ndarray:
        # surrogatepass: a lone surrogate in a corpus read with errors="surrogateescape" counts 3 bytes
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars], dtype=np.int64)

    def _meta(self) -> dict:
        return {"chars": self.chars}


# --------------------------------------------------------------------------------------------- bpe


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE vocabularies,
    Hugging Face's ByteLevel and GPT-2's vocab.json)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on the corpus with Hugging Face `tokenizers`, stored as tokenizer.json.
    Byte-level (no normalizer, no prefix space) so any text round-trips exactly. Trained ones reserve
    id 0 for <|endoftext|>, which separates documents; like GPT-2's, a literal "<|endoftext|>" in the
    text is ordinary characters, never that id."""

    spec = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        # Tokenizers trained before the end-of-text token existed have none.
        self.eot_id = hf_tokenizer.token_to_id(GPT2_EOT)
        self._literal = None  # a copy that reads special tokens' text as ordinary text (made on demand)

    def _for(self, text: str):
        """The Hugging Face tokenizer for `text`: the copy with encode_special_tokens (not saved in
        tokenizer.json; ~30% slower) only for text that holds a special token's characters."""
        if self.eot_id is None or GPT2_EOT not in text:
            return self.hf
        if self._literal is None:
            from tokenizers import Tokenizer as HFTokenizer

            literal = HFTokenizer.from_str(self.hf.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> BPETokenizer:
        if not text:
            raise GptforgeError("cannot train a bpe tokenizer on empty text")
        chunks = split_for_batch(text)
        return cls.train_from_texts(chunks, vocab_size, length=len(chunks))

    @classmethod
    def train_from_texts(cls, texts, vocab_size: int | None = None, length: int | None = None) -> BPETokenizer:
        """Train on an iterable of texts (e.g. a bounded sample of a large corpus)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        vocab_size = check_bpe_vocab_size(BPE_VOCAB_DEFAULT if vocab_size is None else vocab_size)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
            special_tokens=[GPT2_EOT],
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return self._for(text).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        out = [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        for i, t in enumerate(texts):
            if self._for(t) is not self.hf:
                out[i] = self.encode(t)
        return out

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        if _threads() > 1:
            return super().encode_batch_arrays(texts)
        return [np.array(self.encode(t), dtype=np.int64) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def _compute_byte_lengths(self) -> np.ndarray:
        # A byte-level token's string spells its bytes one printable character each (bytes_to_unicode);
        # added tokens (<|endoftext|>) are special and stand for no text.
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        special = set(self.hf.get_added_tokens_decoder())
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i in special:
                continue
            if any(c not in byte_of for c in token):
                raise GptforgeError(f"bpe token {token!r} (id {i}) is not byte-level; cannot count its bytes")
            lengths[i] = len(token)
        return lengths

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".tokenizer.json.tmp{os.getpid()}"
        self.hf.save(str(tmp))
        os.replace(tmp, d / "tokenizer.json")
        super().save(d)


# --------------------------------------------------------------------------------------------- build / load


def check_bpe_vocab_size(vocab_size: int) -> int:
    if not isinstance(vocab_size, int) or not BPE_VOCAB_MIN <= vocab_size <= BPE_VOCAB_MAX:
        raise GptforgeError(
            f"bpe vocabulary size {vocab_size} is out of range; choose {BPE_VOCAB_MIN}..{BPE_VOCAB_MAX} "
            f"(e.g. {BPE_VOCAB_DEFAULT})"
        )
    return vocab_size


def check_spec(spec: str) -> str:
    if spec not in SPECS:
        raise GptforgeError(f"unknown tokenizer {spec!r}; choose one of {', '.join(SPECS)}")
    return spec


def build_tokenizer(spec: str, text: str | None = None, vocab_size: int | None = None) -> Tokenizer:
    """A new tokenizer: `gpt2` (fixed), `char` (the characters of `text`) or `bpe` (trained on
    `text` to `vocab_size` ids, default 4096)."""
    check_spec(spec)
    if vocab_size is not None and spec != "bpe":
        raise GptforgeError(f"a vocabulary size only applies to the bpe tokenizer, not {spec!r}")
    if spec == "gpt2":
        return GPT2Tokenizer()
    if spec == "bpe":
        check_bpe_vocab_size(BPE_VOCAB_DEFAULT if vocab_size is None else vocab_size)
    if text is None:
        raise GptforgeError(f"the {spec} tokenizer is built from the corpus; pass its text")
    return CharTokenizer.from_text(text) if spec == "char" else BPETokenizer.train(text, vocab_size)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """A tokenizer saved with `Tokenizer.save(directory)`."""
    d = Path(directory)
    meta_path = d / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        spec = meta["spec"]
    except FileNotFoundError:
        raise GptforgeError(f"{d} holds no saved tokenizer ({META_FILE} is missing)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GptforgeError(f"{meta_path} is damaged ({type(e).__name__}); prepare the data again") from None
    if spec == "gpt2":
        # The run's own copy of the ranks; run directories written before it existed use the shared one.
        ranks = d / GPT2_RANKS_FILE
        tok: Tokenizer = GPT2Tokenizer(ranks if ranks.is_file() else None)
    elif spec == "char":
        chars = meta.get("chars")
        if not isinstance(chars, list):
            raise GptforgeError(f"{meta_path} has no character list; prepare the data again")
        tok = CharTokenizer(chars)
    elif spec == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = BPETokenizer(HFTokenizer.from_file(str(d / "tokenizer.json")))
        except Exception as e:  # tokenizers raises a bare Exception for missing or bad files
            raise GptforgeError(f"cannot load {d / 'tokenizer.json'} ({e}); prepare the data again") from None
    else:
        raise GptforgeError(f"{meta_path} names an unknown tokenizer {spec!r}; choose one of {', '.join(SPECS)}")
    if tok.vocab_size != meta.get("vocab_size"):
        raise GptforgeError(
            f"{d} says vocabulary {meta.get('vocab_size')} but the tokenizer has {tok.vocab_size}; "
            "prepare the data again"
        )
    return tok
