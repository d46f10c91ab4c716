"""gptforge.plot and `gptforge plot`: a PNG drawn from metrics.jsonl, and clear errors without one."""

from __future__ import annotations

import math

import pytest

from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.plot import plot_run, read_metrics
from gptforge.train.metrics import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir, scale: float = 1.0, steps: int = 40):
    """A run directory whose metrics.jsonl is written by the real logger."""
    with MetricsLogger(run_dir, total_steps=steps) as log:
        for step in range(1, steps + 1):
            lr = 1e-3 * min(1.0, step / 5) * 0.5 * (1 + math.cos(math.pi * step / steps))
            log.log_train(step, tokens=step * 512, loss=scale * (4.0 / math.sqrt(step)) + 1.0, lr=lr)
            if step % 10 == 0:
                log.log_eval(step, tokens=step * 512, val_loss=scale * 4.2 / math.sqrt(step) + 1.1,
                             train_loss=scale * 4.0 / math.sqrt(step) + 1.0)
        log.event("resumed", step=20)
    return run_dir


def test_plot_writes_a_png_that_depends_on_the_data(tmp_path, capsys):
    a = _fake_run(tmp_path / "a")
    b = _fake_run(tmp_path / "b", scale=2.0)
    png_a = plot_run(a)
    assert png_a == a / "loss.png"
    data = png_a.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    # Width x height from the IHDR chunk: two panels side by side (steps and tokens) make it wide.
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 300

    png_b = plot_run(b, tmp_path / "out" / "b.png")
    assert png_b == tmp_path / "out" / "b.png"
    assert png_b.read_bytes() != data
    # Same run name and data again: the bytes are the same, so the difference above is the data.
    c = _fake_run(tmp_path / "c" / "a")
    assert plot_run(c).read_bytes() == data
    assert not list(a.glob("*.tmp"))


