"""Tokenizers: known facts, exact round trips, chunked == one-shot encoding, save/load as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptforge.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    build_tokenizer,
    load_tokenizer,
    split_for_batch,
)
from gptforge.errors import GptforgeError

EDGE_CASES = [
    "",
    "👍🏽 family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵",  # emoji, skin tone, ZWJ sequences, regional indicators
    "cafe\u0301 vs caf\u00e9, Z\u0351\u0358a\u0300\u0311lgo\u0302",  # combining marks (no normalisation!)
    "line one\r\nline two\r\n\r\n  indented\tand tabs\t\n",  # CRLF, tabs, blank lines
    "bell\x07 backspace\x08 esc\x1b[31m form\x0c vt\x0b del\x7f c1\x85\u2028\u2029",  # control characters
    "日本語のテキスト، العربية، עברית, ελληνικά",
    "<|endoftext|> is ordinary text here",
    "   leading and trailing spaces   ",
    "\n\n\n\nmany\n\n\n newlines \n \n",
]


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return build_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bpe(shakespeare_text) -> BPETokenizer:
    return build_tokenizer("bpe", shakespeare_text[:200_000], vocab_size=512)


def test_gpt2_known_facts(gpt2, shakespeare_text):
    assert (gpt2.spec, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 50257, 50256)
    ids = gpt2.encode_to_array(shakespeare_text)  # chunked, multi-threaded
    assert len(ids) == 338_025
    one_shot = gpt2.enc.encode_ordinary(shakespeare_text)
    assert ids.tolist() == one_shot
    assert gpt2.decode(one_shot) == shakespeare_text
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids


def test_chunking_never_changes_the_tokens(gpt2, bpe):
    # Text full of places where a naive cut would change GPT-2's pre-tokenisation: runs of spaces
    # and newlines, spaces before newlines, contractions and digits right after line breaks.
    rng = np.random.default_rng(0)
    pieces = ["word", " ", "  ", "\n", "\n\n", "\n\n\n", " \n", "'s", "'ll", "123", "!", "\t", "é", "👍", "\r\n"]
    text = "".join(rng.choice(pieces, size=20_000).tolist())
    chunks = split_for_batch(text, chunk_chars=64)
    assert len(chunks) > 50 and "".join(chunks) == text
    for tok, one_shot in ((gpt2, gpt2.enc.encode_ordinary), (bpe, bpe.encode)):
        batched = [i for ids in tok.encode_batch(chunks) for i in ids]
        assert batched == one_shot(text)


def test_windows_line_endings_are_cut_too(gpt2, bpe, shakespeare_text):
    text = shakespeare_text[:300_000].replace("\n", "\r\n")
    chunks = split_for_batch(text, chunk_chars=4096)
    assert len(chunks) > 50 and "".join(chunks) == text
    assert gpt2.encode_to_array(text).tolist() == gpt2.enc.encode_ordinary(text)
    assert [i for ids in bpe.encode_batch(chunks) for i in ids] == bpe.encode(text)


def test_text_without_safe_cuts_stays_whole():
    assert split_for_batch("x" * 1000, chunk_chars=10) == ["x" * 1000]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_round_trip_edge_cases(gpt2, bpe, text):
    assert gpt2.decode(gpt2.encode(text)) == text
    assert bpe.decode(bpe.encode(text)) == text  # byte-level: characters never seen in training too
    char = CharTokenizer.from_text(text or "x")
    assert char.decode(char.encode(text)) == text


def test_char_known_facts_and_unknown_characters(shakespeare_text):
    char = build_tokenizer("char", shakespeare_text)
    assert (char.spec, char.vocab_size, char.eot_id) == ("char", 65, None)
    assert char.chars == sorted(set(shakespeare_text))
    ids = char.encode_to_array(shakespeare_text)
    assert len(ids) == len(shakespeare_text) and ids.max() == 64
    assert char.decode(ids.tolist()) == shakespeare_text
    with pytest.raises(GptforgeError, match=r"2 character\(s\) the char tokenizer does not know: '@', '👍'"):
        char.encode("hello @ 👍 world")


def test_char_errors_say_exactly_what_is_wrong():
    """The unknown-character message lists the first ten (sorted), then "...", then what to do; an
    empty text names itself (mutation-testing survivors: the count shown, the ellipsis, the advice)."""
    char = CharTokenizer(list("abc"))
    unknown = "".join(chr(ord("A") + i) for i in range(12))  # A..L, twelve unknown characters
    with pytest.raises(GptforgeError) as e:
        char.encode_to_array("ab" + unknown)
    shown = ", ".join(repr(c) for c in unknown[:10])
    assert str(e.value) == (f"text has 12 character(s) the char tokenizer does not know: {shown}, ...; build the "
                            "tokenizer from text that contains them, or use the gpt2 or bpe tokenizer")
    for n, more in ((10, ""), (11, ", ...")):  # the ellipsis only past ten
        with pytest.raises(GptforgeError) as e:
            char.encode_to_array(unknown[:n])
        assert f"{', '.join(repr(c) for c in unknown[:10])}{more}; build" in str(e.value)
    with pytest.raises(GptforgeError) as e:
        char.encode_to_array("abZ")
    assert str(e.value).startswith("text has 1 character(s) the char tokenizer does not know: 'Z'; build")
    with pytest.raises(GptforgeError, match=r"^cannot build a char tokenizer from empty text$"):
        CharTokenizer.from_text("")


def test_byte_lengths_are_computed_once_and_read_only(shakespeare_text):
    char = CharTokenizer.from_text(shakespeare_text + "é")
    lengths = char.byte_lengths()
    assert char.byte_lengths() is lengths and not lengths.flags.writeable
    assert lengths.tolist() == [len(c.encode("utf-8")) for c in char.chars] and lengths.max() == 2


def test_bpe_learns_merges_and_round_trips(bpe, shakespeare_text):
    # (The whole corpus, trained at full size, round-trips in test_prepare_cli's bpe test.)
    # Id 0 is reserved for <|endoftext|>, the document separator.
    assert (bpe.spec, bpe.vocab_size, bpe.eot_id) == ("bpe", 512, 0)
    text = shakespeare_text[-300_000:]  # mostly text it was not trained on
    ids = bpe.encode_to_array(text)
    assert ids.max() < 512 and len(set(ids.tolist())) > 256 and 0 not in ids
    assert len(ids) < 0.6 * len(text)  # it learned merges (255 of them: ~1.9 characters a token)
    assert bpe.decode(ids.tolist()) == text
    assert bpe.decode([0]) == "<|endoftext|>"
    # As with GPT-2's, the separator's text in a corpus is ordinary characters, never the id, also
    # after a save and load (tokenizer.json does not store that setting).
    literal = "the end<|endoftext|>begin"
    assert 0 not in bpe.encode(literal) and bpe.decode(bpe.encode(literal)) == literal


def test_batch_arrays_equal_one_by_one(gpt2, bpe, shakespeare_text, monkeypatch):
    from gptforge.data import tokenizers as tok_mod

    texts = [shakespeare_text[:5000], "", "ROMEO: <|endoftext|> x", shakespeare_text[-7000:]]
    char = build_tokenizer("char", shakespeare_text + "<|>")
    for threads in (None, 1):  # in process (threads) and as in a worker process
        monkeypatch.setattr(tok_mod, "MAX_THREADS", threads)
        for tok in (gpt2, bpe, char):
            arrays = tok.encode_batch_arrays(texts)
            assert [a.tolist() for a in arrays] == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("size", [0, 256, 65537, -5])
def test_bpe_vocab_size_out_of_range(size):
    with pytest.raises(GptforgeError, match=f"bpe vocabulary size {size} is out of range; choose 257..65536"):
        build_tokenizer("bpe", "some text", vocab_size=size)


def test_unknown_spec_and_misuse():
    with pytest.raises(GptforgeError, match="unknown tokenizer 'wordpiece'; choose one of gpt2, char, bpe"):
        build_tokenizer("wordpiece", "text")
    with pytest.raises(GptforgeError, match="only applies to the bpe"):
        build_tokenizer("char", "text", vocab_size=300)
    with pytest.raises(GptforgeError, match="pass its text"):
        build_tokenizer("char")


def test_decode_never_fails_below_vocab_size(gpt2, bpe):
    for tok in (gpt2, bpe):
        ids = list(range(0, tok.vocab_size, max(1, tok.vocab_size // 997))) + [tok.vocab_size - 1]
        assert isinstance(tok.decode(ids), str)
        for i in ids[:300]:
            assert isinstance(tok.decode([i]), str)  # lone bytes of multi-byte characters included


def test_save_load_round_trip(tmp_path, gpt2, bpe, shakespeare_text):
    char = build_tokenizer("char", shakespeare_text)
    sample = shakespeare_text[:5000]
    for tok in (gpt2, char, bpe):
        d = tmp_path / tok.spec
        tok.save(d)
        # JSON only (no pickles), but for gpt2's ranks in tiktoken's own text format.
        for f in d.iterdir():
            if f.name != "gpt2.tiktoken":
                json.loads(f.read_text(encoding="utf-8"))
        loaded = load_tokenizer(d)
        assert type(loaded) is type(tok)
        assert (loaded.spec, loaded.vocab_size, loaded.eot_id) == (tok.spec, tok.vocab_size, tok.eot_id)
        assert loaded.encode(sample) == tok.encode(sample)
        assert loaded.decode(tok.encode(sample)) == sample
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == ["gptforge_tokenizer.json", "tokenizer.json"]


def test_load_errors(tmp_path):
    with pytest.raises(GptforgeError, match="holds no saved tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "gptforge_tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(GptforgeError, match="is damaged"):
        load_tokenizer(tmp_path)
    (tmp_path / "gptforge_tokenizer.json").write_text('{"spec": "bpe", "vocab_size": 300}', encoding="utf-8")
    with pytest.raises(GptforgeError, match="cannot load .*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_gpt2_offline_without_data_dir_is_a_one_line_error(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")  # what tiktoken's download raises with no network

    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(tmp_path))  # a data directory without gpt2.tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(GptforgeError, match="cannot load GPT-2's BPE.*r50k_base.tiktoken.*GPTFORGE_DATA_DIR"):
        build_tokenizer("gpt2")


def test_a_saved_gpt2_tokenizer_carries_its_ranks_and_loads_offline(tmp_path, monkeypatch, gpt2, data_dir):
    import tiktoken

    gpt2.save(tmp_path / "tok")
    ranks = (tmp_path / "tok" / "gpt2.tiktoken").read_bytes()
    assert ranks == (data_dir / "gpt2" / "gpt2.tiktoken").read_bytes()  # byte for byte r50k_base.tiktoken

    def offline(name):
        raise ConnectionError("no network")

    # No data directory, no download: the saved copy is all there is.
    monkeypatch.delenv("GPTFORGE_DATA_DIR")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(GptforgeError, match="cannot load GPT-2's BPE"):
        build_tokenizer("gpt2")
    loaded = load_tokenizer(tmp_path / "tok")
    text = "Café 東京 🙂 <|endoftext|>\r\n  ROMEO:"
    assert loaded.encode(text) == gpt2.encode(text) and loaded.eot_id == 50256

    # A run saved before the ranks were bundled still loads from the data directory, as it did. (A new
    # directory: the encoding of a ranks file already read is cached by its path.)
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(data_dir))
    gpt2.save(tmp_path / "legacy")
    (tmp_path / "legacy" / "gpt2.tiktoken").unlink()
    assert load_tokenizer(tmp_path / "legacy").encode(text) == gpt2.encode(text)

    # A damaged copy is refused in one line, never used.
    gpt2.save(tmp_path / "damaged")
    (tmp_path / "damaged" / "gpt2.tiktoken").write_bytes(ranks[:-100])
    with pytest.raises(GptforgeError, match="not GPT-2's BPE ranks file"):
        load_tokenizer(tmp_path / "damaged")


# The tests below were added for mutants that survived `make mutate` (docs/testing.md).


def test_load_errors_say_exactly_what_is_wrong(tmp_path):
    """Each way a saved tokenizer can be missing or damaged is named in one line, with the way out."""
    meta = tmp_path / "gptforge_tokenizer.json"

    def error() -> str:
        with pytest.raises(GptforgeError) as e:
            load_tokenizer(tmp_path)
        return str(e.value)

    assert error() == f"{tmp_path} holds no saved tokenizer (gptforge_tokenizer.json is missing)"
    for text, cause in (("{not json", "JSONDecodeError"), ("{}", "KeyError"), ("[]", "TypeError")):
        meta.write_text(text, encoding="utf-8")
        assert error() == f"{meta} is damaged ({cause}); prepare the data again"
    for chars in ("", ', "chars": "abc"'):  # no list of characters, or a string instead of one
        meta.write_text('{"spec": "char", "vocab_size": 3' + chars + "}", encoding="utf-8")
        assert error() == f"{meta} has no character list; prepare the data again"
    meta.write_text('{"spec": "wordpiece", "vocab_size": 3}', encoding="utf-8")
    assert error() == f"{meta} names an unknown tokenizer 'wordpiece'; choose one of gpt2, char, bpe"
    meta.write_text('{"spec": "char", "vocab_size": 4, "chars": ["a", "b", "c"]}', encoding="utf-8")
    assert error() == f"{tmp_path} says vocabulary 4 but the tokenizer has 3; prepare the data again"
    meta.write_text('{"spec": "bpe", "vocab_size": 300}', encoding="utf-8")
    message = error()
    assert message.startswith(f"cannot load {tmp_path / 'tokenizer.json'} (") and message.endswith(
        "); prepare the data again")


def test_save_makes_missing_directories_and_replaces_an_earlier_save(tmp_path, gpt2, bpe, shakespeare_text):
    """`save(directory)` creates the directory and its parents, and saving again into it replaces the
    files (a run re-prepared in place), leaving exactly the tokenizer's files and no temporary ones."""
    char = build_tokenizer("char", shakespeare_text)
    files = {"gpt2": ["gpt2.tiktoken", "gptforge_tokenizer.json"], "char": ["gptforge_tokenizer.json"],
             "bpe": ["gptforge_tokenizer.json", "tokenizer.json"]}
    sample = "ROMEO: Café 🙂\r\n<|endoftext|> x"
    for tok in (gpt2, char, bpe):
        d = tmp_path / "runs" / "new" / tok.spec  # no parent exists yet
        tok.save(d)
        tok.save(d)
        assert sorted(p.name for p in d.iterdir()) == files[tok.spec]
        loaded = load_tokenizer(d)
        text = sample if tok.spec != "char" else "ROMEO: x"
        assert loaded.encode(text) == tok.encode(text) and loaded.decode(tok.encode(text)) == text


