"""Where the sampler's Gaussian noise comes from.

The reference draws, per video and on one generator: the initial noise for every latent frame in
one call, then, for each chunk, one draw after each denoising step but the last, shaped like the
chunk's x0 ([B*F, C, h, w]). `SeededNoise` reproduces that order; `InjectedNoise` replays noise
recorded elsewhere (parity fixtures, or a user who wants to fix a video's noise).
"""
from __future__ import annotations

import torch


class NoiseSource:
    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise for all latent frames, [B, F, C, h, w]."""
        raise NotImplementedError

    def step(self, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Fresh noise for re-noising chunk `chunk` after denoising step `step`, [B*F, C, h, w]."""
        raise NotImplementedError

    def context(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Noise [B*F, C, h, w] that re-noises chunk `chunk`'s x0 to `context_noise` before its
        committing pass, or None to commit the clean x0 (inference, as the reference does)."""
        return None


class SeededNoise(NoiseSource):
    """Draws from a torch generator in the reference's order and dtype (bf16 by default: the
    reference samples bf16 directly, which is not the same as sampling fp32 and casting).
    With `context_noise` it also draws the committing pass's noise after each chunk's step
    noise, as a training rollout does (TRAINING.md §3.4)."""

    def __init__(
        self,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        context_noise: bool = False,
    ):
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(0 if seed is None else seed)
        self.generator = generator
        self.dtype = dtype
        self.device = torch.device(device)
        self.draws_context_noise = context_noise

    def _draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=self.dtype, device=self.device)

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape)

    def step(self, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape)

    def context(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self._draw(shape) if self.draws_context_noise else None


class InjectedNoise(NoiseSource):
    """Replays given noise: `initial` [B, F, C, h, w], `step_noise` indexed as
    [chunk, step, F_chunk, C, h, w] (batch 1) or [chunk, step, B*F_chunk, C, h, w], and optional
    `context_noise` [chunk, B*F_chunk, C, h, w] for the committing passes (training)."""

    def __init__(
        self,
        initial: torch.Tensor,
        step_noise: torch.Tensor,
        context_noise: torch.Tensor | None = None,
    ):
        self._initial = initial
        self._step = step_noise
        self._context = context_noise

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(self._initial.shape) != tuple(shape):
            raise ValueError(
                f"injected initial noise has shape {tuple(self._initial.shape)}, "
                f"the video needs {tuple(shape)}"
            )
        return self._initial

    def step(self, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        if chunk >= self._step.shape[0] or step >= self._step.shape[1]:
            raise ValueError(
                f"injected step noise {tuple(self._step.shape)} has no entry for chunk {chunk}, "
                f"step {step}"
            )
        return self._step[chunk, step].reshape(shape)

    def context(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        if self._context is None:
            return None
        return self._context[chunk].reshape(shape)
