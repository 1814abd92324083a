"""Prompt switches: the text cache is rebuilt and the recache rewrites exactly the window."""
from __future__ import annotations

import pytest
import torch

from memflow.config import MemoryOptions, SamplingConfig, StreamConfig, SwitchOptions
from memflow.noise import SeededNoise
from pipeline.interactive_inference import InteractiveInferencePipeline

from conftest import bank_of, tiny_dit, tiny_prompt

HW = (4, 6)
STEPS = SamplingConfig(denoising_step_list=(1000, 500))


def _pipe(options=None):
    cfg = StreamConfig(memory=options or MemoryOptions.compat("every_interval"))
    return InteractiveInferencePipeline(tiny_dit(), cfg, STEPS)


@pytest.mark.parametrize("switch", [SwitchOptions.compat(), SwitchOptions()])
@torch.no_grad()
def test_recache_rewrites_window_slots_only(switch):
    pipe = _pipe()
    frames, switch_chunk = 24, 6  # switch at frame 18 > local_attn_size 12
    state = pipe.new_state(1, HW, frames)
    noise = SeededNoise(0, dtype=torch.float32)
    x = noise.initial((1, frames, 16, *HW))
    old, new = tiny_prompt(seed=1), tiny_prompt(seed=2, length=3)
    out = torch.zeros_like(x)
    for n in range(switch_chunk):
        x0 = pipe.stepper.step(state, n, x[:, 3 * n : 3 * n + 3], old, noise)
        out[:, 3 * n : 3 * n + 3] = x0
    k_before, text_before = torch.stack(state.kv.k), state.text.k[0].clone()
    pointers = (state.kv.end, state.kv.fill, bank_of(state).opened)
    proto = torch.stack(bank_of(state).proto_k)
    pipe.stepper.switch_prompt(state, switch_chunk, out, new, switch)
    flen = state.frame_len
    k_after = torch.stack(state.kv.k)
    assert torch.equal(k_after[:, :, : 3 * flen], k_before[:, :, : 3 * flen])  # sink kept
    for slot in range(3, 12):  # every window slot re-encoded with the new prompt
        sl = slice(slot * flen, (slot + 1) * flen)
        assert not torch.allclose(k_after[:, :, sl], k_before[:, :, sl])
    assert (state.kv.end, state.kv.fill, bank_of(state).opened) == pointers
    assert torch.equal(torch.stack(bank_of(state).proto_k), proto)
    assert all(k is None for k in state.text.k)  # text cache dropped again after the recache
    x0 = pipe.stepper.denoise(state, switch_chunk, x[:, 18:21], new, noise)
    assert not torch.allclose(state.text.k[0], text_before)  # rebuilt from the new prompt


@torch.no_grad()
def test_early_switch_sink_behaviour():
    """A switch at frame 6 (< local_attn_size) recaches from frame 0: the reference rewrites the
    sink (K3), the clean default keeps it."""
    results = {}
    for name, switch in (("compat", SwitchOptions.compat()), ("clean", SwitchOptions())):
        pipe = _pipe()
        state = pipe.new_state(1, HW, 9)
        sinks = []
        pipe.generate_latents_interactive(
            [tiny_prompt(seed=1), tiny_prompt(seed=2)], [2], 9, HW, SeededNoise(0, dtype=torch.float32),
            switch=switch, state=state,
            on_chunk=lambda n, x0: sinks.append(torch.stack(state.kv.k)[:, :, : 3 * state.frame_len]),
        )
        results[name] = torch.equal(sinks[1], sinks[2])
    assert results == {"compat": False, "clean": True}


@torch.no_grad()
def test_no_switch_equals_single_prompt_pipeline():
    pipe = _pipe()
    ctx = tiny_prompt()
    a = pipe.generate_latents_interactive([ctx], [], 18, HW, SeededNoise(3, dtype=torch.float32))
    b = pipe.generate_latents(ctx, 18, HW, SeededNoise(3, dtype=torch.float32))
    assert torch.equal(a, b)


@torch.no_grad()
def test_switch_to_same_prompt_changes_only_through_recache():
    """Switching to the same prompt still recaches (bidirectionally), so the video differs;
    switching to another prompt differs more."""
    pipe = _pipe()
    p1, p2 = tiny_prompt(seed=1), tiny_prompt(seed=2)
    base = pipe.generate_latents_interactive([p1], [], 30, HW, SeededNoise(3, dtype=torch.float32))
    same = pipe.generate_latents_interactive([p1, p1], [6], 30, HW, SeededNoise(3, dtype=torch.float32))
    other = pipe.generate_latents_interactive([p1, p2], [6], 30, HW, SeededNoise(3, dtype=torch.float32))
    assert torch.equal(base[:, :18], same[:, :18]) and torch.equal(base[:, :18], other[:, :18])
    assert (other[:, 18:] - base[:, 18:]).abs().max() > (same[:, 18:] - base[:, 18:]).abs().max() > 0


def test_switch_arguments_are_checked():
    pipe = _pipe()
    with pytest.raises(ValueError, match="switch points"):
        pipe.generate_latents_interactive([tiny_prompt()] * 2, [], 9, HW, SeededNoise(0))
    with pytest.raises(ValueError, match="strictly increasing"):
        pipe.generate_latents_interactive([tiny_prompt()] * 3, [2, 2], 9, HW, SeededNoise(0))
    with pytest.raises(ValueError, match="compat mode"):
        SwitchOptions(global_sink=False)
