"""Loss and learning-rate curves of a run, drawn from RUN/metrics.jsonl into a PNG.

    gptforge plot runs/demo                 # writes runs/demo/loss.png
    gptforge plot runs/demo --out demo.png --log-y
    gptforge plot runs/a runs/b runs/c --x seconds --out compare.png   # validation curves overlaid
    gptforge plot runs/char runs/gpt2 --metric bpb --out bpb.png     # bits per byte: across tokenizers

    from gptforge.plot import plot_run
    plot_run("runs/demo")                   # -> Path("runs/demo/loss.png")

Everything comes from metrics.jsonl, so any run (finished, interrupted, resumed) can be drawn again.
`metric="bpb"` draws the evaluations' bits per byte (val_bpb, train_bpb) instead of nats per token;
runs logged before those existed have none and are refused with a one-line error.
Matplotlib is used through its Agg canvas only: no pyplot, no global backend switch, no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError
from gptforge.io import iter_jsonl, write_atomically

__all__ = ["plot_run", "plot_runs", "read_metrics"]


_NUMBERS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s", "val_loss",
            "train_loss")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_metrics(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """RUN/metrics.jsonl as {"train": [...], "eval": [...], "event": [...]}, each sorted by step. A line cut
    short by a kill (or otherwise damaged) is skipped; a step logged twice keeps its last record."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise GptforgeError(f"{run_dir} is not a directory; pass a run directory (the --out of gptforge train)")
    if not path.is_file():
        raise GptforgeError(f"{path} not found; pass a run directory that gptforge train has logged into")
    by_step: dict[str, dict[Any, dict[str, Any]]] = {"train": {}, "eval": {}}
    events: list[dict[str, Any]] = []
    for _, record in iter_jsonl(path):
        kind = record.get("kind")
        if kind in by_step and any(record.get(k) is not None and not _is_number(record[k]) for k in _NUMBERS):
            continue  # a damaged record (a number that is not one) is skipped like a damaged line
        if kind in by_step and isinstance(record.get("step"), (int, float)):
            by_step[kind][record["step"]] = record
        elif kind == "event":
            events.append(record)
    if not by_step["train"] and not by_step["eval"]:
        raise GptforgeError(f"{path} has no train or eval records yet; plot once the run has logged a step")
    return {
        "train": [by_step["train"][s] for s in sorted(by_step["train"])],
        "eval": [by_step["eval"][s] for s in sorted(by_step["eval"])],
        "event": events,
    }


# metric -> (the training updates' key or None, the eval keys (train, val), the axis label)
METRICS = {
    "loss": ("loss", "train_loss", "val_loss", "loss (nats/token)"),
    "bpb": (None, "train_bpb", "val_bpb", "bits per byte"),
}


def _check_metric(metric: str) -> tuple[str | None, str, str, str]:
    if metric not in METRICS:
        raise GptforgeError(f"--metric {metric!r} is unknown; use one of {', '.join(METRICS)}")
    return METRICS[metric]


def _no_bpb(run_dir: str | Path) -> GptforgeError:
    return GptforgeError(f"{run_dir} has no bits per byte in metrics.jsonl (logged before gptforge recorded them, "
                         f"or no evaluation yet); plot it with --metric loss, or get its exact bits per byte "
                         f"with gptforge eval {run_dir}")


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, log_y: bool = False,
             metric: str = "loss") -> Path:
    """Draw train and validation loss (or, with metric="bpb", their bits per byte) against steps and
    against tokens, the LR beneath, into a PNG (default RUN/loss.png, RUN/bpb.png) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    update_key, train_key, val_key, ylabel = _check_metric(metric)
    run_dir = Path(run_dir)
    out = _check_out(out if out is not None else run_dir / ("bpb.png" if metric == "bpb" else "loss.png"))
    metrics = read_metrics(run_dir)
    train, evals = metrics["train"], metrics["eval"]
    if metric == "bpb" and not any(e.get(train_key) is not None or e.get(val_key) is not None for e in evals):
        raise _no_bpb(run_dir)
    has_tokens = any("tokens" in r for r in train + evals)
    xs = ["step", "tokens"] if has_tokens else ["step"]

    fig = Figure(figsize=(6.5 * len(xs), 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(xs), height_ratios=[3, 1])
    resumes = [e["step"] for e in metrics["event"] if e.get("event") == "resumed" and "step" in e]

    for col, x in enumerate(xs):
        ax = fig.add_subplot(grid[0, col])
        ax_lr = fig.add_subplot(grid[1, col], sharex=ax)
        lines = [
            (train, update_key, "train", {"color": "C0", "linewidth": 1.0, "alpha": 0.8}),
            (evals, train_key, "train (eval mode)", {"color": "C0", "linestyle": "--", "marker": "o",
                                                 "markersize": 3}),
            (evals, val_key, "val", {"color": "C1", "marker": "o", "markersize": 3}),
        ]
        for records, key, label, style in lines:
            if key is None:  # no bits per byte per update: only evaluations count bytes
                continue
            xv, yv = _series(records, x, key)
            if yv:
                ax.plot(xv, yv, label=f"{label} (final {yv[-1]:.4f})", **style)
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right")
        ax.tick_params(labelbottom=False)

        xv, lr = _series(train, x, "lr")
        if lr:
            ax_lr.plot(xv, lr, color="C2", linewidth=1.0)
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("tokens" if x == "tokens" else "step")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.grid(True, alpha=0.3)
        if x == "tokens":
            ax_lr.xaxis.set_major_formatter(EngFormatter())  # 300M, not 3e8
        if x == "step":
            for step in resumes:  # where a resumed run picked up again
                for a in (ax, ax_lr):
                    a.axvline(step, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{'bits per byte' if metric == 'bpb' else 'loss'} vs {'tokens' if x == 'tokens' else 'steps'}")

    last = (train or evals)[-1]
    fig.suptitle(f"{run_dir.resolve().name}: step {last['step']:,}"
                 + (f", {last['tokens']:,} tokens" if "tokens" in last else ""))

    return _write_png(out, fig)


def _check_out(out: str | Path) -> Path:
    """The PNG to write, refused before any work when it cannot be one."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise GptforgeError(f"--out {out}: plots are written as PNG; give a path ending in .png")
    if out.is_dir():
        raise GptforgeError(f"--out {out} is a directory; give a .png file path")
    return out


