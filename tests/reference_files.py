"""Writers of the reference's checkpoint files and its wrapper-key state, for tests only.

The library reads these formats (memflow/checkpoint.py, memflow/lora.py) and training writes its
own checkpoint folders (trainer/checkpointing.py); tests need to *make* files in the reference's
layout (`base.pt`, `lora.pt`) to check that they load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from memflow.checkpoint import (
    GENERATOR_ENTRIES,
    WRAPPER_PREFIX,
    PathLike,
    _plain_state_dict,
    load_checked,
)
from memflow.files import atomic_write
from memflow.lora import lora_state_dict
from memflow.model import WanDiT
from trainer.checkpointing import list_checkpoints


def save_generator_checkpoint(
    model: nn.Module,
    path: PathLike,
    key: str = "generator",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `{key: {"model." + name: tensor}, **extra}`, the reference's `base.pt` layout
    (`extra` carries e.g. `critic` or `step`)."""
    if key not in GENERATOR_ENTRIES:
        raise ValueError(f"key must be one of {GENERATOR_ENTRIES}, got {key!r}")
    if extra and key in extra:
        raise ValueError(f"extra must not contain the entry {key!r} itself")
    state = {WRAPPER_PREFIX + k: v for k, v in _plain_state_dict(model).items()}
    payload = {key: state, **(extra or {})}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def save_lora_checkpoint(
    model: nn.Module, path: PathLike, critic: nn.Module | None = None, step: int = 0
) -> Path:
    """Write the reference's `lora.pt`: {generator_lora, critic_lora (when a critic is given),
    step}. Without a critic there is no `critic_lora`, so reference training will not resume
    from the file (it requires both)."""
    payload: dict[str, Any] = {"generator_lora": lora_state_dict(model)}
    if critic is not None:
        payload["critic_lora"] = lora_state_dict(critic)
    payload["step"] = int(step)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_wan_state(model: WanDiT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a `{"model.<Wan param>": tensor}` dict (the reference wrapper's keys) strictly."""
    plain = {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}
    load_checked(model, plain, source, strict=True)


def find_resume_checkpoint(logdir: PathLike) -> Path | None:
    """The highest-step complete checkpoint folder in `logdir`, or None (no check that it reads;
    `load_checkpoint` does that and falls back)."""
    found = list_checkpoints(logdir)
    return found[-1].path if found else None
