"""benchmarks/gpu_check.py (`make gpu-check`): its dry run works end to end on the CPU, a stage that fails or
runs out of time leaves the earlier stages' results and marks itself, and the GPU tests are deselected unless
asked for (they are run by the check on a GPU, never here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _read(out: Path) -> tuple[dict, str]:
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


@pytest.mark.slow
def test_the_dry_run_passes_every_stage_and_reports_it(tmp_path, data_dir):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--data-dir", str(data_dir)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, md = _read(out)

    assert report["dry_run"] is True and report["ok"] is True
    assert [s["name"] for s in report["stages"]] == ["env", "tests", "exercise", "throughput"]
    for stage in report["stages"]:
        assert stage["status"] == "ok", stage
        assert stage["seconds"] > 0 and stage["logs"]
        assert f"| {stage['name']} | ok |" in md
    stages = {s["name"]: s["result"] for s in report["stages"]}
    assert report["environment"]["torch"] and report["environment"]["cuda_available"] is False

    # The GPU tests were collected, not run: every one of them, by id.
    collected = stages["tests"]["tests"]
    assert stages["tests"]["collected"] == len(collected) >= 10
    assert all(t.startswith("tests/gpu/") for t in collected)

    # Throughput: three rows from three processes on the same batches, HF on SDPA attention.
    rows = {(r["model"], r["compile"]): r for r in stages["throughput"]["rows"]}
    assert set(rows) == {("gptforge", False), ("hf", False), ("gptforge", True)}
    assert rows[("hf", False)]["attn_implementation"] == "sdpa" and rows[("hf", False)]["vs_hf"] == 1.0
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["peak_memory_bytes"] > 0
        assert 9.0 < r["final_loss"] < 12.0  # a few updates from ln(50257) = 10.8 on random tokens
    assert rows[("gptforge", True)]["compile_s"] is not None and rows[("gptforge", False)]["compile_s"] is None
    assert "## Training throughput" in md and "HF GPT2LMHeadModel eager" in md

    # The exercise's mechanism on a CPU: stopped by the whole-text target, which `gptforge eval` recomputes.
    ex = stages["exercise"]
    assert ex["stopped_by"] == "stop_at_loss" and ex["whole_text_train_loss"] < ex["target"] < 0.1
    assert ex["whole_text_tokens"] == ex["eval_tokens"] == 1999 and ex["eval_agrees"] is True
    assert ex["updates"] > 0 and ex["epochs"] > 1 and ex["training_s"] > 0
    assert len(ex["samples"]) == 3 and all(s.startswith("First Citizen:") for s in ex["samples"])
    assert "## The classic exercise" in md and "Sample 3:" in md


def test_a_stage_that_raises_keeps_the_earlier_results_and_the_next_stage_runs(tmp_path, gpu_check):
    out = tmp_path / "check"

    def first(ctx):
        ctx.result["answer"] = 42

    def boom(ctx):
        # The report on disk already holds the first stage's result while this one runs.
        on_disk = json.loads((out / "report.json").read_text())
        ctx.result["seen_before"] = [[s["name"], s["status"]] for s in on_disk["stages"]]
        raise RuntimeError("the card caught fire")

    def after(ctx):
        ctx.result["ran"] = True

    stages = [gpu_check.Stage("first", first, 60, needs_cuda=False), gpu_check.Stage("boom", boom, 60),
              gpu_check.Stage("after", after, 60)]
    report = gpu_check.run_check(stages, gpu_check.Options(out=out, data_dir=None, dry_run=True, budget_s=600))

    on_disk, md = _read(out)
    assert on_disk == json.loads(json.dumps(report, default=str))
    by_name = {s["name"]: s for s in on_disk["stages"]}
    assert by_name["first"]["status"] == "ok" and by_name["first"]["result"] == {"answer": 42}
    assert by_name["boom"]["status"] == "failed" and "RuntimeError: the card caught fire" in by_name["boom"]["error"]
    assert by_name["boom"]["result"]["seen_before"] == [["first", "ok"], ["boom", "running"], ["after", "pending"]]
    assert by_name["after"]["status"] == "ok" and by_name["after"]["result"] == {"ran": True}
    assert on_disk["ok"] is False
    assert "| first | ok |" in md and "| boom | failed |" in md and "the card caught fire" in md


def test_a_stage_past_its_limit_is_killed_and_marked_timeout(tmp_path, gpu_check):
    out = tmp_path / "check"
    pid_file = tmp_path / "pid"

    def slow(ctx):
        ctx.result["started"] = True
        # sh writes its pid at once and exec keeps it: a Python child slow to start on a busy machine
        # could be killed before writing it.
        ctx.run(["sh", "-c", f'echo $$ > "{pid_file}"; exec sleep 120'], "sleeper", timeout=5)

    def later(ctx):
        ctx.result["ran"] = True

    # A 19.5 s budget: the first stage starts (>= 15 s left) however slowly this process got there, up
    # to 4.5 s; after the sleeper's 5 s the second finds less than 15 s left, whatever the machine's load.
    stages = [gpu_check.Stage("slow", slow, 30, needs_cuda=False), gpu_check.Stage("later", later, 30)]
    gpu_check.run_check(stages, gpu_check.Options(out=out, data_dir=None, dry_run=True, budget_s=19.5))

    report, md = _read(out)
    slow_entry, later_entry = report["stages"]
    assert slow_entry["status"] == "timeout" and "sleeper" in slow_entry["error"]
    assert slow_entry["result"] == {"started": True} and slow_entry["logs"] == ["logs/slow-sleeper.log"]
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the child was killed and reaped, not left running
        os.kill(pid, 0)
    assert later_entry["status"] == "skipped" and "out of time" in later_entry["error"]
    assert "| slow | timeout |" in md and "| later | skipped |" in md


def test_without_cuda_the_gpu_stages_are_skipped_not_run(tmp_path, gpu_check):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU stages would run")
    out = tmp_path / "check"
    ran = []
    stages = [gpu_check.Stage("env", gpu_check.stage_env, 120, needs_cuda=False),
              gpu_check.Stage("tests", lambda ctx: ran.append("tests"), 60)]
    gpu_check.run_check(stages, gpu_check.Options(out=out, data_dir=None, dry_run=False, budget_s=600))
    report, _ = _read(out)
    env, tests = report["stages"]
    assert env["status"] == "ok" and report["environment"]["cuda_available"] is False
    assert tests["status"] == "skipped" and "no CUDA GPU" in tests["error"] and ran == []


def test_the_tests_stage_fails_where_cuda_skips_every_gpu_test(tmp_path, gpu_check, data_dir):
    """Outside a dry run the stage runs `pytest -m gpu` and reads its JUnit XML; on a CPU every test is
    skipped ("needs CUDA"), which is a failure of the stage, never a pass."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU tests would run")
    out = tmp_path / "check"
    stages = [gpu_check.Stage("tests", gpu_check.stage_tests, 120, needs_cuda=False)]
    gpu_check.run_check(stages, gpu_check.Options(out=out, data_dir=data_dir, dry_run=False, budget_s=600))
    entry = _read(out)[0]["stages"][0]
    tests = entry["result"]["tests"]
    assert entry["status"] == "failed" and "skipped" in entry["error"]
    assert len(tests) >= 10 and entry["result"]["counts"] == {"skipped": len(tests)}
    assert all(t["outcome"] == "skipped" and "needs CUDA" in t["message"] for t in tests)


