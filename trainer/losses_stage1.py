"""One stage-1 generator loss and one critic loss (TRAINING.md §3.1): rollout, then DMD / flow.

`DistillationModels` bundles the generator's chunk stepper and the teacher/critic x0 readers;
`generator_loss` is the reference's `DMD.generator_loss` (rollout with gradient, DMD loss),
`critic_loss` its `DMD.critic_loss` (an independent no-grad rollout, critic flow loss). Each
takes its own `TrainingDraws`, so the two rollouts of an iteration draw independently. The
caller backpropagates (loss / gradient_accumulation_steps) and steps the optimisers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memflow.chunk_loop import ChunkStepper

from .dmd import critic_flow_loss, dmd_gradient, dmd_loss
from .draws import TrainingDraws
from .rollout import RolloutConfig, RolloutOutput, training_rollout
from .score import ScoreConfig, ScoreModel, score_scheduler


@dataclass
class DistillationModels:
    """The generator (through its stepper), the frozen teacher and the critic."""

    stepper: ChunkStepper
    teacher: ScoreModel
    critic: ScoreModel

    @classmethod
    def build(cls, stepper: ChunkStepper, teacher, critic, config: ScoreConfig) -> "DistillationModels":
        """Wrap two bidirectional WanDiTs with the teacher/critic table of `config`."""
        table = score_scheduler(config)
        return cls(stepper, ScoreModel(teacher, table), ScoreModel(critic, table))


@dataclass
class GeneratorLoss:
    """The loss (0-dim float64, with graph into the generator) and what the reference logs."""

    loss: torch.Tensor
    rollout: RolloutOutput
    dmd_grad: torch.Tensor
    dmd_timestep: torch.Tensor
    dmdtrain_gradient_norm: torch.Tensor


def generator_loss(
    models: DistillationModels,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    latent_hw: tuple[int, int],
    rollout_config: RolloutConfig,
    score_config: ScoreConfig,
    draws: TrainingDraws,
) -> GeneratorLoss:
    """Self-Forcing rollout with gradient, then the DMD loss on its output (§3.2, §4.1-§4.5)."""
    out = training_rollout(models.stepper, cond, latent_hw, rollout_config, draws, grad=True)
    interval = (out.denoised_timestep_from, out.denoised_timestep_to)
    dmd = dmd_gradient(
        out.latents, cond, uncond, models.teacher, models.critic, models.stepper.scheduler,
        score_config, draws, interval,
    )
    loss = dmd_loss(out.latents, dmd.grad, out.gradient_mask)
    return GeneratorLoss(loss, out, dmd.grad, dmd.timestep, dmd.gradient_norm)


@dataclass
class CriticStepLoss:
    """The loss (graph into the critic), its timestep, the rollout it judged, and the critic's
    flow v̂ with its target ε - x."""

    loss: torch.Tensor
    critic_timestep: torch.Tensor
    rollout: RolloutOutput
    critic_flow: torch.Tensor
    flow_target: torch.Tensor


def critic_loss(
    models: DistillationModels,
    cond: torch.Tensor,
    latent_hw: tuple[int, int],
    rollout_config: RolloutConfig,
    score_config: ScoreConfig,
    draws: TrainingDraws,
) -> CriticStepLoss:
    """A no-grad rollout, then the critic's flow loss on it (§4.6); only the critic trains.
    Stage 1 passes no gradient mask to the critic loss (every frame counts, as the reference
    discards the rollout's mask there)."""
    with torch.no_grad():
        out = training_rollout(models.stepper, cond, latent_hw, rollout_config, draws, grad=False)
    interval = (out.denoised_timestep_from, out.denoised_timestep_to)
    crit = critic_flow_loss(
        out.latents, cond, models.critic, models.stepper.scheduler, score_config, draws,
        None, interval,
    )
    return CriticStepLoss(crit.loss, crit.timestep, out, crit.flow, crit.target)
