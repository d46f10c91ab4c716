"""gptforge.evaluate: evaluating a run is a component of its own, with nothing of the training package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Runs one `gptforge` command through cli.main in this process, then prints the gptforge.train modules
# it loaded on the last line (after whatever the command printed).
WRAPPER = """
import json, sys
from gptforge.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code not in (None, 0):
        raise
print(json.dumps(sorted(m for m in sys.modules if m == "gptforge.train" or m.startswith("gptforge.train."))))
"""


@pytest.mark.parametrize("command", [
    ["eval", "{run}", "--device", "cpu"],
    ["generate", "{run}", "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "0", "--device", "cpu"],
])
def test_eval_and_generate_load_no_training_module(tiny_run, command):
    """`gptforge eval` and `gptforge generate` on a trained run never import gptforge.train (docs/design.md)."""
    argv = [a.format(run=tiny_run) for a in command]
    out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    *printed, loaded = out.stdout.strip().splitlines()
    assert printed, "the command printed nothing"
    assert json.loads(loaded) == []


def test_the_old_names_still_resolve_to_the_evaluation_module():
    import gptforge.evaluate as evaluate
    import gptforge.train.trainer as trainer

    for name in ("EvalLoss", "evaluate_run", "mean_loss", "split_loss", "split_windows"):
        assert getattr(trainer, name) is getattr(evaluate, name)