def _write_png(out: Path, fig) -> Path:
    # A reader (or a kill) never sees half a PNG.
    try:
        return write_atomically(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    except OSError as e:
        raise GptforgeError(f"cannot write {out}: {e.strerror or e}; choose another --out") from None


X_AXES = {"steps": "step", "tokens": "tokens", "seconds": "elapsed_s"}


def _eval_x(metrics: dict[str, list[dict[str, Any]]], x: str, y: str = "val_loss"
            ) -> tuple[list[float], list[float]]:
    """(x, y) of a run's evaluations, y val_loss or val_bpb. Seconds are the training clock at the
    evaluation (its own `elapsed_s`, or for older runs the clock of the train records around it, interpolated)."""
    key = X_AXES[x]
    evals = [e for e in metrics["eval"] if e.get(y) is not None]
    if key != "elapsed_s" or all("elapsed_s" in e for e in evals):
        return _series(evals, key, y)
    clock = [(r["step"], r["elapsed_s"]) for r in metrics["train"] if r.get("elapsed_s") is not None]
    xs, ys = [], []
    for e in evals:
        before = [c for c in clock if c[0] <= e["step"]]
        after = [c for c in clock if c[0] >= e["step"]]
        if not before or not after:
            continue
        (s0, t0), (s1, t1) = before[-1], after[0]
        xs.append(t0 if s1 == s0 else t0 + (t1 - t0) * (e["step"] - s0) / (s1 - s0))
        ys.append(e[y])
    return xs, ys


def overlay_figure(runs: list[str | Path], x: str = "seconds", *, log_y: bool = False, metric: str = "loss"):
    """A matplotlib Figure with one validation curve per run (loss, or bits per byte with metric="bpb")
    against `x` (steps, tokens or seconds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    if x not in X_AXES:
        raise GptforgeError(f"--x {x!r} is unknown; use one of {', '.join(X_AXES)}")
    _, _, val_key, ylabel = _check_metric(metric)
    if not runs:
        raise GptforgeError("no run to plot; pass one or more run directories")
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [Path(r).resolve().name for r in runs]
    if len(set(names)) < len(names):  # runs/a/x and runs/b/x: show the parent too
        names = [f"{Path(r).resolve().parent.name}/{Path(r).resolve().name}" for r in runs]
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        metrics = read_metrics(run)
        xs, ys = _eval_x(metrics, x, val_key)
        if not ys and metric == "bpb" and any(e.get("val_loss") is not None for e in metrics["eval"]):
            raise _no_bpb(run)
        if not ys:
            raise GptforgeError(f"{run} has no validation loss to plot (no evaluation with a validation split yet)")
        ax.plot(xs, ys, marker="o", markersize=3, color=f"C{i % 10}", label=f"{name} (final {ys[-1]:.4f})")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel({"steps": "step", "tokens": "tokens", "seconds": "training seconds (evaluations included)"}[x])
    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel(f"validation {ylabel}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(f"validation {'bits per byte' if metric == 'bpb' else 'loss'} vs {x}")
    return fig


def plot_runs(runs: list[str | Path], out: str | Path, x: str = "seconds", *, log_y: bool = False,
              metric: str = "loss") -> Path:
    """Overlay several runs' validation curves (loss, or bits per byte with metric="bpb": runs with
    different tokenizers compare only so) against steps, tokens or seconds into the PNG `out`."""
    out = _check_out(out)
    fig = overlay_figure(runs, x, log_y=log_y, metric=metric)
    return _write_png(out, fig)
