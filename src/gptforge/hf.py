"""A trained run as a standard Hugging Face model directory, and the tokenizer found in one.

    gptforge export runs/char hf/char                # config.json, model.safetensors, generation_config.json,
                                                     # tokenizer.json, tokenizer_config.json, README.md

    from transformers import pipeline
    pipe = pipeline("text-generation", model="hf/char")
    pipe("ROMEO:", max_new_tokens=50, do_sample=False)   # = gptforge generate runs/char --temperature 0

    from gptforge.hf import export_run, tokenizer_from_hf
    export_run("runs/char", "hf/char", which="best")
    tok = tokenizer_from_hf("hf/char")               # the gptforge tokenizer again (train --init uses it)

Weights: `load_pretrained(dir_or_hub_name)` reads GPT-2 weights in Hugging Face's layout into a gptforge
GPT (train --init uses it); `save_pretrained(model, dir)` writes a GPT in that layout (padded vocabulary
rows dropped), which transformers.GPT2LMHeadModel loads. The tokenizer
is written with Hugging Face `tokenizers` alone, so exporting needs no `transformers` and no network:
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

import torch

from gptforge.data.tokenizers import bytes_to_unicode
from gptforge.errors import GptforgeError

if TYPE_CHECKING:
    from gptforge.data.tokenizers import Tokenizer
    from gptforge.model import GPT, GPTConfig

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CARD = "README.md"


# --------------------------------------------------------------------------------------------- GPT-2 weights


def load_pretrained(name_or_dir: str | Path, **overrides: Any) -> GPT:
    """Load a GPT-2 checkpoint in Hugging Face's layout as a gptforge GPT.

        load_pretrained("hf-gpt2/")                 # config.json + model.safetensors (or pytorch_model.bin)
        load_pretrained("gpt2", dropout=0.1)        # a Hub name, downloaded when online

    Overrides may set `dropout`, `pad_vocab_multiple` or a smaller `block_size` (the position
    embeddings are cropped). Weights are read with safetensors or torch.load(weights_only=True):
    loading never runs pickled code.
    """
    from gptforge.model import GPT

    directory = _resolve_pretrained(name_or_dir)
    hf = _read_config_json(directory / "config.json")
    config = _config_from_hf(hf, directory, overrides)
    state = _read_hf_weights(directory)
    model = GPT(config)
    _load_hf_state(model, state, directory)
    return model


def save_pretrained(model: GPT, directory: str | Path) -> None:
    """Write `config.json` + `model.safetensors` that `transformers.GPT2LMHeadModel.from_pretrained`
    loads. Padded vocabulary rows are dropped; with `bias=False` the biases are written as zeros
    (which computes the same thing)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_config_to_hf(model.config), indent=2) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in hf_state(model).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def hf_state(model: GPT) -> dict[str, torch.Tensor]:
    """A GPT's weights under Hugging Face's names. Its Conv1D stores (in, out), nn.Linear (out, in)."""
    c, V = model.config, model.config.vocab_size
    t = model.transformer
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": t.wte.weight[:V],
        "transformer.wpe.weight": t.wpe.weight,
    }

    def ln(prefix: str, module: torch.nn.LayerNorm) -> None:
        out[f"{prefix}.weight"] = module.weight
        out[f"{prefix}.bias"] = (
            module.bias if module.bias is not None else torch.zeros_like(module.weight)
        )

    def linear(prefix: str, module: torch.nn.Linear) -> None:
        out[f"{prefix}.weight"] = module.weight.t()
        out[f"{prefix}.bias"] = (
            module.bias if module.bias is not None else module.weight.new_zeros(module.out_features)
        )

    for i, block in enumerate(t.h):
        p = f"transformer.h.{i}"
        ln(f"{p}.ln_1", block.ln_1)
        linear(f"{p}.attn.c_attn", block.attn.c_attn)
        linear(f"{p}.attn.c_proj", block.attn.c_proj)
        ln(f"{p}.ln_2", block.ln_2)
        linear(f"{p}.mlp.c_fc", block.mlp.c_fc)
        linear(f"{p}.mlp.c_proj", block.mlp.c_proj)
    ln("transformer.ln_f", t.ln_f)
    # Tied: the head *is* wte, and safetensors refuses two names for one storage, so (like
    # transformers) we write wte only and tie_word_embeddings=true makes the loader re-tie it.
    if not c.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight[:V]
    return out


