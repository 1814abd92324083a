"""Checkpoint I/O in the original on-disk formats.

* Wan2.1 DiT weights: `diffusion_pytorch_model.safetensors` (single, or sharded with a
  `diffusion_pytorch_model.safetensors.index.json`) or a `.pth`/`.pt` state dict, with the
  original parameter names, plus the diffusers-style `config.json` of the model folder.
* MemFlow `base.pt`: `{"generator": sd, "generator_ema": sd, "critic": sd, "step": n, ...}`
  whose keys carry the training wrapper's `model.` prefix (EMA keys may also contain
  `_fsdp_wrapped_module.`), INFERENCE.md §5.8 / TRAINING.md §6.4.

`load_wan_generator` puts the two together (a Wan folder's DiT, then a MemFlow checkpoint over
it); it takes no inference or training settings, so both load the generator the same way.

Every mismatch raises `CheckpointError` naming the file, the entry, the first offending keys and
the expected vs found shapes, so a wrong file reads as such and not as a torch traceback. Writers
write to a temporary file beside the target and rename it, so nothing half-written is left.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file

from memflow.errors import InputError

from .config import DiTConfig
from .model import WanDiT

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

WAN_CONFIG = "config.json"
WAN_WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".index.json"
WRAPPER_PREFIX = "model."
FSDP_PART = "_fsdp_wrapped_module."
GENERATOR_ENTRIES = ("generator", "generator_ema", "model")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
MAX_LISTED = 5

# The file names of a Wan2.1 model folder (beside config.json and the DiT weights); here, in a
# module without heavy imports, so that configs can be checked before anything is loaded.
WAN_T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_T5_TOKENIZER = "google/umt5-xxl"
WAN_VAE_CHECKPOINT = "Wan2.1_VAE.pth"


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable or does not fit the model.

    An `InputError` (hence a ValueError): the CLI reports it on one line, so the message names
    the file, the entry and the offending keys by itself.
    """


@dataclass(frozen=True)
class LoadResult:
    """What a loader read: the entry used (None: the file is the state dict itself), the keys a
    non-strict load skipped, and the file's training `step` when it has one."""

    path: Path
    entry: str | None
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    step: int | None = None


# ------------------------------------------------------------------------------------------------
# Reading and writing files
# ------------------------------------------------------------------------------------------------
def _require_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return path


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _pickled_types(path: Path) -> list[str]:
    """The non-tensor types a checkpoint's pickle names ([] if it names none or is no
    checkpoint at all)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: nothing to list
        return []


def _why_unreadable(path: Path, err: BaseException) -> str:
    """What is wrong with a file that torch.load (or safetensors) could not read, in words: torch's
    own messages are empty (EOFError), a bare key (KeyError: 101) or about its internals."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot open it ({e.strerror})"
    if not head:
        return "the file is empty (0 bytes)"
    if path.suffix == ".safetensors":
        return f"not a valid safetensors file ({_first_line(err)})"
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        if not zipfile.is_zipfile(path):
            return "the file is truncated (an incomplete PyTorch zip archive; copy it again)"
        return f"a damaged PyTorch zip archive ({_first_line(err)})"
    if head[:1] == b"\x80":  # a pickle: the legacy torch.save format
        return f"a legacy pickle that cannot be read as tensors ({_first_line(err)})"
    return "not a PyTorch checkpoint (its contents are neither a zip archive nor a pickle)"



def check_state_fits(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    source: str | Path,
    *,
    model: str,
    config: str,
    shown_name: Callable[[str], str] = lambda key: key,
) -> None:
    """Raise one line naming `source` and the first key of `state` that is unexpected, missing or
    of the wrong shape for `expected`, the shapes of the model built from the config (`model`:
    "a 2-layer encoder", `config`: "text-encoder config"). `shown_name` maps a key back to the
    file's own naming, so the message names what the user can find in the file."""
    for key, value in state.items():
        if key not in expected:
            raise ValueError(f"{source}: unexpected key {shown_name(key)!r} for {model}")
        if value.shape != expected[key]:
            raise ValueError(
                f"{source}: key {shown_name(key)!r} has shape {tuple(value.shape)} but the "
                f"{config} expects {tuple(expected[key])}"
            )
    for key in expected:
        if key not in state:
            raise ValueError(f"{source}: missing key {shown_name(key)!r}")

