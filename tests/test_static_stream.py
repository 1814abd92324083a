"""The static stream state (`compile: true`'s fixed-shape arena) is the same stream as the
dynamic one: the same frames attended, the same bank, the same positions; only the order of the
keys differs, so the videos agree within float32 round-off."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import bank_of, tiny_prompt
from streams import FULL, HW, noise, stepper, video

from memflow.chunk_loop import ChunkHooks
from memflow.config import MemoryOptions, StreamConfig, SwitchOptions
from memflow.stream import Stream
from utils.probes import AllocatedBytes


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: no thread contention
TOL = 1e-5  # float32 round-off of a reordered softmax sum, over 15 chunks; videos are O(1)

STREAMS = {
    "sink+bank": StreamConfig(local_attn_size=9, sink_size=3, bank_size=2, record_interval=1),
    "nam+sma": FULL,
    "nam+sma relative": dataclasses.replace(FULL, positions="relative"),
    "bank relative": StreamConfig(local_attn_size=9, sink_size=3, bank_size=2,
                                  record_interval=2, positions="relative"),
    "window only": StreamConfig(local_attn_size=6, sink_size=0, bank_size=0),
    "sink 6, chunks of 3": StreamConfig(local_attn_size=12, sink_size=6, bank_size=1,
                                        record_interval=1),
    "compat": StreamConfig(memory=MemoryOptions.compat("every_interval"), sma=True,
                           sma_top_k=4),
}


@pytest.mark.parametrize("switch_chunk", [None, 1, 5], ids=["one-prompt", "switch@1", "switch@5"])
@pytest.mark.parametrize("name", list(STREAMS))
def test_static_state_generates_the_dynamic_states_video(name, switch_chunk):
    stream = STREAMS[name]
    dynamic = video(stepper(stream), 45, switch_chunk)
    static = video(stepper(stream, static=True), 45, switch_chunk)
    assert (dynamic - static).abs().max() < TOL
    # not a tolerance that hides a wrong stream: one frame of window less moves it by far more
    other = dataclasses.replace(stream, local_attn_size=stream.local_attn_size - 1)
    assert (video(stepper(other, static=True), 45, switch_chunk) - dynamic).abs().max() > 1e3 * TOL


def _frames_seen(static: bool):
    step = stepper(FULL, static=static)
    state = step.new_state(1, HW, 60, debug=True, track_frames=True)
    banks = []
    step.hooks.append(ChunkHooks(
        on_chunk=lambda n, x0: banks.append([list(f) for f in bank_of(state).slot_frames])))
    video(step, 45, 5, state=state)
    keys = [torch.cat(bank_of(state).read(layer)[0], dim=1) for layer in range(state.num_layers)]
    return (state.debug.key_frames, banks, state.cache_frames()), keys


def test_static_state_attends_and_remembers_the_same_frames():
    """Per call the same number of attended frames, per chunk the same bank slots (every
    layer: NAM's choice), the same sink and window at the end, and bank slots holding the same
    keys."""
    (static_frames, static_keys), (frames, keys) = _frames_seen(True), _frames_seen(False)
    assert static_frames == frames
    for static_layer, layer in zip(static_keys, keys):
        assert static_layer.shape == layer.shape and (static_layer - layer).abs().max() < TOL


def test_static_state_after_a_switch_without_a_global_sink():
    """compat's `global_sink: false` zeroes the cache at a switch: the arena's sink and ring."""
    stream = StreamConfig(memory=MemoryOptions.compat("every_interval"))
    videos = []
    for static in (False, True):
        step = stepper(stream, static=static)
        a, b = tiny_prompt(seed=1), tiny_prompt(seed=2)
        with torch.no_grad():
            videos.append(step.rollout(a, 30, HW, noise(), switch=SwitchOptions.compat(False),
                                       hooks=ChunkHooks(before_chunk=step.prompt_switches({4: b}))))
    assert (videos[0] - videos[1]).abs().max() < TOL


@pytest.mark.parametrize("stream, message", [
    (StreamConfig(memory_layout="ema", positions="relative"), "memory_layout: standard"),
    (StreamConfig(local_attn_size=-1), "rolling window"),
])
def test_static_state_refuses_what_it_cannot_hold(stream, message):
    with pytest.raises(ValueError, match=message):
        stepper(stream, static=True).new_state(1, HW, 30)


def test_static_recache_longer_than_the_window_is_refused():
    step = stepper(FULL, static=True)
    state = step.new_state(1, HW, 60)
    video(step, 30, state=state)
    recent = torch.zeros(1, 12, 16, *HW)
    with pytest.raises(ValueError, match="at most the attention window"):
        step.switch_prompt(state, 10, recent, tiny_prompt(seed=2), SwitchOptions(), frames=12)


def _bytes_per_steady_chunk(window: int, static: bool) -> int:
    stream = StreamConfig(local_attn_size=window, sink_size=3, bank_size=3, record_interval=1,
                          sma=True, sma_top_k=2)
    step = stepper(stream, static=static)
    state = step.new_state(1, HW, 120)
    video(step, 3 * (window + 3), state=state)  # window + 3 chunks: the window has rolled
    steady = Stream(step, tiny_prompt(seed=1), noise(), latent_hw=HW, state=state,
                    first_chunk=window + 3)
    with torch.no_grad(), AllocatedBytes() as alloc:
        steady.next_chunk()
    return alloc.total


def test_static_state_allocates_nothing_that_grows_with_the_context():
    """Doubling the window (the context every layer attends) adds to the bytes a steady chunk
    allocates on the arena only its boolean key masks (1 byte per key per call, and per head in
    each SMA layer),
    no K/V (no per-layer concatenation, no copy on roll); the dynamic state's K/V copies grow
    with it (what the measurement would catch)."""
    static = _bytes_per_steady_chunk(18, static=True) - _bytes_per_steady_chunk(9, static=True)
    dynamic = _bytes_per_steady_chunk(18, static=False) - _bytes_per_steady_chunk(9, static=False)
    added_keys = 9 * HW[0] * HW[1] // 4  # 9 frames of 2x2-patched tokens
    calls, layers, heads = 5, 2, 2  # 4 denoising steps and the commit; the tiny DiT
    assert static <= added_keys * calls * (1 + layers * heads)
    assert dynamic > 100 * static


class _MaskSpy:
    """An attention kernel that records whether each self-attention call carried a key mask
    (cross-attention calls, over the `text_len` prompt keys, are not recorded)."""

    def __init__(self, kernel, text_len: int):
        self.kernel, self.text_len, self.masked = kernel, text_len, []

    def __call__(self, q, k, v, mask=None):
        if k.shape[1] != self.text_len:
            self.masked.append(mask is not None)
        return self.kernel(q, k, v, mask)


def test_steady_chunks_attend_without_a_mask():
    """Once the sink, bank and window are full every key of the arena slice is valid: the
    calls pass no mask, so a flash kernel (which takes no mask) can run them; the warm-up's
    calls are masked."""
    step = stepper(FULL, static=True)
    spy = _MaskSpy(step.generator.attention_kernel, step.generator.config.text_len)
    step.generator.attention_kernel = spy
    state = step.new_state(1, HW, 60)
    video(step, 6, state=state)  # two chunks: the window and the bank are still filling
    assert spy.masked and all(spy.masked)
    spy.masked.clear()
    steady = Stream(step, tiny_prompt(seed=1), noise(), latent_hw=HW, state=state,
                    first_chunk=2)
    with torch.no_grad():
        for _ in range(8):
            steady.next_chunk()
    assert spy.masked[-10:] == [False] * 10  # the last chunk: 5 calls x 2 layers
