"""The web layer without a browser: clamped inputs, the model card, the page's generate function, a real
server's queue under concurrent requests and the address `gptforge serve` binds, and `export-space` (the
exported folder must build its page offline, with its own copy of gptforge)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gptforge.errors import GptforgeError
from gptforge.generate import Generator
from gptforge.web import (
    EXAMPLE_PROMPTS,
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
    assert clamp_inputs(None, None, None, None, None, None).max_new_tokens == 200  # the page's default
    s = clamp_inputs(5, 1.0, 0, 1.0, "abc", "many")  # junk seed: random; junk count: one sample
    assert (s.seed, s.num_samples) == (None, 1)
    assert clamp_inputs(20, 0.5, 40, 0.9, 7, 2).temperature == 0.5  # in-range values pass through
    assert clamp_inputs(20, 0.5, 40, 0.9, 2**70, 2).seed < 2**63
    assert clamp_inputs(20, 0.5, 40, 0.9, 2**63 + 4096, 2).seed == 4096  # a signed 64-bit seed, whatever was typed


def test_format_samples():
    assert format_samples("A", ["b"]) == "Ab"
    assert format_samples("A", ["b", "c"]) == "──── sample 1 ────\nAb\n\n──── sample 2 ────\nAc"


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


def test_model_facts_fall_back_to_the_metrics_log_for_older_runs(tmp_path):
    """A checkpoint's info.json may lack the step, tokens or losses (runs from before they were
    written): the card then takes them from metrics.jsonl, the evaluation at that step first, and
    reads past a line a crash cut short."""
    from gptforge.data.tokenizers import CharTokenizer
    from gptforge.model import GPT, GPTConfig

    records = [
        {"kind": "train", "step": 10, "tokens": 100, "loss": 3.0},
        {"kind": "eval", "step": 10, "tokens": 100, "train_loss": 2.9, "val_loss": 3.1},
        {"kind": "sample", "step": 10, "text": "ab"},
        {"kind": "train", "step": 20, "tokens": 200, "loss": 2.5},
        {"kind": "eval", "step": 20, "tokens": 200, "train_loss": 2.4, "val_loss": 2.6, "val_bpb": 3.7},
    ]
    after_cut = [
        {"kind": "eval", "step": 30, "tokens": 300, "train_loss": 2.1, "val_loss": 2.3},
        {"kind": "train", "step": 35, "tokens": 350, "loss": 2.0},
    ]
    lines = [json.dumps(r) for r in records] + ['{"kind": "eval", "st'] + [json.dumps(r) for r in after_cut]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = GPT(GPTConfig(vocab_size=3, n_layer=1, n_head=1, n_embd=8, block_size=8))
    tok = CharTokenizer("abc")

    def facts(info: dict) -> tuple:
        f = model_facts(Generator(model, tok, info=info, run_dir=tmp_path))
        return f["run"], f["step"], f["tokens"], f["train_loss"], f["val_loss"], f["val_bpb"]

    name = tmp_path.name
    assert facts({}) == (name, 30, 300, 2.1, 2.3, None)  # the last evaluation, past the cut line
    assert model_card_markdown(Generator(model, tok, info={}, run_dir=tmp_path)) == "\n".join([
        "### Model card",
        f"| run | `{name}` |",
        "|---|---|",
        f"| parameters | {model.num_params():,} |",
        "| shape | 1 layers, 1 heads, 8 wide |",
        "| context | 8 tokens |",
        "| tokenizer | char (3 ids) |",
        "| steps | 30 |",
        "| tokens seen | 300 |",
        "| train loss | 2.1000 |",
        "| val loss | 2.3000 |",
        "| train bits per byte | n/a |",
        "| val bits per byte | n/a |",
        "",
        "Losses are mean cross-entropy in nats per token; bits per byte are the same nats over the UTF-8 "
        "bytes of the predicted tokens, / ln 2 (comparable across tokenizers).",
    ])
    assert facts({"step": 20, "tokens": 12_345}) == (name, 20, 12_345, 2.4, 2.6, 3.7)  # the one at its step
    # No evaluation at the checkpoint's step: its own losses, else the last evaluation's.
    assert facts({"step": 25, "train_loss": 1.5}) == (name, 25, None, 1.5, 2.3, None)
    assert facts({"step": 25}) == (name, 25, None, 2.1, 2.3, None)
    assert facts({"step": 25, "val_loss": 1.9}) == (name, 25, None, 2.1, 1.9, None)
    # Only training records: the last one's step, tokens and loss.
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records + after_cut
                                                      if r["kind"] == "train") + "\n", encoding="utf-8")
    assert facts({}) == (name, 35, 350, 2.0, None, None)
    # A run that trained to memorise evaluates the whole training split (train_loss_tokens): the card says so.
    whole = {"kind": "eval", "step": 4000, "tokens": 4_096_000, "train_loss": 0.05, "val_loss": 4.0,
             "train_loss_tokens": 1_000, "train_bpb": 0.07, "val_bpb": 5.8}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(whole) + "\n", encoding="utf-8")
    f = model_facts(Generator(model, tok, info={"step": 4000}, run_dir=tmp_path))
    assert (f["whole_train_split"], f["train_bpb"], f["val_bpb"]) == (True, 0.07, 5.8)
    card = model_card_markdown(Generator(model, tok, info={"step": 4000}, run_dir=tmp_path))
    assert "| steps | 4,000 |\n| tokens seen | 4,096,000 |" in card
    assert card.endswith("(comparable across tokenizers). The train loss is over the whole training split, which "
                         "this run trained to memorise; the val loss is text it never saw.")
    assert "| train bits per byte | 0.0700 |\n| val bits per byte | 5.8000 |" in card
    assert not model_facts(Generator(model, tok, info={"step": 10}, run_dir=tmp_path))["whole_train_split"]
    # Built in Python: no run directory, no log.
    f = model_facts(Generator(model, tok))
    assert (f["run"], f["step"], f["tokens"], f["val_loss"]) == ("model", None, None, None)


def test_page_streams_clamped_generation(gen):
    from gptforge.web import build_app

    demo = build_app(gen, max_new_tokens_limit=12)
    run = next(f.fn for f in demo.fns.values() if f.name == "run")
    outputs = list(run("ROMEO:", 1000, 0.8, 5, 0.9, 3, 2))
    assert len(outputs) > 2 and outputs[0] == format_samples("ROMEO:", ["", ""])  # streamed, not at once
    expected = gen.generate("ROMEO:", max_new_tokens=12, temperature=0.8, top_k=5, top_p=0.9, seed=3, num_samples=2)
    assert outputs[-1] == format_samples("ROMEO:", expected)
    assert all(len(t) == 12 for t in expected)  # 1000 tokens were asked for: clamped to the server's 12
    with pytest.raises(Exception, match="☃"):  # gr.Error, shown as a message on the page
        list(run("☃", 5, 1.0, 0, 1.0, 1, 1))


def test_the_page_offers_every_control_with_its_label_range_and_default(gen):
    """What a visitor sees: each control's label, range, step and default, the title and header, the
    card, the example prompts, the loss plot, and one request at a time in a queue of 64. The browser
    tests find the controls by these element ids."""
    from gptforge.web import build_app

    demo = build_app(gen, max_new_tokens_limit=300, num_samples_limit=3)
    config = demo.get_config_file()
    assert config["title"] == f"gptforge: {gen.run_dir.name}" and config["analytics_enabled"] is False
    by_id = {c["props"]["elem_id"]: (c["type"], c["props"]) for c in config["components"] if c["props"].get("elem_id")}
    want = {  # elem_id: type, label, minimum, maximum, value, step
        "prompt": ("textbox", "Prompt", None, None, "ROMEO:", None),
        "max-new-tokens": ("slider", "Max new tokens", 1, 300, 200, 1),
        "temperature": ("slider", "Temperature (0 = greedy)", 0.0, 2.0, 0.8, 0.05),
        "top-k": ("slider", "Top-k (0 = off)", 0, gen.vocab_limit, 0, 1),
        "top-p": ("slider", "Top-p (1 = off)", TOP_P_MIN, 1.0, 1.0, 0.01),
        "seed": ("number", "Seed (blank = random)", None, None, 1337, 1),
        "num-samples": ("slider", "Samples", 1, 3, 1, 1),
        "generate": ("button", None, None, None, "Generate", None),
        "output": ("textbox", "Output", None, None, None, None),
    }
    for elem_id, (kind, label, lo, hi, value, step) in want.items():
        got_kind, props = by_id[elem_id]
        assert (got_kind, props.get("label"), props.get("minimum"), props.get("maximum"), props.get("value"),
                props.get("step")) == (kind, label, lo, hi, value, step), elem_id
    assert (by_id["prompt"][1]["lines"], by_id["output"][1]["lines"], by_id["output"][1]["max_lines"]) == (3, 14, 40)
    assert by_id["output"][1]["interactive"] is False and by_id["seed"][1]["precision"] == 0
    assert by_id["model-card"][1]["value"] == model_card_markdown(gen)
    assert by_id["loss-plot"][0] == "image" and by_id["loss-plot"][1]["label"] == "Loss curves"
    assert by_id["loss-plot"][1]["interactive"] is False  # shown, not an upload box
    assert by_id["loss-plot"][1]["value"]["orig_name"] == "loss.png"
    header = next(c["props"]["value"] for c in config["components"] if c["type"] == "markdown")
    assert header == (f"# gptforge · {gen.run_dir.name}\nA GPT trained from scratch with gptforge. "
                      "Type a prompt and press **Generate**.")
    examples = next(c["props"] for c in config["components"] if c["type"] == "dataset")
    assert examples["label"] == "Example prompts" and examples["samples"] == [[p] for p in EXAMPLE_PROMPTS]
    scales = [c["props"]["scale"] for c in config["components"] if c["type"] == "column"]
    assert scales == [3, 2]  # the controls left, the card and plot right
    assert (demo._queue.default_concurrency_limit, demo._queue.max_size) == (1, 64)
    assert [f.api_name for f in demo.fns.values() if f.name == "run"] == ["generate"]

    # A model with no run directory (built in Python) has no plot, and a short vocabulary a shorter top-k.
    bare = build_app(Generator(gen.model, gen.tokenizer, info=gen.info))
    components = bare.get_config_file()["components"]
    assert not [c for c in components if c["type"] == "image"]
    assert next(c for c in components if c["props"].get("elem_id") == "max-new-tokens")["props"]["maximum"] == 500
    # Limits of one (a slider needs two values): fixed numbers, not a crash.
    one = {c["props"].get("elem_id"): c for c in build_app(gen, max_new_tokens_limit=1, num_samples_limit=1)
           .get_config_file()["components"]}
    for elem_id, label in (("max-new-tokens", "Max new tokens"), ("num-samples", "Samples")):
        assert (one[elem_id]["type"], one[elem_id]["props"]["value"], one[elem_id]["props"]["label"],
                one[elem_id]["props"]["interactive"], one[elem_id]["props"]["precision"]) == (
                    "number", 1, label, False, 0)
    two = {c["props"].get("elem_id"): c for c in build_app(gen, max_new_tokens_limit=2, num_samples_limit=2)
           .get_config_file()["components"]}
    for elem_id in ("max-new-tokens", "num-samples"):  # two values: a slider again
        assert (two[elem_id]["type"], two[elem_id]["props"]["minimum"], two[elem_id]["props"]["maximum"]) == (
            "slider", 1, 2)
    assert by_id["generate"][1]["variant"] == "primary"


def test_top_k_goes_to_200_at_most_and_the_page_needs_gradio(monkeypatch):
    import sys

    from gptforge.data.tokenizers import build_tokenizer
    from gptforge.model import GPT, GPTConfig
    from gptforge.web import build_app

    tok = build_tokenizer("gpt2")  # 50,257 ids: the slider stops at 200
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8, block_size=8))
    demo = build_app(Generator(model, tok))
    top_k = next(c for c in demo.get_config_file()["components"] if c["props"].get("elem_id") == "top-k")
    assert (top_k["props"]["minimum"], top_k["props"]["maximum"]) == (0, 200)
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    with pytest.raises(GptforgeError) as e:
        build_app(Generator(model, tok))
    assert str(e.value) == "the web page needs gradio; pip install 'gptforge[web]'"


def test_the_pages_generate_passes_every_setting_and_an_empty_prompt(gen):
    from gptforge.web import build_app

    run = next(f.fn for f in build_app(gen, max_new_tokens_limit=12, num_samples_limit=1).fns.values()
               if f.name == "run")
    out = list(run("ROMEO:", 5, 0.8, 0, 1.0, 7, 3))[-1]  # 3 samples asked for, the limit is 1
    assert out == format_samples("ROMEO:", gen.generate("ROMEO:", max_new_tokens=5, temperature=0.8, seed=7))
    out = list(run(None, 4, 0.0, 0, 1.0, 1, 1))[-1]  # an empty prompt box: generation from nothing
    assert out == format_samples("", gen.generate("", max_new_tokens=4, temperature=0.0))
    assert len(out) == 4


def test_example_prompts_are_those_the_tokenizer_can_encode():
    from types import SimpleNamespace

    from gptforge.data.tokenizers import CharTokenizer
    from gptforge.web import example_prompts

    def with_chars(chars: str) -> list[str]:
        return example_prompts(SimpleNamespace(tokenizer=CharTokenizer(chars)))

    assert with_chars("".join(EXAMPLE_PROMPTS)) == list(EXAMPLE_PROMPTS)
    # The first prompts' letters missing, the later ones still offered: one unknown prompt is skipped.
    assert with_chars("KINGHERY:\nOncemor ") == ["KING HENRY:\nOnce more"]
    assert with_chars("xyz") == [""]  # none encodes: the page starts from an empty prompt


# ----------------------------------------------------------------------------------------- serving



def test_concurrent_requests_are_queued_served_one_at_a_time_and_all_answered(tiny_run, serve):
    """Six visitors press Generate at once on a served page: every one gets its own whole answer (the
    queue drops none) and the model runs one request at a time (they wait in line, not side by side)."""
    from gradio_client import Client

    import gptforge
    from gptforge.web import build_app

    gen = gptforge.load(tiny_run, device="cpu")
    asks = [(prompt, seed) for prompt in ("ROMEO:", "JULIET:") for seed in (1, 2, 3)]
    expected = {(prompt, seed): format_samples(prompt, gen.generate(prompt, max_new_tokens=30, temperature=0.9,
                                                                    top_k=0, top_p=1.0, seed=seed, num_samples=2))
                for prompt, seed in asks}
    assert len(set(expected.values())) == len(asks)  # six different answers: none can stand in for another

    running, most, served = [0], [0], []
    lock = threading.Lock()
    real_stream = gen.stream_batch

    def stream_batch(prompt, **settings):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            yield from real_stream(prompt, **settings)
        finally:
            with lock:
                running[0] -= 1
                served.append((prompt, settings["seed"]))

    gen.stream_batch = stream_batch
    demo = build_app(gen, max_new_tokens_limit=30)
    port = serve.free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                show_error=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        serve.wait_until_it_answers(url)
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        jobs = {ask: client.submit(ask[0], 30, 0.9, 0, 1.0, ask[1], 2, api_name="/generate") for ask in asks}
        answers = {ask: job.result(timeout=300) for ask, job in jobs.items()}
    finally:
        demo.close()
    assert answers == expected
    assert sorted(served) == sorted(asks) and most[0] == 1


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on TCP `port`, from Linux's /proc/net/tcp and tcp6."""
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        table = Path("/proc/net") / name
        if not table.is_file():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)  # each 32-bit word printed in the host's byte order
            if sys.byteorder == "little":
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_serve_listens_on_loopback_only_by_default(tiny_run, serve):
    """Without --host the page is for this machine only: its one listening socket is bound to
    127.0.0.1 (not 0.0.0.0 or ::), and where the machine has another address, connecting there fails."""
    with serve(tiny_run) as port:
        if Path("/proc/net/tcp").is_file():
            assert _listening_addresses(port) == {"127.0.0.1"}
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, port), timeout=10).close()
        elif not Path("/proc/net/tcp").is_file():
            pytest.skip("neither /proc/net/tcp nor a non-loopback address to tell the bound address by")


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


