"""The web layer without a browser: clamped inputs, the model card, the page's generate function,
and `export-space` (the exported folder must build its page offline, with its own copy of gptforge)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.errors import GptforgeError
from gptforge.web import (
    NUM_SAMPLES_LIMIT,
    TOP_P_MIN,
    clamp_inputs,
    export_space,
    format_samples,
    model_card_markdown,
    model_facts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gen(tiny_run):
    import gptforge

    return gptforge.load(tiny_run, device="cpu")


# ----------------------------------------------------------------------------------------- inputs


def test_clamp_inputs_limits_every_field():
    s = clamp_inputs(10_000, 5.0, -3, 0.0, -42, 99, max_new_tokens_limit=300)
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.num_samples) == (
        300, 2.0, 0, TOP_P_MIN, 42, NUM_SAMPLES_LIMIT)
    s = clamp_inputs(0, -1.0, 7.6, 3.0, None, 0, max_new_tokens_limit=300)
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.num_samples) == (1, 0.0, 7, 1.0, None, 1)
    # junk and NaN from the browser fall back to defaults; the result always passes validation
    s = clamp_inputs("lots", float("nan"), None, float("inf"), "", "2", max_new_tokens_limit=50)
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.num_samples) == (50, 1.0, 0, 1.0, None, 2)
    s.check()
    assert clamp_inputs(20, 0.5, 40, 0.9, 7, 2).temperature == 0.5  # in-range values pass through
    assert clamp_inputs(20, 0.5, 40, 0.9, 2**70, 2).seed < 2**63


def test_format_samples():
    assert format_samples("A", ["b"]) == "Ab"
    two = format_samples("A", ["b", "c"])
    assert "sample 1" in two and "sample 2" in two and "Ab" in two and "Ac" in two


# ----------------------------------------------------------------------------------------- page


def test_model_card_shows_the_runs_numbers(gen, tiny_run):
    info = json.loads((tiny_run / "checkpoints" / "latest" / "info.json").read_text())
    evals = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in evals if r["kind"] == "eval"][-1]
    assert last_eval["step"] == info["step"]
    facts = model_facts(gen)
    assert facts["step"] == info["step"] and facts["val_loss"] == last_eval["val_loss"]
    assert facts["parameters"] == gen.model.num_params() and facts["context"] == 64
    card = model_card_markdown(gen)
    for text in (f"{info['step']:,}", f"{last_eval['val_loss']:.4f}", f"{last_eval['train_loss']:.4f}", "char"):
        assert text in card
    assert facts["val_bpb"] == last_eval["val_bpb"] and facts["train_bpb"] == last_eval["train_bpb"]
    assert f"| val bits per byte | {last_eval['val_bpb']:.4f} |" in card
    assert f"| train bits per byte | {last_eval['train_bpb']:.4f} |" in card


def test_page_streams_clamped_generation(gen):
    from gptforge.web import build_app

    demo = build_app(gen, max_new_tokens_limit=12)
    assert demo._queue.default_concurrency_limit == 1  # one request at a time, the rest queue
    run = next(f.fn for f in demo.fns.values() if f.name == "run")
    outputs = list(run("ROMEO:", 1000, 0.8, 5, 0.9, 3, 2))
    assert len(outputs) > 2 and outputs[0] == format_samples("ROMEO:", ["", ""])  # streamed, not at once
    expected = gen.generate("ROMEO:", max_new_tokens=12, temperature=0.8, top_k=5, top_p=0.9, seed=3, num_samples=2)
    assert outputs[-1] == format_samples("ROMEO:", expected)
    assert all(len(t) == 12 for t in expected)  # 1000 tokens were asked for: clamped to the server's 12
    with pytest.raises(Exception, match="☃"):  # gr.Error, shown as a message on the page
        list(run("☃", 5, 1.0, 0, 1.0, 1, 1))


# ----------------------------------------------------------------------------------------- export


def test_export_space_runs_offline_from_the_folder(tiny_run, tmp_path):
    out = export_space(tiny_run, tmp_path / "space", max_new_tokens_limit=77)
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert "torch" in (out / "requirements.txt").read_text()
    assert (out / tiny_run.name / "checkpoints" / "latest" / "model.safetensors").is_file()
    assert (out / tiny_run.name / "tokenizer").is_dir() and (out / "gptforge" / "generate.py").is_file()
    assert not list(out.rglob("*.pt")) and not list(out.rglob("__pycache__"))  # no pickles, no caches
    # A clean interpreter (-I: no PYTHONPATH, no user site, no cwd) must take gptforge from the folder.
    probe = (
        "import sys; sys.path.insert(0, '.'); import app, gptforge, gradio; "
        "assert isinstance(app.demo, gradio.Blocks); "
        "print(gptforge.__file__); print(app.demo.fns and 'ok'); "
        "print(app.demo.get_config_file()['components'] and 'components')"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-I", "-c", probe], cwd=out, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.split()
    assert Path(lines[0]).resolve().is_relative_to(out.resolve()) and "ok" in lines
    # the exported run loads and samples like the original
    import gptforge

    exported = gptforge.load(out / tiny_run.name, device="cpu")
    assert exported.info["step"] == gptforge.load(tiny_run, device="cpu").info["step"]
    with pytest.raises(GptforgeError, match="not an empty directory"):
        export_space(tiny_run, out)
