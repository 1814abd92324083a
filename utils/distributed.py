"""The one home of process-group helpers, for inference, evaluation and training.

Data-parallel inference under torchrun: every rank holds a full pipeline and takes a share of the
prompts (spec §8: no collectives beyond one barrier; each rank writes its own files). Training
asks the live process group who is rank 0 and lets rank 0 do the file work (`on_main`). Without
torchrun everything here is a no-op for a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from config.schema import SEED_MODES
from memflow.errors import InputError

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job, as torchrun describes it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read RANK, WORLD_SIZE and LOCAL_RANK; absent variables mean a single process."""
        info = cls(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
        if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
            raise InputError(
                f"inconsistent torchrun environment: RANK={info.rank}, "
                f"WORLD_SIZE={info.world_size}, LOCAL_RANK={info.local_rank}"
            )
        return info

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group when torchrun started more than one process.

    The backend defaults to NCCL when CUDA is available (the device is set to LOCAL_RANK first,
    so NCCL binds to the right GPU) and to Gloo otherwise. A one-process job creates no group.
    """
    info = DistInfo.from_env()
    if info.world_size == 1 or dist.is_initialized():
        return info
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend)
    return info


def is_distributed() -> bool:
    """Whether a process group is up (torchrun with more than one process, or a test's group)."""
    return dist.is_available() and dist.is_initialized()


def current_rank() -> int:
    """This process's rank in the live process group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def current_world_size() -> int:
    """The number of processes in the live process group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_rank() -> bool:
    """True on rank 0, and in a process without a process group."""
    return current_rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has created the output folder); no-op alone."""
    if is_distributed():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (small picklable objects only); `value` itself alone."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and give every rank its (small) result, or make every rank raise.

    Other ranks raise the same `InputError` type (the CLI's one-line error) or a RuntimeError
    carrying rank 0's message; rank 0 re-raises its original exception, so no rank is left
    waiting in a collective that rank 0 never reaches."""
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if is_main_rank():
        try:
            outcome = ("ok", fn())
        except Exception as err:  # shared below, then re-raised
            error = err
            kind = "input" if isinstance(err, InputError) else "other"
            outcome = (kind, f"{type(err).__name__}: {err}" if kind == "other" else str(err))
    outcome = broadcast_object(outcome)
    if error is not None:
        raise error
    kind, value = outcome
    if kind == "input":
        raise InputError(value)
    if kind == "other":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def cleanup_distributed() -> None:
    """Leave the process group if `init_distributed` joined one."""
    if is_distributed():
        dist.destroy_process_group()


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """Round-robin share of `num_items` for one rank: rank, rank+W, rank+2W, ...

    Unlike the reference's DistributedSampler(drop_last=True) (P3), nothing is dropped and
    nothing is padded: the ranks together cover every index exactly once, and a rank may get
    one item fewer than another, or none when num_items < world_size.
    """
    if world_size < 1 or not 0 <= rank < world_size or num_items < 0:
        raise ValueError(
            f"shard_indices: bad arguments num_items={num_items}, rank={rank}, "
            f"world_size={world_size}"
        )
    return list(range(rank, num_items, world_size))


def _check_mode(mode: str) -> None:
    if mode not in SEED_MODES:
        raise InputError(f"seed_mode must be one of {', '.join(SEED_MODES)}; got {mode!r}")


def rank_seed(base_seed: int, rank: int, mode: str) -> int:
    """The seed to set once per process, before the model is built (spec §5.5).

    * ``per_rank``: base_seed + rank, the reference single-prompt script (it adds LOCAL_RANK;
      pass the local rank for bit-exact compat on more than one node).
    * ``shared``: base_seed on every rank, the reference interactive script.
    * ``per_prompt``: base_seed; the noise is re-seeded per prompt by `prompt_seed`.

    In the two reference modes the generator is never re-seeded, so a prompt's noise depends on
    the rank it lands on and on every earlier prompt of that rank: the same prompt file gives
    different videos on 1 and 2 GPUs, and under ``shared`` rank 0's first prompt and rank 1's
    first prompt start from identical noise.
    """
    _check_mode(mode)
    return base_seed + rank if mode == "per_rank" else base_seed


def prompt_seed(base_seed: int, prompt_index: int, mode: str) -> int | None:
    """The seed to re-seed the noise generator with before the prompt at global line
    `prompt_index`, or None to keep drawing from the process stream (the reference modes).

    ``per_prompt`` gives base_seed + prompt_index, so each video depends only on the seed and
    its line in the file, not on the number of GPUs, the sharding or the prompts before it.
    Runs with nearby base seeds share noise (seed 0's line 1 is seed 1's line 0); use base seeds
    at least the prompt count apart when that matters.
    """
    _check_mode(mode)
    return base_seed + prompt_index if mode == "per_prompt" else None


def pick_device(name: str, local_rank: int = 0, source: str = "config key `device`") -> torch.device:
    """`auto` | `cpu` | `cuda` -> the device this rank runs on (cuda: its own GPU). A name that
    is none of them, or cuda without a GPU, is a one-line InputError naming `source`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{source}: cuda requested but no GPU is available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise InputError(f"{source} must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")
