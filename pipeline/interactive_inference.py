"""Interactive multi-prompt generation: the prompt changes at given latent frames (spec §6).

A video is a list of prompt segments. Before the chunk at the next switch frame, the chunk
loop's `before_chunk` hook (`ChunkStepper.prompt_switches`) switches to the next segment's
prompt through `switch_prompt`: the cross-attention (text) cache is dropped and the last
`local_attn_size` generated frames are re-encoded with the new prompt ("recache"), so the KV
window speaks the new prompt while the sink and the memory bank keep the story so far.

Switches never draw noise, so the noise source's order alone fixes the numbers: the runner passes
the ``per_chunk`` order in `behaviour: clean`, and a live session (pipeline/session.py), which
decides its switches while it runs, then reproduces a video made here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from memflow.chunk_loop import ChunkCallback, ChunkHooks
from memflow.config import SwitchOptions
from memflow.noise import NoiseSource
from memflow.prompt_blend import Transition
from memflow.static_stream import AnyStreamState
from memflow.stream import ControlChange, Stream

from .causal_inference import CausalInferencePipeline


class InteractiveInferencePipeline(CausalInferencePipeline):
    """Single-prompt streaming plus prompt switches with recache."""

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
        state: AnyStreamState | None = None,
        transitions: Sequence[Transition] | None = None,
        prefix: torch.Tensor | None = None,
        controls: Sequence[ControlChange] = (),
    ) -> torch.Tensor:
        """Generate [B, num_frames, C, h, w] latents; segment k+1's prompt starts at chunk
        `switch_chunks[k]` (one chunk index per switch, strictly increasing), at once or as
        `transitions[k]` says (memflow/stream.py: over that many chunks, no recache); after
        the clean `prefix` latents if given (a start image or video); `controls`: a live
        session's runtime changes of steps and seed, replayed at their chunks."""
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
        if transitions is not None and len(transitions) != len(switch_chunks):
            raise ValueError(f"{len(switch_chunks)} switches need as many transitions, got "
                             f"{len(transitions)}")
        switches = self.stepper.prompt_switches(dict(zip(switch_chunks, contexts[1:])),
                                                dict(zip(switch_chunks, transitions or ())))
        replay = self.stepper.runtime_controls(controls)

        def before_chunk(n: int, stream: Stream) -> None:
            switches(n, stream)
            replay(n, stream)

        return self.stepper.rollout(
            contexts[0], num_frames, latent_hw, noise,
            hooks=ChunkHooks(before_chunk=before_chunk, on_chunk=on_chunk), progress=progress,
            state=state, switch=switch, prefix=prefix,
        )
