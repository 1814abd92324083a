"""The random generators' states (Python, NumPy, torch CPU and CUDA) of every rank, saved in a
checkpoint's resume.pt and restored on resume, so a resumed run draws what the uninterrupted run
would have."""
from __future__ import annotations

import logging
import random
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from utils.distributed import current_rank, current_world_size, is_distributed, is_main_rank

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (if available) CUDA RNG states, in types
    `torch.load(weights_only=True)` accepts (NumPy's key array becomes an int64 tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored when this process has CUDA and
    the same number of devices; otherwise they are skipped with a warning."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("saved CUDA RNG states (%d devices) not restored on this machine", len(cuda))


def gather_rng_states() -> list[dict[str, Any]] | None:
    """Every rank's RNG state, in rank order, on rank 0 (None elsewhere). Collective."""
    mine = capture_rng_state()
    if not is_distributed():
        return [mine]
    states: list[Any] | None = [None] * dist.get_world_size() if is_main_rank() else None
    dist.gather_object(mine, states, dst=0)
    return states


def restore_saved_rng(rng: list[Any] | None, path: str) -> bool:
    """Restore this rank's saved RNG state; False (with a warning) when there is none or it was
    saved with another number of ranks."""
    if rng is None:
        return False
    world = current_world_size()
    if len(rng) != world:
        log.warning("%s: saved with %d rank(s), resuming with %d; RNG states not restored",
                    path, len(rng), world)
        return False
    restore_rng_state(rng[current_rank()])
    return True
