"""RUN/data.json: which corpus and tokenizer a run was trained on, so that resuming or evaluating it on
other data is refused instead of silently training (or scoring) on it.

    save_data_identity(run_dir, prepared)     # when a run starts (gptforge.train.trainer)
    check_data_identity(run_dir, prepared)    # on resume and in `gptforge eval` (gptforge.evaluate)

Written by the trainer, read by the trainer and evaluation: it lives outside gptforge.train so that
evaluating a run never loads training code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError
from gptforge.io import atomic_write_text

DATA_IDENTITY = "data.json"


def _dir_sha256(directory: Path) -> str:
    """sha256 over a directory's files (names and contents, sorted): a saved tokenizer's identity."""
    h = hashlib.sha256()
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(directory).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def save_data_identity(run_dir: Path, data: Any) -> None:
    """RUN/data.json: the sha256 of the corpus text and of the run's tokenizer, and the split sizes, so
    that resuming or evaluating on other data is refused instead of silently training on it."""
    m = data.meta
    identity = {"corpus_sha256": m["source_sha256"], "tokenizer_sha256": _dir_sha256(run_dir / "tokenizer"),
                "tokenizer": m["tokenizer"], "sources": m.get("sources"), "train_tokens": m["train_tokens"],
                "val_tokens": m["val_tokens"]}
    atomic_write_text(run_dir / DATA_IDENTITY, json.dumps(identity, indent=2) + "\n")


def check_data_identity(run_dir: Path, data: Any) -> None:
    """Raise GptforgeError when the corpus or tokenizer differs from the one the run recorded. Runs from
    before data.json existed are not checked."""
    path = Path(run_dir) / DATA_IDENTITY
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise GptforgeError(f"{path} is damaged; it records which data {run_dir} was trained on") from None
    way_out = (f"restore that data, or continue on the new text in a new run: gptforge train --init {run_dir} "
               "--out NEW_RUN ...")
    now = data.meta["source_sha256"]
    if recorded.get("corpus_sha256") != now:
        raise GptforgeError(f"the corpus of {run_dir} changed: sha256 {str(recorded.get('corpus_sha256'))[:16]} when "
                            f"it was trained, {now[:16]} now ({', '.join(data.meta.get('sources') or [])}); "
                            + way_out)
    tok_now = _dir_sha256(Path(run_dir) / "tokenizer")
    if recorded.get("tokenizer_sha256") != tok_now:
        raise GptforgeError(f"the tokenizer of {run_dir} changed: sha256 {str(recorded.get('tokenizer_sha256'))[:16]} "
                            f"when it was trained, {tok_now[:16]} now ({Path(run_dir) / 'tokenizer'}); " + way_out)
