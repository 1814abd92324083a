"""Streaming single-prompt generation: latents chunk by chunk through the causal DiT.

Per chunk n (frames [nF, nF+F)), spec §5.3:
  1. start from the chunk's slice of the initial noise;
  2. for each timestep of the (warped) step list: predict the flow, convert to x0, and, except
     after the last step, re-noise x0 to the next timestep with fresh noise. The first step
     refreshes the memory bank; none of these calls writes the cache;
  3. the chunk's output is the last x0; one more call on the clean x0 at t = context_noise
     commits its K/V to the cache and stages the bank prototype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from memflow.config import StreamConfig
from memflow.model import WanDiT
from memflow.scheduler import FlowMatchScheduler
from memflow.streaming import StreamCall, StreamState

from .noise import NoiseSource

ChunkCallback = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class SamplingConfig:
    denoising_step_list: Sequence[int] = field(default_factory=lambda: (1000, 750, 500, 250))
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    context_noise: float = 0.0


class CausalInferencePipeline:
    """Generates latent videos chunk by chunk with a KV cache, frame sink and memory bank."""

    def __init__(self, generator: WanDiT, stream_config: StreamConfig, sampling: SamplingConfig):
        self.generator = generator
        self.stream_config = stream_config
        self.sampling = sampling
        self.scheduler = FlowMatchScheduler(shift=sampling.timestep_shift)
        self.timesteps = self.scheduler.denoising_timesteps(
            sampling.denoising_step_list, warp=sampling.warp_denoising_step
        )

    @property
    def frames_per_block(self) -> int:
        return self.stream_config.num_frame_per_block

    def new_state(self, batch_size: int, latent_hw: tuple[int, int], num_frames: int) -> StreamState:
        return StreamState(
            self.generator.config,
            self.stream_config,
            batch_size,
            *latent_hw,
            num_frames=num_frames,
            dtype=self.generator.dtype,
            device=self.generator.device,
        )

    def check_num_frames(self, num_frames: int) -> int:
        """Number of chunks; the video must be a whole number of chunks."""
        if num_frames <= 0 or num_frames % self.frames_per_block:
            raise ValueError(
                f"num_output_frames ({num_frames}) must be a positive multiple of "
                f"num_frame_per_block ({self.frames_per_block})"
            )
        return num_frames // self.frames_per_block

    def _dit(
        self, x: torch.Tensor, t: float | torch.Tensor, context: torch.Tensor, state: StreamState,
        call: StreamCall,
    ) -> torch.Tensor:
        """Call the DiT on [B, F, C, h, w] latents with one timestep for every frame."""
        b, f = x.shape[:2]
        timestep = torch.full((b, f), float(t), dtype=torch.float32, device=x.device)
        flow = self.generator(
            x.permute(0, 2, 1, 3, 4), timestep, context, stream=state, call=call
        )
        return flow.permute(0, 2, 1, 3, 4)

    def denoise_chunk(
        self,
        state: StreamState,
        chunk: int,
        x: torch.Tensor,
        context: torch.Tensor,
        noise: NoiseSource,
    ) -> torch.Tensor:
        """Run the step list on one chunk's noisy latents [B, F, C, h, w]; returns its x0."""
        start = chunk * self.frames_per_block
        b, f = x.shape[:2]
        steps = self.timesteps
        x0 = x
        for i, t in enumerate(steps):
            call = StreamCall.denoise(start, refresh_memory=(i == 0))
            flow = self._dit(x, t, context, state, call)
            t_all = t.expand(b * f)
            x0 = self.scheduler.flow_to_x0(flow.flatten(0, 1), x.flatten(0, 1), t_all)
            if i + 1 < len(steps):
                eps = noise.step(chunk, i, tuple(x0.shape)).to(x0.device, x0.dtype)
                x0_next = self.scheduler.add_noise(x0, eps, steps[i + 1].expand(b * f))
                x = x0_next.unflatten(0, (b, f))
            x0 = x0.unflatten(0, (b, f))
        return x0

    def commit_chunk(
        self, state: StreamState, chunk: int, x0: torch.Tensor, context: torch.Tensor
    ) -> None:
        """Re-run the clean chunk to write its K/V to the cache (and stage a bank prototype)."""
        call = StreamCall.commit_chunk(
            chunk * self.frames_per_block, record_memory=state.bank.wants_prototype(chunk)
        )
        self._dit(x0, self.sampling.context_noise, context, state, call)

    @torch.no_grad()
    def generate_latents(
        self,
        prompt_embeds: torch.Tensor,
        num_frames: int,
        latent_hw: tuple[int, int],
        noise: NoiseSource,
        on_chunk: ChunkCallback | None = None,
        progress: bool = False,
        state: StreamState | None = None,
    ) -> torch.Tensor:
        """Generate [B, num_frames, C, h, w] latents for one prompt embedding [B, T, text_dim].

        `on_chunk(chunk_index, x0)` is called as soon as each chunk is final (for streaming
        decode). Pass `state` to inspect the cache and bank afterwards.
        """
        context = prompt_embeds.to(self.generator.device, self.generator.dtype)
        return self._run_chunks(
            prompt_embeds.shape[0], num_frames, latent_hw, noise,
            lambda n, state, generated: context, on_chunk, progress, state,
        )

    def _run_chunks(
        self,
        batch_size: int,
        num_frames: int,
        latent_hw: tuple[int, int],
        noise: NoiseSource,
        context_for_chunk: Callable[[int, StreamState, torch.Tensor], torch.Tensor],
        on_chunk: ChunkCallback | None,
        progress: bool,
        state: StreamState | None,
    ) -> torch.Tensor:
        """The chunk loop shared by every mode. `context_for_chunk(n, state, generated)` returns
        the prompt embedding for chunk n; it may first act on the state (a prompt switch)."""
        num_chunks = self.check_num_frames(num_frames)
        channels = self.generator.config.in_dim
        device, dtype = self.generator.device, self.generator.dtype
        initial = noise.initial((batch_size, num_frames, channels, *latent_hw)).to(device, dtype)
        state = state or self.new_state(batch_size, latent_hw, num_frames)
        out = torch.empty_like(initial)
        fpb = self.frames_per_block
        for n in tqdm(range(num_chunks), desc="chunks", disable=not progress, leave=False):
            context = context_for_chunk(n, state, out)
            x0 = self.denoise_chunk(state, n, initial[:, n * fpb : (n + 1) * fpb], context, noise)
            out[:, n * fpb : (n + 1) * fpb] = x0
            if on_chunk is not None:
                on_chunk(n, x0)
            self.commit_chunk(state, n, x0, context)
        return out
