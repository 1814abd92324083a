"""LoRA on the DiT through peft, and the MemFlow `lora.pt` format.

The adapter goes on every linear inside each transformer block (self_attn.{q,k,v,o},
cross_attn.{q,k,v,o}, ffn.0, ffn.2), injected in place with `peft.inject_adapter_in_model`, so
the model keeps its class and its parameter names gain `.base_layer` / `.lora_A.default` (this
also suits FSDP2 wrapping for training).

`lora.pt` (written by training) is `{"generator_lora": sd, "critic_lora": sd, "step": n}` where sd
has peft's `get_peft_model` names: `base_model.model.blocks.0.self_attn.q.lora_A.weight`. Rank and
alpha are not in the file; they come from the config's `adapter:` section.

The reference keeps LoRA unmerged (y = base(x) + B(A(x)) * alpha / r, in bf16); merging changes
bf16 rounding, so `merge_lora` is for clean mode and for exporting a standalone base checkpoint.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from .checkpoint import CheckpointError, _listed, atomic_write, torch_load

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."
BLOCK_LINEARS = r"blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o)|ffn\.(0|2))"


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: str = field(default=BLOCK_LINEARS)

    @classmethod
    def from_config(cls, adapter: Mapping[str, Any]) -> "LoraSettings":
        """From the reference's `adapter:` section ({type, rank, alpha, dropout, dtype, verbose};
        dtype and verbose are accepted and ignored)."""
        kind = adapter.get("type", "lora")
        if kind != "lora":
            raise ValueError(f"adapter type {kind!r} is not supported (only lora)")
        if "rank" not in adapter or int(adapter["rank"]) < 1:
            raise ValueError("adapter.rank must be a positive integer")
        rank = int(adapter["rank"])
        return cls(rank=rank, alpha=float(adapter.get("alpha", rank)), dropout=float(adapter.get("dropout", 0.0)))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers in place (B starts at zero, so the model's output is unchanged)."""
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    return inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors under the model's own parameter names."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def _to_model_name(key: str) -> str:
    """`base_model.model.blocks.0.ffn.0.lora_A.weight` (any wrapper prefixes) ->
    `blocks.0.ffn.0.lora_A.default.weight`."""
    key = key.replace("_fsdp_wrapped_module.", "")
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    key = re.sub(r"\.lora_(A|B)\.(default\.)?weight$", rf".lora_\1.{ADAPTER}.weight", key)
    return key


def _to_file_name(key: str) -> str:
    return PEFT_PREFIX + key.replace(f".{ADAPTER}.", ".")


def load_lora_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a `lora.pt` (its `generator_lora` entry, or the whole file) strictly."""
    data = torch_load(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a LoRA state dict")
    state = data.get("generator_lora", data)
    source = f"{path} [generator_lora]" if "generator_lora" in data else str(path)
    state = {_to_model_name(k): v for k, v in state.items() if torch.is_tensor(v)}
    expected = lora_state_dict(model)
    if not expected:
        raise CheckpointError(f"{source}: the model has no LoRA layers (is `adapter` configured?)")
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        parts = [f"missing {_listed(missing)}"] if missing else []
        parts += [f"unexpected {_listed(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{source} does not match the LoRA layers: " + "; ".join(parts))
    for key in sorted(expected):
        want, got = tuple(expected[key].shape), tuple(state[key].shape)
        if want != got:
            rank_axis = 0 if ".lora_A." in key else 1
            raise CheckpointError(
                f"{source}: {key} has shape {got}, expected {want} (file rank {got[rank_axis]}, "
                f"configured adapter.rank {want[rank_axis]})"
            )
    model.load_state_dict(state, strict=False)


def save_lora_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], critic: nn.Module | None = None, step: int = 0
) -> Path:
    """Write the reference's `lora.pt`: {generator_lora, critic_lora, step}."""

    def as_file(m: nn.Module | None) -> dict[str, torch.Tensor]:
        if m is None:
            return {}
        return {_to_file_name(k): v.detach().cpu() for k, v in lora_state_dict(m).items()}

    payload = {"generator_lora": as_file(model), "critic_lora": as_file(critic), "step": step}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold W + scale * B @ A into each base linear and remove the adapters, in place.

    The result has the original parameter names again, so it can be saved as a base checkpoint.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
