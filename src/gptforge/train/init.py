"""Start training from existing weights instead of a random initialisation (`train.init`).

    gptforge train --config configs/x.toml train.init=gpt2             # GPT-2 124M from the Hub (online)
    gptforge train --config configs/x.toml train.init=path/to/hf-gpt2  # a local Hugging Face GPT-2 directory
                                                                       # (e.g. one `gptforge export` wrote)
    gptforge train --config configs/x.toml train.init=runs/char        # another gptforge run (its latest
                                                                       # checkpoint, or name one: runs/char/checkpoints/best)

    config, init = prepare_init(config)      # the trainer calls this before it builds data and model
    init.load_into(model)                    # ... and this once the model exists

The architecture comes from the weights: `prepare_init` fills every model field of the config
from them, so the rest of the trainer (block size, data preparation, model construction) works as
it does for a fresh model, and the saved RUN/config.toml describes what was trained. Fields the
config sets itself must agree with the weights; a smaller `model.block_size` is allowed (the
position embeddings are cropped, as for fine-tuning GPT-2 at a shorter context); `model.dropout`
and `model.attn_dropout` are the config's. A gptforge run brings its own saved tokenizer, so a char or BPE vocabulary keeps
its ids; so does a Hugging Face directory with a tokenizer.json (`gptforge export` writes one): it is
read back as the gptforge gpt2, bpe or char tokenizer it was (`gptforge.hf.tokenizer_from_hf`).
Hugging Face GPT-2 weights without tokenizer files need GPT-2's tokenizer (`data.tokenizer = "gpt2"`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptforge.errors import GptforgeError

if TYPE_CHECKING:
    from gptforge.config import Config
    from gptforge.data.tokenizers import Tokenizer
    from gptforge.model import GPT

# Model fields that must agree with the weights when the config sets them (block_size may be smaller).
_ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "tie_embeddings", "activation")


@dataclass
class InitWeights:
    """Weights to start from: the loaded model (on the CPU), where it came from, and its tokenizer
    (None for Hugging Face GPT-2 weights without tokenizer files, which use the gpt2 tokenizer)."""

    source: str
    kind: str  # "huggingface" or "gptforge"
    model: GPT
    tokenizer: Tokenizer | None

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the weights into `model` (built from the config `prepare_init` returned)."""
        src = self.model.state_dict()
        block_size = model.config.block_size  # type: ignore[union-attr]
        with torch.no_grad():
            for name, target in model.state_dict().items():
                if name not in src:
                    raise GptforgeError(f"--init {self.source}: weight {name} is missing from the source model")
                value = src[name]
                if name == "transformer.wpe.weight":
                    value = value[:block_size]  # fine-tuning at a shorter context: crop the positions
                if value.shape != target.shape:
                    raise GptforgeError(f"--init {self.source}: weight {name} has shape {tuple(value.shape)}, "
                                        f"the model needs {tuple(target.shape)}")
                target.copy_(value.to(device=target.device, dtype=target.dtype))


def load_init(spec: str) -> InitWeights:
    """Load `spec`: a gptforge run or checkpoint directory, a Hugging Face GPT-2 directory, or a Hub name."""
    from gptforge.hf import load_pretrained

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "checkpoints").is_dir() or (path / "model_config.json").is_file():
            from gptforge.runs import load_model

            model, tokenizer, _ = load_model(path, which="latest", device="cpu")
            return InitWeights(str(spec), "gptforge", model, tokenizer)
        if (path / "config.json").is_file():
            from gptforge.hf import tokenizer_from_hf

            tokenizer = tokenizer_from_hf(path)  # None without tokenizer.json: GPT-2's is assumed
            return InitWeights(str(spec), "huggingface", load_pretrained(path), tokenizer)
        raise GptforgeError(f"train.init = {spec!r} is a directory but neither a gptforge run (checkpoints/) nor a "
                            "Hugging Face GPT-2 directory (config.json + model.safetensors)")
    # Not a local directory: a Hugging Face Hub name (load_pretrained explains a failed download).
    return InitWeights(str(spec), "huggingface", load_pretrained(str(spec)), None)


def _biases_are_zero(model: GPT) -> bool:
    """True when every bias is zero: the weights compute the same thing without them."""
    return all(not p.any() for n, p in model.named_parameters() if n.endswith(".bias"))


def prepare_init(config: Config) -> tuple[Config, InitWeights]:
    """Load `config.train.init` and return (a copy of `config` whose model fields describe those
    weights, the weights). Raises GptforgeError naming the fields that disagree."""
    from gptforge.data.tokenizers import GPT2Tokenizer

    spec = config.train.init
    if not spec:
        raise GptforgeError("train.init is not set; nothing to start from")
    init = load_init(spec)
    have = init.model.config
    m, d = config.model, config.data

    differ = []
    for name in _ARCH_FIELDS:
        want = getattr(m, name)
        if want is None or want == getattr(have, name):
            continue
        if name == "block_size" and want < have.block_size:
            continue  # cropped in load_into
        if name == "bias" and want is False and _biases_are_zero(init.model):
            continue  # a bias-free model in GPT-2's layout (an export): its zero biases are dropped
        differ.append(f"model.{name} = {want} (weights: {getattr(have, name)})")
    if differ:
        raise GptforgeError(f"the config's model differs from the train.init weights ({spec}): {', '.join(differ)}; "
                            "remove those fields from the config or pick matching weights")

    if init.tokenizer is None:
        if d.tokenizer != "gpt2":
            raise GptforgeError(f"train.init = {spec!r} holds GPT-2 weights, which need GPT-2's tokenizer; "
                                f"set data.tokenizer = \"gpt2\" (not {d.tokenizer!r})")
        vocab = GPT2Tokenizer().vocab_size
        if have.vocab_size != vocab:
            raise GptforgeError(f"train.init = {spec!r} has vocab_size {have.vocab_size}, but GPT-2's tokenizer has "
                                f"{vocab} ids; only GPT-2-vocabulary checkpoints can be fine-tuned here")
    else:
        if d.tokenizer != init.tokenizer.spec:
            raise GptforgeError(f"train.init = {spec!r} was trained with the {init.tokenizer.spec!r} tokenizer; "
                                f"set data.tokenizer = \"{init.tokenizer.spec}\" (not {d.tokenizer!r})")
        if have.vocab_size != init.tokenizer.vocab_size:
            raise GptforgeError(f"train.init = {spec!r} has vocab_size {have.vocab_size}, but its tokenizer has "
                                f"{init.tokenizer.vocab_size} ids; the weights and the tokenizer do not belong together")

    config = copy.deepcopy(config)
    for name in _ARCH_FIELDS:
        if getattr(config.model, name) is None:
            setattr(config.model, name, getattr(have, name))
    config.validate()
    return config, init