def test_read_metrics_skips_a_torn_line_and_keeps_the_last_duplicate(tmp_path):
    run = _fake_run(tmp_path / "r", steps=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "loss": 0.5}\n{"kind": "train", "st')
    m = read_metrics(run)
    assert [r["step"] for r in m["train"]] == [1, 2, 3]
    assert m["train"][-1]["loss"] == 0.5
    assert [e["event"] for e in m["event"]] == ["resumed"]


def test_log_scale_without_tokens(tmp_path):
    run = tmp_path / "r"
    with MetricsLogger(run) as log:
        for step in range(1, 6):
            log.log_train(step, loss=5.0 / step, lr=1e-3)
    linear = plot_run(run, tmp_path / "lin.png").read_bytes()
    log_y = plot_run(run, tmp_path / "log.png", log_y=True).read_bytes()
    assert log_y.startswith(PNG_MAGIC) and log_y != linear
    width, height = int.from_bytes(linear[16:20], "big"), int.from_bytes(linear[20:24], "big")
    assert width == height  # one column: no tokens to plot against


@pytest.mark.parametrize("content", [None, "", "not json\n", '{"kind": "event", "event": "started", "step": 0}\n'])
def test_missing_or_empty_metrics_is_an_error(tmp_path, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(GptforgeError, match="metrics.jsonl"):
        plot_run(tmp_path)
    assert not (tmp_path / "loss.png").exists()


def test_cli_plot(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", steps=12)
    capsys.readouterr()
    main(["plot", str(run), "--out", str(tmp_path / "x.png"), "--log-y"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes().startswith(PNG_MAGIC)

    with pytest.raises(SystemExit) as exit_info:
        main(["plot", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge: error: ") and "not a directory" in err and "Traceback" not in err


def _timed_run(run_dir, scale: float, seconds_per_step: float, with_eval_clock: bool = True):
    with MetricsLogger(run_dir, total_steps=40) as log:
        for step in range(1, 41):
            log.log_train(step, tokens=step * 512, loss=scale * 4.0 / math.sqrt(step) + 1.0, lr=1e-3,
                          elapsed_s=step * seconds_per_step)
            if step % 10 == 0:
                clock = {"elapsed_s": step * seconds_per_step} if with_eval_clock else {}
                log.log_eval(step, tokens=step * 512, val_loss=scale * 4.2 / math.sqrt(step) + 1.1, **clock)
    return run_dir


@pytest.mark.parametrize("x", ["steps", "tokens", "seconds"])
def test_overlay_draws_one_validation_curve_per_run(tmp_path, x):
    from gptforge.plot import overlay_figure, plot_runs

    runs = [_timed_run(tmp_path / "fast", 1.0, 0.5), _timed_run(tmp_path / "slow", 0.8, 2.0),
            _timed_run(tmp_path / "old", 1.2, 1.0, with_eval_clock=False)]  # eval records without a clock
    fig = overlay_figure(runs, x)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3
    assert [line.get_label().split(" ")[0] for line in lines] == ["fast", "slow", "old"]
    expected_x = {"steps": [10, 20, 30, 40], "tokens": [5120, 10240, 15360, 20480],
                  "seconds": [5.0, 10.0, 15.0, 20.0]}[x]
    assert list(lines[0].get_xdata()) == pytest.approx(expected_x)
    if x == "seconds":  # 2 s per step, and the older run's clock read from its train records
        assert list(lines[1].get_xdata()) == pytest.approx([20.0, 40.0, 60.0, 80.0])
        assert list(lines[2].get_xdata()) == pytest.approx([10.0, 20.0, 30.0, 40.0])
    assert list(lines[1].get_ydata()) == pytest.approx([0.8 * 4.2 / math.sqrt(s) + 1.1 for s in (10, 20, 30, 40)])
    png = plot_runs(runs, tmp_path / "cmp.png", x=x)
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_plot_cli_overlays_several_runs(tmp_path, capsys, monkeypatch):
    a, b = _timed_run(tmp_path / "a", 1.0, 0.5), _timed_run(tmp_path / "b", 0.9, 0.5)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    main(["plot", str(a), str(b)])
    assert capsys.readouterr().out.strip() == "compare.png" and (tmp_path / "compare.png").is_file()
    main(["plot", str(a), str(b), "--x", "tokens", "--out", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(SystemExit) as e:
        main(["plot", str(a), str(tmp_path / "nope")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("gptforge: error: ")


def _tokenizer_run(run_dir, bpb: list[float] | None, nats_per_byte: float):
    """A run whose evaluations log val_bpb (None: an older run that did not), as runs with different
    tokenizers do: their losses per token differ by the bytes per token, their bits per byte do not."""
    with MetricsLogger(run_dir, total_steps=30) as log:
        for i, step in enumerate((10, 20, 30)):
            log.log_train(step, tokens=step * 512, loss=3.0, lr=1e-3, elapsed_s=step * 1.0)
            extra = {"val_bpb": bpb[i]} if bpb is not None else {}
            log.log_eval(step, tokens=step * 512, val_loss=nats_per_byte * 2.0 / (i + 1), train_loss=2.0,
                         elapsed_s=step * 1.0, **({"train_bpb": bpb[i] * 0.9} if bpb else {}), **extra)
    return run_dir


def test_bpb_overlays_runs_with_different_tokenizers_and_refuses_runs_without(tmp_path, capsys):
    from gptforge.plot import overlay_figure

    char = _tokenizer_run(tmp_path / "char", [2.5, 2.2, 2.0], 1.0)
    gpt2 = _tokenizer_run(tmp_path / "gpt2", [2.8, 2.1, 1.9], 3.5)
    fig = overlay_figure([char, gpt2], "seconds", metric="bpb")
    lines = fig.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[2.5, 2.2, 2.0], [2.8, 2.1, 1.9]]
    assert fig.axes[0].get_ylabel() == "validation bits per byte"
    assert "nats" in overlay_figure([char, gpt2], "seconds").axes[0].get_ylabel()  # the default is unchanged

    png = plot_run(char, metric="bpb")
    assert png == char / "bpb.png" and png.read_bytes().startswith(PNG_MAGIC)
    assert not (char / "loss.png").exists()

    old = _tokenizer_run(tmp_path / "old", None, 1.0)
    capsys.readouterr()
    for argv in (["plot", str(char), str(old), "--metric", "bpb"], ["plot", str(old), "--metric", "bpb"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        assert f"{old} has no bits per byte" in err and f"gptforge eval {old}" in err
    main(["plot", str(char), str(gpt2), "--metric", "bpb", "--out", str(tmp_path / "bpb.png")])
    assert (tmp_path / "bpb.png").read_bytes().startswith(PNG_MAGIC)
