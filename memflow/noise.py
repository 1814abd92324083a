"""Where the sampler's Gaussian noise comes from, and in which order it is drawn.

Two orders, both on one generator per video:

* ``upfront`` (the reference's, spec §5.5): the initial noise of every latent frame in one call,
  then, for each chunk, one draw after each denoising step but the last, shaped like the chunk's
  x0 ([B*F, C, h, w]). It needs the video's length before the first chunk.
* ``per_chunk``: chunk n's initial noise ([B, F_chunk, C, h, w]) is drawn when chunk n starts,
  then its step noises. The video needs no fixed length, so a live session
  (pipeline/session.py) and an offline run with the same seed draw the same numbers.

`behaviour: compat` and training use ``upfront``; offline inference in `behaviour: clean` uses
``per_chunk`` (docs/behaviour.md). `SeededNoise` draws in either order; `InjectedNoise` replays
noise recorded elsewhere (parity fixtures, or a user who wants to fix a video's noise).
"""
from __future__ import annotations

from typing import Literal

import torch

NoiseOrder = Literal["upfront", "per_chunk"]
NOISE_ORDERS: tuple[str, ...] = ("upfront", "per_chunk")


class NoiseSource:
    """`order` tells the chunk loop which initial-noise call to make: ``upfront`` calls
    `initial` once per video, ``per_chunk`` calls `chunk_initial` as each chunk starts."""

    order: NoiseOrder = "upfront"

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise for all latent frames, [B, F, C, h, w] (the ``upfront`` order)."""
        raise NotImplementedError

    def chunk_initial(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Initial noise of chunk `chunk` alone, [B, F_chunk, C, h, w] (the ``per_chunk`` order)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-chunk initial noise")

    def step(self, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Fresh noise for re-noising chunk `chunk` after denoising step `step`, [B*F, C, h, w]."""
        raise NotImplementedError

    def reseed(self, seed: int) -> None:
        """Draw what follows from `seed` (a live session's "seed for the next chunk")."""
        raise ValueError(f"{type(self).__name__} cannot be reseeded")

    def context(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Noise [B*F, C, h, w] that re-noises chunk `chunk`'s x0 to `context_noise` before its
        committing pass, or None to commit the clean x0 (inference, as the reference does)."""
        return None


class SeededNoise(NoiseSource):
    """Draws from a torch generator in the given `order` and dtype (bf16 by default: the
    reference samples bf16 directly, which is not the same as sampling fp32 and casting).
    With `context_noise` it also draws the committing pass's noise after each chunk's step
    noise, as a training rollout does (TRAINING.md §3.4).

    Each order has only its own initial-noise call: asking the other one would silently give
    another video than the order promises, so it raises."""

    def __init__(
        self,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        context_noise: bool = False,
        order: NoiseOrder = "upfront",
    ):
        if order not in NOISE_ORDERS:
            raise ValueError(f"noise order must be one of {NOISE_ORDERS}, got {order!r}")
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(0 if seed is None else seed)
        self.generator = generator
        self.dtype = dtype
        self.device = torch.device(device)
        self.draws_context_noise = context_noise
        self.order = order

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def _draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=self.dtype, device=self.device)

    def _require(self, order: NoiseOrder, call: str) -> None:
        if self.order != order:
            raise RuntimeError(f"{call} belongs to the {order} noise order; this source draws "
                               f"{self.order}")

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        self._require("upfront", "initial (the whole video's noise)")
        return self._draw(shape)

    def chunk_initial(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
        self._require("per_chunk", "chunk_initial (one chunk's noise)")
        return self._draw(shape)

    def step(self, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape)

    def context(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self._draw(shape) if self.draws_context_noise else None


class InjectedNoise(NoiseSource):
    """Replays given noise: `initial` [B, F, C, h, w], `step_noise` indexed as
    [chunk, step, F_chunk, C, h, w] (batch 1) or [chunk, step, B*F_chunk, C, h, w], and optional
    `context_noise` [chunk, B*F_chunk, C, h, w] for the committing passes (training).

    Recorded noise has no draw order, so both calls work: a rollout asks `initial` once, a
    chunk-by-chunk caller (a session) may slice it with `chunk_initial`."""

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

    def chunk_initial(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
        f = shape[1]
        piece = self._initial[:, chunk * f : (chunk + 1) * f]
        if tuple(piece.shape) != tuple(shape):
            raise ValueError(
                f"injected initial noise {tuple(self._initial.shape)} has no frames "
                f"{chunk * f}..{(chunk + 1) * f - 1} of shape {tuple(shape)}"
            )
        return piece

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
