"""Hugging Face GPT-2 weights both ways, and the gptforge tokenizer found in a Hugging Face directory.

    from gptforge.hf import load_pretrained, save_pretrained, tokenizer_from_hf
    model = load_pretrained("gpt2")                  # or a directory: config.json + model.safetensors
    save_pretrained(model, "hf/gpt2")                # transformers.GPT2LMHeadModel loads it
    tok = tokenizer_from_hf("hf/char")               # the gptforge tokenizer again (train --init uses it)

Weights: `load_pretrained(dir_or_hub_name)` reads GPT-2 weights in Hugging Face's layout into a gptforge
GPT (train --init uses it); `save_pretrained(model, dir)` writes a GPT in that layout (padded vocabulary
rows dropped), which transformers.GPT2LMHeadModel loads.

Exporting a whole run (`gptforge export`: weights, tokenizer files, generation config, model card)
is gptforge.export; `gptforge.hf.export_run`, `model_card` and `write_tokenizer` still resolve to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptforge.data.tokenizers import bytes_to_unicode
from gptforge.errors import GptforgeError

if TYPE_CHECKING:
    from gptforge.data.tokenizers import Tokenizer
    from gptforge.model import GPT, GPTConfig

TOKENIZER_JSON = "tokenizer.json"

# The export of a run moved to gptforge.export, which builds on this module: its names are looked up
# there on first use (not imported here, so that the two modules import one way only).
_EXPORTED = ("CARD", "GENERATION_CONFIG", "TOKENIZER_CONFIG", "export_run", "gpt2_vocab_merges", "model_card",
             "write_tokenizer")


def __getattr__(name: str):
    if name in _EXPORTED:
        from gptforge import export

        return getattr(export, name)
    raise AttributeError(f"module 'gptforge.hf' has no attribute {name!r}")


# --------------------------------------------------------------------------------------------- GPT-2 weights


def load_pretrained(name_or_dir: str | Path, **overrides: Any) -> GPT:
    """Load a GPT-2 checkpoint in Hugging Face's layout as a gptforge GPT.

        load_pretrained("hf-gpt2/")                 # config.json + model.safetensors (or pytorch_model.bin)
        load_pretrained("gpt2", dropout=0.1)        # a Hub name, downloaded when online

    Overrides may set `dropout`, `attn_dropout`, `pad_vocab_multiple` or a smaller `block_size` (the position
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


# Hugging Face's activation names -> GPTConfig.activation ("gelu_new" and "gelu_pytorch_tanh" are both
# GELU's tanh approximation, GPT-2's; "gelu" is the exact one).
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


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
            f"{directory}: activation {act!r} / n_inner {n_inner!r} differ from GPT-2's (gelu_new or gelu, 4*n_embd); "
            "this model cannot hold that checkpoint"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise GptforgeError(f"{directory}: non-standard attention scaling in config.json is not supported")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise GptforgeError(f"{directory}: layer_norm_epsilon {eps} differs from GPT-2's 1e-5; not supported")
    allowed = {"dropout", "attn_dropout", "pad_vocab_multiple", "block_size"}
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
        activation=_HF_ACTIVATIONS[act],
    )
    return GPTConfig(**{**fields_, **overrides})


def _config_to_hf(c: GPTConfig) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new" if c.activation == "gelu_tanh" else "gelu",
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
        "attn_pdrop": c.attn_dropout_p,
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
