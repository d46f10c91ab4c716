"""RUN/data.json's guard: resuming or evaluating a run on other data is refused in one line."""

from __future__ import annotations

import pytest

from gptforge.cli import main
from gptforge.train.trainer import train


def test_files_merged_into_one_are_other_data(tiny_config, tmp_path, shakespeare_text, capsys):
    """The same text as one file instead of two is other tokens (one document, no end-of-text token
    between them with gpt2 or bpe): eval and --resume refuse it, as they refuse changed text."""
    d = tmp_path / "texts"
    d.mkdir()
    first, second = shakespeare_text[:6_000], shakespeare_text[6_000:12_000]
    (d / "a.txt").write_text(first, encoding="utf-8")
    (d / "b.txt").write_text(second, encoding="utf-8")
    run = tmp_path / "run"
    train(tiny_config(f"data.corpus={d}", "train.max_steps=2"), run)
    (d / "a.txt").write_text(first + ("" if first.endswith("\n") else "\n") + second, encoding="utf-8")
    (d / "b.txt").unlink()
    for argv in (["eval", str(run), "--device", "cpu"], ["train", "--resume", str(run), "train.max_steps=4"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"gptforge: error: the corpus of {run} changed") and "\n" not in err
