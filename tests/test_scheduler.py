"""Flow-matching schedule: shift, warp, nearest-timestep sigma lookup, conversions."""
from __future__ import annotations

import pytest
import torch

from memflow.scheduler import FlowMatchScheduler


def test_warped_steps_and_sigmas_match_reference_values():
    s = FlowMatchScheduler(shift=5.0)
    t = s.denoising_timesteps([1000, 750, 500, 250], warp=True)
    assert t.dtype == torch.float32
    assert t.tolist() == [1000.0, 937.5, 833.3333129882812, 625.0]
    assert s.sigma(t).tolist() == pytest.approx([1.0, 0.9375, 0.8333333134651184, 0.625], abs=0)
    assert s.sigmas[999].item() == 0.004980080295354128
    assert s.sigma(torch.tensor([0.0])).item() == s.sigmas[999].item()


def test_closed_form_of_the_warp():
    s = FlowMatchScheduler(shift=5.0)
    steps = [1000, 800, 600, 400, 200, 50]
    t = s.denoising_timesteps(steps)
    closed = [5000 * x / (1000 + 4 * x) for x in steps]
    assert t.tolist() == pytest.approx(closed, rel=1e-5)


def test_warp_rejects_zero_step():
    with pytest.raises(ValueError, match="warped denoising steps"):
        FlowMatchScheduler().denoising_timesteps([1000, 0])


def test_flow_x0_noise_round_trip():
    s = FlowMatchScheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, generator=g)
    noise = torch.randn(3, 4, 5, generator=g)
    t = s.denoising_timesteps([1000, 750, 500])
    xt = s.add_noise(x0, noise, t)
    flow = noise - x0
    assert torch.allclose(s.flow_to_x0(flow, xt, t), x0, atol=1e-6)
