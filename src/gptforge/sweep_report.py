"""A sweep's results: the table (printed, and SWEEP/trials.csv), SWEEP/best.toml (the base config with
the best trial's values) and the plots (history.png, params.png), read from the Optuna study.

    from gptforge.sweep_report import report
    result = report("sweeps/lr")        # what gptforge.sweep.sweep() ends with; any time after, too
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError
from gptforge.io import atomic_write_text, write_atomically
from gptforge.sweep_space import OBJECTIVES, Param, _fmt, _load_settings, _override, _storage, parse_space

# --------------------------------------------------------------------------------------------- results


@dataclass
class TrialRow:
    """One line of the results table."""

    number: int
    params: dict[str, Any]
    val_loss: float | None
    """The objective's value: the best validation loss, or bits per byte under objective val_bpb."""
    steps: int | None
    time_s: float | None
    state: str  # complete, pruned, skipped, failed, running, killed, waiting
    reason: str = ""


@dataclass
class SweepResult:
    """What `sweep()` returns: the table, the best trial, and where the files are."""

    sweep_dir: Path
    study_name: str
    rows: list[TrialRow]
    best_number: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_config: Path | None = None


# --------------------------------------------------------------------------------------------- report


def _rows(study) -> list[TrialRow]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        state = t.state.name
        if state == "COMPLETE":
            shown = "complete"
        elif state == "PRUNED":
            shown = attrs.get("outcome", "pruned")
        elif state == "FAIL":
            shown = "killed"
        else:
            shown = state.lower()
        value = t.value if state == "COMPLETE" else attrs.get("val_loss")
        reason = attrs.get("reason", "")
        if "retry_of" in attrs:
            reason = (reason + "; " if reason else "") + f"re-run of trial {attrs['retry_of']}"
        rows.append(TrialRow(t.number, dict(t.params), value, attrs.get("steps"), attrs.get("time_s"),
                             shown, reason))
    return rows


def report(sweep_dir: str | Path, study_name: str | None = None, storage: str | None = None,
           verbose: bool = True) -> SweepResult:
    """Print the table and write trials.csv, best.toml, history.png and params.png."""
    import optuna

    sweep_dir = Path(sweep_dir)
    study_name = study_name or sweep_dir.resolve().name
    store = _storage(storage, sweep_dir)
    settings = _load_settings(store, study_name)
    if settings is None:
        raise GptforgeError(f"no sweep named {study_name!r} in {storage or sweep_dir}")
    study = optuna.load_study(study_name=study_name, storage=store)
    rows = _rows(study)
    keys = [parse_space(s).key for s in settings["space"]]
    objective = settings.get("objective", "val_loss")
    _write_csv(sweep_dir / "trials.csv", rows, keys, objective)
    result = SweepResult(sweep_dir, study_name, rows)
    complete = [r for r in rows if r.state == "complete"]
    if complete:
        best = min(complete, key=lambda r: r.val_loss)
        result.best_number, result.best_value, result.best_params = best.number, best.val_loss, best.params
        result.best_config = _write_best(sweep_dir, settings, best)
    _plot(sweep_dir, rows, [parse_space(s) for s in settings["space"]], objective)
    if verbose:
        print(format_table(rows, keys, objective=objective))
        if result.best_config:
            print(f"best: trial {result.best_number}, {OBJECTIVES[objective][0]} {result.best_value:.4f}; "
                  f"config in {result.best_config}")
        else:
            print("best: no trial completed")
    return result


def format_table(rows: Sequence[TrialRow], keys: Sequence[str], markdown: bool = False,
                 objective: str = "val_loss") -> str:
    """The results table as aligned text (or Markdown for the docs)."""
    header = ["trial", *keys, OBJECTIVES[objective][0], "steps", "time s", "state", "reason"]
    lines = [[str(r.number), *(_fmt(r.params[k]) if k in r.params else "-" for k in keys),
              f"{r.val_loss:.4f}" if r.val_loss is not None else "-",
              str(r.steps) if r.steps is not None else "-",
              f"{r.time_s:.0f}" if r.time_s is not None else "-", r.state, r.reason] for r in rows]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), *(fmt(line) for line in lines)])


