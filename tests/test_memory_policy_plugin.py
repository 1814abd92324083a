"""A memory policy plugs in whole: one defined here, in this test file alone ("keep every 5th
frame", attended between the sink and the window), registered by name and chosen with the config
key `model_kwargs.memory_layout`, runs offline, live and in a training rollout. No project file
knows it; a state built with it has no memory bank at all."""
from __future__ import annotations

import torch

import inference
from conftest import TINY, tiny_dit, tiny_prompt
from memflow.chunk_loop import ChunkStepper
from memflow.config import SamplingConfig, StreamConfig
from memflow.kv_cache import CachePlan
from memflow.memory_sources import (Commit, MemorySource, Segment, SinkSource, WindowSource,
                                    register_memory_layout)
from pipeline.session import Session
from trainer.draws import SeededDraws
from trainer.rollout import RolloutConfig, training_rollout

TINY_INTERACTIVE = "configs/tiny_interactive.yaml"
EVERY = 5


class EveryFifthFrame(MemorySource):
    """Keeps the K/V of the last `keep` committed latent frames whose index is a multiple of 5."""

    name = "every_5th"
    selectable = True
    commits = 0  # commits seen by any instance: the policy was really used

    def __init__(self, num_layers: int, frame_len: int, keep: int = 2):
        self.frame_len, self.keep = frame_len, keep
        self.frames: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_layers)]

    def read(self, layer: int, plan: CachePlan) -> Segment | None:
        held = self.frames[layer]
        if not held:
            return None
        return Segment([k for _, k, _ in held], [v for _, _, v in held], selectable=True)

    def on_commit(self, commit: Commit) -> None:
        plan = commit.plan
        if plan.recompute:  # a recache re-encodes frames it already holds
            return
        EveryFifthFrame.commits += 1
        first = (plan.start + plan.skip) // self.frame_len
        for layer, (k, v) in commit.new_kv.items():
            count = (k.shape[1] - plan.skip) // self.frame_len
            for j in range(count):
                if (first + j) % EVERY == 0:
                    lo = plan.skip + j * self.frame_len
                    piece = (first + j, k[:, lo:lo + self.frame_len].clone(),
                             v[:, lo:lo + self.frame_len].clone())
                    self.frames[layer] = (self.frames[layer] + [piece])[-self.keep:]

    def held_frames(self) -> list[list[int]]:
        return [[f for f, _, _ in layer] for layer in self.frames]

    @property
    def frames_held(self) -> int:
        return len(self.frames[0])

    @property
    def capacity_frames(self) -> int:
        return self.keep


def every_fifth_layout(state) -> list[MemorySource]:
    sink = [SinkSource(state.kv)] if state.kv.sink > 0 else []
    return sink + [EveryFifthFrame(state.num_layers, state.frame_len), WindowSource(state.kv)]


register_memory_layout("every_5th", every_fifth_layout)


def test_the_policy_runs_offline(tmp_path):
    before = EveryFifthFrame.commits
    out = tmp_path / "out"
    assert inference.main(["--config_path", TINY_INTERACTIVE, f"output_folder={out}",
                           "model_kwargs.memory_layout=every_5th", "height=48", "width=64"]) == 0
    assert list(out.glob("*.mp4")) and EveryFifthFrame.commits > before


def test_the_policy_runs_live_and_its_frames_are_shown():
    session = Session.from_config(TINY_INTERACTIVE, ["model_kwargs.memory_layout=every_5th",
                                                     "height=48", "width=64"])
    session.start("a cat on a chair", seed=1)
    for _ in range(5):  # 15 latent frames
        session.next_chunk()
    view = session.memory()
    assert view.bank == [5, 10]  # the last two multiples of 5 (the sink holds 0..2)
    assert all(layer == [5, 10] for layer in view.bank_layers)
    assert session._video.stream.state.source("bank") is None  # no bank in this state


def test_the_policy_runs_in_a_training_rollout():
    stream = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1,
                          memory_layout="every_5th")
    stepper = ChunkStepper(tiny_dit(TINY), stream, SamplingConfig(denoising_step_list=(1000, 500)))
    draws = SeededDraws(torch.Generator().manual_seed(0))
    config = RolloutConfig(num_training_frames=15, min_num_training_frames=15, slice_last_frames=15)
    before = EveryFifthFrame.commits
    out = training_rollout(stepper, tiny_prompt(), (4, 4), config, draws, grad=True)
    out.latents.float().square().mean().backward()
    assert EveryFifthFrame.commits > before
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stepper.generator.parameters())
