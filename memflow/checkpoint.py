"""Checkpoint I/O in the original on-disk formats.

* Wan2.1 DiT weights: `diffusion_pytorch_model.safetensors` (single or sharded with an
  `.index.json`) or a `.pth`/`.pt` state dict, with the original parameter names, plus the
  diffusers-style `config.json` of the model folder.
* MemFlow `base.pt`: `{"generator": sd, "generator_ema": sd, "critic": sd, ...}` whose keys carry
  the training wrapper's `model.` prefix (EMA keys may also contain `_fsdp_wrapped_module.`).

Every mismatch raises `CheckpointError` naming the file, the entry, the first offending keys and
expected vs found shapes, so a wrong file reads as such and not as a torch traceback. Writers
write to a temporary file and rename it, so nothing half-written is left behind.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from utils.errors import InputError

from .config import DiTConfig

log = logging.getLogger(__name__)

WAN_CONFIG = "config.json"
WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WRAPPER_PREFIX = "model."
FSDP_PART = "_fsdp_wrapped_module."
GENERATOR_ENTRIES = ("generator", "generator_ema", "model")
MAX_LISTED = 5


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


# ------------------------------------------------------------------------------------------------
# Reading and writing files
# ------------------------------------------------------------------------------------------------
def _require_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def torch_load(path: str | os.PathLike[str]) -> Any:
    """torch.load on the CPU, tensors-only when the file allows it."""
    path = _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f"{path} holds more than tensors; loading it with weights_only=False")
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    path = _require_file(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    state = torch_load(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict")
    return dict(state)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------
# Matching a state dict to a model
# ------------------------------------------------------------------------------------------------
def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def load_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool = True
) -> None:
    """Copy `state` into `model`, checking names and shapes first.

    With `strict=False`, missing keys keep the model's values and unexpected keys are ignored
    (both are logged); shape mismatches always fail.
    """
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in expected  # in model order: the first listed is the first layer that differs
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{source}: {len(wrong)} tensors have the wrong shape (a different model size?): "
            + "; ".join(wrong[:MAX_LISTED])
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    if missing:
        log.warning("%s: %d missing keys keep their current values: %s", source, len(missing), _listed(missing))
    if unexpected:
        log.warning("%s: ignoring %d unexpected keys: %s", source, len(unexpected), _listed(unexpected))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


# ------------------------------------------------------------------------------------------------
# Wan2.1 model folders
# ------------------------------------------------------------------------------------------------
def load_wan_config(folder: str | os.PathLike[str]) -> DiTConfig:
    """DiT shape from a Wan2.1 folder's diffusers-style `config.json`."""
    path = Path(folder) / WAN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"model config not found: {path}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    model_type = values.get("model_type", "t2v")
    if model_type != "t2v":
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported (only t2v)")
    return DiTConfig.from_dict(values)


def _wan_weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"Wan weights not found: {path}")
    if (path / WAN_INDEX).is_file():
        index = json.loads((path / WAN_INDEX).read_text())
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    if (path / WAN_WEIGHTS).is_file():
        return [path / WAN_WEIGHTS]
    candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
    if not candidates:
        raise CheckpointError(f"no DiT weights (*.safetensors, *.pth) in {path}")
    return candidates


def load_wan_weights(model: nn.Module, path_or_folder: str | os.PathLike[str]) -> None:
    """Load original Wan2.1 DiT weights (single file, sharded safetensors or .pth), strictly."""
    files = _wan_weight_files(Path(path_or_folder))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state_dict_file(f))
    load_into(model, state, source=", ".join(str(f) for f in files))


def save_wan_weights(
    model: nn.Module, path: str | os.PathLike[str], max_shard_bytes: int | None = None
) -> list[Path]:
    """Save with the original Wan names: `.safetensors` (sharded with an index json when
    `max_shard_bytes` is set; `path` is then a folder) or `.pth`/`.pt`."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    if max_shard_bytes is None:
        if path.suffix == ".safetensors":
            return [atomic_write(path, lambda tmp: save_file(state, str(tmp)))]
        return [atomic_write(path, lambda tmp: torch.save(state, tmp))]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    n = len(shards)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = [
        atomic_write(path / name, lambda tmp, s=shard: save_file(s, str(tmp)))
        for name, shard in zip(names, shards)
    ]
    index = {"metadata": {}, "weight_map": {k: name for name, s in zip(names, shards) for k in s}}
    written.append(atomic_write(path / WAN_INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1))))
    return written


# ------------------------------------------------------------------------------------------------
# MemFlow base.pt
# ------------------------------------------------------------------------------------------------
def _strip_wrapper(state: Mapping[str, torch.Tensor], ema: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if ema:
            key = key.replace(FSDP_PART, "")
        if key.startswith(WRAPPER_PREFIX):
            key = key[len(WRAPPER_PREFIX) :]
        out[key] = value
    return out


def load_generator_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], use_ema: bool = False
) -> str:
    """Load a MemFlow `base.pt` into `model`; returns the entry used.

    The `generator_ema` entry (when `use_ema`) is loaded non-strictly: keys it lacks keep their
    current (Wan base) values, as in the reference.
    """
    data = torch_load(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a checkpoint dict")
    wanted = "generator_ema" if use_ema else "generator"
    if wanted in data:
        entry = wanted
    elif "generator" in data or "generator_ema" in data:
        raise CheckpointError(f"{path} has no `{wanted}` entry (it has {_listed(data)})")
    elif "model" in data:
        entry = "model"
    elif all(torch.is_tensor(v) for v in data.values()):
        entry = ""
    else:
        raise CheckpointError(
            f"{path}: expected one of the entries {', '.join(GENERATOR_ENTRIES)}, found {_listed(data)}"
        )
    state = data[entry] if entry else data
    source = f"{path} [{entry}]" if entry else str(path)
    load_into(model, _strip_wrapper(state, ema=entry == "generator_ema"), source, strict=entry != "generator_ema")
    return entry


def save_generator_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    key: str = "generator",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `{key: {"model." + name: tensor}, **extra}`, the reference's `base.pt` layout."""
    state = {WRAPPER_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {key: state, **(extra or {})}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))