def test_gpt2_ranks_errors_name_the_file_and_the_cause(tmp_path):
    """A ranks file that cannot be read, or is not r50k_base's, is refused in one line naming it."""
    missing = tmp_path / "gpt2.tiktoken"
    with pytest.raises(GptforgeError) as e:
        GPT2Tokenizer(missing)
    assert str(e.value) == f"cannot read GPT-2's BPE ranks {missing} (FileNotFoundError)"
    missing.write_bytes(b"aGVsbG8= 0\n")
    with pytest.raises(GptforgeError) as e:
        GPT2Tokenizer(missing)
    assert str(e.value) == (f"{missing} is not GPT-2's BPE ranks file (its sha256 differs); replace it with "
                            "r50k_base.tiktoken or delete it")


def test_bpe_training_takes_the_vocabulary_size_asked_for_and_refuses_empty_text(shakespeare_text):
    for size in (300, 700):
        tok = BPETokenizer.train(shakespeare_text[:100_000], size)
        assert tok.vocab_size == size
        assert tok.decode(tok.encode(shakespeare_text[:500])) == shakespeare_text[:500]
    with pytest.raises(GptforgeError) as e:
        BPETokenizer.train("")
    assert str(e.value) == "cannot train a bpe tokenizer on empty text"


def test_bpe_vocabulary_sizes_at_the_limits_and_the_default(shakespeare_text, bpe):
    from gptforge.data.tokenizers import BPE_VOCAB_DEFAULT, check_bpe_vocab_size

    assert (check_bpe_vocab_size(257), check_bpe_vocab_size(65536)) == (257, 65536)  # both ends allowed
    assert bpe.vocab_size == 512  # the fixture's size, passed through build_tokenizer
    assert build_tokenizer("bpe", shakespeare_text).vocab_size == BPE_VOCAB_DEFAULT == 4096
    # A bad size is refused before anything asks for the text to train on.
    with pytest.raises(GptforgeError, match="bpe vocabulary size 5 is out of range"):
        build_tokenizer("bpe", None, vocab_size=5)


