"""Files that are whole or absent: atomic writes of files and directories, and tolerant reads.

    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))   # any writer, then a rename
    atomic_write_text(path, text); atomic_write_json(path, {"step": 1})
    swap_in_dir(tmp_dir, final_dir)                                      # a finished directory replaces another
    record = read_json(path, hint="use another checkpoint")             # GptforgeError when missing or damaged
    for line, record in iter_jsonl(path): ...                            # a line cut short by a kill is skipped
    lock = RunLock(run_dir); lock.acquire(); ...; lock.release()         # one writer per run directory

A writer always writes a temporary sibling (`.NAME.tmp-PID`) and renames it over the target, so a
reader, or a kill at any moment, sees the old content or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError


def temp_sibling(path: str | os.PathLike) -> Path:
    """Where a write of `path` goes before it is renamed into place (hidden, and unique per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any], fsync: bool = False) -> Path:
    """`write(tmp)` then rename tmp over `path`; on any failure tmp is removed and `path` is untouched.
    `fsync=True` puts the bytes on disk before the rename (for what a crash must not lose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` at `final`: `final` -> `final.old`, `tmp` -> `final`, then
    `final.old` is deleted. At every moment `final` or `final.old` is complete (readers fall back to
    `.old`, see runs.resolve_checkpoint)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def read_json(path: str | os.PathLike, hint: str = "write it again") -> dict[str, Any]:
    """A JSON object from `path`; a missing, unreadable or non-object file is a GptforgeError that
    names the file and ends with `hint` (what the user can do)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptforgeError(f"{path} is missing; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptforgeError(f"{path} is damaged ({type(e).__name__}); {hint}") from None
    if not isinstance(value, dict):
        raise GptforgeError(f"{path} is damaged (not a JSON object); {hint}")
    return value


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, record) for each JSON object of a JSON Lines file (metrics.jsonl, samples.jsonl); a line
    cut short by a kill, or anything that is not an object, is skipped."""
    for raw in Path(path).read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except ValueError:  # not JSON, or bytes a kill or a disk error left that are not even UTF-8
            continue
        if isinstance(record, dict):
            yield line, record


class RunLock:
    """An exclusive lock on a run directory, held while one process trains into it: a second writer
    (another `gptforge train --resume RUN`) gets one line naming the first, never an interleaving of
    two runs' checkpoints and metrics. The lock is `RUN/.lock` (flock, released by the kernel when the
    holder exits, even after kill -9); the file holds the holder's pid and start time, for that message.
    Where flock is missing (Windows) there is no lock."""

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = ""
            try:
                holder = self.path.read_text(encoding="utf-8").strip()
            except OSError:
                pass
            raise GptforgeError(f"{self.path.parent} is being trained by another process ({holder or 'pid unknown'}); "
                                "wait for it to finish or stop it (Ctrl-C saves its checkpoint), or pick another "
                                "--out") from None
        import time

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release  # a Trainer built but never run (tests, notebooks) lets go when it is dropped
