"""Which samples each rank trains on, batch by batch, epoch after epoch; resumable at (epoch, position).

Everything here is computed in numpy from the samples' lengths (an int array), never from the
samples themselves, so a corpus of a million conversations costs a few arrays of n integers:

    epoch_order(epoch)  DistributedSampler's order (seeded torch.randperm of n, padded by wrapping
                        to a multiple of world_size, rank r takes r, r+N, …), optionally length-grouped
    BatchStream.next()  the next collated batch of this rank; `epoch`, `position` (batches consumed
                        in the epoch) are the resume cursor

With `workers > 0` a torch DataLoader materializes and collates batches in worker processes
(prefetching `prefetch` batches each); the cursor still counts only the batches `next()` returned,
so a checkpoint taken after step k resumes at batch k whatever was prefetched (tested with 2 workers: a
mid-epoch resume from a corpus is bitwise equal to an uninterrupted run). The trainer's --data-workers
defaults to 0 on CPU and 2 on CUDA (pinned memory on CUDA). A test compares epoch_order with
torch.utils.data.DistributedSampler itself.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from higgs_min.data import collate


def distributed_order(n: int, world_size: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """torch.utils.data.DistributedSampler(shuffle=True, drop_last=False) after set_epoch(epoch), in numpy:
    a permutation from torch.randperm seeded with seed + epoch, wrapped to a multiple of world_size,
    every world_size-th entry from `rank`. Returns int64 (ceil(n / world_size),)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    total = math.ceil(n / world_size) * world_size
    if total > n:  # the sampler's padding: the first indices again, cyclically
        perm = np.concatenate([perm, np.resize(perm, total - n)])
    return perm[rank:total:world_size]


def length_grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    """Reorder `order` so each run of `batch_size` holds samples of similar length.

    Sort within mega-batches of 50 batches (longest first, ties in order), then shuffle whole
    batches with random.Random(seed): padding drops, and every epoch still sees a new order.
    """
    order = np.asarray(order, dtype=np.int64)
    mega = batch_size * 50
    pieces = []
    for i in range(0, len(order), mega):
        chunk = order[i:i + mega]
        chunk = chunk[np.argsort(-lengths[chunk].astype(np.int64), kind="stable")]
        pieces.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    perm = list(range(len(pieces)))
    random.Random(seed).shuffle(perm)  # the same permutation as shuffling the list of batches itself
    return np.concatenate([pieces[p] for p in perm]) if pieces else order


def padding_fraction(lengths, order, batch_size: int) -> float:
    """Fraction of padded positions when batches are taken in `order`."""
    lengths, order = np.asarray(lengths), np.asarray(order, dtype=np.int64)
    real = padded = 0
    for i in range(0, len(order), batch_size):
        lens = lengths[order[i:i + batch_size]]
        real += int(lens.sum())
        padded += int(lens.max()) * len(lens)
    return 1 - real / padded if padded else 0.0


def lengths_of(dataset) -> np.ndarray:
    """`dataset.lengths` when it has them (packed corpus, JSONL dataset), else each sample's length."""
    if hasattr(dataset, "lengths"):
        return np.asarray(dataset.lengths)
    return np.array([len(s.input_ids) for s in dataset], dtype=np.int64)


class _Collated(torch.utils.data.Dataset):
    """dataset + collate, indexed by a list of sample indices (what the batch sampler yields)."""

    def __init__(self, dataset, pad_id: int):
        self.dataset, self.pad_id = dataset, pad_id

    def __getitem__(self, idx: list[int]):
        return collate([self.dataset[i] for i in idx], self.pad_id)

    def __len__(self):
        return len(self.dataset)


class BatchStream:
    """One rank's batches, epoch after epoch, resumable at (epoch, position).

    The order is DistributedSampler's (seeded, `set_epoch` each epoch), so rank r of N
    sees samples r, r+N, … of one global permutation: N ranks × batch b cover what
    one process with batch N·b covers. `dataset`: anything with __len__ and
    __getitem__(i) -> Sample (a list of Samples, or a dataset from corpus.open_dataset).
    """

    def __init__(self, dataset, batch_size, world_size, rank, seed, pad_id, group_by_length=False,
                 workers: int = 0, pin_memory: bool = False, prefetch: int = 2):
        self.dataset, self.batch_size, self.pad_id, self.seed = dataset, batch_size, pad_id, seed
        self.world_size, self.rank, self.group_by_length = world_size, rank, group_by_length
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, prefetch
        self.lengths = lengths_of(dataset)
        self.n = len(self.lengths)
        self.epoch, self.position = 0, 0
        self._iter, self._iter_at = None, None  # the loader iterator and the cursor it will deliver next

    def batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.n / self.world_size) / self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        order = distributed_order(self.n, self.world_size, self.rank, self.seed, epoch)
        if self.group_by_length:
            order = length_grouped(order, self.lengths, self.batch_size, self.seed + epoch)
        return order

    def _index_lists(self, epoch: int, position: int):
        """Batches of sample indices from (epoch, position) on, forever (the loader's sampler)."""
        bpe, b = self.batches_per_epoch(), self.batch_size
        while True:
            if position >= bpe:
                epoch, position = epoch + 1, 0
            order = self.epoch_order(epoch)
            check = getattr(self.dataset, "check_samples", None)  # a corpus: shards verified before first use
            for p in range(position, bpe):
                batch = order[p * b:(p + 1) * b].tolist()
                if check is not None:  # here, in this process: a damaged shard is one error line, not a worker's
                    check(batch)
                yield batch
            position = bpe

    def _start(self):
        self.close()
        loader = torch.utils.data.DataLoader(
            _Collated(self.dataset, self.pad_id), batch_size=None, sampler=self._index_lists(self.epoch, self.position),
            num_workers=self.workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if self.workers else None,
            # its own generator: creating the iterator draws a worker seed, which must not move the global
            # torch RNG (dropout reads it; a resumed run restores it and must then see the same draws)
            generator=torch.Generator().manual_seed(self.seed))
        self._iter, self._iter_at = iter(loader), (self.epoch, self.position)

    def next(self) -> dict[str, torch.Tensor]:
        if self._iter is None or self._iter_at != (self.epoch, self.position):  # first call, or the cursor was set
            self._start()
        batch = next(self._iter)
        if self.position >= self.batches_per_epoch():
            self.epoch, self.position = self.epoch + 1, 0
        self.position += 1
        self._iter_at = (self.epoch, self.position)
        return batch

    def close(self):
        """Stop the worker processes (if any)."""
        if self._iter is not None and hasattr(self._iter, "_shutdown_workers"):
            self._iter._shutdown_workers()
        self._iter = self._iter_at = None
