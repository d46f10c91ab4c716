"""A trained run needs nothing but itself: with its token cache gone, no data directory and no network,
`gptforge eval` and `--resume` of a gpt2 run rebuild the tokens with the run's own copy of GPT-2's ranks."""

from __future__ import annotations

import shutil

import pytest

from gptforge.cli import main
from gptforge.data import tokenizers as tokenizers_mod
from gptforge.data.corpus import cache_dir
from gptforge.train.trainer import train


def test_a_gpt2_run_resumes_and_evaluates_offline_without_its_token_cache(tiny_config, tmp_path, monkeypatch,
                                                                          capsys, read_metrics):
    import tiktoken
    import tiktoken.load

    run = tmp_path / "run"
    train(tiny_config("data.tokenizer=gpt2", "train.max_steps=2", "train.eval_every=2", "optim.warmup_steps=0"),
          run)
    assert (run / "tokenizer" / "gpt2.tiktoken").is_file()

    # Offline: no token cache, no data directory, tiktoken's cache empty and every download refused.
    shutil.rmtree(cache_dir() / "tokens")
    monkeypatch.delenv("GPTFORGE_DATA_DIR")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))

    def no_network(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    tokenizers_mod._gpt2_encoding_from.cache_clear()  # nothing built earlier in this process helps
    try:
        with pytest.raises(Exception, match="GPT-2's BPE"):  # the network really is gone
            tokenizers_mod.build_tokenizer("gpt2")

        main(["eval", str(run), "--device", "cpu"])
        assert "val loss" in capsys.readouterr().out
        assert not (tmp_path / "empty-tiktoken-cache").exists() or not any((tmp_path / "empty-tiktoken-cache")
                                                                         .iterdir())
        shutil.rmtree(cache_dir() / "tokens")
        main(["train", "--resume", str(run), "train.max_steps=4"])
        assert "stopped by max_steps at step 4" in capsys.readouterr().out
        assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4]
    finally:
        tokenizers_mod._gpt2_encoding_from.cache_clear()
