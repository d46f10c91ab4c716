"""Typed run configuration: one dataclass per concern, one path to fill it.

    from gptforge.config import load_config
    cfg = load_config("configs/tinyshakespeare-char.toml", ["train.max_steps=200", "optim.lr=1e-3"])
    cfg.save("runs/x/config.toml")            # every section, every field; loads back identically

Precedence: dataclass defaults < TOML file < `section.key=value` overrides. Override values are
parsed as TOML literals when they can be (`3e-4`, `true`, `["a.txt", "b.txt"]`) and as plain
strings otherwise (`data.corpus=tinyshakespeare`); `none` unsets an optional field. Every value is
then checked against the field's type, and the whole config is validated when it is built: errors
name the field and the allowed values.

TOML has no null, so an unset optional field is written as a comment (`# max_tokens = unset`) and
read back as its default, which is always None for optional fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from gptforge.errors import GptforgeError

AUTO = "auto"  # model.preset chosen for the time budget (gptforge.train.auto)


@dataclass
class ModelConfig:
    preset: str = "mini"
    """Name of a preset in gptforge.model.PRESETS (the fields below override it when set), or "auto": shape, batch and learning rates chosen for train.max_time on this machine (gptforge.train.auto)."""
    n_layer: int | None = None
    """Number of transformer blocks (default: the preset's)."""
    n_head: int | None = None
    """Attention heads per block; must divide n_embd (default: the preset's)."""
    n_embd: int | None = None
    """Width of the residual stream (default: the preset's)."""
    block_size: int | None = None
    """Context length in tokens (default: the preset's)."""
    dropout: float | None = None
    """Dropout probability during training, 0 <= p < 1 (default: the preset's)."""
    attn_dropout: float | None = None
    """Dropout on the attention weights alone, 0 <= p < 1 (default: `dropout`'s). 0 keeps a CPU's attention in its fast fused kernel, which has no dropout."""
    bias: bool | None = None
    """Biases in linear layers and LayerNorms (default: the preset's)."""
    tie_embeddings: bool | None = None
    """Share the token embedding with the output head (default: the preset's)."""
    activation: str | None = None
    """The MLP's GELU: "gelu_tanh" (GPT-2's tanh approximation, the default) or "gelu" (exact; nanoGPT's, and several times cheaper on some CPUs). Both export to Hugging Face's GPT-2."""

    def shape(self) -> dict[str, Any]:
        """Every model field (vocab_size aside): the set ones, the preset's for the others. Raises
        GptforgeError when they do not fit together (n_head must divide n_embd)."""
        presets = _model_presets()
        fields = [f.name for f in dataclasses.fields(self) if f.name != "preset"]
        shape = {**presets[self.preset], **{k: getattr(self, k) for k in fields if getattr(self, k) is not None}}
        if shape["n_embd"] % shape["n_head"]:
            raise GptforgeError(
                f"model.n_embd = {shape['n_embd']} is not divisible by model.n_head = {shape['n_head']} "
                f"(what is unset comes from preset {self.preset!r}); set both to fit")
        from gptforge.model import GPTConfig

        defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
        return {k: shape.get(k, defaults[k]) for k in fields}

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise GptforgeError(f"model.{name} = {v} is invalid; it must be a positive integer")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise GptforgeError(f"model.dropout = {self.dropout} is invalid; it must be in [0, 1)")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise GptforgeError(f"model.attn_dropout = {self.attn_dropout} is invalid; it must be in [0, 1)")
        if self.activation is not None:
            from gptforge.model import ACTIVATIONS

            _choice("model.activation", self.activation, tuple(ACTIVATIONS))
        if self.n_head is not None and self.n_embd is not None and self.n_embd % self.n_head:
            raise GptforgeError(f"model.n_embd = {self.n_embd} is not divisible by model.n_head = {self.n_head}")
        if self.preset not in _model_presets() and self.preset != AUTO:
            raise GptforgeError(f"model.preset = {self.preset!r} is unknown; "
                                f"choose one of {', '.join(sorted(_model_presets()))} or {AUTO!r}")


@dataclass
class DataConfig:
    corpus: str | list[str] = "tinyshakespeare"
    """A corpus name, a file, a directory of .txt files, or a list of those (see gptforge.data.corpus)."""
    tokenizer: str = "gpt2"
    """Tokenizer: "gpt2" (tiktoken), "char" (characters of the corpus) or "bpe" (trained on the corpus)."""
    bpe_vocab_size: int | None = None
    """Vocabulary size of a trained "bpe" tokenizer (ignored by the others)."""
    val_fraction: float = 0.1
    """Fraction of the tokens (the end of the corpus) held out for validation, 0 <= f < 1."""
    sampling: str = "random"
    """Training windows: "random" offsets, or "sequential" epochs walking the tokens in order."""
    text_field: str = "text"
    """The JSON field / column holding each document's text in .jsonl, .parquet and datasets corpora."""
    val_tokens: int | None = None
    """Hold out about this many tokens (whole documents where possible) for validation instead of val_fraction."""
    bpe_sample_bytes: int | None = None
    """Train a "bpe" tokenizer on a seeded sample of at most this many bytes of text (default 64 MiB)."""

    def prepare_options(self) -> dict:
        """The keyword arguments of gptforge.data.prepare that this section sets beyond the positional ones."""
        return {"text_field": self.text_field, "val_tokens": self.val_tokens,
                "bpe_sample_bytes": self.bpe_sample_bytes if self.tokenizer == "bpe" else None}

    def validate(self) -> None:
        _choice("data.tokenizer", self.tokenizer, ("gpt2", "char", "bpe"))
        _choice("data.sampling", self.sampling, ("random", "sequential"))
        if not self.text_field:
            raise GptforgeError("data.text_field is empty; name the field that holds the text (e.g. text)")
        for name in ("val_tokens", "bpe_sample_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GptforgeError(f"data.{name} = {value} is invalid; it must be a positive integer (or unset)")
        if isinstance(self.corpus, list) and not self.corpus:
            raise GptforgeError("data.corpus is an empty list; name at least one corpus, file or directory")
        for spec in self.corpus if isinstance(self.corpus, list) else [self.corpus]:
            if not spec.strip():
                raise GptforgeError("data.corpus is empty; name a corpus (tinyshakespeare), a file or a directory")
        if not 0.0 <= self.val_fraction < 1.0:
            raise GptforgeError(f"data.val_fraction = {self.val_fraction} is invalid; it must be in [0, 1)")
        if self.bpe_vocab_size is not None and self.bpe_vocab_size < 2:
            raise GptforgeError(f"data.bpe_vocab_size = {self.bpe_vocab_size} is invalid; it must be >= 2")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """"adamw" for every parameter, or "muon": Muon (train/muon.py) on the blocks' 2-D weights, AdamW on the rest."""
    lr: float = 6e-4
    """Peak learning rate (reached at the end of warm-up); with "muon", the AdamW part's."""
    muon_lr: float = 0.02
    """"muon": peak learning rate of the Muon part (the schedule scales it as it scales lr)."""
    muon_momentum: float = 0.95
    """"muon": Muon's (Nesterov) momentum."""
    muon_weight_decay: float = 0.0
    """"muon": decoupled weight decay of the Muon part."""
    min_lr: float = 6e-5
    """Floor of the cosine decay."""
    warmup_steps: int = 100
    """Optimizer updates of linear warm-up from 0 to lr."""
    schedule: str = "cosine"
    """"cosine" (warm-up, cosine decay to min_lr), "wsd" (warm-up, lr, then a linear cool-down to min_lr) or "constant"."""
    cooldown_fraction: float = 0.2
    """"wsd": the last fraction of the schedule spent decaying linearly from lr to min_lr, in (0, 1]."""
    decay_steps: int | None = None
    """Length of the schedule in updates (default: train.max_steps, else from train.max_tokens; with train.max_time alone the budget is its clock)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices (>= 2-D parameters) only."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    fused: bool = True
    """Use the fused AdamW kernel where the device supports it."""

    def validate(self) -> None:
        _choice("optim.name", self.name, ("adamw", "muon"))
        _choice("optim.schedule", self.schedule, ("cosine", "wsd", "constant"))
        if not self.muon_lr > 0:
            raise GptforgeError(f"optim.muon_lr = {self.muon_lr} is invalid; it must be > 0")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise GptforgeError(f"optim.muon_momentum = {self.muon_momentum} is invalid; it must be in [0, 1)")
        if self.muon_weight_decay < 0:
            raise GptforgeError(f"optim.muon_weight_decay = {self.muon_weight_decay} is invalid; it must be >= 0")
        if not 0.0 < self.cooldown_fraction <= 1.0:
            raise GptforgeError(f"optim.cooldown_fraction = {self.cooldown_fraction} is invalid; it must be in (0, 1]")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise GptforgeError(f"optim.{name} = {getattr(self, name)} is invalid; it must be > 0")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise GptforgeError(f"optim.{name} = {getattr(self, name)} is invalid; it must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise GptforgeError(f"optim.{name} = {getattr(self, name)} is invalid; it must be in [0, 1)")
        if self.schedule != "constant" and self.min_lr > self.lr:
            raise GptforgeError(f"optim.min_lr = {self.min_lr} is above optim.lr = {self.lr}; the schedule decays "
                                "from lr down to min_lr, so set min_lr <= lr")
        if self.warmup_steps < 0:
            raise GptforgeError(f"optim.warmup_steps = {self.warmup_steps} is invalid; it must be >= 0")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise GptforgeError(f"optim.decay_steps = {self.decay_steps} is invalid; it must be >= 1")


@dataclass
class TrainConfig:
    batch_size: int = 8
    """Sequences per micro-batch on each process."""
    grad_accum_steps: int | None = None
    """Micro-batches per optimizer update (default: derived from tokens_per_update, else 1)."""
    tokens_per_update: int | None = None
    """Tokens per optimizer update over all processes (default: batch_size * block_size * accum * world)."""
    max_steps: int | None = None
    """Stop after this many optimizer updates."""
    max_tokens: int | None = None
    """Stop once this many training tokens have been seen."""
    max_time: float | None = field(default=None, metadata={"duration": True})
    """The time budget: seconds of training (summed over resumed runs), also "90s", "10m", "1.5h"; alone (no max_steps or max_tokens) it is the LR schedule's clock."""
    stop_at_loss: float | None = None
    """Stop once the metric named by stop_metric falls to this value (nats/token) at an evaluation."""
    stop_metric: str = "val"
    """Metric for stop_at_loss: "val" (validation loss) or "train_full" (loss over the whole training split)."""
    eval_every: int = 250
    """Evaluate every this many updates (and at the end of the run)."""
    eval_batches: int = 20
    """Micro-batches per split in the periodic evaluation estimate."""
    log_every: int = 10
    """Log a training record every this many updates."""
    checkpoint_every: int = 250
    """Save checkpoints/latest (and a step-NNNNNNN copy) every this many updates (and at the end)."""
    keep_last: int = 2
    """Step checkpoints to keep (0 keeps none; latest and best are kept apart)."""
    dtype: str = "auto"
    """"auto" (bf16 on CUDA where supported, else fp16; bf16 on CPUs with native bf16, else fp32), "float32", "bfloat16" or "float16"."""
    compile: bool = False
    """Run the model through torch.compile (checkpoints still hold the plain module)."""
    device: str = "auto"
    """"auto" (cuda > mps > cpu), "cpu", "cuda" or "mps"."""
    seed: int = 1337
    """Seed of every random number generator (python, numpy, torch, the data sampler)."""
    sample_every: int | None = None
    """Write a short sample (console and RUN/samples.jsonl) every this many updates (default: at each evaluation; 0: never)."""
    sample_prompt: str = ""
    """Prompt of those samples (empty: start from <|endoftext|>, or a newline for a char vocabulary)."""
    sample_tokens: int = 100
    """Tokens per sample written while training."""
    tensorboard: bool = False
    """Also write TensorBoard scalars into RUN/tensorboard."""
    init: str | None = None
    """Start from these weights, not a random init: a gptforge run or checkpoint directory, a Hugging Face GPT-2 directory, or a Hub name (gpt2); see gptforge.train.init."""

    def validate(self) -> None:
        _choice("train.stop_metric", self.stop_metric, ("val", "train_full"))
        _choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda", "mps"))
        if self.sample_every is not None and self.sample_every < 0:
            raise GptforgeError(f"train.sample_every = {self.sample_every} is invalid; it must be >= 0 (0: no samples)")
        for name in ("batch_size", "eval_every", "eval_batches", "log_every", "checkpoint_every", "sample_tokens"):
            if getattr(self, name) < 1:
                raise GptforgeError(f"train.{name} = {getattr(self, name)} is invalid; it must be >= 1")
        for name in ("grad_accum_steps", "tokens_per_update", "max_steps", "max_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise GptforgeError(f"train.{name} = {v} is invalid; it must be >= 1 (or unset)")
        if self.max_time is not None and not self.max_time > 0:
            raise GptforgeError(f"train.max_time = {self.max_time} is invalid; it must be > 0 seconds (or unset)")
        if self.stop_at_loss is not None and not (math.isfinite(self.stop_at_loss) and self.stop_at_loss >= 0):
            raise GptforgeError(f"train.stop_at_loss = {self.stop_at_loss} is invalid; it must be a loss >= 0")
        if not 0 <= self.seed < 2**63:
            raise GptforgeError(f"train.seed = {self.seed} is invalid; it must be an integer in [0, 2**63)")
        if self.keep_last < 0:
            raise GptforgeError(f"train.keep_last = {self.keep_last} is invalid; it must be >= 0")
        if all(getattr(self, n) is None for n in ("max_steps", "max_tokens", "max_time", "stop_at_loss")):
            raise GptforgeError("the run would never stop; set train.max_steps, train.max_tokens, "
                                "train.max_time or train.stop_at_loss")


@dataclass
class Config:
    """A whole run: model, data, optimizer and training settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field, then the rules that span sections. Raises GptforgeError."""
        for name in SECTIONS:
            section = getattr(self, name)
            _check_types(name, section)
            section.validate()
        t = self.train
        if (t.stop_metric == "val" and t.stop_at_loss is not None and self.data.val_fraction == 0
                and self.data.val_tokens is None):
            raise GptforgeError("train.stop_metric = 'val' needs a validation split; set data.val_fraction > 0 "
                                "or train.stop_metric = 'train_full'")
        if self.model.preset == AUTO:
            if t.init:
                raise GptforgeError("model.preset = 'auto' chooses a shape, train.init brings one; drop one of them")
            if t.max_time is None or t.max_steps is not None or t.max_tokens is not None:
                raise GptforgeError("model.preset = 'auto' chooses the model for a time budget: set train.max_time "
                                    "(e.g. --time 10m) and leave train.max_steps and train.max_tokens unset")
        elif not self.train.init:  # with init, the unset model fields come from the weights
            self.model.shape()
        lengths = (self.optim.decay_steps, t.max_steps, t.max_tokens, t.max_time)
        if self.optim.schedule != "constant" and all(v is None for v in lengths):
            raise GptforgeError(f"optim.schedule = {self.optim.schedule!r} needs a length: set optim.decay_steps, "
                                "train.max_steps, train.max_tokens or train.max_time (or use optim.schedule = 'constant')")
        if t.grad_accum_steps is not None and t.tokens_per_update is not None:
            raise GptforgeError(f"train.grad_accum_steps = {t.grad_accum_steps} and train.tokens_per_update = "
                                f"{t.tokens_per_update} are both set; set only one of them (the other is derived)")

    # ---- serialisation

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self, notes: typing.Sequence[str] = ()) -> str:
        """Every section and field, with its docstring as a comment; unset fields as comments; `notes`
        as comment lines after the header (e.g. what a run derived from this config)."""
        lines = ["# gptforge run configuration (defaults < TOML file < command-line overrides)"]
        lines += [f"# {note}" for note in notes]
        for name in SECTIONS:
            section = getattr(self, name)
            lines += ["", f"[{name}]"]
            docs = field_docs(type(section))
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                doc = docs.get(f.name, "")
                if value is None:
                    lines.append(f"# {f.name} = unset" + (f"  # {doc}" if doc else ""))
                else:
                    lines.append(f"{f.name} = {_toml_value(value)}" + (f"  # {doc}" if doc else ""))
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path, notes: typing.Sequence[str] = ()) -> Path:
        """Write to_toml(notes) to `path` atomically (temp file + rename)."""
        from gptforge.io import atomic_write_text

        return atomic_write_text(path, self.to_toml(notes))


SECTIONS = ("model", "data", "optim", "train")
_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults < TOML file at `path` < `section.key=value` overrides; validated. Raises GptforgeError."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GptforgeError(f"config file {path} does not exist; pass an existing TOML file to --config")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise GptforgeError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None
        for section, body in data.items():
            if section not in values:
                raise GptforgeError(f"config file {path}: unknown section [{section}]; allowed: {', '.join(SECTIONS)}")
            if not isinstance(body, dict):
                raise GptforgeError(f"config file {path}: '{section}' must be a table ([{section}])")
            for key, value in body.items():
                _field_type(section, key)  # unknown key -> error naming the allowed ones
                values[section][key] = value
    for item in overrides:
        section, key, value = parse_override(item)
        values[section][key] = value
    return build_config(values)


def build_config(values: dict[str, dict[str, Any]]) -> Config:
    """A validated Config from {section: {field: value}} (missing fields take their defaults)."""
    sections = {}
    for name in SECTIONS:
        given = dict(values.get(name, {}))
        for key in given:
            _field_type(name, key)  # unknown key -> error naming the allowed ones
        if name == "train" and not given.keys() & {"max_steps", "max_tokens", "max_time", "stop_at_loss"}:
            given["max_steps"] = 1000  # the default stop, unless the run names its own
        sections[name] = _SECTION_TYPES[name](**given)
    return Config(**sections)  # __post_init__ checks every type and value


def parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, typed value). Raises GptforgeError."""
    item = item.removeprefix("--")
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise GptforgeError(f"override {item!r} is not of the form section.key=value (e.g. train.max_steps=100)")
    dotted, raw = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    tp = _field_type(section, key)
    raw = raw.strip()
    if raw.lower() in ("none", "null", "unset") and _is_optional(tp):
        return section, key, None
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as a corpus name or a path
    if _allows(tp, str) and not isinstance(value, (str, list)):
        value = raw  # e.g. data.corpus=2024 is a file name, not a number
    return section, key, value


def describe() -> dict[str, list[tuple[str, str]]]:
    """{section: [(field, one-line doc), ...]} for every config field (used by `gptforge train --help`)."""
    out = {}
    for name, cls in _SECTION_TYPES.items():
        docs = field_docs(cls)  # once per class: it parses the class's source (~20 ms)
        out[name] = [(f.name, docs.get(f.name, "")) for f in dataclasses.fields(cls)]
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings written under each field, read from the class source."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs, last = {}, None
    for node in tree.body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif last and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            docs[last] = str(node.value.value).strip()
            last = None
        else:
            last = None
    return docs


# --------------------------------------------------------------------------------------------- helpers


def _model_presets() -> dict[str, dict]:
    from gptforge.model import PRESETS

    return PRESETS


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GptforgeError(f"{name} = {value!r} is invalid; allowed: {', '.join(repr(a) for a in allowed)}")


def _field_type(section: str, key: str) -> Any:
    if section not in _SECTION_TYPES:
        raise GptforgeError(f"unknown config section {section!r}; allowed: {', '.join(SECTIONS)}")
    hints = typing.get_type_hints(_SECTION_TYPES[section])
    if key not in hints:
        raise GptforgeError(f"unknown config field {section}.{key}; allowed: {', '.join(hints)}")
    return hints[key]


def _args(tp: Any) -> tuple:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _is_optional(tp: Any) -> bool:
    return type(None) in _args(tp)


def _allows(tp: Any, kind: type) -> bool:
    return kind in _args(tp)


def _check_types(section: str, obj: Any) -> None:
    """Coerce ints into float fields; reject anything that is not of the field's type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if f.metadata.get("duration") and isinstance(value, str):  # train.max_time = "10m"
            value = parse_duration(value, f"{section}.{f.name}")
            setattr(obj, f.name, value)
        ok = False
        for arg in _args(tp):
            if arg is type(None) and value is None:
                ok = True
            elif arg is bool and isinstance(value, bool):
                ok = True
            elif arg is int and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            elif arg is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):  # nan compares false with every bound: reject it by name
                    raise GptforgeError(f"{section}.{f.name} = {value} is invalid; it must be a finite number")
                setattr(obj, f.name, float(value))
                ok = True
            elif arg is str and isinstance(value, str):
                ok = True
            elif typing.get_origin(arg) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
                ok = True
            if ok:
                break
        if not ok:
            raise GptforgeError(f"{section}.{f.name} = {value!r} has the wrong type; expected {_type_name(tp)}")


