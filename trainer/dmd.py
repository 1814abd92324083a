"""DMD generator loss and critic flow loss (TRAINING.md §4), with the reference's precisions.

Everything is a function of tensors, models and a `TrainingDraws`: no global RNG. The pieces:

* `score_timestep`: the integer draw, the float32 shift in the reference's exact operation order
  and the clamp (§4.1);
* `dmd_gradient`: teacher CFG minus critic, normalised per sample by mean|x - r̂| over the whole
  clip, NaN -> 0 (§4.2-§4.4), under no_grad;
* `dmd_loss`: ½·mean_M (x - stopgrad(x - Δ))² in float64 over the gradient mask (§4.5);
* `critic_flow_loss`: the critic's x0 converted to flow with the generator's table, against
  ε - x (§4.6); gradient reaches only the critic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memflow.scheduler import FlowMatchScheduler

from .draws import TrainingDraws
from .score import ScoreConfig, ScoreModel, cfg_x0


def shift_timestep(t_int: torch.Tensor, shift: float, num_train_timestep: int = 1000) -> torch.Tensor:
    """shift·u / (1 + (shift - 1)·u) · N with u = t / N, in float32 and in exactly the
    reference's order: the textbook form rounds differently for 421 of the 1000 integers."""
    n = num_train_timestep
    return shift * (t_int / n) / (1 + (shift - 1) * (t_int / n)) * n


def score_timestep(
    config: ScoreConfig,
    draws: TrainingDraws,
    batch_size: int,
    num_frames: int,
    interval: tuple[int | None, int | None] = (None, None),
) -> torch.Tensor:
    """The DMD / critic timestep [B, F] (float32, equal over frames).

    t_int ~ U{lo, ..., hi - 1} with lo = min_score_timestep (or the exit interval's "to" under
    ts_schedule) and hi = num_train_timestep (or its "from" under ts_schedule_max), shifted when
    timestep_shift > 1, clamped to [min_step, max_step]."""
    t_from, t_to = interval
    lo = t_to if config.ts_schedule and t_to is not None else config.min_score_timestep
    hi = t_from if config.ts_schedule_max and t_from is not None else config.num_train_timestep
    t = draws.score_timestep(lo, hi, batch_size).repeat(1, num_frames)
    if config.timestep_shift > 1:
        t = shift_timestep(t, config.timestep_shift, config.num_train_timestep)
    return t.to(torch.float32).clamp(config.min_step, config.max_step)


def noisy_sample(
    scheduler: FlowMatchScheduler, x: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """(1 - σ(t))·x + σ(t)·ε per frame with the generator's table, in x's dtype."""
    b, f = x.shape[:2]
    out = scheduler.add_noise(x.flatten(0, 1), noise.flatten(0, 1), timestep.flatten())
    return out.unflatten(0, (b, f))


@dataclass
class DMDGradient:
    """Δ [B, F, C, h, w], the logged mean|Δ| and the timestep [B, F] it was taken at."""

    grad: torch.Tensor
    gradient_norm: torch.Tensor
    timestep: torch.Tensor


@torch.no_grad()
def dmd_gradient(
    x: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    teacher: ScoreModel,
    critic: ScoreModel,
    scheduler: FlowMatchScheduler,
    config: ScoreConfig,
    draws: TrainingDraws,
    interval: tuple[int | None, int | None] = (None, None),
) -> DMDGradient:
    """Δ = (f̂ - r̂) / mean|x - r̂| (per sample, every frame counted, masked or not), NaN -> 0.

    `x` is the generator's sample; `scheduler` the generator's (shift-5) table, used for the
    noising. No critic CFG (released configs)."""
    b, f = x.shape[:2]
    t = score_timestep(config, draws, b, f, interval)
    x_t = noisy_sample(scheduler, x, draws.score_noise(x), t).detach()
    fake = critic.x0(x_t, t, cond)
    real = cfg_x0(teacher, x_t, t, cond, uncond, config.guidance_scale)
    normaliser = (x - real).abs().mean(dim=[1, 2, 3, 4], keepdim=True)
    grad = torch.nan_to_num((fake - real) / normaliser)
    return DMDGradient(grad, grad.abs().mean(), t)


def dmd_loss(
    x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """½·mean_M (x - stopgrad(x - Δ))² in float64: value ½·mean_M Δ², ∂/∂x = Δ/|M| on M."""
    x64 = x.double()
    target = (x64 - grad.double()).detach()
    if mask is not None:
        return 0.5 * F.mse_loss(x64[mask], target[mask], reduction="mean")
    return 0.5 * F.mse_loss(x64, target, reduction="mean")


@dataclass
class CriticLoss:
    """The loss, the timestep [B, F], the critic's flow v̂ and its target ε - x (for reports)."""

    loss: torch.Tensor
    timestep: torch.Tensor
    flow: torch.Tensor
    target: torch.Tensor


def critic_flow_loss(
    x: torch.Tensor,
    cond: torch.Tensor,
    critic: ScoreModel,
    scheduler: FlowMatchScheduler,
    config: ScoreConfig,
    draws: TrainingDraws,
    mask: torch.Tensor | None = None,
    interval: tuple[int | None, int | None] = (None, None),
) -> CriticLoss:
    """mean_M (v̂ - (ε - x))² with v̂ = (x_t - x̂0)/σ(t) from the generator's table (§4.6).

    `x` (a generated sample) is detached; the critic runs with gradient on the conditional
    prompt only. In compat the critic's x̂0 used the shift-8 table and v̂ the shift-5 one, so
    v̂ = (σ8/σ5)·v_net; in clean both are the same table and v̂ = v_net."""
    x = x.detach()
    b, f = x.shape[:2]
    t = score_timestep(config, draws, b, f, interval)
    noise = draws.score_noise(x)
    x_t = noisy_sample(scheduler, x, noise, t)
    x0 = critic.x0(x_t, t, cond)
    flow = scheduler.x0_to_flow(x0.flatten(0, 1), x_t.flatten(0, 1), t.flatten()).unflatten(0, (b, f))
    target = noise - x
    err = (flow - target) ** 2
    loss = err[mask].mean() if mask is not None else err.mean()
    return CriticLoss(loss, t, flow, target)
