"""Streaming single-prompt generation: latents chunk by chunk through the causal DiT.

The per-chunk work (denoise with the warped step list, then the committing clean pass) and the
loop over chunks are the model library's `ChunkStepper` (memflow/chunk_loop.py); this pipeline
runs it on one prompt for every chunk.
"""
from __future__ import annotations

import torch

from memflow.chunk_loop import ChunkCallback, ChunkHooks, ChunkStepper
from memflow.config import SamplingConfig, StreamConfig
from memflow.model import WanDiT
from memflow.noise import NoiseSource
from memflow.static_stream import AnyStreamState


def inference_stepper(
    generator: WanDiT, stream_config: StreamConfig, sampling: SamplingConfig
) -> ChunkStepper:
    """The chunk stepper of offline inference and of a live session (pipeline/session.py)
    alike: a per-chunk behaviour of inference goes into its `hooks` here, and reaches both."""
    return ChunkStepper(generator, stream_config, sampling)


class CausalInferencePipeline:
    """Generates latent videos chunk by chunk with a KV cache, frame sink and memory bank."""

    def __init__(self, generator: WanDiT, stream_config: StreamConfig, sampling: SamplingConfig):
        self.stepper = inference_stepper(generator, stream_config, sampling)

    @property
    def generator(self) -> WanDiT:
        return self.stepper.generator

    @property
    def timesteps(self) -> torch.Tensor:
        return self.stepper.timesteps

    def new_state(
        self, batch_size: int, latent_hw: tuple[int, int], num_frames: int, debug: bool = False
    ) -> AnyStreamState:
        return self.stepper.new_state(batch_size, latent_hw, num_frames, debug=debug)

    def check_num_frames(self, num_frames: int) -> int:
        return self.stepper.num_chunks(num_frames)

    @torch.no_grad()
    def generate_latents(
        self,
        prompt_embeds: torch.Tensor,
        num_frames: int,
        latent_hw: tuple[int, int],
        noise: NoiseSource,
        on_chunk: ChunkCallback | None = None,
        progress: bool = False,
        state: AnyStreamState | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate [B, num_frames, C, h, w] latents for one prompt embedding [B, T, text_dim],
        after the clean `prefix` latents if given (a start image or video, committed first).

        `on_chunk(chunk_index, x0)` is called as soon as each chunk is final (for streaming
        decode). Pass `state` to inspect the cache and bank afterwards.
        """
        context = prompt_embeds.to(self.generator.device, self.generator.dtype)
        return self.stepper.rollout(
            context, num_frames, latent_hw, noise,
            hooks=ChunkHooks(on_chunk=on_chunk), progress=progress, state=state, prefix=prefix,
        )