def load_torch_file(path: PathLike, what: str = "checkpoint", *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; an unreadable file is a
    `CheckpointError` naming `what`, the file and what is wrong with it. Files holding pickled
    objects are refused too (see `read_checkpoint` for the opt-in)."""
    path = _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except Exception as err:
        raise CheckpointError(f"cannot read {what} {path}: {_why_unreadable(path, err)}") from None


def _is_zip(path: Path) -> bool:
    """mmap needs the zip format; a legacy file should get the 'why' message, not torch's."""
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_checkpoint(path: PathLike, *, trust: bool = False) -> Any:
    """`torch.load` on the CPU with `weights_only=True`.

    A file that also holds other pickled objects (classes, functions) is refused, because
    unpickling them can run arbitrary code; the message names the file, the types and the
    opt-in. With `trust` (the config key `trust_checkpoints`, passed by the caller) it is loaded
    anyway, after a warning that names both.
    """
    path = _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not _pickled_types(path):  # a garbage or legacy file, not a checkpoint with objects
            raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(path, err)}") from None
    except Exception as err:  # empty, truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(path, err)}") from None
    types = ", ".join(_pickled_types(path))
    if not trust:
        raise CheckpointError(
            f"{path} holds pickled objects ({types}) that could run code when loaded; if you "
            f"trust this file, set `trust_checkpoints: true` in the config (or pass "
            f"trust_checkpoints=true)"
        )
    log.warning("%s: loading pickled objects (%s) because trust_checkpoints is set; this runs "
                "code from the file", path, types)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def _tensor_dict(value: Any, source: str) -> dict[str, torch.Tensor]:
    """Check that a loaded object is a flat {name: tensor} state dict."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{source} does not hold a state dict (found {type(value).__name__})")
    other = [k for k, v in value.items() if not torch.is_tensor(v)]
    if other:
        hint = ""
        if any(k in value for k in GENERATOR_ENTRIES):
            hint = " (a MemFlow training checkpoint: load it with load_generator_checkpoint)"
        raise CheckpointError(
            f"{source} is not a flat state dict: entries {_listed(other)} are not tensors{hint}"
        )
    return dict(value)


def read_state_dict(path: PathLike, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """A flat state dict from a `.safetensors` file or a torch `.pth`/`.pt`/`.bin` file."""
    path = _require_file(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(path, err)}") from None
    return _tensor_dict(read_checkpoint(path, trust=trust), str(path))


# ------------------------------------------------------------------------------------------------
# Matching a state dict to a model
# ------------------------------------------------------------------------------------------------
def _listed(keys: Iterable[str], sep: str = ", ") -> str:
    keys = list(keys)
    more = f"{sep}... (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return sep.join(keys[:MAX_LISTED]) + more


def _shape(shape: Iterable[int]) -> str:
    return str(list(shape))


@dataclass(frozen=True)
class Mismatch:
    """How a state dict differs from the one a model expects (keys in the model's order)."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    wrong_shape: tuple[tuple[str, torch.Size, torch.Size], ...]  # key, expected, found

    @classmethod
    def between(
        cls, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
    ) -> "Mismatch":
        return cls(
            missing=tuple(k for k in expected if k not in found),
            unexpected=tuple(k for k in found if k not in expected),
            wrong_shape=tuple(
                (k, expected[k].shape, found[k].shape)
                for k in expected
                if k in found and expected[k].shape != found[k].shape
            ),
        )

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self, source: str, hint: str = "") -> str:
        lines = [f"{source} does not fit the model:"]
        if hint:
            lines.append(f"  {hint}")
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s): {_listed(self.missing)}")
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s): {_listed(self.unexpected)}")
        if self.wrong_shape:
            shapes = [
                f"{k}: model expects {_shape(want)}, file has {_shape(got)}"
                for k, want, got in self.wrong_shape
            ]
            lines.append(f"  {len(shapes)} tensor(s) with the wrong shape: {_listed(shapes, '; ')}")
        return "\n".join(lines)