@torch.no_grad()
def _load_hf_state(model: GPT, state: dict[str, torch.Tensor], source: Path) -> None:
    # Old checkpoints (the original "gpt2" upload) have no "transformer." prefix.
    state = {
        k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
        for k, v in state.items()
    }
    V, c = model.config.vocab_size, model.config
    ours = hf_state(model)
    for name, target in ours.items():
        if name not in state:
            raise GptforgeError(f"{source}: weight {name} is missing; is this a GPT-2 checkpoint?")
        src = state[name]
        if name == "transformer.wpe.weight":
            src = src[: c.block_size]  # a smaller block_size override crops the positions
        if tuple(src.shape) != tuple(target.shape):
            raise GptforgeError(
                f"{source}: weight {name} has shape {tuple(src.shape)}, expected {tuple(target.shape)} "
                "from config.json; the checkpoint and its config disagree"
            )
        target.copy_(src.to(target.dtype))
    if not c.tie_embeddings and "lm_head.weight" not in state:
        raise GptforgeError(f"{source}: untied checkpoint without lm_head.weight")
    # Padded rows never get probability; zero them so they are inert, as a fresh model would be.
    model.transformer.wte.weight[V:].zero_()
    if model.lm_head is not None:
        model.lm_head.weight[V:].zero_()


_HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation


