"""Config: defaults < TOML < overrides, typed parsing, validation errors, round trips, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptforge.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    field_docs,
    load_config,
    parse_override,
    resume_config,
)
from gptforge.errors import GptforgeError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_defaults_are_valid_and_stop():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.train.max_steps == 1000  # the default stop
    assert cfg.model.preset and cfg.data.tokenizer == "gpt2" and cfg.optim.schedule == "cosine"


def test_every_field_has_a_one_line_docstring():
    for cls in (ModelConfig, DataConfig, OptimConfig, TrainConfig):
        docs = field_docs(cls)
        for name in cls.__dataclass_fields__:
            assert docs.get(name) and "\n" not in docs[name], f"{cls.__name__}.{name} has no docstring"


def test_precedence_defaults_toml_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlr = 1e-3\nwarmup_steps = 7\n[train]\nmax_steps = 50\nbatch_size = 4\n')
    cfg = load_config(toml, ["optim.lr=2e-4", "train.compile=true"])
    assert cfg.optim.lr == 2e-4            # override beats TOML
    assert cfg.optim.warmup_steps == 7     # TOML beats default
    assert cfg.optim.beta1 == 0.9          # default
    assert cfg.train.max_steps == 50 and cfg.train.compile is True


@pytest.mark.parametrize("item, section, key, value", [
    ("train.max_steps=100", "train", "max_steps", 100),
    ("optim.lr=3e-4", "optim", "lr", 3e-4),
    ("train.compile=true", "train", "compile", True),
    ("train.max_tokens=none", "train", "max_tokens", None),
    ("data.corpus=tinyshakespeare", "data", "corpus", "tinyshakespeare"),
    ("data.corpus=2024", "data", "corpus", "2024"),  # a file name, not a number
    ('data.corpus=["a.txt", "b.txt"]', "data", "corpus", ["a.txt", "b.txt"]),
    ("--model.dropout=0.1", "model", "dropout", 0.1),
])
def test_overrides_are_parsed_by_type(item, section, key, value):
    assert parse_override(item) == (section, key, value)


def test_int_given_for_a_float_field_becomes_a_float():
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("overrides, message", [
    (["train.dtype=float8"], r"train.dtype = 'float8' is invalid; allowed: 'auto', 'float32', 'bfloat16', 'float16'"),
    (["data.sampling=shuffled"], r"data.sampling .* allowed: 'random', 'sequential'"),
    (["train.stop_metric=loss"], r"train.stop_metric .* allowed: 'val', 'train_full'"),
    (["optim.schedule=linear"], r"optim.schedule .* allowed: 'cosine', 'wsd', 'constant'"),
    (["train.batch_size=x"], r"train.batch_size = 'x' has the wrong type; expected an integer"),
    (["train.compile=3"], r"train.compile = 3 has the wrong type; expected true/false"),
    (["train.nope=1"], r"unknown config field train.nope; allowed: batch_size"),
    (["trian.max_steps=1"], r"unknown config section 'trian'"),
    (["train.max_steps"], r"not of the form section.key=value"),
    (["model.dropout=1.5"], r"model.dropout = 1.5 is invalid; it must be in \[0, 1\)"),
    (["model.attn_dropout=-0.1"], r"model.attn_dropout = -0.1 is invalid; it must be in \[0, 1\)"),
    (["model.activation=relu"], r"model.activation = 'relu' is invalid; allowed: 'gelu_tanh', 'gelu'"),
    (["model.preset=huge"], r"model.preset = 'huge' is unknown; choose one of"),
    (["optim.lr=0"], r"optim.lr = 0.0 is invalid"),
    (["train.max_steps=none"], r"never stop"),
    (["train.stop_at_loss=1", "data.val_fraction=0"], r"needs a validation split"),
    (["optim.schedule=cosine", "train.max_steps=none", "train.stop_at_loss=1.0"], r"needs a length"),
    (["model.block_size=64", "train.batch_size=4", "train.tokens_per_update=512", "train.grad_accum_steps=3"],
     r"train.grad_accum_steps = 3 and train.tokens_per_update = 512 are both set"),
    # Bad values that used to pass (nan compares false with every bound) or fail late with a traceback.
    (["train.seed=-1"], r"train.seed = -1 is invalid; it must be an integer in \[0, 2\*\*63\)"),
    (["optim.lr=nan"], r"optim.lr = nan is invalid; it must be a finite number"),
    (["optim.lr=inf"], r"optim.lr = inf is invalid; it must be a finite number"),
    (["optim.min_lr=nan"], r"optim.min_lr = nan is invalid; it must be a finite number"),
    (["optim.weight_decay=nan"], r"optim.weight_decay = nan is invalid; it must be a finite number"),
    (["optim.grad_clip=nan"], r"optim.grad_clip = nan is invalid; it must be a finite number"),
    (["optim.beta1=nan"], r"optim.beta1 = nan is invalid; it must be a finite number"),
    (["optim.beta2=-inf"], r"optim.beta2 = -inf is invalid; it must be a finite number"),
    (["optim.lr=1e-4", "optim.min_lr=1e-3"], r"optim.min_lr = 0.001 is above optim.lr = 0.0001"),
    (["data.corpus="], r"data.corpus is empty; name a corpus"),
    (['data.corpus=["a.txt", " "]'], r"data.corpus is empty; name a corpus"),
    (["model.preset=tiny", "model.n_head=3"],
     r"model.n_embd = 64 is not divisible by model.n_head = 3 \(what is unset comes from preset 'tiny'\)"),
    (["model.preset=tiny", "model.n_embd=99"], r"model.n_embd = 99 is not divisible by model.n_head = 2"),
])
def test_errors_name_the_field_and_the_allowed_values(overrides, message):
    with pytest.raises(GptforgeError, match=message):
        load_config(None, overrides)


def test_toml_errors(tmp_path):
    with pytest.raises(GptforgeError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nmax_steps = 1")
    with pytest.raises(GptforgeError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[training]\nmax_steps = 1\n")
    with pytest.raises(GptforgeError, match=r"unknown section \[training\]"):
        load_config(bad)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["data.corpus=[\"a b.txt\", \"c.txt\"]", "optim.lr=1e-30", "optim.min_lr=0", "train.max_time=3.5",
                             "train.max_steps=none", "train.stop_at_loss=0.25", "model.n_layer=3", "optim.decay_steps=100",
                             "train.init=runs/x"])
    path = cfg.save(tmp_path / "run" / "config.toml")
    again = load_config(path)
    assert again == cfg
    assert "# max_steps = unset" in path.read_text()  # TOML has no null: unset fields are comments


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses_and_validates(path):
    cfg = load_config(path)
    t = cfg.train
    assert cfg.model.shape()["block_size"] and (t.max_steps or t.max_time or t.stop_at_loss)
    assert load_config(path, ["train.max_steps=10"]).train.max_steps == 10


def test_the_required_configs_ship():
    names = {p.name for p in CONFIGS}
    assert {"tinyshakespeare-char.toml", "tinyshakespeare-gpt2-cpu.toml"} <= names


def test_resume_allows_stop_limits_only(tmp_path):
    load_config(None, ["train.max_steps=10"]).save(tmp_path / "config.toml")
    assert resume_config(tmp_path, ["train.max_steps=20", "train.max_time=60"]).train.max_steps == 20
    with pytest.raises(GptforgeError, match="optim.lr cannot change when resuming"):
        resume_config(tmp_path, ["optim.lr=1"])
    with pytest.raises(GptforgeError, match="not a gptforge run directory"):
        resume_config(tmp_path / "nothing")


def test_cli_takes_overrides_in_both_forms():
    from gptforge.cli import build_parser

    args = build_parser().parse_args(["train", "optim.lr=1e-3", "--train.max_steps=5", "--model.preset", "tiny"])
    assert args.overrides == ["optim.lr=1e-3"] and args.option_overrides == ["train.max_steps=5", "model.preset=tiny"]
    cfg = load_config(None, [*args.overrides, *args.option_overrides])
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.model.preset) == (1e-3, 5, "tiny")


@pytest.mark.parametrize("override", ["train.seed=-1", "optim.lr=nan", "data.corpus=", "model.n_head=5",
                                      "optim.min_lr=1"])
def test_bad_config_values_stop_the_cli_before_anything_is_written(tmp_path, monkeypatch, capsys, override):
    """One line on stderr, exit 2, no run directory and no prepared data."""
    from gptforge.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), "model.preset=tiny", override])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("gptforge: error: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
