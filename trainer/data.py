"""Training prompts: a text file, sharded across ranks, shuffled per epoch, resumable.

Training is text-only (TRAINING.md §9): a dataset item is one prompt (and, in stage 2, its
line-aligned switch prompt). Differences from the reference's DistributedSampler(shuffle=True,
drop_last=True) without set_epoch (§7.4, §10 item 19), all deliberate:
* nothing is dropped: each epoch the permutation is split round robin (`shard_indices`), so the
  ranks together see every prompt exactly once; a rank may hold one prompt fewer than another;
* ``shuffle="epoch"``: a new permutation each epoch, torch.randperm seeded with data_seed + epoch
  (the reference's sampler seeds its epoch-0 permutation the same way); ``"fixed"`` keeps the
  epoch-0 permutation forever (the reference's behaviour); ``"none"`` uses file order. The
  permutation depends only on the seed and the epoch, never on the rank;
* the position is a plain count of batches consumed, which is the same on every rank at a given
  step, so a checkpoint written by rank 0 restores every rank exactly (`state_dict`).

The last batch of a rank's epoch may be smaller than batch_size (as a DataLoader without
drop_last); the next batch starts the next epoch.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memflow.errors import InputError
from utils.distributed import shard_indices
from utils.prompts import _read_lines, load_prompts

SHUFFLE_MODES = ("epoch", "fixed", "none")


def read_switch_prompts(
    path: str | os.PathLike[str], switch_path: str | os.PathLike[str]
) -> tuple[list[str], list[str]]:
    """Line-aligned (prompt, switch prompt) pairs of two ``.txt`` files (stage 2, §9).

    Trailing whitespace is stripped; lines blank in both files are skipped; a line blank in only
    one of them, or a different line count, is an error naming the file and line.
    """
    path, switch_path = Path(path), Path(switch_path)
    first, second = _read_lines(path), _read_lines(switch_path)
    for lines in (first, second):
        while lines and not lines[-1].strip():
            lines.pop()
    if len(first) != len(second):
        raise InputError(
            f"{switch_path}: {len(second)} lines, but {path} has {len(first)}; switch prompts "
            "must be line-aligned with the prompts"
        )
    prompts, switches = [], []
    for lineno, (a, b) in enumerate(zip(first, second), start=1):
        if not a.strip() and not b.strip():
            continue
        if not a.strip() or not b.strip():
            blank = path if not a.strip() else switch_path
            raise InputError(f"{blank}:{lineno}: blank line, but the other prompt file has text there")
        prompts.append(a.rstrip())
        switches.append(b.rstrip())
    if not prompts:
        raise InputError(f"{path}: no prompts (the file is empty or has only blank lines)")
    return prompts, switches


class PromptDataset:
    """The prompts of a file, one per line (``.txt``; ``.jsonl`` as `utils.prompts` reads it).

    Blank lines are skipped (the reference would train on an empty prompt). An empty file is a
    one-line `InputError` naming it.
    """

    def __init__(self, prompts: Sequence[str], switch_prompts: Sequence[str] | None = None,
                 source: str = "<memory>"):
        if not prompts:
            raise InputError(f"{source}: no prompts")
        if switch_prompts is not None and len(switch_prompts) != len(prompts):
            raise ValueError("switch_prompts must be aligned with prompts")
        self.prompts = list(prompts)
        self.switch_prompts = list(switch_prompts) if switch_prompts is not None else None
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike[str],
                  switch_path: str | os.PathLike[str] | None = None) -> PromptDataset:
        if switch_path is not None:
            prompts, switches = read_switch_prompts(path, switch_path)
            return cls(prompts, switches, source=str(path))
        return cls(load_prompts(path), source=str(path))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The reference's item: {"prompts": str, "idx": int} (+ "switch_prompts" in stage 2)."""
        item: dict[str, Any] = {"prompts": self.prompts[index], "idx": index}
        if self.switch_prompts is not None:
            item["switch_prompts"] = self.switch_prompts[index]
        return item


@dataclass(frozen=True)
class PromptBatch:
    """One micro-batch: the prompts, their line indices in the dataset, and where it came from."""

    prompts: list[str]
    indices: list[int]
    switch_prompts: list[str] | None
    epoch: int
    position: int  # batch index inside this rank's epoch

    def __len__(self) -> int:
        return len(self.prompts)


