"""Where data lives: $GPTFORGE_DATA_DIR, read-only local copies (named corpora, GPT-2's BPE ranks),
and $GPTFORGE_CACHE_DIR, the writable cache (downloads, prepared token files, remembered source
hashes). A module of its own so that corpus, stream and tokenizers read it without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path | None:
    """$GPTFORGE_DATA_DIR: a read-only directory of local copies, or None when unset."""
    env = os.environ.get("GPTFORGE_DATA_DIR")
    return Path(env).expanduser() if env else None


def cache_dir() -> Path:
    """$GPTFORGE_CACHE_DIR (default ~/.cache/gptforge): downloads and prepared token files."""
    env = os.environ.get("GPTFORGE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptforge"
