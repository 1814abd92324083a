"""Training prompts: file reading, sharding across ranks, per-epoch shuffling, exact resume."""
from __future__ import annotations

import warnings
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from memflow.errors import InputError
from trainer.data import (
    PromptDataset,
    PromptLoader,
    build_prompt_loader,
    epoch_permutation,
    read_switch_prompts,
    validation_batch,
)

REPO = Path(__file__).resolve().parents[1]


def dataset(n: int) -> PromptDataset:
    return PromptDataset([f"prompt {i}" for i in range(n)], source="test")


def take(loader: PromptLoader, count: int) -> list:
    return list(islice(loader, count))


def test_reads_text_file_and_rejects_empty(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat  \n\na dog\n")
    ds = PromptDataset.from_file(path)
    assert ds.prompts == ["a cat", "a dog"]
    assert ds[1] == {"prompts": "a dog", "idx": 1}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match=rf"^{empty}: no prompts"):
        PromptDataset.from_file(empty)
    with pytest.raises(InputError, match="prompt file not found"):
        PromptDataset.from_file(tmp_path / "missing.txt")
    assert len(PromptDataset.from_file(REPO / "prompts" / "tiny_train_prompts.txt")) == 12


def test_switch_prompts_are_line_aligned(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo\n\nthree\n")
    b.write_text("uno\ndos\n\ntres\n")
    ds = PromptDataset.from_file(a, b)
    assert ds.prompts == ["one", "two", "three"] and ds.switch_prompts == ["uno", "dos", "tres"]
    assert ds[2] == {"prompts": "three", "idx": 2, "switch_prompts": "tres"}
    b.write_text("uno\ndos\n")
    with pytest.raises(InputError, match="2 lines, but .* has 4"):
        read_switch_prompts(a, b)
    b.write_text("uno\n\nx\ntres\n")
    with pytest.raises(InputError, match=rf"{b}:2: blank line"):
        read_switch_prompts(a, b)


@pytest.mark.parametrize("n, world, batch", [(12, 2, 1), (13, 3, 2), (10, 4, 3), (5, 1, 2)])
def test_every_prompt_once_per_epoch_across_ranks(n, world, batch):
    loaders = [PromptLoader(dataset(n), batch, rank, world, seed=7) for rank in range(world)]
    orders = []
    for epoch in range(3):
        seen = Counter()
        for loader in loaders:
            for b in take(loader, loader.batches_per_epoch):
                assert b.epoch == epoch and len(b) <= batch
                assert b.prompts == [f"prompt {i}" for i in b.indices]
                seen.update(b.indices)
        assert seen == Counter(range(n)), f"epoch {epoch}"
        orders.append(epoch_permutation(n, epoch, 7, "epoch"))
    if n > 3:
        assert orders[0] != orders[1] != orders[2]


def test_permutation_is_the_same_on_every_rank_and_differs_per_epoch():
    world = 3
    loaders = [PromptLoader(dataset(30), 1, r, world, seed=3) for r in range(world)]
    for epoch in range(2):
        order = epoch_permutation(30, epoch, 3, "epoch")
        for r, loader in enumerate(loaders):
            assert loader.epoch_indices(epoch) == order[r::world]
    assert loaders[0].epoch_indices(0) != loaders[0].epoch_indices(1)
    # the seed matters, the rank does not
    assert epoch_permutation(30, 0, 3, "epoch") != epoch_permutation(30, 0, 4, "epoch")


def test_fixed_and_none_shuffle_modes():
    fixed = PromptLoader(dataset(8), 2, shuffle="fixed")
    assert fixed.epoch_indices(0) == fixed.epoch_indices(5) != list(range(8))
    plain = PromptLoader(dataset(8), 3, shuffle="none")
    assert [b.indices for b in take(plain, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [0, 1, 2]]


def test_last_batch_of_an_epoch_may_be_short():
    loader = PromptLoader(dataset(5), 2, seed=0)
    sizes = [len(b) for b in take(loader, 6)]
    assert sizes == [2, 2, 1, 2, 2, 1]
    assert loader.epoch == 2 and loader.position == 0


def test_resume_gives_the_same_next_batches():
    for world in (1, 2):
        for rank in range(world):
            ref = PromptLoader(dataset(11), 2, rank, world, seed=5)
            expected = take(ref, 20)
            first = PromptLoader(dataset(11), 2, rank, world, seed=5)
            take(first, 7)
            state = first.state_dict()
            assert state["batches_consumed"] == 7
            assert (state["epoch"], state["position"]) == (first.epoch, first.position)
            resumed = PromptLoader(dataset(11), 2, rank, world, seed=5)
            resumed.load_state_dict(state)
            assert take(resumed, 13) == expected[7:]


def test_rank0_state_restores_other_ranks():
    """The batch count is the same on every rank, so rank 0's saved state serves them all."""
    world, steps = 3, 9
    loaders = [PromptLoader(dataset(10), 1, r, world, seed=1) for r in range(world)]
    for loader in loaders:
        take(loader, steps)
    state = loaders[0].state_dict()
    for r in range(world):
        fresh = PromptLoader(dataset(10), 1, r, world, seed=1)
        fresh.load_state_dict(state)
        assert take(fresh, 4) == take(loaders[r], 4)


def test_resume_with_changed_setup_warns():
    loader = PromptLoader(dataset(10), 1, seed=1)
    take(loader, 3)
    state = loader.state_dict()
    other = PromptLoader(dataset(10), 1, 0, 2, seed=1)
    with pytest.warns(UserWarning, match="world_size"):
        other.load_state_dict(state)
    assert other.batches_consumed == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PromptLoader(dataset(10), 1, seed=1).load_state_dict(state)


def test_bad_loader_arguments():
    with pytest.raises(InputError, match="2 prompts cannot be shared by 3 ranks"):
        PromptLoader(dataset(2), 1, 0, 3)
    with pytest.raises(ValueError):
        PromptLoader(dataset(4), 0)
    with pytest.raises(ValueError):
        PromptLoader(dataset(4), 1, rank=2, world_size=2)


def test_validation_batch_per_rank():
    ds = dataset(5)
    assert validation_batch(ds, 1, 1, 2).indices == [1]
    assert validation_batch(ds, 2, 0, 2).prompts == ["prompt 0", "prompt 2"]


def test_build_from_settings():
    from trainer.config import TrainSettings, load_train_config

    prompts = REPO / "prompts" / "tiny_train_prompts.txt"
    cfg = load_train_config(REPO / "configs" / "tiny_train_init.yaml",
                            [f"data_path={prompts}", "batch_size=2", "data_seed=4"])
    settings = TrainSettings.from_config(cfg)
    loader = build_prompt_loader(settings, rank=1, world_size=2)
    assert loader.batch_size == 2 and loader.seed == 4 and loader.shuffle == "epoch"
    assert loader.shard_size == 6 and len(next(loader)) == 2