def test_the_exercise_numbers_come_from_metrics_jsonl(tmp_path, gpu_check):
    """A compiled run's log: the first update carries the compile, an evaluation (logged after the step's
    train record) lengthens the next interval, the last line was cut short by a kill. Steady seconds per
    update come only from the intervals without an evaluation."""
    records = [
        {"kind": "event", "event": "started", "step": 0, "device": "cuda:0", "dtype": "bfloat16", "params": 124,
         "train_tokens": 1000, "tokens_per_update": 100},
        {"kind": "event", "event": "compiled", "step": 1, "seconds": 29.9},
        {"kind": "train", "step": 1, "tokens": 100, "loss": 10.9, "elapsed_s": 0.0},
        {"kind": "train", "step": 10, "tokens": 1000, "loss": 5.0, "elapsed_s": 0.9, "tokens_per_s": 1000.0},
        {"kind": "train", "step": 20, "tokens": 2000, "loss": 0.6, "elapsed_s": 2.1, "tokens_per_s": 833.3},
        {"kind": "eval", "step": 20, "tokens": 2000, "train_loss": 0.5, "train_loss_tokens": 999, "eval_s": 0.4},
        {"kind": "train", "step": 30, "tokens": 3000, "loss": 0.1, "elapsed_s": 3.7, "tokens_per_s": 625.0,
         "epoch": 3},
        {"kind": "eval", "step": 30, "tokens": 3000, "train_loss": 0.09, "train_loss_tokens": 999, "eval_s": 0.6},
        {"kind": "event", "event": "stopped", "step": 30, "reason": "stop_at_loss", "metric": "train_loss",
         "value": 0.09, "target": 0.099999},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st', encoding="utf-8")

    out = gpu_check.summarise_metrics(path)

    assert (out["stopped_by"], out["target"], out["updates"], out["epochs"], out["epochs_seen"]) == \
        ("stop_at_loss", 0.099999, 30, 3.0, 3)
    assert out["whole_text_train_loss"] == 0.09 and out["whole_text_tokens"] == 999
    # 1->10 (0.10 s/update) and 10->20 (0.12); 20->30 holds the evaluation at 20 and is left out.
    assert out["steady_s_per_update"] == pytest.approx(0.11)
    assert out["compile_s_reported"] == 29.9 and out["training_s"] == 3.7
    assert out["training_s_with_compile"] == pytest.approx(33.6)
    assert out["median_tokens_per_s"] == 833
    assert out["n_evals"] == 2 and out["median_eval_s"] == pytest.approx(0.5)


def test_stage_and_timeout_options(gpu_check):
    assert gpu_check.parse_stages(None) == ["env", "tests", "exercise", "throughput"]
    assert gpu_check.parse_stages("exercise,tests") == ["env", "tests", "exercise"]  # fixed order, env first
    with pytest.raises(ValueError, match="unknown stage"):
        gpu_check.parse_stages("tests,benchmark")
    defaults = {"env": 60.0, "tests": 100.0}
    assert gpu_check.parse_timeouts("tests=200", defaults) == {"env": 60.0, "tests": 200.0}
    assert gpu_check.parse_timeouts("30", defaults) == {"env": 30.0, "tests": 30.0}
    for bad in ("tests=soon", "gpu=5", "tests=-1"):
        with pytest.raises(ValueError):
            gpu_check.parse_timeouts(bad, defaults)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--stages", "nope"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown stage" in proc.stderr


def _collect(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "--collect-only", "-q", "-p",
                           "no:cacheprovider", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout


def test_gpu_tests_are_deselected_by_default_and_all_carry_the_marker():
    rc, out = _collect()
    assert rc == 5 and "deselected" in out  # 5: nothing selected, so `make test` never runs them
    rc, out = _collect("-m", "gpu")
    selected = [line for line in out.splitlines() if line.startswith("tests/gpu/")]
    rc_all, out_all = _collect("-m", "gpu or not gpu")
    every = [line for line in out_all.splitlines() if line.startswith("tests/gpu/")]
    assert rc == rc_all == 0 and len(selected) >= 10 and selected == every
