"""Teacher ("real score") and critic ("fake score"): bidirectional Wan DiTs read as x0 predictors.

The reference wraps each DiT so that it returns x0 = x_t - sigma(t) * v, with sigma looked up in
the wrapper's own flow-matching table (TRAINING.md §2.1). The generator's wrapper has shift 5;
the teacher's and critic's are built without model_kwargs and get the wrapper default, shift 8
(§10 item 10). `ScoreConfig.compat()` reproduces that; `ScoreConfig.clean()` converts with the
generator's table, so noising, x0 and the critic's flow all use one sigma.

The reference pads teacher/critic inputs to 21 frames of tokens and masks the padded keys; a
bidirectional call on the real frames only is the same computation (§10 item 23b).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from config.schema import ScoreKeys, TrainConfig
from memflow.errors import InputError
from memflow.model import WanDiT
from memflow.scheduler import FlowMatchScheduler


@dataclass(frozen=True)
class ScoreConfig:
    """How the DMD / critic losses draw and read timesteps (TRAINING.md §1.2, §4).

    score_shift: shift of the table the teacher and critic convert flow -> x0 with; None uses
        the generator's table (clean).
    """

    num_train_timestep: int = ScoreKeys.num_train_timestep
    timestep_shift: float = ScoreKeys.timestep_shift
    min_score_timestep: int = ScoreKeys.min_score_timestep
    min_step_fraction: float = 0.02
    max_step_fraction: float = 0.98
    guidance_scale: float = ScoreKeys.guidance_scale
    ts_schedule: bool = ScoreKeys.ts_schedule
    ts_schedule_max: bool = ScoreKeys.ts_schedule_max
    score_shift: float | None = None

    @classmethod
    def from_config(cls, c: TrainConfig, compat: bool) -> ScoreConfig:
        """From a typed training config, on the compat or the clean timestep table;
        `real_guidance_scale` overrides `guidance_scale` when set."""
        if c.min_score_timestep >= c.num_train_timestep:
            raise InputError(
                f"config key `min_score_timestep` ({c.min_score_timestep}) must be below "
                f"num_train_timestep ({c.num_train_timestep})"
            )
        guidance = c.guidance_scale if c.real_guidance_scale is None else c.real_guidance_scale
        score_kwargs = dict(
            num_train_timestep=c.num_train_timestep,
            timestep_shift=c.timestep_shift,
            min_score_timestep=c.min_score_timestep,
            guidance_scale=guidance,
            ts_schedule=c.ts_schedule,
            ts_schedule_max=c.ts_schedule_max,
        )
        return cls.compat(**score_kwargs) if compat else cls.clean(**score_kwargs)

    @classmethod
    def compat(cls, **overrides) -> "ScoreConfig":
        """The reference: teacher and critic read x0 through a shift-8 table."""
        return cls(**{"score_shift": 8.0, **overrides})

    @classmethod
    def clean(cls, **overrides) -> "ScoreConfig":
        """One table everywhere: the generator's (shift `timestep_shift`)."""
        return cls(**{"score_shift": None, **overrides})

    @property
    def min_step(self) -> int:
        return int(self.min_step_fraction * self.num_train_timestep)

    @property
    def max_step(self) -> int:
        return int(self.max_step_fraction * self.num_train_timestep)


class ScoreModel:
    """A bidirectional DiT on [B, F, C, h, w] latents that returns x0 through its own table.

    Timesteps are one per sample ([B] or [B, F] with equal columns: the reference's
    bidirectional wrapper reads only the first column)."""

    def __init__(self, model: WanDiT, scheduler: FlowMatchScheduler):
        self.model = model
        self.scheduler = scheduler

    def x0(self, x_t: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, f = x_t.shape[:2]
        t = timestep.reshape(b, -1)[:, :1].to(torch.float32).expand(b, f)
        flow = self.model(x_t.permute(0, 2, 1, 3, 4), t, context).permute(0, 2, 1, 3, 4)
        x0 = self.scheduler.flow_to_x0(flow.flatten(0, 1), x_t.flatten(0, 1), t.flatten())
        return x0.unflatten(0, (b, f))


def score_scheduler(config: ScoreConfig) -> FlowMatchScheduler:
    """The teacher's / critic's flow -> x0 table."""
    shift = config.timestep_shift if config.score_shift is None else config.score_shift
    return FlowMatchScheduler(shift=shift, num_train_timesteps=config.num_train_timestep)


def cfg_x0(
    teacher: ScoreModel,
    x_t: torch.Tensor,
    timestep: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free-guided teacher x0: r_c + g * (r_c - r_u) (§4.2), two separate calls as
    the reference makes them (not one batched call: batching changes nothing but memory)."""
    rc = teacher.x0(x_t, timestep, cond)
    ru = teacher.x0(x_t, timestep, uncond)
    return rc + (rc - ru) * guidance_scale
