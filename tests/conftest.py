"""Shared fixtures. Tests run offline: data comes from GPTFORGE_DATA_DIR (CI sets it to
../shared/data) and every test gets its own empty, writable cache directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _default_data_dir() -> Path | None:
    env = os.environ.get("GPTFORGE_DATA_DIR")
    if env:
        return Path(env)
    guess = REPO.parent / "shared" / "data"
    return guess if guess.is_dir() else None


DATA_DIR = _default_data_dir()
if DATA_DIR is not None:
    # Make the local copies visible to code under test (and to subprocesses it starts).
    os.environ["GPTFORGE_DATA_DIR"] = str(DATA_DIR)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test writes caches into its own temporary directory, never ~/.cache."""
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: two OpenMP threads syncing on a busy 2-core
    CPU cost far more than they save at this size. Opt in with pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if DATA_DIR is None or not (DATA_DIR / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail("set GPTFORGE_DATA_DIR to a directory holding tinyshakespeare/input.txt and gpt2/gpt2.tiktoken")
    return DATA_DIR


@pytest.fixture(scope="session")
def shakespeare_text(data_dir) -> str:
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


# ------------------------------------------------------------------ a tiny trained run
SLICE_CHARS = 100_000  # enough text for ~60 steps of 16 x 64 tokens without much repetition
OVERRIDES = [
    "model.preset=tiny",  # 2 layers, 2 heads, 64 wide, context 64
    "data.tokenizer=char",
    "data.val_fraction=0.1",
    "optim.lr=5e-3",
    "optim.min_lr=5e-4",
    "optim.warmup_steps=10",
    "train.batch_size=16",
    "train.max_steps=120",
    "train.eval_every=60",
    "train.eval_batches=4",
    "train.checkpoint_every=60",
    "train.log_every=10",
    "train.device=cpu",
    "train.seed=1337",
]


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_tiny_run(base: Path, shakespeare_text: str) -> Path:
    """Train (once) and return BASE/shakespeare-char-tiny; a finished run is marked by BASE/done."""
    run = base / "shakespeare-char-tiny"
    if (base / "done").is_file():
        return run
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "lock", "w") as lock:
        if fcntl is not None:  # two pytest processes sharing BASE (make mutate) train it once
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "done").is_file():
            _train_tiny_run(base, run, shakespeare_text)
    return run


def _train_tiny_run(base: Path, run: Path, shakespeare_text: str) -> None:
    from gptforge.config import load_config
    from gptforge.train.trainer import train

    shutil.rmtree(run, ignore_errors=True)  # a run cut short before it was done
    corpus = base / "shakespeare-slice.txt"
    corpus.write_text(shakespeare_text[:SLICE_CHARS], encoding="utf-8")
    config = load_config(None, [*OVERRIDES, f"data.corpus={corpus}"])
    # The session fixture runs before the per-test cache fixture: keep its cache inside BASE.
    # One thread: for a 0.1M-parameter model, syncing two threads costs more than it saves, and
    # far more on a machine whose cores are busy with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _env(GPTFORGE_CACHE_DIR=str(base / "cache")):
            train(config, run)
    finally:
        torch.set_num_threads(threads)
    (base / "done").write_text("ok\n")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shakespeare_text) -> Path:
    """A char-level model really trained for 120 steps on a slice of Tiny Shakespeare, once per
    session; shared by the generation, web and browser tests. GPTFORGE_TEST_TINY_RUN names a directory
    that keeps it across sessions: `make mutate` runs pytest once per mutant and trains it once."""
    shared = os.environ.get("GPTFORGE_TEST_TINY_RUN")
    base = Path(shared) if shared else tmp_path_factory.getbasetemp() / "gptforge-tiny-run"
    return make_tiny_run(base, shakespeare_text)


class _Greedy:
    """Greedy decoding two ways, to compare models and the KV cache token for token."""

    @staticmethod
    def full(step_logits, prompt: torch.Tensor, n: int) -> list[int]:
        """step_logits(ids) -> (1, T, V) logits of the whole sequence, recomputed at every token."""
        ids = prompt.clone()
        for _ in range(n):
            nxt = step_logits(ids)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        return ids[0, prompt.size(1):].tolist()

    @staticmethod
    def cached(model, prompt: torch.Tensor, n: int) -> list[int]:
        """A gptforge GPT with its KV cache: prefill the prompt, then one token at a time."""
        cache = model.new_kv_cache(1)
        logits, _ = model(prompt, kv_cache=cache)
        out = []
        for _ in range(n):
            nxt = logits[0, -1].argmax().view(1, 1)
            out.append(nxt.item())
            logits, _ = model(nxt, kv_cache=cache)
        return out


@pytest.fixture
def greedy() -> _Greedy:
    return _Greedy()


class _Serve:
    """`gptforge serve` for the web and browser tests. `serve(run, *args)` starts it in a subprocess on
    a free port and yields the port once the page answers, always stopping it after; `free_port()` and
    `wait_until_it_answers(url)` serve an app launched in the test's own process. Time limits here only
    turn a hang into a failure."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    @staticmethod
    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @staticmethod
    def wait_until_it_answers(url: str, alive=lambda: None) -> None:
        """Poll `url` until it answers 200; alive() raises if the server died."""
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
        give_up = time.monotonic() + 180
        while True:
            alive()
            try:
                with direct.open(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < give_up, f"{url} did not answer"
            time.sleep(0.3)

    @contextlib.contextmanager
    def __call__(self, run: Path, *args: str):
        port = self.free_port()
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
        with open(self.log_dir / "serve.log", "w+") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(run), "--port", str(port),
                                     "--device", "cpu", *args], stdout=log, stderr=subprocess.STDOUT, env=env)

            def alive():
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"gptforge serve exited with {proc.returncode}:\n{log.read()[-3000:]}")

            try:
                self.wait_until_it_answers(f"http://127.0.0.1:{port}/", alive)
                yield port
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def serve(tmp_path) -> _Serve:
    return _Serve(tmp_path)