def _architecture(shapes: Mapping[str, torch.Size]) -> str:
    """'dim 1536, ffn_dim 8960, text_dim 4096, 30 blocks', as far as the keys tell."""
    parts = []
    for label, key, axis in (
        ("dim", "patch_embedding.weight", 0),
        ("ffn_dim", "blocks.0.ffn.0.weight", 0),
        ("text_dim", "text_embedding.0.weight", 1),
    ):
        if key in shapes and len(shapes[key]) > axis:
            parts.append(f"{label} {shapes[key][axis]}")
    blocks = {m.group(1) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    parts.append(f"{len(blocks)} blocks")
    return ", ".join(parts)


def load_checked(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool = True
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Check names and shapes, then copy `state` into `model`; returns (missing, unexpected).

    With `strict=False`, missing keys keep the model's current values and unexpected keys are
    ignored (both logged); a shape mismatch always fails, since it means another architecture.
    """
    expected = model.state_dict()
    mismatch = Mismatch.between(expected, state)
    if mismatch.wrong_shape or (strict and mismatch):
        found_arch = _architecture({k: v.shape for k, v in state.items()})
        model_arch = _architecture({k: v.shape for k, v in expected.items()})
        hint = ""
        if found_arch != model_arch:
            hint = f"wrong architecture: the file is {found_arch}; the model is {model_arch}"
        raise CheckpointError(mismatch.describe(source, hint))
    if mismatch.missing:
        log.warning(
            "%s: %d key(s) missing, they keep their current values: %s",
            source, len(mismatch.missing), _listed(mismatch.missing),
        )
    if mismatch.unexpected:
        log.warning(
            "%s: ignoring %d unexpected key(s): %s",
            source, len(mismatch.unexpected), _listed(mismatch.unexpected),
        )
    model.load_state_dict(state, strict=strict)
    return mismatch.missing, mismatch.unexpected


# ------------------------------------------------------------------------------------------------
# Wan2.1 model folders
# ------------------------------------------------------------------------------------------------
def load_wan_config(folder: PathLike) -> DiTConfig:
    """DiT shape from a Wan2.1 folder's diffusers-style `config.json` (`_class_name: WanModel`).

    The json omits some constructor defaults (patch_size, text_dim, qk_norm, cross_attn_norm);
    DiTConfig's defaults are those of WanModel, so they fill in the same values.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Wan2.1 model folder not found: {folder}")
    path = folder / WAN_CONFIG
    if not path.is_file():
        raise CheckpointError(f"model config not found: {path}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    class_name = values.get("_class_name", "WanModel")
    if class_name != "WanModel":
        raise CheckpointError(
            f"{path}: _class_name {class_name!r} is not the original Wan2.1 layout (WanModel); "
            "diffusers-converted folders use other parameter names"
        )
    if values.get("model_type") != "t2v":
        raise CheckpointError(
            f"{path}: model_type {values.get('model_type')!r} is not supported (only 't2v')"
        )
    absent = [k for k in ("dim", "ffn_dim", "num_heads", "num_layers") if k not in values]
    if absent:
        raise CheckpointError(f"{path} lacks {', '.join(absent)}")
    try:
        return DiTConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _read_index(index: Path) -> dict[str, torch.Tensor]:
    """Every shard named by a `.safetensors.index.json`, merged into one state dict."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a safetensors index: {err}") from None
    state: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(weight_map.values()):
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"shard {shard} listed in {index} not found")
        state.update(read_state_dict(shard))
    return state


def _resolve_wan_weights(path: Path) -> Path:
    """The file to read for a Wan folder or file: the single safetensors, else its index."""
    if path.is_dir():
        for name in (WAN_WEIGHTS, WAN_WEIGHTS + INDEX_SUFFIX):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"no DiT weights in {path}: expected {WAN_WEIGHTS} or {WAN_WEIGHTS}{INDEX_SUFFIX}"
        )
    return _require_file(path)


def load_wan_weights(model: nn.Module, path_or_folder: PathLike) -> LoadResult:
    """Load the original Wan2.1 DiT weights, strictly.

    Accepts a Wan folder (its `diffusion_pytorch_model.safetensors`, or the sharded set through
    the `.index.json`), one of those files, or a `.pth`/`.pt` state dict with the Wan names.
    """
    path = _resolve_wan_weights(Path(path_or_folder))
    if path.name.endswith(INDEX_SUFFIX):
        state = _read_index(path)
    elif path.suffix == ".safetensors" or path.suffix in TORCH_SUFFIXES:
        state = read_state_dict(path)
    else:
        raise CheckpointError(f"{path}: unknown weight format (expected .safetensors, .pth or .pt)")
    load_checked(model, state, str(path))
    return LoadResult(path, entry=None)


# ------------------------------------------------------------------------------------------------
# MemFlow base.pt
# ------------------------------------------------------------------------------------------------
def _pick_generator_entry(data: Mapping[str, Any], path: Path, use_ema: bool) -> str:
    """The reference's choice: `generator_ema` / `generator` by use_ema, else `model`."""
    if "generator" in data or "generator_ema" in data:
        entry = "generator_ema" if use_ema else "generator"
        if entry not in data:
            other = "use_ema=False" if use_ema else "use_ema=True"
            raise CheckpointError(
                f"{path} has no '{entry}' entry (entries: {_listed(data)}); try {other}"
            )
        return entry
    if "model" in data:
        return "model"
    raise CheckpointError(
        f"{path} has none of the entries {', '.join(GENERATOR_ENTRIES)} "
        f"(entries: {_listed(data)})"
    )


def load_generator_checkpoint(
    model: nn.Module, path: PathLike, use_ema: bool = False, *, trust: bool = False
) -> LoadResult:
    """Load a MemFlow `base.pt` (or any training checkpoint) into a plain `WanDiT`.

    The wrapper prefix `model.` is removed from the keys. With `use_ema`, every
    `_fsdp_wrapped_module.` is removed too and the load is non-strict, as in the reference:
    keys the EMA lacks keep their current (Wan base) values and are reported through logging.
    Critic, optimiser and step entries are not loaded (the step is returned).
    """
    path = _require_file(path)
    data = read_checkpoint(path, trust=trust)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a checkpoint dict ({type(data).__name__})")
    entry = _pick_generator_entry(data, path, use_ema)
    source = f"{path} (entry '{entry}')"
    state = {}
    for key, value in _tensor_dict(data[entry], source).items():
        if use_ema:
            key = key.replace(FSDP_PART, "")
        state[key.removeprefix(WRAPPER_PREFIX)] = value
    missing, unexpected = load_checked(model, state, source, strict=not use_ema)
    step = data.get("step")
    step = step if isinstance(step, int) else None
    return LoadResult(path, entry, missing, unexpected, step)


# ------------------------------------------------------------------------------------------------
# The generator: Wan weights, then a MemFlow checkpoint
# ------------------------------------------------------------------------------------------------
def load_wan_generator(
    wan_folder: Path, generator_ckpt: Path | None = None, *, use_ema: bool = False,
    trust: bool = False,
) -> WanDiT:
    """The DiT of a Wan2.1 folder with the Wan weights or a MemFlow `generator_ckpt`.

    fp32 on the CPU, trainable and in train mode: the caller decides what to freeze and where it
    runs. Takes no inference settings, so training loads the same way.
    """
    generator = WanDiT(load_wan_config(wan_folder))
    if generator_ckpt is None or use_ema:  # EMA checkpoints may be partial: start from the Wan weights
        load_wan_weights(generator, wan_folder)
    return load_checkpoint_weights(generator, generator_ckpt, use_ema=use_ema, trust=trust)


def load_checkpoint_weights(generator: WanDiT, generator_ckpt: Path | None, *, use_ema: bool,
                            trust: bool = False) -> WanDiT:
    """Load a MemFlow generator checkpoint (`base.pt`, a training model.pt) over the base
    weights; with `use_ema` its `generator_ema` entry, which may leave keys at the base values."""
    if generator_ckpt is not None:
        load_generator_checkpoint(generator, generator_ckpt, use_ema=use_ema, trust=trust)
    return generator
