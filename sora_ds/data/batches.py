"""A resumable stream of training micro-batches.

The order is a pure function of (seed, epoch): every rank draws the same permutation, accelerate shards it by
batch, and a run resumed after ``n`` micro-batches continues with exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

IGNORE_INDEX = -100  # label of tokens that carry no loss (PyTorch's and transformers' convention)


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch from ``seed + epoch`` (accelerate calls :meth:`set_epoch`)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def micro_batches(loader: DataLoader, start: int = 0) -> Iterator[dict]:
    """Endless micro-batches of a prepared ``loader``, skipping the first ``start`` (this process's count)."""
    from accelerate import skip_first_batches

    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("the training set is smaller than one batch; lower per_device_train_batch_size")
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader.set_epoch(epoch)
        yield from (skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0


def supervised_tokens(batch: dict) -> torch.Tensor:
    """Tokens that carry loss after the causal shift (what transformers divides by with ``num_items_in_batch``)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
