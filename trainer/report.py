"""What one training iteration computed, handed to an opt-in hook (parity checks, debugging).

A trainer given a `report_hook` calls it once per iteration, after the micro-steps and before
clipping and the optimiser steps, with an `IterationReport`: every loss object of the iteration
(each holds its stage-1 rollout or stage-2 window with the window's schedule, the DMD gradient or
the critic's flow and its target) and the parameter gradients as the losses left them, before
clipping. Everything stays a tensor on the device: building the report never syncs with the
host, and without a hook nothing is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .long_sequence import Window


@dataclass
class IterationReport:
    """One iteration's losses and pre-clipping gradients.

    `generator_losses` / `critic_losses`: one per micro-step, in order (`GeneratorLoss` /
    `CriticStepLoss` in stage 1, `WindowGeneratorLoss` / `WindowCriticLoss` in stage 2).
    `context_windows`: stage-2 first windows generated as context only (train_first_chunk
    false). The gradient dicts hold the parameters' live `.grad` tensors: clipping scales them in
    place after the hook returns, so a hook clones what it keeps."""

    step: int
    train_generator: bool
    generator_losses: list[Any] = field(default_factory=list)
    critic_losses: list[Any] = field(default_factory=list)
    context_windows: list[Window] = field(default_factory=list)
    generator_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    critic_grads: dict[str, torch.Tensor] = field(default_factory=dict)


ReportHook = Callable[[IterationReport], None]


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The `.grad` of every parameter that has one, by parameter name (shards under FSDP)."""
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
