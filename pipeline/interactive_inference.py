"""Interactive multi-prompt generation: the prompt changes at given latent frames (spec §6).

A video is a list of prompt segments. When chunk n starts at or after the next switch frame, the
next segment's prompt takes over: the cross-attention (text) cache is dropped and the last
`local_attn_size` generated frames are re-encoded with the new prompt ("recache"), so the KV
window speaks the new prompt while the sink and the memory bank keep the story so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from memflow.streaming import StreamCall, StreamState

from .causal_inference import CausalInferencePipeline, ChunkCallback
from .noise import NoiseSource


@dataclass(frozen=True)
class SwitchOptions:
    """How a prompt switch treats the caches.

    global_sink: keep the sink's K/V across switches (released setting). Without it the
        reference zeroes the K/V buffers and, because the recache protects the sink, attends an
        all-zero sink afterwards (spec K2); that is reproduced in compat mode only.
    protect_sink_at_start: a switch within the first `local_attn_size` frames recaches from frame
        0; the reference then overwrites the sink with the new prompt (K3). True keeps the sink,
        as every later switch does.
    """

    global_sink: bool = True
    protect_sink_at_start: bool = True

    @classmethod
    def compat(cls, global_sink: bool = True) -> "SwitchOptions":
        return cls(global_sink=global_sink, protect_sink_at_start=False)

    def __post_init__(self) -> None:
        if not self.global_sink and self.protect_sink_at_start:
            raise ValueError(
                "global_sink=false is only available in compat mode: the reference leaves an "
                "all-zero sink after a switch (spec K2)"
            )


class InteractiveInferencePipeline(CausalInferencePipeline):
    """Single-prompt streaming plus prompt switches with recache."""

    def recache(
        self,
        state: StreamState,
        chunk: int,
        generated: torch.Tensor,
        context: torch.Tensor,
        switch: SwitchOptions,
    ) -> None:
        """Switch to `context` before chunk `chunk`; `generated` holds the committed latents
        [B, >= start, C, h, w]."""
        start = chunk * self.frames_per_block
        if not switch.global_sink:
            state.kv.k.zero_()
            state.kv.v.zero_()
        state.text.reset()
        if start == 0:
            return
        cap = self.stream_config.local_attn_size
        frames = start if cap == -1 else min(cap, start)
        x = generated[:, start - frames : start]
        call = StreamCall.recache_frames(
            start - frames, refresh_memory=True, protect_sink=switch.protect_sink_at_start
        )
        self._dit(x, 0.0, context, state, call)
        state.text.reset()

    @torch.no_grad()
    def generate_latents_interactive(
        self,
        segment_embeds: Sequence[torch.Tensor],
        switch_chunks: Sequence[int],
        num_frames: int,
        latent_hw: tuple[int, int],
        noise: NoiseSource,
        switch: SwitchOptions = SwitchOptions(),
        on_chunk: ChunkCallback | None = None,
        progress: bool = False,
        state: StreamState | None = None,
    ) -> torch.Tensor:
        """Generate [B, num_frames, C, h, w] latents; segment k+1's prompt starts at chunk
        `switch_chunks[k]` (one chunk index per switch, strictly increasing)."""
        num_chunks = self.check_num_frames(num_frames)
        if len(switch_chunks) != len(segment_embeds) - 1:
            raise ValueError(
                f"{len(segment_embeds)} prompt segments need {len(segment_embeds) - 1} switch "
                f"points, got {len(switch_chunks)}"
            )
        if list(switch_chunks) != sorted(set(switch_chunks)) or any(
            not 0 < c < num_chunks for c in switch_chunks
        ):
            raise ValueError(
                f"switch chunks {list(switch_chunks)} must be strictly increasing within "
                f"(0, {num_chunks})"
            )
        device, dtype = self.generator.device, self.generator.dtype
        contexts = [e.to(device, dtype) for e in segment_embeds]
        starts = dict(zip(switch_chunks, range(1, len(contexts))))  # chunk -> segment it starts
        segment = 0

        def context_for_chunk(n: int, state: StreamState, generated: torch.Tensor) -> torch.Tensor:
            nonlocal segment
            if n in starts:
                segment = starts[n]
                self.recache(state, n, generated, contexts[segment], switch)
            return contexts[segment]

        return self._run_chunks(
            contexts[0].shape[0], num_frames, latent_hw, noise, context_for_chunk,
            on_chunk, progress, state,
        )