def test_a_bpe_vocabulary_counts_its_added_tokens(bpe):
    """Ids of tokens added after training (a tokenizer.json from elsewhere) are part of the vocabulary
    the model must cover."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(bpe.hf.to_str())
    hf.add_special_tokens(["<|pad|>"])
    tok = BPETokenizer(hf)
    assert tok.vocab_size == bpe.vocab_size + 1 == hf.token_to_id("<|pad|>") + 1
    assert tok.byte_lengths()[-1] == 0  # special: stands for no text


def test_bpe_save_makes_missing_parent_directories(tmp_path, bpe):
    d = tmp_path / "a" / "b" / "tokenizer"
    bpe.save(d)
    assert load_tokenizer(d).encode("ROMEO: hi") == bpe.encode("ROMEO: hi")


def test_char_tokenizer_needs_single_characters():
    for chars in ([], ["ab", "c"], ["a", ""]):
        with pytest.raises(GptforgeError) as e:
            CharTokenizer(chars)
        assert str(e.value) == "a char tokenizer needs a non-empty list of single characters"


def test_saved_metadata_names_the_tokenizer_and_a_char_save_makes_its_directories(tmp_path, gpt2, bpe):
    char = CharTokenizer("ba\n")
    d = tmp_path / "x" / "y" / "char"  # no parent exists yet
    char.save(d)
    meta = json.loads((d / "gptforge_tokenizer.json").read_text(encoding="utf-8"))
    assert meta == {"spec": "char", "vocab_size": 3, "eot_id": None, "chars": ["\n", "a", "b"]}
    for tok in (gpt2, bpe):
        tok.save(tmp_path / tok.spec)
        meta = json.loads((tmp_path / tok.spec / "gptforge_tokenizer.json").read_text(encoding="utf-8"))
        assert meta == {"spec": tok.spec, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}
    assert (gpt2.eot_id, bpe.eot_id) == (50256, 0)


def test_a_bpe_vocabulary_that_is_not_byte_level_cannot_count_bytes():
    """Bits per byte need each token's bytes; a tokenizer.json whose tokens are not GPT-2's byte
    alphabet (one made elsewhere) is refused by name rather than counted wrong."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    tok = BPETokenizer(HFTokenizer(models.BPE(vocab={"a": 0, "☃": 1}, merges=[])))
    with pytest.raises(GptforgeError) as e:
        tok.byte_lengths()
    assert str(e.value) == "bpe token '☃' (id 1) is not byte-level; cannot count its bytes"