def test_export_space_takes_the_checkpoint_asked_for_and_the_runs_files(tiny_run, tmp_path):
    import shutil

    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "best")
    shutil.copytree(ckpts / "step-0000060", ckpts / "best")  # a best checkpoint that is not the latest
    out = export_space(run, tmp_path / "new" / "deeper" / "space", which="best")  # no parent exists yet
    exported = out / run.name / "checkpoints" / "latest"
    assert json.loads((exported / "info.json").read_text())["step"] == 60
    assert (exported / "model.safetensors").read_bytes() == (ckpts / "step-0000060" / "model.safetensors").read_bytes()
    assert "| steps | 60 |" in (out / "README.md").read_text(encoding="utf-8")  # the card of what is exported
    for name in ("config.toml", "metrics.jsonl", "loss.png"):
        assert (out / run.name / name).read_bytes() == (run / name).read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_space(run, empty) == empty  # an existing empty folder is fine; the latest by default
    assert json.loads((empty / run.name / "checkpoints" / "latest" / "info.json").read_text())["step"] == 120


# ----------------------------------------------------------------------------------------- bind checks
# `serve` runs these before loading anything; the CLI tests see them only through a subprocess, which
# mutmut cannot attribute (docs/testing.md), so they are called directly here too.


def _bind_error(host: str, port: int) -> str:
    from gptforge.web import _check_bind

    with pytest.raises(GptforgeError) as e:
        _check_bind(host, port)
    return str(e.value)


