"""A small streaming setup shared by the fast-path tests: a tiny DiT, a stepper over a stream
config, and a rollout with an optional prompt switch."""
from __future__ import annotations

import dataclasses

import torch
from conftest import TINY, tiny_prompt

from memflow.chunk_loop import ChunkHooks, ChunkStepper
from memflow.config import SamplingConfig, StreamConfig
from memflow.model import WanDiT
from memflow.noise import SeededNoise

HW = (4, 4)
STEPS = SamplingConfig(denoising_step_list=(1000, 750, 500, 250))
# every memory mechanism at once, sized so that a few chunks roll the window, fill and compress
# the bank, and give SMA a choice (2 of 3 sink + 3 bank frames)
FULL = StreamConfig(local_attn_size=9, sink_size=3, bank_size=3, record_interval=1, sma=True,
                    sma_top_k=2)


def stepper(stream: StreamConfig, *, static: bool = False, rope: str = "float32",
            seed: int = 0) -> ChunkStepper:
    torch.manual_seed(seed)
    model = WanDiT(TINY).eval()
    model.set_rope_precision(rope)
    return ChunkStepper(model, dataclasses.replace(stream, static_shapes=static), STEPS)


def noise() -> SeededNoise:
    return SeededNoise(0, dtype=torch.float32, order="per_chunk")


def video(step: ChunkStepper, frames: int, switch_chunk: int | None = None,
          state=None) -> torch.Tensor:
    """`frames` latent frames of prompt a, switching to b before chunk `switch_chunk`."""
    a, b = tiny_prompt(seed=1), tiny_prompt(seed=2)
    hooks = None
    if switch_chunk is not None:
        hooks = ChunkHooks(before_chunk=step.prompt_switches({switch_chunk: b}))
    with torch.no_grad():
        return step.rollout(a, frames, HW, noise(), hooks=hooks, state=state)
