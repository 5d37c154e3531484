"""A DataLoader that continues mid-epoch exactly where a checkpoint left it.

Its position is the sampler generator's state at the start of the current epoch and the number
of batches of the epoch already trained. Lightning saves it with the fit loop's state
(``state_dict``, called when a checkpoint is written) and hands it back before the first
``iter`` of a resumed fit (``load_state_dict``): the loader then replays the epoch's shuffle from
the same generator state and skips the trained batches (indices only; nothing is collated), so
the rest of the epoch, and every later epoch, sees the same batches in the same order as an
uninterrupted run.

The trained-batch count is set by the checkpoint callback (:meth:`ResumableLoader.mark_trained`)
just before it saves: the loader itself cannot tell trained batches from the ones Lightning
prefetched.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader


def _advance(it, n: int) -> None:
    """Move a fresh DataLoader iterator ``n`` batches on without fetching them."""
    sampler_iter = getattr(it, "_sampler_iter", None)
    if sampler_iter is None:  # pragma: no cover - other iterator kinds: fetch and drop
        for _ in range(n):
            next(it)
        return
    for _ in range(n):
        next(sampler_iter)
    it._num_yielded += n


class ResumableLoader(DataLoader):
    """``torch.utils.data.DataLoader`` with a saveable position (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: the sampler generator's state when the current epoch's iterator was created
        self._epoch_start: torch.Tensor | None = None
        #: batches of the current epoch trained (set before a checkpoint is written)
        self._trained = 0
        #: batches to skip at the next ``iter`` (set by ``load_state_dict``)
        self._skip = 0

    def __iter__(self):
        if self.generator is not None:
            self._epoch_start = self.generator.get_state().clone()
        skip, self._skip = self._skip, 0
        self._trained = 0
        it = super().__iter__()
        if skip:
            if skip >= len(self):  # the checkpoint closed the epoch: consume its shuffle, start the next
                _advance(it, len(self))
                return self.__iter__()
            _advance(it, skip)
            self._trained = skip
        return it

    def mark_trained(self, batches: int) -> None:
        """The number of batches of the current epoch that training has consumed."""
        self._trained = int(batches)

    def state_dict(self) -> dict:
        return {"generator": self._epoch_start, "batches": self._trained}

    def load_state_dict(self, state: dict) -> None:
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        self._skip = int(state.get("batches", 0))