def _resolve_pretrained(name_or_dir: str | Path) -> Path:
    """A local directory as is; otherwise a Hub name, downloaded (config + weights) when online."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise GptforgeError(
            f"{name}: not a directory holding config.json and model.safetensors; give a Hugging Face "
            "GPT-2 directory or a Hub name such as gpt2"
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise GptforgeError(
            f"{name}: downloading from the Hub needs huggingface_hub; pip install 'gptforge[hf]'"
        ) from e
    try:
        config = hf_hub_download(name, "config.json")
    except Exception as e:  # offline, unknown repository, ...: one line for the user
        raise GptforgeError(
            f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}); check the name and "
            "your connection, or pass a local directory with config.json and model.safetensors"
        ) from e
    for weights in ("model.safetensors", "pytorch_model.bin"):
        try:
            hf_hub_download(name, weights)
            break
        except Exception:  # noqa: S112 - try the next file name
            continue
    else:
        raise GptforgeError(f"{name}: the Hub repository has neither model.safetensors nor pytorch_model.bin")
    return Path(config).parent


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise GptforgeError(f"{path} is missing; a Hugging Face GPT-2 directory has config.json") from e
    except (OSError, ValueError) as e:
        raise GptforgeError(f"{path} is not readable JSON ({e}); re-export the checkpoint") from e
    if not isinstance(data, dict):
        raise GptforgeError(f"{path} is not a JSON object; re-export the checkpoint")
    return data


def _config_from_hf(hf: dict[str, Any], directory: Path, overrides: dict[str, Any]) -> GPTConfig:
    from gptforge.model import GPTConfig

    if hf.get("model_type", "gpt2") != "gpt2":
        raise GptforgeError(
            f"{directory}: model_type {hf.get('model_type')!r} is not gpt2; only GPT-2 checkpoints load"
        )
    act = hf.get("activation_function", "gelu_new")
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner")
    if act not in _HF_ACTIVATIONS or (n_inner is not None and n_inner != 4 * n_embd):
        raise GptforgeError(
            f"{directory}: activation {act!r} / n_inner {n_inner!r} differ from GPT-2's (gelu_new, 4*n_embd); "
            "this model cannot hold that checkpoint"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise GptforgeError(f"{directory}: non-standard attention scaling in config.json is not supported")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise GptforgeError(f"{directory}: layer_norm_epsilon {eps} differs from GPT-2's 1e-5; not supported")
    allowed = {"dropout", "pad_vocab_multiple", "block_size"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise GptforgeError(
            f"cannot override {', '.join(bad)} of a pretrained model; only {', '.join(sorted(allowed))} may change"
        )
    n_positions = hf.get("n_positions", hf.get("n_ctx", 1024))
    if overrides.get("block_size", n_positions) > n_positions:
        raise GptforgeError(
            f"block_size={overrides['block_size']} exceeds the checkpoint's n_positions={n_positions}"
        )
    fields_ = dict(
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        block_size=n_positions,
        vocab_size=hf.get("vocab_size", 50257),
        dropout=0.0,
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
    return GPTConfig(**{**fields_, **overrides})


def _config_to_hf(c: GPTConfig) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_inner": None,
        "vocab_size": c.vocab_size,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "resid_pdrop": c.dropout,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": "float32",
    }
    if c.vocab_size == 50257:  # GPT-2's BPE: <|endoftext|> starts and ends documents
        hf["bos_token_id"] = hf["eos_token_id"] = 50256
    return hf


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors, else pytorch_model.bin; never unpickles arbitrary objects."""
    st, pt = directory / "model.safetensors", directory / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as e:
            raise GptforgeError(
                f"{st} is damaged or not a safetensors file ({e}); download or export it again"
            ) from e
    if pt.is_file():
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for anything but tensors and plain containers
            raise GptforgeError(
                f"{pt} was refused: it is not a plain tensor file loadable with weights_only=True "
                f"({type(e).__name__}); convert it to model.safetensors"
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise GptforgeError(f"{pt} does not hold a dict of tensors; convert it to model.safetensors")
        return state
    raise GptforgeError(
        f"{directory} has neither model.safetensors nor pytorch_model.bin; give a GPT-2 checkpoint directory"
    )


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


# --------------------------------------------------------------------------------------------- read back


def tokenizer_from_hf(directory: str | os.PathLike) -> Tokenizer | None:
    """The gptforge tokenizer a Hugging Face directory holds (same ids), or None when it has no
    tokenizer.json (a bare GPT-2 checkpoint: GPT-2's tokenizer is then assumed, as before).

    gpt2: a byte-level BPE whose vocabulary is exactly GPT-2's ranks (checked by their sha256) plus
    <|endoftext|>; char: a WordLevel vocabulary of single characters in sorted order (what gptforge's
    char tokenizer assigns); bpe: any other byte-level BPE tokenizer.json, used as it is."""
    from gptforge.data.tokenizers import BPETokenizer, CharTokenizer, GPT2Tokenizer

    d = Path(directory)
    path = d / TOKENIZER_JSON
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
        kind, vocab = model["type"], model["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GptforgeError(f"{path} is not a readable Hugging Face tokenizer ({type(e).__name__}); "
                            "export the model again") from None
    if kind == "WordLevel":
        chars = sorted(vocab, key=vocab.get)
        if (any(len(c) != 1 for c in chars) or chars != sorted(chars)
                or [vocab[c] for c in chars] != list(range(len(chars)))):
            raise GptforgeError(f"{path} is a WordLevel vocabulary but not a gptforge char vocabulary (single "
                                "characters with ids 0..n-1 in sorted order); gptforge cannot train with it")
        return CharTokenizer(chars)
    pre = json.dumps(spec.get("pre_tokenizer"))
    if kind != "BPE" or '"ByteLevel"' not in pre or isinstance(vocab, list):
        raise GptforgeError(f"{path} is a {kind} tokenizer; gptforge trains with byte-level BPE (gpt2, bpe) or "
                            "char vocabularies only")
    if _is_gpt2_vocab(vocab, spec.get("added_tokens") or []):
        return GPT2Tokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise GptforgeError(f"cannot load {path} ({e}); export the model again") from None


def _is_gpt2_vocab(vocab: dict[str, int], added: list[dict]) -> bool:
    """True when `vocab` + added tokens are GPT-2's 50,256 byte-level tokens and <|endoftext|> = 50256."""
    import base64
    import hashlib

    from gptforge.data.tokenizers import GPT2_EOT, GPT2_RANKS_SHA256

    eot = {**vocab, **{a.get("content"): a.get("id") for a in added}}.get(GPT2_EOT)
    if eot != 50256 or len(vocab) - (GPT2_EOT in vocab) != 50256:
        return False
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    lines = []
    for token, rank in sorted(vocab.items(), key=lambda item: item[1]):
        if token == GPT2_EOT:
            continue
        if any(c not in to_byte for c in token):
            return False
        lines.append(base64.b64encode(bytes(to_byte[c] for c in token)) + b" %d\n" % rank)
    # The same bytes as r50k_base.tiktoken: the ranks are GPT-2's, every one of them.
    return hashlib.sha256(b"".join(lines)).hexdigest() == GPT2_RANKS_SHA256


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
