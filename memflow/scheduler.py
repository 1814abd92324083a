"""Flow-matching noise schedule with the reference's timestep shift and warp (spec §5.1-5.2).

Conventions: x_t = (1 - sigma) * x0 + sigma * noise, and the DiT predicts the flow
v = noise - x0, so x0 = x_t - sigma * v.
"""
from __future__ import annotations

from typing import Sequence

import torch


class FlowMatchScheduler:
    """A 1000-entry shifted sigma table; timesteps are 1000 * sigma.

    sigma_lin = linspace(1, 0, 1001)[:1000]; sigma = shift * s / (1 + (shift - 1) * s).
    Every lookup takes the table entry whose timestep is nearest to the given one.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        lin = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        self.sigmas = shift * lin / (1 + (shift - 1) * lin)
        self.timesteps = self.sigmas * num_train_timesteps

    def denoising_timesteps(self, steps: Sequence[float], warp: bool = True) -> torch.Tensor:
        """The sampling timesteps for a distilled step list such as [1000, 750, 500, 250].

        With `warp`, step s maps to the shifted table entry 1000 - s (with 0 appended), so the
        list becomes [1000, 937.5, 833.33, 625] for shift 5. A list containing 0 is rejected
        when warping (it would index past the table).
        """
        steps_t = torch.tensor(list(steps), dtype=torch.long)
        if not warp:
            return steps_t.to(torch.float32)
        n = self.num_train_timesteps
        if (steps_t <= 0).any() or (steps_t > n).any():
            raise ValueError(f"warped denoising steps must be in (0, {n}], got {list(steps)}")
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return table[n - steps_t]

    def index(self, timestep: torch.Tensor) -> torch.Tensor:
        """Index of the nearest table timestep (float64 distances), elementwise over `timestep`."""
        t = torch.as_tensor(timestep).reshape(-1).to(torch.float64)
        return (self.timesteps.double()[None, :] - t[:, None].cpu()).abs().argmin(dim=1)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Table sigma (float32) of the nearest table timestep, elementwise over `timestep`."""
        return self.sigmas[self.index(timestep)]

    def interval_bound(self, timestep: float | torch.Tensor) -> int:
        """A denoising timestep in un-shifted index units, `num_train_timesteps - index`: the
        (from, to) bounds of a training exit step (TRAINING.md §4.1) are given this way, e.g.
        937.5 -> 750 for shift 5."""
        return self.num_train_timesteps - int(self.index(timestep)[0])

    def flow_to_x0(self, flow: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma(t) * flow, in float64, returned in the flow's dtype.

        flow and x_t are [N, ...] with one timestep per leading index."""
        return x0_from_flow(flow, x_t, self.sigma(timestep).to(flow.device))

    def x0_to_flow(self, x0: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """flow = (x_t - x0) / sigma(t), in float64, returned in x0's dtype (the inverse of
        `flow_to_x0`; the critic's flow loss converts its x0 prediction back this way).

        x0 and x_t are [N, ...] with one timestep per leading index."""
        sigma = self.sigma(timestep).double().to(x0.device)
        sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
        return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """(1 - sigma) * x0 + sigma * noise with the float32 sigma, cast to x0's dtype."""
        return noised(x0, noise, self.sigma(timestep).to(x0.device))

    def step_sigmas(self, timesteps: torch.Tensor) -> list[torch.Tensor]:
        """The float32 sigma of each timestep of a sampling list, one [1] tensor each: a stepper
        puts them on its device once, so denoising never looks a sigma up on the host."""
        return [self.sigma(t.reshape(1)) for t in timesteps]


def _per_row(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.view(-1, *([1] * (like.dim() - 1)))


def x0_from_flow(flow: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t - sigma * flow in float64, in the flow's dtype; `sigma`: float32, one per leading
    index of flow/x_t or a single [1] one for all (the reference's float64 conversion)."""
    return (x_t.double() - _per_row(sigma.double(), flow) * flow.double()).to(flow.dtype)


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) * x0 + sigma * noise with a float32 `sigma` (per leading index, or [1]),
    cast to x0's dtype."""
    sigma = _per_row(sigma, x0)
    return ((1 - sigma) * x0 + sigma * noise).type_as(x0)
