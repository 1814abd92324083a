"""Writers of the reference's and Wan2.1's files, for tests only.

The library reads these formats (memflow/checkpoint.py, memflow/lora.py, memflow/text_encoder.py,
memflow/vae.py) and training writes its own checkpoint folders (trainer/checkpoint_save.py); tests
need to *make* files in the original layouts (`base.pt`, `lora.pt`, a Wan2.1 folder's DiT
weights, umT5 `.pth` and VAE `.pth`) to check that they load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import save_file

from memflow.checkpoint import (
    GENERATOR_ENTRIES,
    INDEX_SUFFIX,
    TORCH_SUFFIXES,
    WAN_WEIGHTS,
    WRAPPER_PREFIX,
    PathLike,
    load_checked,
)
from memflow.files import atomic_write
from memflow.lora import lora_state_dict
from memflow.model import WanDiT
from memflow.text_encoder import hf_to_wan_t5_key
from memflow.vae import diffusers_to_wan_vae_key
from trainer.checkpoint_files import list_checkpoints


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
    state = {WRAPPER_PREFIX + k: v for k, v in plain_state_dict(model).items()}
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


# ---- original Wan2.1 files (a DiT, the umT5 encoder, the VAE) ---------------------------------
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, refusing a model that still carries LoRA layers (its names
    would not be the Wan names)."""
    state = model.state_dict()
    if any(".lora_" in k or ".base_layer." in k for k in state):
        raise ValueError("the model has LoRA layers; merge them first (memflow.lora.merge_lora)")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _saved_layout(path: Path) -> set[Path]:
    """The files an earlier save to `path` may have left: the single file, or the index and the
    shards it names."""
    index = path.with_name(path.name + INDEX_SUFFIX)
    files = {path, index}
    if index.is_file():
        try:
            files |= {path.parent / n for n in json.loads(index.read_text())["weight_map"].values()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass
    return {f for f in files if f.is_file()}


def save_wan_weights(
    model: nn.Module, path: PathLike, max_shard_size: int | None = None
) -> list[Path]:
    """Save the DiT with the original Wan names; returns the files written.

    `path` is a `.safetensors` or `.pth`/`.pt` file, or a folder (then
    `diffusion_pytorch_model.safetensors` in it). With `max_shard_size` (bytes) a safetensors
    state dict larger than that is split into `<stem>-00001-of-0000N.safetensors` shards plus
    `<name>.index.json`, the layout of the larger Wan checkpoints; the index is written last.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / WAN_WEIGHTS
    state = plain_state_dict(model)
    if path.suffix in TORCH_SUFFIXES:
        if max_shard_size is not None:
            raise ValueError("sharding is only supported for .safetensors")
        return [atomic_write(path, lambda tmp: torch.save(state, tmp))]
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: unknown weight format (use .safetensors, .pth or .pt)")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    def write_safetensors(target: Path, tensors: dict[str, torch.Tensor]) -> Path:
        return atomic_write(target, lambda tmp: save_file(tensors, str(tmp), {"format": "pt"}))

    previous = _saved_layout(path)
    if len(shards) == 1:
        written = [write_safetensors(path, state)]
    else:
        n = len(shards)
        names = [f"{path.stem}-{i + 1:05d}-of-{n:05d}{path.suffix}" for i in range(n)]
        written = [write_safetensors(path.parent / nm, s) for nm, s in zip(names, shards)]
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: nm for nm, s in zip(names, shards) for k in s},
        }
        text = json.dumps(index, indent=2)
        index_path = path.with_name(path.name + INDEX_SUFFIX)
        written.append(atomic_write(index_path, lambda tmp: tmp.write_text(text)))
    # Drop the other layout of an earlier save, so a folder never holds two sets of weights.
    for old in previous - set(written):
        old.unlink()
    return written


def to_wan_t5_state_dict(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `from_wan_t5_state_dict`: transformers names -> Wan's original umT5 layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state_dict.items():
        wan_key = hf_to_wan_t5_key(key)
        if wan_key is None:
            raise ValueError(f"state dict: key {key!r} has no Wan umT5 counterpart")
        if key == "encoder.embed_tokens.weight" and wan_key in out:
            continue  # the tied copy of shared.weight
        out[wan_key] = value
    return out


def to_wan_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`AutoencoderKLWan` state dict -> Wan's original `Wan2.1_VAE.pth` layout.

    Exact inverse of diffusers' `convert_wan_vae_to_diffusers` for Wan2.1-structured VAEs (the
    tests check the round trip), so tiny random VAEs can be saved as original-format files.
    """
    return {diffusers_to_wan_vae_key(k): v for k, v in state_dict.items()}
