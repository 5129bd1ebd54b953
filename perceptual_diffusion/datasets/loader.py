"""The data pipeline of the trainer: a resumable, rank-sliced batch sampler and a loader that
skips (and counts) corrupt items.

Resuming: every collated batch carries "position", the sampler position right after it. The
trainer stores the position of the last batch it consumed in the checkpoint and builds the new
sampler from it. (`sampler.position` is the same thing when num_workers == 0; with workers the
DataLoader draws index batches ahead of use, so the sampler's own position runs ahead.) Give the
loader to the trainer as is, never to `accelerator.prepare`, which would re-shard the batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ResumableBatchSampler", "ScaledDataset", "SkipCorrupt", "collate_skip", "make_loader"]

log = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003  # epoch e of seed s shuffles with s * stride + e


class IndexBatch(list):
    """One rank's indices of one batch, with `position`: the sampler position after it.

    A list subclass so it travels through the DataLoader (and pickles to workers) unchanged.
    """

    position: tuple[int, int] | None = None


class ResumableBatchSampler(Sampler[list[int]]):
    """Endless batches of indices, epoch after epoch, resumable from `.position`.

    Epoch e is the permutation randperm(num_items) seeded with seed * 1_000_003 + e. It is cut
    into global batches of batch_size * world_size consecutive indices (the incomplete tail is
    dropped, so every rank sees the same number of batches) and rank r takes the slice
    [r * batch_size, (r + 1) * batch_size) of each global batch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, batch_in_epoch: int = 0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size,"
                             f" got {batch_size}, {world_size}, {rank}")
        if num_items < batch_size * world_size:
            raise ValueError(f"{num_items} items are fewer than one global batch "
                             f"(batch_size {batch_size} x {world_size} processes)")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if epoch < 0 or not 0 <= batch_in_epoch < self.batches_per_epoch:
            raise ValueError(f"position ({epoch}, {batch_in_epoch}) is outside the "
                             f"{self.batches_per_epoch} batches of an epoch")
        self.position: tuple[int, int] = (epoch, batch_in_epoch)

    def permutation(self, epoch: int) -> Tensor:
        """The order of all items in `epoch`: (num_items,) int64."""
        g = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self) -> Iterator[IndexBatch]:
        epoch, first = self.position
        global_batch = self.batch_size * self.world_size
        while True:
            perm = self.permutation(epoch)
            for b in range(first, self.batches_per_epoch):
                start = b * global_batch + self.rank * self.batch_size
                batch = IndexBatch(perm[start:start + self.batch_size].tolist())
                last = b + 1 == self.batches_per_epoch
                batch.position = (epoch + 1, 0) if last else (epoch, b + 1)
                self.position = batch.position
                yield batch
            epoch, first = epoch + 1, 0


class _Items(list):
    """The items of one batch, carrying the batch's `position` on to `collate_skip`."""

    position: tuple[int, int] | None = None


class ScaledDataset(Dataset):
    """`dataset` with every item's "x" multiplied by `scale` (the model's units: `data.scale`);
    the other keys and the wrapped dataset's attributes pass through."""

    def __init__(self, dataset: Dataset, scale: float):
        if not 0 < scale < float("inf"):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.dataset, self.scale = dataset, float(scale)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        return {**item, "x": item["x"] * self.scale}

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SkipCorrupt(Dataset):
    """`dataset[i]`, or None (with a logged warning naming i and the error) when it raises."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as e:  # any failure of one item is that item's, not the run's
            log.warning("skipping data item %d: %s: %s", index, type(e).__name__, e)
            return None

    def __getitems__(self, indices: Sequence[int]) -> _Items:
        # The DataLoader hands the sampler's IndexBatch here; keep its position for collate.
        items = _Items(self[i] for i in indices)
        items.position = getattr(indices, "position", None)
        return items


def collate_skip(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Drop None items; stack tensors ("x" (B, C, ...), "label" (B,)), keep the rest ("caption")
    as lists; add "skipped" (items dropped) and "position" (when the batch came from a
    ResumableBatchSampler). A batch with no good item has no "x"."""
    kept = [item for item in batch if item is not None]
    out: dict[str, Any] = {}
    for key, first in (kept[0].items() if kept else ()):
        values = [item[key] for item in kept]
        out[key] = torch.stack(values) if isinstance(first, Tensor) else values
    out["skipped"] = len(batch) - len(kept)
    position = getattr(batch, "position", None)
    if position is not None:
        out["position"] = position
    return out


def make_loader(dataset: Dataset, sampler: ResumableBatchSampler, num_workers: int = 0) -> DataLoader:
    """A DataLoader over `SkipCorrupt(dataset)` drawing its batches from `sampler`.

    It has its own generator, so creating its iterator leaves the global torch RNG untouched
    (an exact resume depends on that). Iterate it once per run: with workers, a second
    iterator would start after the batches the first one prefetched.
    """
    if len(dataset) != sampler.num_items:
        raise ValueError(f"the sampler covers {sampler.num_items} items, the dataset has "
                         f"{len(dataset)}")
    return DataLoader(SkipCorrupt(dataset), batch_sampler=sampler, collate_fn=collate_skip,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(sampler.seed))
