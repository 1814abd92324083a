"""Where a training step's random draws come from.

Every random quantity of a stage-1 step (TRAINING.md §3.2, §4.1) is taken from a `TrainingDraws`
object passed in, never from the global RNG: the trainer uses `SampleDraws` (per-sample
generators keyed by seed, step and sample index), `SeededDraws` draws everything from one
`torch.Generator` in the reference's order, parity tests use `InjectedDraws` (the reference's
recorded draws replayed by role). The rollout's Gaussian noise goes through the
shared `pipeline.noise.NoiseSource` interface, so the chunk stepper consumes it the same way in
inference and training.

Roles, in the order the reference consumes them in one generator step:
  1. `num_blocks`          number of blocks of the rollout
  2. `rollout_noise`       initial / step / context noise of the rollout (a NoiseSource)
  3. `exit_steps`          one exit step per block (drawn after the initial noise)
  4. `score_timestep`      integer DMD / critic timestep, one per sample
  5. `score_noise`         the noise that takes the sample to that timestep
"""
from __future__ import annotations

import hashlib
from typing import Protocol, Sequence

import torch

from pipeline.noise import InjectedNoise, NoiseSource, SeededNoise


class TrainingDraws(Protocol):
    """The random draws of one rollout + loss; one object per rollout (its noise is
    consumed once)."""

    def num_blocks(self, low: int, high: int) -> int:
        """An integer in [low, high] (both included)."""
        ...

    def rollout_noise(self) -> NoiseSource:
        """The rollout's noise; its `context()` returns noise (training re-noises the commit)."""
        ...

    def exit_steps(self, num_blocks: int, num_steps: int) -> list[int]:
        """One exit step per block, each in [0, num_steps)."""
        ...

    def score_timestep(self, low: int, high: int, batch_size: int) -> torch.Tensor:
        """Integer timesteps [B, 1] (int64) in [low, high)."""
        ...

    def score_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Gaussian noise shaped and typed like `like`."""
        ...


class SeededDraws:
    """All draws from one `torch.Generator`, in the reference's order and dtypes (noise in the
    dtype the caller asks for: bf16 when training in bf16, as the reference samples it)."""

    def __init__(
        self,
        generator: torch.Generator,
        noise_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.generator = generator
        self.noise_dtype = noise_dtype
        self.device = torch.device(device)

    def num_blocks(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=self.generator).item())

    def rollout_noise(self) -> NoiseSource:
        return SeededNoise(generator=self.generator, dtype=self.noise_dtype, device=self.device,
                           context_noise=True)

    def exit_steps(self, num_blocks: int, num_steps: int) -> list[int]:
        return torch.randint(0, num_steps, (num_blocks,), generator=self.generator).tolist()

    def score_timestep(self, low: int, high: int, batch_size: int) -> torch.Tensor:
        return torch.randint(low, high, (batch_size, 1), generator=self.generator, dtype=torch.long)

    def score_noise(self, like: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(like.shape, generator=self.generator, dtype=like.dtype,
                            device=self.generator.device)
        return noise.to(like.device)


class InjectedDraws:
    """Replays recorded draws by role (parity fixtures). Each value is checked against what the
    step asks for, so a fixture that does not fit the configuration fails loudly."""

    def __init__(
        self,
        num_blocks: int,
        initial_noise: torch.Tensor,
        step_noise: torch.Tensor,
        context_noise: torch.Tensor,
        exit_steps: Sequence[int],
        score_timestep: torch.Tensor,
        score_noise: torch.Tensor,
    ):
        self._num_blocks = int(num_blocks)
        self._noise = InjectedNoise(initial_noise, step_noise, context_noise)
        self._exit_steps = [int(k) for k in exit_steps]
        self._score_timestep = torch.as_tensor(score_timestep, dtype=torch.long)
        self._score_noise = score_noise

    def num_blocks(self, low: int, high: int) -> int:
        if not low <= self._num_blocks <= high:
            raise ValueError(f"injected num_blocks {self._num_blocks} is outside [{low}, {high}]")
        return self._num_blocks

    def rollout_noise(self) -> NoiseSource:
        return self._noise

    def exit_steps(self, num_blocks: int, num_steps: int) -> list[int]:
        if len(self._exit_steps) != num_blocks or not all(0 <= k < num_steps for k in self._exit_steps):
            raise ValueError(
                f"injected exit steps {self._exit_steps} do not fit {num_blocks} blocks of "
                f"{num_steps} steps"
            )
        return list(self._exit_steps)

    def score_timestep(self, low: int, high: int, batch_size: int) -> torch.Tensor:
        t = self._score_timestep.reshape(batch_size, 1)
        if (t < low).any() or (t >= high).any():
            raise ValueError(f"injected score timestep {t.tolist()} is outside [{low}, {high})")
        return t

    def score_noise(self, like: torch.Tensor) -> torch.Tensor:
        if tuple(self._score_noise.shape) != tuple(like.shape):
            raise ValueError(
                f"injected score noise {tuple(self._score_noise.shape)} does not fit "
                f"{tuple(like.shape)}"
            )
        return self._score_noise.to(like.device, like.dtype)


def stable_seed(*parts: object) -> int:
    """A stable 63-bit seed for a tuple of names and numbers (the same in every process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _PerSampleNoise(NoiseSource):
    """Rollout noise whose batch row b comes from sample b's own generator, so a sample's noise
    does not depend on which other samples share its batch or rank."""

    def __init__(self, generators: Sequence[torch.Generator], dtype: torch.dtype,
                 device: torch.device):
        self.generators = list(generators)
        self.dtype = dtype
        self.device = device

    def _draw(self, shape: tuple[int, ...], rows_per_sample: int) -> torch.Tensor:
        """`shape`'s leading dim holds len(generators) blocks of `rows_per_sample` rows."""
        one = (rows_per_sample, *shape[1:])
        return torch.cat([torch.randn(one, generator=g, dtype=self.dtype).to(self.device)
                          for g in self.generators])

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape, 1)

    def step(self, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape, shape[0] // len(self.generators))

    def context(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self._draw(shape, shape[0] // len(self.generators))


class SampleDraws:
    """Production draws for one rollout + loss, a pure function of (seed, step, role, global
    sample index): nothing to save for an exact resume, and the same numbers whatever the
    number of ranks, the batch size or the gradient-accumulation split (sample i of an
    optimiser step draws the same noise whether it sits in batch row 1 or micro-step 1).

    Draws that shape the computation (number of blocks, exit steps) come from a generator shared
    by every sample, so all ranks agree without a broadcast; noise and score timesteps come from
    each sample's own generator, so ranks differ as samples do.
    """

    def __init__(
        self,
        seed: int,
        step: int,
        role: str,
        sample_ids: Sequence[int],
        noise_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        key = (seed, step, role)
        self.shared = torch.Generator().manual_seed(stable_seed(*key, "shared"))
        self.samples = [torch.Generator().manual_seed(stable_seed(*key, i)) for i in sample_ids]
        self.noise_dtype = noise_dtype
        self.device = torch.device(device)

    def num_blocks(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=self.shared).item())

    def rollout_noise(self) -> NoiseSource:
        return _PerSampleNoise(self.samples, self.noise_dtype, self.device)

    def exit_steps(self, num_blocks: int, num_steps: int) -> list[int]:
        return torch.randint(0, num_steps, (num_blocks,), generator=self.shared).tolist()

    def score_timestep(self, low: int, high: int, batch_size: int) -> torch.Tensor:
        if batch_size != len(self.samples):
            raise ValueError(f"batch of {batch_size} for {len(self.samples)} sample generators")
        return torch.cat([torch.randint(low, high, (1, 1), generator=g, dtype=torch.long)
                          for g in self.samples])

    def score_noise(self, like: torch.Tensor) -> torch.Tensor:
        rows = [torch.randn((1, *like.shape[1:]), generator=g, dtype=like.dtype)
                for g in self.samples]
        return torch.cat(rows).to(like.device)
