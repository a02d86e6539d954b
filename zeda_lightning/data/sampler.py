"""``EpochSampler``: the training shuffle, seeded per epoch and resumable mid-epoch.

Epoch ``e`` is ``torch.randperm(n)`` from a generator seeded with ``seed + e`` (``DistributedSampler``'s order, then
this rank's share; see :meth:`EpochSampler.order`), so it depends on nothing but the seed and the epoch: a run
resumed in epoch ``e`` (in a new process, from a checkpoint) sees the same order as one that never stopped.
``state_dict`` is ``{epoch, position}`` (indices of this rank handed out in the current pass); after
``load_state_dict`` the next pass starts there.
``torchdata``'s ``StatefulDataLoader`` saves and restores it with its own state, and Lightning leaves a
``DistributedSampler`` in place (it shards itself), so the loader Lightning checkpoints is the one built here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (``seed + epoch`` shuffle, ``rank::num_replicas`` share) that counts its passes and
    resumes mid-pass.

    Each pass uses ``self.epoch`` and advances it by one when it ends, so a loader iterated without Lightning
    (which also calls ``set_epoch`` before every epoch, with the same number) still gets a new order per epoch.
    ``batch_size`` / ``drop_last_batch``: a saved position past the last full batch (only a dropped partial batch
    left) resumes at the start of the next epoch, as an uninterrupted run does.
    """

    def __init__(self, dataset: Sized, *, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 batch_size: int = 1, drop_last_batch: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.drop_last_batch = drop_last_batch
        self.position = 0  # indices handed out in the current pass
        self.in_pass = False  # a pass has drawn its order and not finished
        self._resume: tuple[int, int] | None = None  # (epoch, position) the next pass starts at

    def __iter__(self) -> Iterator[int]:
        # a generator: the order is drawn at the first ``next``, after Lightning's ``set_epoch`` or a late restore
        if self._resume is not None:
            (self.epoch, start), self._resume = self._resume, None
        else:
            start = 0
        epoch = self.epoch
        order = self.order(epoch)
        self.position, self.in_pass = start, True
        for index in order[start:]:
            self.position += 1
            yield index
        self.epoch, self.position, self.in_pass = epoch + 1, 0, False

    def order(self, epoch: int) -> list[int]:
        """This rank's indices in epoch ``epoch``: ``DistributedSampler``'s, except that the generator's first draw
        is skipped, as torch's DataLoader takes its base seed from the shuffle generator first: so epoch 0 is the
        order a ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` gives."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            torch.empty((), dtype=torch.int64).random_(generator=g)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        pad = self.total_size - n  # drop_last=False: repeat the first indices so every rank gets num_samples
        while pad > 0:
            indices += indices[:pad]
            pad = self.total_size - len(indices)
        return indices[self.rank : self.total_size : self.num_replicas]

    def _usable(self) -> int:
        """Indices per pass that end up in a batch."""
        n = self.num_samples
        return n - n % self.batch_size if self.drop_last_batch else n

    def state_dict(self) -> dict[str, int]:
        epoch, position = self._resume if self._resume is not None else (self.epoch, self.position)
        return {"epoch": int(epoch), "position": int(position)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if position >= self._usable():  # saved after the pass's last batch: the next pass is the next epoch
            epoch, position = epoch + 1, 0
        self._resume = (epoch, position)
        self.epoch, self.position = epoch, position


__all__ = ["EpochSampler"]
