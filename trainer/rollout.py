"""The stage-1 Self-Forcing rollout (TRAINING.md §3.2) on the shared chunk stepper.

The generator produces a whole clip chunk by chunk exactly as at inference (the same chunk
loop, `ChunkStepper.rollout`, cache and bank), except that each chunk stops at a random exit
step (the loop's exit-step rule, drawn after the initial noise), that exit call carries
gradient, and the committing pass re-noises the clean chunk to `context_noise` with fresh
noise. Gradient reaches the parameters only through each chunk's own exit-step call: the
cache, the bank, the noisy inputs and earlier chunks are constants of that graph (§3.3).

Differences from the reference, all deliberate:
* batch size > 1 works (the reference's context-pass timestep fails to broadcast, §10 item 23);
* gradient checkpointing, when on, recomputes each exit call with the cache and bank it saw in
  the forward (the reference re-reads the bank in its final state, §3.5 / §10 item 6; the two
  agree for rollouts of up to 3 blocks, like the recorded fixture's 2);
* rollouts longer than `slice_last_frames` (the reference then decodes and re-encodes the first
  kept frame with the VAE, §3.2 item 8; never triggered in the released configs) are rejected.

Reproduced in compat mode only: with k* = 0 the reference's re-run inherits the last denoising
step's `q_bank` (§10 item 5) and refreshes the bank once more before the commit
(`MemoryOptions.commit_refreshes_after_step0_exit`, applied by the stepper's commit). With the
released sizes a 21-frame rollout never compresses, so that re-inserts the same prototype into
the same slot and changes nothing; a bank that saturates (more blocks, a smaller bank, stage 2
from frame 30) is compressed once more per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from config.schema import RolloutKeys, TrainConfig
from config.stream import whole_chunks
from memflow.chunk_loop import ChunkStepper
from memflow.errors import InputError

from .draws import TrainingDraws


@dataclass(frozen=True)
class RolloutConfig:
    """Stage-1 rollout settings, in latent frames (names as in the reference's config)."""

    num_training_frames: int = RolloutKeys.num_training_frames
    min_num_training_frames: int = RolloutKeys.min_num_training_frames
    slice_last_frames: int = RolloutKeys.slice_last_frames
    same_step_across_blocks: bool = RolloutKeys.same_step_across_blocks
    last_step_only: bool = RolloutKeys.last_step_only

    @classmethod
    def from_config(cls, c: TrainConfig, stage: int) -> RolloutConfig:
        """From a typed training config: whole chunks, min <= max, and (stage 1) the kept frames
        hold a rollout."""
        fpb = c.num_frame_per_block
        num_frames = whole_chunks("num_training_frames", c.num_training_frames, fpb)
        min_frames = whole_chunks("min_num_training_frames", c.min_num_training_frames, fpb)
        if min_frames > num_frames:
            raise InputError(
                f"config key `min_num_training_frames` ({min_frames}) must not exceed "
                f"num_training_frames ({num_frames})"
            )
        if stage == 1 and num_frames > c.slice_last_frames:
            raise InputError(
                f"config key `slice_last_frames` ({c.slice_last_frames}) is smaller than "
                f"num_training_frames ({num_frames}); re-encoding the first kept frame is not implemented"
            )
        return cls(
            num_training_frames=num_frames,
            min_num_training_frames=min_frames,
            slice_last_frames=c.slice_last_frames,
            same_step_across_blocks=c.same_step_across_blocks,
            last_step_only=c.last_step_only,
        )

    def block_range(self, frames_per_block: int) -> tuple[int, int]:
        """Inclusive range of the number of blocks a rollout draws from."""
        lo, hi = self.min_num_training_frames, self.num_training_frames
        if lo % frames_per_block or hi % frames_per_block or not 0 < lo <= hi:
            raise ValueError(
                f"min_num_training_frames ({lo}) and num_training_frames ({hi}) must be positive "
                f"multiples of num_frame_per_block ({frames_per_block}), min <= max"
            )
        return lo // frames_per_block, hi // frames_per_block

    def cache_frames(self, local_attn_size: int) -> int:
        """KV buffer size of a rollout: min(local_attn_size + slice_last_frames,
        num_training_frames), so that nothing a later exit call attends to is evicted."""
        if local_attn_size == -1:
            return self.num_training_frames
        return min(local_attn_size + self.slice_last_frames, self.num_training_frames)


@dataclass
class RolloutOutput:
    """A rollout's clean latents [B, F, C, h, w] (with graph), the DMD gradient mask (None when
    every frame is trained) and the exit interval in un-shifted index units (None when blocks
    exit at different steps)."""

    latents: torch.Tensor
    gradient_mask: torch.Tensor | None
    denoised_timestep_from: int | None
    denoised_timestep_to: int | None
    exit_steps: list[int]
    num_blocks: int


def exit_interval(stepper: ChunkStepper, exit_step: int) -> tuple[int, int]:
    """(from, to) of an exit step, as the reference reports it: 1000 - the table index of the
    exit timestep and of the next one (0 after the last step); (1000, 750), (750, 500),
    (500, 250), (250, 0) for the released schedule."""
    steps = stepper.timesteps
    bound = stepper.scheduler.interval_bound
    to = 0 if exit_step == len(steps) - 1 else bound(steps[exit_step + 1])
    return bound(steps[exit_step]), to


def training_rollout(
    stepper: ChunkStepper,
    context: torch.Tensor,
    latent_hw: tuple[int, int],
    config: RolloutConfig,
    draws: TrainingDraws,
    grad: bool = True,
) -> RolloutOutput:
    """One stage-1 rollout for prompt embeddings `context` [B, T, text_dim].

    Draw order (the reference's): number of blocks, initial noise, exit steps (one per block;
    with `same_step_across_blocks` only the first is used, for every block; `last_step_only`
    forces the last step), then per block the step noise after each no-grad step and the
    commit's context noise.
    """
    fpb = stepper.frames_per_block
    num_blocks = draws.num_blocks(*config.block_range(fpb))
    num_frames = num_blocks * fpb
    if num_frames > config.slice_last_frames:
        raise NotImplementedError(
            f"a {num_frames}-frame rollout is longer than slice_last_frames "
            f"({config.slice_last_frames}); re-encoding the first kept frame is not implemented"
        )
    num_steps = len(stepper.timesteps)
    flags: list[int] = []

    def exit_step(block: int) -> int:
        if not flags:  # drawn lazily: after the initial noise, as the reference does
            drawn = draws.exit_steps(num_blocks, num_steps)
            flags.extend([num_steps - 1] * num_blocks if config.last_step_only else drawn)
        return flags[0] if config.same_step_across_blocks else flags[block]

    batch = context.shape[0]
    cache = config.cache_frames(stepper.stream_config.local_attn_size)
    state = stepper.new_state(batch, latent_hw, num_frames, cache_frames=cache)
    latents = stepper.rollout(context, num_frames, latent_hw, draws.rollout_noise(),
                              exit_step=exit_step, grad=grad, state=state)
    if config.same_step_across_blocks:
        t_from, t_to = exit_interval(stepper, flags[0])
    else:
        t_from, t_to = None, None
    mask = None
    if num_frames != config.min_num_training_frames:
        # the reference never trains the first block of a longer rollout (it would hold the
        # re-encoded image latent after slicing)
        mask = torch.ones(latents.shape, dtype=torch.bool, device=latents.device)
        mask[:, :fpb] = False
    used = [flags[0]] * num_blocks if config.same_step_across_blocks else list(flags)
    return RolloutOutput(latents, mask, t_from, t_to, used, num_blocks)
