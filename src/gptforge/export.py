"""A trained run as a standard Hugging Face model directory (`gptforge export`).

    gptforge export runs/char hf/char                # config.json, model.safetensors, generation_config.json,
                                                     # tokenizer.json, tokenizer_config.json, README.md

    from transformers import pipeline
    pipe = pipeline("text-generation", model="hf/char")
    pipe("ROMEO:", max_new_tokens=50, do_sample=False)   # = gptforge generate runs/char --temperature 0

    from gptforge.export import export_run
    export_run("runs/char", "hf/char", which="best")

The weights are written by gptforge.hf.save_pretrained (which also reads them back, with the tokenizer:
gptforge.hf.tokenizer_from_hf); this module adds the tokenizer files, the generation config and the
model card. The tokenizer is written with Hugging Face `tokenizers` alone, so exporting needs no `transformers` and no network:
- gpt2: GPT-2's own tokenizer files (tokenizer.json, vocab.json, merges.txt), rebuilt from the local
  tiktoken ranks: the vocabulary is the ranks under GPT-2's byte-to-unicode mapping, and each merge is
  recovered by running BPE over the token's bytes with the lower ranks only. <|endoftext|> (50256) is
  bos, eos and unk, as on the Hub's gpt2.
- bpe: the run's tokenizer.json as it is (byte-level BPE; one trained by gptforge has
  <|endoftext|> = 0 between documents, which is then bos/eos).
- char: a WordLevel model with one entry per character (same ids) behind a pre-tokenizer that
  isolates every character, and a decoder that joins them without spaces. Like gptforge, it refuses
  text with a character outside its vocabulary: encoding raises instead of inventing an unknown id
  the model never saw.
char runs (and bpe runs from before documents were separated) have no end-of-text token, so their
generation_config has no eos: generation runs for max_new_tokens (at most the context, n_positions). One difference from gptforge stays, as
on the Hub's gpt2: transformers reads a literal "<|endoftext|>" in the text as the special id,
where gptforge encodes it as ordinary characters.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptforge.data.tokenizers import bytes_to_unicode
from gptforge.errors import GptforgeError
from gptforge.hf import TOKENIZER_JSON, save_pretrained

if TYPE_CHECKING:
    from gptforge.data.tokenizers import Tokenizer
    from gptforge.model import GPT

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CARD = "README.md"


# --------------------------------------------------------------------------------------------- gpt2 files


def gpt2_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json and merges.txt contents from tiktoken's ranks (bytes -> rank).

    A token of rank r was made by merging two tokens of lower rank; which two is found by running
    BPE over its bytes with the merges of rank < r only, which stops at exactly those two parts.
    Sorted by rank, these pairs are GPT-2's 50,000 merges (~1 s in Python)."""
    to_str = bytes_to_unicode()

    def name(b: bytes) -> str:
        return "".join(to_str[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise GptforgeError(f"the BPE ranks cannot build token {token!r} from two lower-ranked tokens; "
                                "they are not a byte-level BPE vocabulary")
        merges.append((name(parts[0]), name(parts[1])))
    return {name(t): r for t, r in ranks.items()}, merges


def _gpt2_hf(tok: Tokenizer):
    """GPT-2's fast tokenizer (what the Hub's gpt2 tokenizer.json holds), from the tiktoken ranks."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    vocab, merges = gpt2_vocab_merges(tok.enc._mergeable_ranks)
    eot = tok.enc.decode([tok.eot_id])
    vocab[eot] = tok.eot_id  # in the vocabulary too, as in the Hub's gpt2 vocab.json (50,257 entries)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # ByteLevel's regex is GPT-2's pattern; so ids equal tiktoken's (checked on all of Tiny Shakespeare).
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    return hf, vocab, merges


# --------------------------------------------------------------------------------------------- char files


def _char_hf(tok: Tokenizer):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    # No unk_token: a character outside the vocabulary makes encoding raise, as gptforge does.
    hf = HFTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(tok.chars)}))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every code point alone
    hf.decoder = decoders.Fuse()  # join the characters as they are (no spaces between tokens)
    return hf


def write_tokenizer(tok: Tokenizer, directory: str | os.PathLike, model_max_length: int) -> None:
    """Write `tok` as Hugging Face tokenizer files that `AutoTokenizer.from_pretrained` loads."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "model_max_length": model_max_length,
        # transformers' clean-up would delete spaces before punctuation: decode must stay lossless.
        "clean_up_tokenization_spaces": False,
    }
    if tok.spec == "gpt2":
        hf, vocab, merges = _gpt2_hf(tok)
        eot = tok.enc.decode([tok.eot_id])
        config.update(tokenizer_class="GPT2Tokenizer", bos_token=eot, eos_token=eot, unk_token=eot,
                      add_bos_token=False, add_prefix_space=False, errors="replace")
        # The slow tokenizer's files too, as the Hub's gpt2 has them (older transformers, other tools).
        (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                      encoding="utf-8")
    elif tok.spec == "bpe":
        hf = tok.hf
        config.update(tokenizer_class="PreTrainedTokenizerFast")
        if tok.eot_id is not None:  # a BPE trained by gptforge has <|endoftext|> between documents
            eot = hf.id_to_token(tok.eot_id)
            config.update(bos_token=eot, eos_token=eot)
    elif tok.spec == "char":
        hf = _char_hf(tok)
        config.update(tokenizer_class="PreTrainedTokenizerFast")
    else:
        raise GptforgeError(f"cannot export a {tok.spec!r} tokenizer; gpt2, bpe and char are supported")
    hf.save(str(d / TOKENIZER_JSON))
    _write_json(d / TOKENIZER_CONFIG, config)


# --------------------------------------------------------------------------------------------- export


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, which: str = "latest",
               force: bool = False) -> Path:
    """`gptforge export RUN OUT`: write OUT so that transformers loads it as it is (config.json,
    model.safetensors, generation_config.json, tokenizer files, README.md model card, loss.png).

    OUT must not exist or be empty, unless `force` (then it is replaced). Everything is written
    into a temporary directory beside OUT and renamed into place at the end, so a failure leaves
    no half-written OUT. Returns OUT."""
    from gptforge.runs import load_model, resolve_checkpoint, run_dir_of

    out = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." has no name to put a temp dir beside
    run = Path(run_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise GptforgeError(f"{out} exists and is not a directory; choose a new OUT")
        if any(out.iterdir()) and not force:
            raise GptforgeError(f"{out} exists and is not empty; choose a new OUT or pass --force to replace it")
        if run.resolve() == out.resolve() or out.resolve() in run.resolve().parents:
            raise GptforgeError(f"{out} holds the run {run}; choose an OUT outside it")
    ckpt = resolve_checkpoint(run, which)
    model, tok, info = load_model(ckpt, device="cpu")
    run = run_dir_of(ckpt)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _write_model(model, tok, tmp)
        write_tokenizer(tok, tmp, model_max_length=model.config.block_size)
        has_plot = (run / "loss.png").is_file()
        if has_plot:
            shutil.copy2(run / "loss.png", tmp / "loss.png")
        card = model_card(model, tok, info, run, ckpt, out.name, has_plot)
        (tmp / CARD).write_text(card, encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only directory: one line, nothing left behind
            kept = "; it is unchanged" if out.exists() else ""
            raise GptforgeError(f"could not write {out} ({e.strerror or type(e).__name__}){kept}; "
                                "free some space or choose another OUT") from None
        raise
    return out


def _write_model(model: GPT, tok: Tokenizer, d: Path) -> None:
    """config.json + model.safetensors (save_pretrained) with the tokenizer's special ids, and
    generation_config.json."""
    save_pretrained(model, d)
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    # Explicit, null included: GPT2Config defaults both to 50256, which is no id of a char or bpe vocabulary.
    config.update(bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    _write_json(d / "config.json", config)
    generation: dict[str, Any] = {"_from_model_config": False}
    if tok.eot_id is not None:
        # pad = eos, as for GPT-2: batches pad with it, and generate() stops at it.
        generation.update(bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)
    _write_json(d / GENERATION_CONFIG, generation)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`; an existing `out` (--force) is set aside first and only
    deleted once the new one is in place, or put back if that fails."""
    if out.is_dir() and not any(out.iterdir()):
        # An empty OUT stays the same directory (it may be the shell's working directory): the
        # files (all plain) move in, and back out if a move fails.
        moved = []
        try:
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
                moved.append(f.name)
        except BaseException:
            for name in moved:
                os.replace(out / name, tmp / name)
            raise
        tmp.rmdir()
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- model card


_TOKENIZER_TEXT = {
    "gpt2": "GPT-2's byte-level BPE ({vocab:,} ids; `<|endoftext|>` = {eot} is bos/eos). Generation "
            "stops at `<|endoftext|>` (like `gptforge generate --stop-at-eot`).",
    "bpe": "a byte-level BPE trained on the corpus with Hugging Face `tokenizers` ({vocab:,} ids; "
           "`<|endoftext|>` = {eot}, between documents, is bos/eos where the run has it).",
    "char": "one id per character of the corpus ({vocab:,} ids, no special tokens). Text with a "
            "character outside the vocabulary cannot be encoded (the tokenizer raises). There is no "
            "end-of-text token: generation runs for `max_new_tokens`.",
}


def _losses(run: Path, step: Any, info: dict) -> tuple[dict[str, Any], bool]:
    """The numbers at the checkpoint's step (train_loss, val_loss and, for runs that logged them,
    train_bpb, val_bpb, train_loss_tokens) and whether an evaluation measured them (else the
    checkpoint's info)."""
    from gptforge.io import iter_jsonl

    path = run / "metrics.jsonl"
    if path.is_file() and step is not None:
        evals = [r for _, r in iter_jsonl(path) if r.get("kind") == "eval" and r.get("step") == step]
        if evals:
            return evals[-1], True
    return {"train_loss": info.get("train_loss"), "val_loss": info.get("val_loss")}, False


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if not isinstance(x, (int, float)) else format(x, spec)


def model_card(model: GPT, tok: Tokenizer, info: dict, run: Path, ckpt: Path, name: str,
               has_plot: bool) -> str:
    """README.md for the exported directory: the Hub's metadata header, what the model is, how
    well it did and how to load it."""
    c = model.config
    corpus = None
    if (run / "config.toml").is_file():
        try:
            from gptforge.config import load_config

            corpus = load_config(run / "config.toml").data.corpus
        except GptforgeError:
            corpus = None
    # Names of local files only: their directories say nothing to a reader and may be private.
    sources = corpus if isinstance(corpus, (list, tuple)) else [corpus] if corpus else []
    corpus = ", ".join(Path(str(x)).name if ("/" in str(x) or os.sep in str(x)) else str(x) for x in sources)
    step = info.get("step")
    ev, evaluated = _losses(run, step, info)
    whole_train = ev.get("train_loss_tokens") is not None  # stop_metric = "train_full": a memorisation run
    how = ("from the checkpoint (train: the last training batch)" if not evaluated else
           "measured by the run's evaluation at this step, over every token of the training split (the run "
           "trained to a loss on it: it memorises) and batches of the validation split" if whole_train else
           "measured by the run's evaluation at this step, on batches of the training and the validation split")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- gptforge",
        "- gpt2",
        "- text-generation",
        "---",
        "",
        f"# {name}",
        "",
        "A GPT-2-style language model trained from scratch with gptforge and exported with "
        "`gptforge export`. It is a standard "
        "`GPT2LMHeadModel`: transformers loads it as it is.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {model.num_params():,} |",
        f"| shape | {_count(c.n_layer, 'layer')}, {_count(c.n_head, 'head')}, {c.n_embd} wide |",
        f"| context | {c.block_size} tokens (n_positions: the model cannot see more) |",
        f"| tokenizer | {tok.spec}: {_TOKENIZER_TEXT[tok.spec].format(vocab=tok.vocab_size, eot=tok.eot_id)} |",
        f"| data | {corpus if corpus else 'n/a'} |",
        f"| steps | {_fmt(step, ',')} ({_fmt(info.get('tokens'), ',')} training tokens) |",
        f"| train loss | {_fmt(ev.get('train_loss'), '.4f')} |",
        f"| validation loss | {_fmt(ev.get('val_loss'), '.4f')} |",
        f"| train bits per byte | {_fmt(ev.get('train_bpb'), '.4f')} |",
        f"| validation bits per byte | {_fmt(ev.get('val_bpb'), '.4f')} |",
        f"| checkpoint | `{ckpt.name}` of run `{run.name}` |",
        "",
        "Losses are the mean cross-entropy of the next token, in nats per token (lower is better; "
        f"exp(loss) is the perplexity), {how}. The validation split is the end of the corpus, "
        "never trained on: a validation loss well above the train loss means the model memorises. "
        "Bits per byte are the same nats over the UTF-8 bytes of the predicted tokens (divided by ln 2; "
        "`<|endoftext|>` counts 0 bytes): unlike a loss per token they compare across tokenizers.",
        "",
    ]
    if has_plot:
        lines += ["![training and validation loss](loss.png)", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("text-generation", model="{name}")  # this directory, or its Hub repository id',
        'print(pipe("ROMEO:", max_new_tokens=50, do_sample=False)[0]["generated_text"])',
        "",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        "```",
        "",
        "Greedy decoding (`do_sample=False`) gives the text of `gptforge generate RUN --temperature 0`. "
        "To fine-tune it further with gptforge: "
        f"`gptforge train --init {name} data.tokenizer={tok.spec} data.corpus=...`.",
        "",
    ]
    return "\n".join(lines)
