"""EMA of the generator's parameters (TRAINING.md §2.4).

The shadow is an fp32 CPU copy of every generator parameter, as in the reference: it costs no GPU
memory and its precision does not depend on the bf16 compute copy. It is keyed by the plain Wan
parameter names (wrapper parts such as `_fsdp_wrapped_module.`, `_orig_mod.` or
`_checkpoint_wrapped_module.` removed), so a checkpoint's "generator_ema" loads into an
unwrapped `WanDiT` whatever wrapping the training run used.

Under FSDP2 every parameter is a sharded DTensor: `update` gathers one parameter at a time with
`full_tensor()` (a collective, so **every rank must call it**, in the same order), which keeps
the extra GPU memory at one full parameter. Only rank 0 keeps the shadow (it is the only rank that
writes checkpoints); the other ranks take part in the gathers and hold nothing, so the job does
not pay world_size CPU copies of the model. Without a process group the single process is rank 0.

Lifetime in the loop (reference order, §2.3-§2.5): build at start-up, load from the resume
checkpoint, drop it with `ema_after_resume` when step < ema_start_step, call `update` right after
each generator optimiser step, and after `step += 1` call `ema_after_iteration`, which
re-creates it from the current weights at the first step ≥ ema_start_step.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from utils.distributed import is_distributed, is_main_rank

WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def plain_name(name: str) -> str:
    """A parameter name without FSDP1 / torch.compile / activation-checkpoint wrapper parts."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain name, full detached tensor) per parameter; gathers DTensor shards (collective)."""
    for name, param in model.named_parameters():
        value = param.detach()
        if isinstance(value, DTensor):
            value = value.full_tensor()
        yield plain_name(name), value


class EMA:
    """Exponential moving average of a model's parameters, fp32 on the CPU of rank 0."""

    def __init__(self, model: nn.Module, decay: float = 0.99) -> None:
        """Start the shadow at the model's current weights (the reference's EMA_FSDP init)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        keep = is_main_rank()
        with torch.no_grad():
            for name, value in _full_parameters(model):
                if keep:
                    self.shadow[name] = value.to("cpu", torch.float32, copy=True)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """shadow ← d·shadow + (1 − d)·θ for every parameter (collective under FSDP2).

        The arithmetic is the reference's: in fp32 on the CPU, θ cast to fp32 first."""
        d = self.decay if decay is None else decay
        keep = is_main_rank()
        for name, value in _full_parameters(model):
            if not keep:
                continue
            if name not in self.shadow:
                raise KeyError(f"EMA has no entry for parameter {name!r} (built from another model?)")
            self.shadow[name].mul_(d).add_(value.to("cpu", torch.float32), alpha=1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{plain name: fp32 CPU tensor}; empty on ranks other than 0. The tensors are the live
        shadow (no copy): save them before the next `update`."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "EMA state") -> None:
        """Replace the shadow (on rank 0; other ranks ignore `state`). Names may carry wrapper
        parts or the training wrapper's `model.` prefix; the key set and shapes must match."""
        if not is_main_rank():
            return
        found = {plain_name(k).removeprefix("model."): v for k, v in state.items()}
        missing = [k for k in self.shadow if k not in found]
        unexpected = [k for k in found if k not in self.shadow]
        if missing or unexpected:
            raise ValueError(
                f"{source} does not fit the EMA: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        wrong = [k for k, v in found.items() if v.shape != self.shadow[k].shape]
        if wrong:
            k = wrong[0]
            raise ValueError(
                f"{source}: {k} has shape {list(found[k].shape)}, "
                f"the EMA expects {list(self.shadow[k].shape)}"
            )
        self.shadow = {k: found[k].detach().to("cpu", torch.float32, copy=True) for k in self.shadow}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow into `model`'s parameters (e.g. to evaluate the EMA weights).

        Collective under FSDP2: rank 0's shadow is broadcast and each rank keeps its shard.
        Parameters the shadow lacks (there are none for a model it was built from) are kept."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        distributed = is_distributed()
        state = self.shadow if is_main_rank() else {}
        set_model_state_dict(
            model,
            state,
            options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=distributed, strict=False
            ),
        )


def ema_after_resume(ema: EMA | None, step: int, ema_start_step: int) -> EMA | None:
    """Drop the EMA when the (resumed) step is before ema_start_step (§2.3, §8.4)."""
    return None if ema is not None and step < ema_start_step else ema


def ema_after_iteration(
    ema: EMA | None, model: nn.Module, step: int, ema_start_step: int, decay: float,
    enabled: bool = True,
) -> EMA | None:
    """After `step += 1`: create the EMA from the current weights at the first step ≥
    ema_start_step (collective under FSDP2, so every rank calls this). `enabled` is False in
    LoRA mode or when ema_weight is 0, where the reference never builds one."""
    if enabled and decay > 0 and ema is None and step >= ema_start_step:
        return EMA(model, decay)
    return ema