def epoch_permutation(num_items: int, epoch: int, seed: int, shuffle: str) -> list[int]:
    """The global order of one epoch, identical on every rank."""
    if shuffle not in SHUFFLE_MODES:
        raise ValueError(f"shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
    if shuffle == "none":
        return list(range(num_items))
    generator = torch.Generator().manual_seed(seed + (epoch if shuffle == "epoch" else 0))
    return torch.randperm(num_items, generator=generator).tolist()


class PromptLoader:
    """Endless iterator of `PromptBatch`es for one rank, with an exact, saveable position.

    `state_dict()` / `load_state_dict()` carry the number of batches consumed (plus epoch and
    position for reading); restoring it makes `next()` return exactly the batch that would have
    come next. Save it after the step that consumed the batch.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: str = "epoch"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle not in SHUFFLE_MODES:
            raise ValueError(f"shuffle must be one of {SHUFFLE_MODES}, got {shuffle!r}")
        if len(dataset) < world_size:
            raise InputError(
                f"{dataset.source}: {len(dataset)} prompts cannot be shared by {world_size} ranks "
                "(every rank needs at least one)"
            )
        shard_indices(len(dataset), rank, world_size)  # validates rank / world_size
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.batches_consumed = 0
        self._epoch_cache: tuple[int, list[int]] | None = None

    @property
    def shard_size(self) -> int:
        """Prompts this rank sees per epoch."""
        return len(shard_indices(len(self.dataset), self.rank, self.world_size))

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.shard_size // self.batch_size)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.batches_consumed // self.batches_per_epoch

    @property
    def position(self) -> int:
        """Batch index (within its epoch) of the next batch."""
        return self.batches_consumed % self.batches_per_epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for `epoch`, in order."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = epoch_permutation(len(self.dataset), epoch, self.seed, self.shuffle)
            mine = [order[i] for i in shard_indices(len(order), self.rank, self.world_size)]
            self._epoch_cache = (epoch, mine)
        return self._epoch_cache[1]

    def __iter__(self) -> Iterator[PromptBatch]:
        return self

    def __next__(self) -> PromptBatch:
        epoch, position = self.epoch, self.position
        mine = self.epoch_indices(epoch)
        indices = mine[position * self.batch_size:(position + 1) * self.batch_size]
        items = [self.dataset[i] for i in indices]
        self.batches_consumed += 1
        switches = None
        if self.dataset.switch_prompts is not None:
            switches = [item["switch_prompts"] for item in items]
        return PromptBatch([item["prompts"] for item in items], indices, switches, epoch, position)

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_consumed": self.batches_consumed,
            "epoch": self.epoch,
            "position": self.position,
            "num_prompts": len(self.dataset),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved position. A changed prompt file, batch size or rank count
        keeps the count of batches consumed (the epoch boundaries move); that is warned about."""
        if "batches_consumed" not in state:
            raise ValueError("loader state has no `batches_consumed`")
        changed = [
            key for key, mine in (("num_prompts", len(self.dataset)), ("batch_size", self.batch_size),
                                  ("world_size", self.world_size), ("seed", self.seed),
                                  ("shuffle", self.shuffle))
            if key in state and state[key] != mine
        ]
        if changed:
            warnings.warn(
                f"prompt loader resumed with different {', '.join(changed)}; the data order "
                "does not continue exactly", stacklevel=2,
            )
        self.batches_consumed = int(state["batches_consumed"])


def build_prompt_loader(settings: Any, rank: int = 0, world_size: int = 1) -> PromptLoader:
    """The training loader of a `trainer.config.TrainSettings` (stage 2 adds the switch file)."""
    dataset = PromptDataset.from_file(settings.data_path, settings.switch_prompt_path)
    return PromptLoader(dataset, settings.config.batch_size, rank, world_size,
                        seed=settings.config.data_seed, shuffle=settings.data_shuffle)


def validation_batch(dataset: PromptDataset, batch_size: int, rank: int = 0,
                     world_size: int = 1) -> PromptBatch:
    """This rank's fixed visualisation batch: the first `batch_size` prompts of its round-robin
    share in file order (the reference keeps each rank's first unshuffled batch, §7.4)."""
    mine = shard_indices(len(dataset), rank, world_size)[:batch_size]
    if not mine:
        raise InputError(f"{dataset.source}: no visualisation prompt for rank {rank}")
    items = [dataset[i] for i in mine]
    switches = None
    if dataset.switch_prompts is not None:
        switches = [item["switch_prompts"] for item in items]
    return PromptBatch([item["prompts"] for item in items], mine, switches, 0, 0)
