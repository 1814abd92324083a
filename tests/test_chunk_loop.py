"""The chunk loop's rollout options: a first chunk, per-chunk exit-step and gradient rules."""
from __future__ import annotations

import pytest
import torch

from memflow.chunk_loop import ChunkHooks, ChunkStepper
from memflow.config import SamplingConfig, StreamConfig, SwitchOptions
from memflow.noise import SeededNoise
from memflow.stream import Stream

from conftest import tiny_dit, tiny_prompt

HW = (4, 4)
STREAM = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1)


def _stepper() -> ChunkStepper:
    return ChunkStepper(tiny_dit(), STREAM, SamplingConfig(denoising_step_list=(1000, 750, 500)))


@torch.no_grad()
def test_a_rollout_from_a_later_chunk_continues_the_stream():
    """Chunks 0-2 and then chunks 3-5 from chunk 3 on the same state and noise give the
    latents of one rollout of chunks 0-5 (the per-chunk noise order draws the same numbers)."""
    stepper, ctx = _stepper(), tiny_prompt()
    whole = stepper.rollout(ctx, 18, HW, SeededNoise(0, dtype=torch.float32, order="per_chunk"))
    noise = SeededNoise(0, dtype=torch.float32, order="per_chunk")
    state = stepper.new_state(1, HW, 18)
    first = stepper.rollout(ctx, 9, HW, noise, state=state)
    rest = stepper.rollout(ctx, 9, HW, noise, first_chunk=3, state=state)
    assert torch.equal(torch.cat([first, rest], dim=1), whole)
    with pytest.raises(ValueError, match="pass its state"):
        stepper.rollout(ctx, 9, HW, noise, first_chunk=3)


def test_exit_step_and_gradient_follow_their_per_chunk_rules():
    """Each chunk stops at its own exit step and records a graph only where the rule says so;
    the rules see absolute chunk indices."""
    stepper, ctx = _stepper(), tiny_prompt()
    state = stepper.new_state(1, HW, 15)
    seen = []
    hooks = ChunkHooks(on_chunk=lambda n, x0: seen.append((n, state.exit_step, x0.requires_grad)))
    stepper.rollout(ctx, 6, HW, SeededNoise(0, dtype=torch.float32), state=state, hooks=hooks)
    stepper.rollout(ctx, 9, HW, SeededNoise(1, dtype=torch.float32), first_chunk=2, state=state,
                    exit_step=lambda n: n % 3, grad=lambda n: n == 3, hooks=hooks)
    # chunks 0-1 without rules: every step, no graph
    assert seen == [(0, 2, False), (1, 2, False), (2, 2, False), (3, 0, True), (4, 1, False)]


@torch.no_grad()
def test_a_prompt_asked_for_before_a_chunk_holds_from_it_on():
    """A prompt that `before_chunk` asks for holds from its chunk on: the rollout equals
    chunk-by-chunk `step` calls with A, the switch to B, then B."""
    stepper, a, b = _stepper(), tiny_prompt(seed=1), tiny_prompt(seed=2)
    switch = stepper.prompt_switches({2: b})
    seen = []

    def before_chunk(n, stream):
        switch(n, stream)
        seen.append((n, stream.chunk, stream.pending_label is not None or n == 2))

    out = stepper.rollout(a, 12, HW, SeededNoise(3, dtype=torch.float32),
                          hooks=ChunkHooks(before_chunk=before_chunk))
    assert [s[:2] for s in seen] == [(n, n) for n in range(4)]
    noise = SeededNoise(3, dtype=torch.float32)
    x = noise.initial((1, 12, 16, *HW))
    state = stepper.new_state(1, HW, 12)
    chunks = []
    for n in range(4):
        if n == 2:
            stepper.switch_prompt(state, n, torch.cat(chunks, dim=1), b, SwitchOptions())
        chunks.append(stepper.step(state, n, x[:, 3 * n : 3 * n + 3], a if n < 2 else b, noise))
    assert torch.equal(out, torch.cat(chunks, dim=1))


@torch.no_grad()
def test_a_stream_applies_the_last_wish_at_the_next_boundary():
    """`set_prompt` is a wish: several before one boundary, the last wins (one switch); asking
    for the prompt in effect cancels a pending one; before chunk 0 it replaces the first prompt.
    The stream equals the same chunks run by hand, and its timeline says where each prompt
    took effect."""
    stepper, a, b, c = _stepper(), *(tiny_prompt(seed=s) for s in (1, 2, 3))
    stream = Stream(stepper, a, SeededNoise(4, dtype=torch.float32, order="per_chunk"),
                    latent_hw=HW, num_frames=15, label="a")
    stream.set_prompt(c, "c")  # before chunk 0: replaces "a"
    out = [stream.next_chunk()]
    assert stream.label == "c" and not stream.switched
    stream.set_prompt(a, "a")
    stream.set_prompt(b, "b")  # the last wish before the boundary wins
    out.append(stream.next_chunk())
    assert stream.switched and stream.label == "b"
    stream.set_prompt(a, "a")
    stream.set_prompt(b, "b")  # the prompt in effect: nothing pending
    assert stream.pending_label is None
    out.append(stream.next_chunk())
    assert not stream.switched
    stream.set_prompt(lambda: a, "a")  # a prompt made when the switch happens
    out += [stream.next_chunk(), stream.next_chunk()]
    assert [(e.chunk, e.latent_frame, e.label) for e in stream.timeline] == [
        (0, 0, "c"), (1, 3, "b"), (3, 9, "a")]

    noise = SeededNoise(4, dtype=torch.float32, order="per_chunk")
    state = stepper.new_state(1, HW, 15)
    chunks = []
    for n, prompt in enumerate((c, b, b, a, a)):
        if n in (1, 3):
            stepper.switch_prompt(state, n, torch.cat(chunks, dim=1), prompt, SwitchOptions())
        x = stepper.chunk_noise(noise, n, 1, HW)
        chunks.append(stepper.step(state, n, x, prompt, noise))
    assert torch.equal(torch.cat(out, dim=1), torch.cat(chunks, dim=1))
