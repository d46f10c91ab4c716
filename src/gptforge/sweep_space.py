"""What a sweep searches, and where its study lives: the space syntax (`section.key=lo..hi`,
`log:`, `int:`, `a,b,c`: Param, parse_space), the per-trial budget (parse_budget), a value as a
`key=value` override, the objectives, and the Optuna storage with the sweep's settings in it.

Shared by the search (gptforge.sweep) and its report (gptforge.sweep_report), which import it and
not each other's internals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError

# Study-level user attribute holding everything a worker or a resumed sweep needs.
_ATTR = "gptforge_sweep"
# objective -> (table header, axis label); the trainer logs both in every evaluation record.
OBJECTIVES = {"val_loss": ("val loss", "validation loss (nats/token)"),
              "val_bpb": ("val bpb", "validation bits per byte")}


# --------------------------------------------------------------------------------------------- space


@dataclass(frozen=True)
class Param:
    """One searched config field: `key` is `section.field`; `kind` is float, int or categorical."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    spec: str = ""

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))


_KEY = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
_INT = re.compile(r"^[+-]?\d+$")


def _typed(text: str) -> Any:
    """A categorical literal as the type it reads as: int, float, bool, or else a string."""
    text = text.strip()
    if _INT.match(text):
        return int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def parse_space(spec: str) -> Param:
    """Parse one `--space` value.

    `KEY=log:a..b` log-uniform, `KEY=a..b` uniform (int when both ends are integer literals, else
    float), `int:` / `float:` force the type (`KEY=log:int:16..256`), `KEY=v1,v2,...` categorical
    with each value typed (int, float, bool, string); a single value fixes the field.
    """
    key, sep, rhs = spec.partition("=")
    key, rhs = key.strip(), rhs.strip()
    if not sep or not _KEY.match(key) or not rhs:
        raise GptforgeError(f"bad --space {spec!r}; write KEY=RANGE with KEY like optim.lr "
                            "and RANGE like log:1e-4..3e-3, 0..0.2, int:2..8 or 4,6,8")
    body, log, forced = rhs, False, None
    while True:
        prefix, colon, rest = body.partition(":")
        if not colon or prefix not in ("log", "int", "float"):
            break
        if prefix == "log":
            log = True
        else:
            forced = prefix
        body = rest
    if ".." in body:
        lo_text, _, hi_text = body.partition("..")
        try:
            lo, hi = float(lo_text), float(hi_text)
        except ValueError:
            raise GptforgeError(f"bad range in --space {spec!r}; both ends must be numbers, "
                                "e.g. optim.lr=log:1e-4..3e-3") from None
        kind = forced or ("int" if _INT.match(lo_text.strip()) and _INT.match(hi_text.strip()) else "float")
        if kind == "int":
            if lo != int(lo) or hi != int(hi):
                raise GptforgeError(f"--space {spec!r} is int: its ends must be whole numbers")
            lo, hi = int(lo), int(hi)
        if not lo < hi:
            raise GptforgeError(f"--space {spec!r}: the low end must be below the high end")
        if log and lo <= 0:
            raise GptforgeError(f"--space {spec!r}: a log range needs a positive low end")
        return Param(key, kind, lo, hi, log, spec=spec)
    if log or forced:
        raise GptforgeError(f"--space {spec!r}: log:/int:/float: apply to a range a..b, not a list")
    choices = tuple(_typed(v) for v in body.split(",") if v.strip())
    if len(set(map(repr, choices))) != len(choices):
        raise GptforgeError(f"--space {spec!r} lists a value twice")
    return Param(key, "categorical", choices=choices, spec=spec)


def parse_budget(budget: str | None) -> list[str]:
    """`60s`, `10m`, `500steps` or `2Mtokens` as trainer overrides (the per-trial stopping rule)."""
    if not budget:
        return []
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|steps?|k?tokens|M?tokens)\s*$", budget)
    if not m:
        raise GptforgeError(f"bad --budget-per-trial {budget!r}; use e.g. 60s, 5m, 500steps or 2Mtokens")
    n, unit = float(m.group(1)), m.group(2)
    if unit in ("s", "m", "h"):
        return [f"train.max_time={n * {'s': 1, 'm': 60, 'h': 3600}[unit]:g}"]
    if unit.startswith("step"):
        return [f"train.max_steps={int(n)}"]
    scale = {"k": 1_000, "M": 1_000_000}.get(unit[0], 1)
    return [f"train.max_tokens={int(n * scale)}"]


def _override(key: str, value: Any) -> str:
    """A `section.key=value` override the config loader parses back to the same value."""
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}"



def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)



# --------------------------------------------------------------------------------------------- study storage


def _storage(url: str | None, sweep_dir: Path):
    import optuna

    url = url or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # Several worker processes write to one SQLite file: wait for the lock instead of
        # failing with "database is locked" when two trials finish at the same moment.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)



def _load_settings(store, study_name: str) -> dict | None:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        return None
    return study.user_attrs.get(_ATTR)
