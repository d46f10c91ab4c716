"""Evaluation: the exact mean cross-entropy (and bits per byte) of a model over batches or a whole split.

    from gptforge.evaluate import evaluate_run
    evaluate_run("runs/char")                        # `gptforge eval`: a checkpoint over the val split
    r = split_loss(model, tokens, block_size, batch_size, rt)   # EvalLoss(loss, tokens, bytes); r.bpb

One mean (mean_loss) for the trainer's periodic estimate, its train_full stop metric, `gptforge eval`,
the sweep and the benchmarks. A component the trainer calls, not part of it: this module imports no
gptforge.train code, so evaluating a run never loads the training package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from gptforge import runs
from gptforge.bpb import bits_per_byte, byte_table, target_bytes
from gptforge.config import load_config
from gptforge.data.identity import check_data_identity
from gptforge.data.pipeline import prepare
from gptforge.errors import GptforgeError
from gptforge.runtime import Runtime, setup_runtime


class EvalLoss(NamedTuple):
    """An evaluation's result: the mean cross-entropy (nats/token) over `tokens` predicted tokens, and
    the UTF-8 bytes those tokens spell (None when no byte table was given)."""

    loss: float
    tokens: int
    bytes: int | None = None

    @property
    def bpb(self) -> float | None:
        """Bits per byte: the total nats (loss x tokens) / (bytes x ln 2); see gptforge.bpb."""
        return None if self.bytes is None else bits_per_byte(self.loss * self.tokens, self.bytes)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], rt: Runtime,
              token_bytes: torch.Tensor | None = None) -> EvalLoss:
    """The one mean cross-entropy of evaluation: (loss, tokens, bytes) over every target != -1 of every
    (x, y) batch, token-weighted, summed over ranks under DDP. The periodic estimate, the train_full stop
    metric and `gptforge eval` all go through it, in whatever precision `rt` says (float32 for all three).
    `token_bytes` (gptforge.bpb.byte_table) counts the bytes of the targets, for bits per byte."""
    loss_sum, tokens_counted, bytes_counted = 0.0, 0, 0
    for x, y in batches:
        count = int((y != -1).sum())
        if token_bytes is not None:
            bytes_counted += target_bytes(y, token_bytes)
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device))
        loss_sum += float(loss) * count  # float64 on the host: exact enough for millions of tokens
        tokens_counted += count
    loss_sum, tokens_counted, bytes_counted = _sum_over_ranks(rt, [loss_sum, tokens_counted,
                                                                   bytes_counted]).tolist()
    return EvalLoss(loss_sum / tokens_counted, int(tokens_counted),
                    int(bytes_counted) if token_bytes is not None else None)


def split_windows(tokens: np.ndarray, block_size: int, batch_size: int, rank: int = 0, world_size: int = 1
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A whole split as batches of windows of block_size with stride block_size, so every token but the
    first is predicted exactly once. The last window is shorter: its missing targets are -1 (ignored).
    Under DDP each rank takes every world_size-th window."""
    n = len(tokens)
    if n < 2:
        raise GptforgeError(f"a split of {n} token(s) has nothing to predict; give more text")
    num_windows = math.ceil((n - 1) / block_size)
    mine = list(range(rank, num_windows, world_size))
    for b in range(0, len(mine), batch_size):
        windows = mine[b:b + batch_size]
        x = torch.zeros((len(windows), block_size), dtype=torch.int64)
        y = torch.full((len(windows), block_size), -1, dtype=torch.int64)
        for row, w in enumerate(windows):
            start = w * block_size
            chunk = torch.from_numpy(np.asarray(tokens[start:start + block_size + 1], dtype=np.int64))
            length = len(chunk) - 1
            x[row, :length] = chunk[:-1]
            y[row, :length] = chunk[1:]
        yield x, y


def split_loss(model: torch.nn.Module, tokens: np.ndarray, block_size: int, batch_size: int, rt: Runtime,
               rank: int = 0, world_size: int = 1, token_bytes: torch.Tensor | None = None) -> EvalLoss:
    """Exact mean cross-entropy over a whole split (see split_windows): (mean loss, tokens, bytes)."""
    return mean_loss(model, split_windows(tokens, block_size, batch_size, rank, world_size), rt, token_bytes)


def _sum_over_ranks(rt: Runtime, values: list[float]) -> torch.Tensor:
    """float64 sums over ranks, on the device the process group needs (float64 stays on the host
    otherwise: MPS has no float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    if rt.distributed:
        t = rt.all_reduce_sum(t.to(rt.device)).cpu()
    return t


def evaluate_run(run: str | Path, split: str = "val", which: str = "latest", device: str = "auto",
                 dtype: str = "float32", batch_size: int | None = None) -> dict[str, Any]:
    """`gptforge eval RUN`: exact mean cross-entropy of a checkpoint over a whole split.

    float32 by default, so the number does not depend on the precision the run trained in.
    Returns {"split", "loss", "tokens", "bytes", "bpb", "checkpoint", "step"}: bytes are the UTF-8
    bytes of the predicted tokens, bpb the bits per byte over them (see gptforge.bpb)."""
    if split not in ("train", "val"):
        raise GptforgeError(f"split {split!r} is unknown; use 'train' or 'val'")
    run = Path(run)
    path = runs.resolve_checkpoint(run, which)
    run_dir = runs.run_dir_of(path)
    config = load_config(run_dir / "config.toml")
    rt = setup_runtime(device, dtype)
    model, tokenizer, info = runs.load_model(path, device=rt.device)
    d = config.data
    data = prepare(d.corpus, tokenizer=tokenizer, val_fraction=d.val_fraction,
                   bpe_vocab_size=d.bpe_vocab_size if d.tokenizer == "bpe" else None, **d.prepare_options())
    check_data_identity(run_dir, data)
    tokens = data.train if split == "train" else data.val
    if tokens is None:
        raise GptforgeError(f"{run_dir} was trained without a validation split (data.val_fraction = 0); "
                            "use --split train")
    r = split_loss(model, tokens, model.config.block_size, batch_size or config.train.batch_size, rt,
                   token_bytes=byte_table(tokenizer))
    return {"split": split, "loss": r.loss, "tokens": r.tokens, "bytes": r.bytes, "bpb": r.bpb,
            "checkpoint": str(path), "step": info.get("step")}
