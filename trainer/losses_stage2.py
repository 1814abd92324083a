"""Stage-2 losses on a window of a long sequence (TRAINING.md §5.4, §5.9).

`generator_window_loss`: the next window with gradient, then the DMD loss on its new frames
(one timestep for the whole window, teacher and critic on every frame, the normaliser over every
frame, the loss over the masked ones). `critic_window_loss`: the next window without gradient,
then the critic's flow loss with the window's mask. Both judge a window against the prompt that
is active at its end (§5.6); the unconditional branch is the negative prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dmd import critic_flow_loss, dmd_gradient, dmd_loss
from .draws import TrainingDraws
from .long_sequence import LongSequence, Window
from .losses_stage1 import DistillationModels
from .score import ScoreConfig


@dataclass
class WindowGeneratorLoss:
    """The DMD loss of a window (graph into the generator), the window (its latents and
    schedule), the DMD gradient Δ with its timestep and the logged mean|Δ|."""

    loss: torch.Tensor
    window: Window
    dmd_grad: torch.Tensor
    dmd_timestep: torch.Tensor
    dmdtrain_gradient_norm: torch.Tensor


@dataclass
class WindowCriticLoss:
    """The critic loss of a window (graph into the critic), the window, the timestep, and the
    critic's flow v̂ with its target ε - x."""

    loss: torch.Tensor
    window: Window
    critic_timestep: torch.Tensor
    critic_flow: torch.Tensor
    flow_target: torch.Tensor


def generator_window_loss(
    models: DistillationModels,
    sequence: LongSequence,
    uncond: torch.Tensor,
    score_config: ScoreConfig,
    draws: TrainingDraws,
    last_step_only: bool = False,
) -> WindowGeneratorLoss:
    window = sequence.next_window(draws, grad=True, last_step_only=last_step_only)
    interval = (window.denoised_timestep_from, window.denoised_timestep_to)
    dmd = dmd_gradient(window.latents, window.cond, uncond, models.teacher, models.critic,
                       models.stepper.scheduler, score_config, draws, interval)
    loss = dmd_loss(window.latents, dmd.grad, window.gradient_mask)
    return WindowGeneratorLoss(loss, window, dmd.grad, dmd.timestep, dmd.gradient_norm)


def critic_window_loss(
    models: DistillationModels,
    sequence: LongSequence,
    score_config: ScoreConfig,
    draws: TrainingDraws,
    last_step_only: bool = False,
) -> WindowCriticLoss:
    with torch.no_grad():
        window = sequence.next_window(draws, grad=False, last_step_only=last_step_only)
    interval = (window.denoised_timestep_from, window.denoised_timestep_to)
    crit = critic_flow_loss(window.latents.detach(), window.cond, models.critic,
                            models.stepper.scheduler, score_config, draws,
                            window.gradient_mask, interval)
    return WindowCriticLoss(crit.loss, window, crit.timestep, crit.flow, crit.target)
