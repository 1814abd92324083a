"""Sharding, torchrun environment and seed rules for data-parallel inference."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from memflow.errors import InputError
from utils import distributed
from utils.distributed import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    prompt_seed,
    rank_seed,
    shard_indices,
)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_items", range(12))
def test_shards_cover_every_item_exactly_once(num_items: int, world_size: int) -> None:
    shards = [shard_indices(num_items, r, world_size) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_items))
    for rank, shard in enumerate(shards):
        assert shard == list(range(rank, num_items, world_size))  # round robin, in file order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_tail_prompts_are_not_dropped() -> None:
    # The reference's DistributedSampler(drop_last=True) gives ranks [0] and [1] and skips line 2.
    assert [shard_indices(3, r, 2) for r in range(2)] == [[0, 2], [1]]
    assert [shard_indices(1, r, 4) for r in range(4)] == [[0], [], [], []]


@pytest.mark.parametrize("args", [(3, 2, 2), (3, -1, 2), (3, 0, 0), (-1, 0, 1)])
def test_shard_rejects_bad_arguments(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="shard_indices: bad arguments"):
        shard_indices(*args)


def test_single_process_defaults(no_torchrun: None) -> None:
    assert DistInfo.from_env() == DistInfo(rank=0, world_size=1, local_rank=0)
    info = init_distributed()
    assert info.is_main and not dist.is_initialized()
    cleanup_distributed()
    distributed.barrier()


def test_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert DistInfo.from_env() == DistInfo(rank=3, world_size=4, local_rank=1)
    assert not DistInfo.from_env().is_main


@pytest.mark.parametrize(
    "env,message",
    [
        ({"RANK": "one"}, "environment variable RANK must be an integer, got 'one'"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "inconsistent torchrun environment: RANK=2, WORLD"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ],
)
def test_bad_torchrun_environment(
    monkeypatch: pytest.MonkeyPatch, no_torchrun: None, env: dict, message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=message):
        DistInfo.from_env()


@pytest.mark.parametrize("cuda,expected", [(False, "gloo"), (True, "nccl")])
def test_backend_choice(monkeypatch: pytest.MonkeyPatch, cuda: bool, expected: str) -> None:
    """With WORLD_SIZE > 1 the group is created with NCCL on CUDA machines, Gloo otherwise."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda d: calls.append(("device", d)))
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend))
    )
    info = init_distributed()
    assert info == DistInfo(rank=1, world_size=2, local_rank=1)
    assert calls == ([("device", 1)] if cuda else []) + [("init", expected)]


def test_reference_seed_modes() -> None:
    assert [rank_seed(7, r, "per_rank") for r in range(3)] == [7, 8, 9]
    assert [rank_seed(7, r, "shared") for r in range(3)] == [7, 7, 7]
    assert prompt_seed(7, 5, "per_rank") is None and prompt_seed(7, 5, "shared") is None


def test_per_prompt_seeds_do_not_depend_on_the_number_of_gpus() -> None:
    num_prompts = 7
    expected = {i: 100 + i for i in range(num_prompts)}
    for world_size in range(1, 5):
        seeds = {
            i: prompt_seed(100, i, "per_prompt")
            for rank in range(world_size)
            for i in shard_indices(num_prompts, rank, world_size)
        }
        assert seeds == expected
        assert {rank_seed(100, r, "per_prompt") for r in range(world_size)} == {100}


def test_unknown_seed_mode() -> None:
    with pytest.raises(InputError, match="one of per_prompt, per_rank, shared; got 'random'"):
        rank_seed(0, 0, "random")
    with pytest.raises(InputError, match="seed_mode must be one of"):
        prompt_seed(0, 0, "per_gpu")