def test_check_bind_refuses_ports_out_of_range_and_unknown_hosts():
    from gptforge.web import _check_bind

    for port in (-1, 0, 65536):
        assert _bind_error("127.0.0.1", port) == (f"--port {port} is not a TCP port; choose one in 1..65535 "
                                                  "(default 7860)")
    for port in (1, 65535):  # in range: bound, or refused for another reason (port 1 needs root)
        try:
            _check_bind("127.0.0.1", port)
        except GptforgeError as e:
            assert str(e).startswith(f"cannot serve on 127.0.0.1:{port} (")
    # The resolver's own words (gaierror's strerror), or the codec's for a name that is not even a host name.
    for host in ("no-such-host.invalid", "x" * 64 + ".example"):
        try:
            socket.getaddrinfo(host, 7860, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            cause = getattr(e, "strerror", None) or str(e)
        assert _bind_error(host, 7860) == (f"--host {host!r} is not an address ({cause}); give an address of "
                                           "this machine, e.g. 127.0.0.1 or 0.0.0.0")
    assert "label empty or too long" in cause


def test_check_bind_refuses_a_port_in_use_and_accepts_one_a_stopped_server_just_left():
    from gptforge.web import _check_bind

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server (uvicorn) sets it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert _bind_error("127.0.0.1", port) == (f"cannot serve on 127.0.0.1:{port} (Address already in use); "
                                                  "pick another --port or --host")
        # A server that stops closes its side of a connection first: the port is left in TIME_WAIT,
        # which a new server (SO_REUSEADDR on both) binds again, so the check must accept it too.
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()
        client.recv(1)  # the server's close has arrived
        client.close()
    _check_bind("127.0.0.1", port)
    _check_bind("127.0.0.1", port)  # the check's own socket was closed
    _check_bind("::1" if socket.has_ipv6 and _has_ipv6_loopback() else "localhost", port)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_check_limit():
    from gptforge.web import _check_limit

    _check_limit(1)
    for bad in (0, -3):
        with pytest.raises(GptforgeError) as e:
            _check_limit(bad)
        assert str(e.value) == f"--max-new-tokens-limit must be >= 1, got {bad}"