def _write_csv(path: Path, rows: Sequence[TrialRow], keys: Sequence[str], objective: str = "val_loss") -> None:
    import io

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["number", *keys, objective, "steps", "time_s", "state", "reason"])
    for r in rows:
        w.writerow([r.number, *(r.params.get(k, "") for k in keys),
                    "" if r.val_loss is None else f"{r.val_loss:.6f}",
                    "" if r.steps is None else r.steps, "" if r.time_s is None else r.time_s,
                    r.state, r.reason])
    write_atomically(path, lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8", newline=""))


def _write_best(sweep_dir: Path, settings: Mapping[str, Any], best: TrialRow) -> Path:
    """best.toml: the base config with the best trial's values, ready for `gptforge train --config`."""
    from gptforge.config import load_config

    overrides = [*settings["budget_overrides"], *(_override(k, v) for k, v in best.params.items())]
    cfg = load_config(sweep_dir / "base.toml", overrides)
    path = sweep_dir / "best.toml"
    label = OBJECTIVES[settings.get("objective", "val_loss")][0]
    header = (f"# Best trial {best.number} of the sweep in {sweep_dir} ({label} {best.val_loss:.4f}):\n"
              + "".join(f"#   {k} = {_fmt(v)}\n" for k, v in best.params.items())
              + f"# Train it with: gptforge train --config {path}\n\n")
    return atomic_write_text(path, header + cfg.to_toml())


# --------------------------------------------------------------------------------------------- plots


def _plot(sweep_dir: Path, rows: Sequence[TrialRow], params: Sequence[Param], objective: str = "val_loss") -> None:
    """history.png (value per trial and best so far) and params.png (value against each parameter)."""
    # Figure objects without pyplot: drawing never switches the caller's matplotlib backend.
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    scored = [r for r in rows if r.val_loss is not None]
    complete = [r for r in scored if r.state == "complete"]
    stopped = [r for r in scored if r.state != "complete"]

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if complete:
        ax.scatter([r.number for r in complete], [r.val_loss for r in complete], color="tab:blue",
                   label="complete", zorder=3)
    if stopped:
        ax.scatter([r.number for r in stopped], [r.val_loss for r in stopped], marker="x",
                   color="tab:gray", label="pruned (best before stopping)", zorder=3)
    best, xs, ys = math.inf, [], []
    for r in sorted(complete, key=lambda r: r.number):
        best = min(best, r.val_loss)
        xs.append(r.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(OBJECTIVES[objective][1])
    ax.set_title("optimisation history")
    ax.grid(alpha=0.3)
    if scored:
        ax.legend()
    fig.tight_layout()
    fig.savefig(sweep_dir / "history.png", dpi=110)

    n = max(1, len(params))
    fig = Figure(figsize=(3.6 * n, 3.4))
    axes = fig.subplots(1, n, sharey=True, squeeze=False)
    for ax, p in zip(axes[0], params, strict=False):
        for group, style in ((complete, {"color": "tab:blue"}),
                             (stopped, {"color": "tab:gray", "marker": "x"})):
            pts = [(r.params[p.key], r.val_loss) for r in group if p.key in r.params]
            if not pts:
                continue
            if p.kind == "categorical":
                labels = [str(c) for c in p.choices]
                x = [labels.index(str(v)) for v, _ in pts]
            else:
                x = [v for v, _ in pts]
            ax.scatter(x, [y for _, y in pts], zorder=3, **style)
        if p.kind == "categorical":
            ax.set_xticks(range(len(p.choices)), [str(c) for c in p.choices])
            ax.set_xlim(-0.5, len(p.choices) - 0.5)
        elif p.log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labels would overlap
            ax.set_xlim(p.low / 1.2, p.high * 1.2)
        else:
            pad = (p.high - p.low) * 0.05
            ax.set_xlim(p.low - pad, p.high + pad)
        ax.set_xlabel(p.key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(OBJECTIVES[objective][1])
    fig.suptitle(f"{OBJECTIVES[objective][0]} against each parameter (x = pruned)")
    fig.tight_layout()
    fig.savefig(sweep_dir / "params.png", dpi=110)
