"""`compile: true`: the DiT's blocks compiled by inductor (which works on this CPU, slowly:
tiny shapes only here). On the static stream every call has one of two shapes (a chunk, a
recache padded to the window), masked while the context fills and dense after, so 30 chunks
with the warm-up, bank compressions, SMA and a prompt switch with recache compile exactly three
graphs and never recompile; compiled equals eager within float32 round-off, for inference and
for a training step's gradients."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from conftest import named_grads, tiny_prompt
from streams import FULL, HW, noise, stepper, video
from torch._dynamo.utils import counters

from memflow.chunk_loop import ChunkStepper


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: no thread contention
TOL = 1e-4  # inductor reorders float32 reductions; videos are O(1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("positions", ["absolute", "relative"])
def test_thirty_chunks_compile_two_graphs_and_never_recompile(positions):
    stream = dataclasses.replace(FULL, positions=positions)
    eager = video(stepper(stream, static=True), 90, switch_chunk=12)
    compiled_stepper = stepper(stream, static=True)
    compiled_stepper.generator.compile_blocks(fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = video(compiled_stepper, 90, switch_chunk=12)
    # a chunk while the context fills (masked), a chunk after (dense), the recache (dense)
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
    assert (compiled - eager).abs().max() < TOL


def _training_step_grads(compile: bool) -> dict[str, torch.Tensor]:
    """One stage-1-like step: a 3-chunk rollout of the dynamic (training) stream whose exit
    calls record a graph, a loss on the video, backward."""
    step: ChunkStepper = stepper(FULL)
    model = step.generator.train()
    if compile:
        model.compile_blocks()
    video_ = step.rollout(tiny_prompt(seed=1), 9, HW, noise(), exit_step=1, grad=True)
    (video_.square().mean()).backward()
    assert counters["stats"]["unique_graphs"] > 0 if compile else not counters["stats"]
    return named_grads(model)


def test_compiled_training_step_has_the_eager_gradients():
    eager, compiled = _training_step_grads(False), _training_step_grads(True)
    assert eager.keys() == compiled.keys() and eager
    for name in eager:
        scale = eager[name].abs().max().clamp(min=1e-6)
        assert ((compiled[name] - eager[name]).abs().max() / scale) < 1e-3, name