def parse_duration(value: float | int | str, name: str = "train.max_time") -> float:
    """Seconds from a number (seconds) or a string: "90", "90s", "10m", "1.5h", "1h30m"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().lower().replace(" ", "")
    units = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(sec|min|[smhd]?)", text)
    if not text or "".join(n + u for n, u in parts) != text or (len(parts) > 1 and any(u == "" for _, u in parts)):
        raise GptforgeError(f"{name} = {value!r} is not a duration; write seconds (90) or with a unit: "
                            "'90s', '10m', '1.5h', '1h30m'")
    return sum(float(n) * units[u or "s"] for n, u in parts)


def _type_name(tp: Any) -> str:
    names = []
    for arg in _args(tp):
        if arg is type(None):
            names.append("unset (none)")
        elif typing.get_origin(arg) is list:
            names.append("a list of strings")
        else:
            names.append({bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(arg, str(arg)))
    return " or ".join(names)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# Fields a resumed run may change: when and how it stops, logs and saves, and where it runs, and the
# length of the LR schedule (to train on past it). The rest (model, data, optimizer, batch) would make
# the continuation a different run.
RESUME_OVERRIDABLE = (
    "optim.decay_steps", "train.max_steps", "train.max_tokens", "train.max_time", "train.stop_at_loss", "train.stop_metric",
    "train.eval_every", "train.eval_batches", "train.log_every", "train.checkpoint_every", "train.keep_last",
    "train.tensorboard", "train.device", "train.compile",
)


def resume_config(run_dir: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """RUN/config.toml with stop-limit (and logging/device) overrides; others raise GptforgeError."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise GptforgeError(f"{path} is missing; {run_dir} is not a gptforge run directory")
    overrides = list(overrides)
    for item in overrides:
        section, key, _ = parse_override(item)
        if f"{section}.{key}" not in RESUME_OVERRIDABLE:
            raise GptforgeError(f"{section}.{key} cannot change when resuming; allowed: {', '.join(RESUME_OVERRIDABLE)}")
    return load_config(path, overrides)
