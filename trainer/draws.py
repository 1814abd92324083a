"""Where a training run's random draws come from.

A trainer takes all its randomness from one `RunDraws` object, never from the global RNG:
`rollout(step, role, sample_ids)` gives the `TrainingDraws` of one rollout + loss (stage 1) or
of one window + loss (stage 2), `sequence(index)` the `SequenceDraws` that set up stage-2
sequence `index` (its length and switch frame). The trainer's default is `SeededRunDraws`
(`SampleDraws` keyed by seed, step, role and sample index; sequences keyed by seed and index);
`InjectedRunDraws` replays recorded draws (the reference's, or another run's) in the order the
trainer asks for them. For one rollout, `SeededDraws` draws everything from one
`torch.Generator` in the reference's order and `InjectedDraws` replays recorded values by role.
The Gaussian noise goes through the shared `memflow.noise.NoiseSource` interface, so the chunk
stepper consumes it the same way in inference and training.

Roles of one `TrainingDraws`, in the order the reference consumes them:
  1. `num_blocks`          number of blocks of the rollout (stage 2: of the window's new frames)
  2. `rollout_noise`       initial / step / context noise (a NoiseSource; stage 2 addresses
                           block j of the window as chunk j)
  3. `exit_steps`          one exit step per block (drawn after the initial noise; stage 2 and
                           same_step_across_blocks use the first for every block)
  4. `score_timestep`      integer DMD / critic timestep, one per sample
  5. `score_noise`         the noise that takes the sample to that timestep
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from memflow.noise import InjectedNoise, NoiseSource, SeededNoise


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
    """Replays recorded draws by role (parity fixtures, one stage-1 rollout or one stage-2
    window). Each value is checked against what the step asks for, so a fixture that does not
    fit the configuration fails loudly.

    Noise layout (`memflow.noise.InjectedNoise`): `initial_noise` [B, F, C, h, w],
    `step_noise` [block, step, B*F_block, C, h, w] (exit step 0 draws none: [block, 0, ...]),
    `context_noise` [block, B*F_block, C, h, w]. `exit_steps`: one per block, or one int for
    every block (a stage-2 window draws one exit step)."""

    def __init__(
        self,
        num_blocks: int,
        initial_noise: torch.Tensor,
        step_noise: torch.Tensor,
        context_noise: torch.Tensor,
        exit_steps: Sequence[int] | int,
        score_timestep: torch.Tensor,
        score_noise: torch.Tensor,
    ):
        self._num_blocks = int(num_blocks)
        self._noise = InjectedNoise(initial_noise, step_noise, context_noise)
        if isinstance(exit_steps, int):
            exit_steps = [exit_steps] * self._num_blocks
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


# ------------------------------------------------------------------------------------------------
# A whole run's draws: rollouts / windows by (step, role, samples), stage-2 sequences by index
# ------------------------------------------------------------------------------------------------
class SequenceDraws(Protocol):
    """The draws that set up one stage-2 sequence (TRAINING.md §5.1, §5.5), in this order."""

    def max_length(self, choices: Sequence[int]) -> int:
        """The sequence length among `choices` (asked only when the config lists several)."""
        ...

    def switch_frame(self, candidates: Sequence[int]) -> int:
        """The frame the prompt switches at, among `candidates` (never empty)."""
        ...


class RunDraws(Protocol):
    """Every random draw of a training run: the one object a trainer takes its randomness from."""

    def rollout(self, step: int, role: str, sample_ids: Sequence[int]) -> TrainingDraws:
        """The draws of one rollout (stage 1) or window (stage 2) and its loss, for iteration
        `step`; `role` is "generator", "critic" or "generator_first" (stage 2's context-only
        first window); `sample_ids` are the global indices of the batch rows."""
        ...

    def sequence(self, index: int) -> SequenceDraws:
        """The set-up draws of stage-2 sequence number `index` (0, 1, ... over the run)."""
        ...


class _SeededSequenceDraws:
    """Python `random` on one generator per sequence, length first (as the reference draws
    them with Python's `random` on rank 0)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def max_length(self, choices: Sequence[int]) -> int:
        return self.rng.choice(list(choices))

    def switch_frame(self, candidates: Sequence[int]) -> int:
        found = list(candidates)
        return found[0] if len(found) == 1 else self.rng.choice(found)


class SeededRunDraws:
    """The trainers' default: `SampleDraws(seed, step, role, sample_ids)` for every rollout and
    window, and a generator keyed by (seed, sequence number) for each sequence, so all ranks
    agree without a broadcast and an exact resume needs only the step and the positions."""

    def __init__(self, seed: int, noise_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.seed = seed
        self.noise_dtype = noise_dtype
        self.device = torch.device(device)

    def rollout(self, step: int, role: str, sample_ids: Sequence[int]) -> SampleDraws:
        return SampleDraws(self.seed, step, role, sample_ids, noise_dtype=self.noise_dtype,
                           device=self.device)

    def sequence(self, index: int) -> SequenceDraws:
        return _SeededSequenceDraws(random.Random(stable_seed(self.seed, "sequence", index)))


@dataclass(frozen=True)
class InjectedSequence:
    """A recorded sequence set-up (a `SequenceDraws`): its switch frame and, when the run draws
    it, its length; each is checked against what the configuration allows."""

    switch: int
    length: int | None = None

    def max_length(self, choices: Sequence[int]) -> int:
        if self.length is None or self.length not in choices:
            raise ValueError(f"injected sequence length {self.length} is not one of the "
                             f"configured lengths {list(choices)}")
        return self.length

    def switch_frame(self, candidates: Sequence[int]) -> int:
        if self.switch not in candidates:
            raise ValueError(f"injected switch frame {self.switch} is not one of the candidates "
                             f"{list(candidates)}")
        return self.switch


class InjectedRunDraws:
    """Replays a recorded run: `rollouts` are handed out in the order the trainer asks for them
    (per iteration and micro-step: the generator's, then the critic's; stage 2's windows in
    sequence order), `sequences[i]` sets up sequence i. `requests` lists what was asked,
    (step, role, sample ids), so a replay can check it ran the recorded schedule."""

    def __init__(self, rollouts: Sequence[TrainingDraws],
                 sequences: Sequence[InjectedSequence] = ()):
        self.rollouts = list(rollouts)
        self.sequences = list(sequences)
        self.requests: list[tuple[int, str, tuple[int, ...]]] = []

    @property
    def exhausted(self) -> bool:
        """Whether every recorded rollout has been handed out."""
        return len(self.requests) == len(self.rollouts)

    def rollout(self, step: int, role: str, sample_ids: Sequence[int]) -> TrainingDraws:
        n = len(self.requests)
        if n >= len(self.rollouts):
            raise ValueError(f"the injected draws hold {len(self.rollouts)} rollouts; step {step} "
                             f"asks for another ({role})")
        self.requests.append((step, role, tuple(sample_ids)))
        return self.rollouts[n]

    def sequence(self, index: int) -> SequenceDraws:
        if index >= len(self.sequences):
            raise ValueError(f"the injected draws set up {len(self.sequences)} sequences; the run "
                             f"starts sequence {index}")
        return self.sequences[index]
