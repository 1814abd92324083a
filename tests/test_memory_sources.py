"""The memory-source seam: a call attends what its state's sources give, in list order.

A new memory policy is a `MemorySource` subclass and a layout that lists it; the test-only
sources below are added without touching any library file.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY, DenseMask, bank_of, tiny_dit, tiny_prompt

import memflow.streaming as streaming
from memflow.attention import attention
from memflow.config import MemoryOptions, SamplingConfig, StreamConfig
from memflow.memory_bank import sma_select
from memflow.memory_sources import Commit, MemorySource, Segment, standard_sources
from memflow.noise import SeededNoise
from memflow.stream_call import StreamCall
from memflow.streaming import StreamState
from pipeline.causal_inference import CausalInferencePipeline

H, W = 4, 6  # 2x3 = 6 tokens per frame
STEPS = SamplingConfig(denoising_step_list=(1000, 500))


class CountingSource(MemorySource):
    """Contributes nothing; counts its hooks and saves the counts."""

    name = "counter"

    def __init__(self) -> None:
        self.reads = self.refreshes = self.commits = 0

    def read(self, layer, plan):
        self.reads += 1
        return None

    def refresh(self, text):
        self.refreshes += 1
        return None

    def on_commit(self, commit: Commit) -> None:
        assert len(commit.new_kv) == TINY.num_layers and commit.call.commit
        self.commits += 1

    def state_dict(self) -> dict:
        return {"counts": [self.reads, self.refreshes, self.commits]}

    def load_state_dict(self, state, device) -> None:
        self.reads, self.refreshes, self.commits = state["counts"]


class ConstantFrame(MemorySource):
    """One fixed frame of keys and values, attended once `active` (dormant: nothing)."""

    name = "constant"

    def __init__(self, frame_len: int, selectable: bool, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        shape = (1, frame_len, TINY.num_heads, TINY.head_dim)
        self.k, self.v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        self.selectable = selectable
        self.active = False

    def read(self, layer, plan):
        if not self.active:
            return None
        return Segment([self.k], [self.v], selectable=self.selectable)


def _state(model, cfg: StreamConfig, frames: int, layout=standard_sources, debug=False):
    return StreamState(model.config, cfg, 1, H, W, num_frames=frames, debug=debug, sources=layout)


def _run(model, cfg: StreamConfig, state: StreamState, frames: int) -> torch.Tensor:
    pipe = CausalInferencePipeline(model, cfg, STEPS)
    return pipe.generate_latents(tiny_prompt(), frames, (H, W), SeededNoise(0, dtype=torch.float32),
                                 state=state)


@torch.no_grad()
def test_source_that_contributes_nothing_changes_nothing():
    """A registered source that reads nothing leaves the video bitwise equal; its hooks run once
    per layer read, per memory refresh and per committed call, and its state is saved."""
    model = tiny_dit()
    cfg = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1)
    frames, counter = 12, CountingSource()
    plain = _state(model, cfg, frames, debug=True)
    extra = _state(model, cfg, frames, lambda s: [*standard_sources(s), counter], debug=True)
    assert torch.equal(_run(model, cfg, plain, frames), _run(model, cfg, extra, frames))
    calls = len(plain.debug.key_frames)
    assert counter.reads == calls * TINY.num_layers
    assert counter.refreshes == len(plain.debug.memory_refreshes) > 0
    assert counter.commits == frames // cfg.num_frame_per_block
    saved = extra.state_dict()
    assert list(saved["sources"]) == ["sink", "bank", "window", "counter"]
    restored_counter = CountingSource()
    restored = _state(model, cfg, frames, lambda s: [*standard_sources(s), restored_counter])
    restored.load_state_dict(saved)
    assert [restored_counter.reads, restored_counter.refreshes, restored_counter.commits] == [
        counter.reads, counter.refreshes, counter.commits]
    with pytest.raises(ValueError, match="memory sources"):
        _state(model, cfg, frames).load_state_dict(saved)
    with pytest.raises(ValueError, match="unique"):
        _state(model, cfg, frames, lambda s: [*standard_sources(s), *standard_sources(s)])


def _probe(model, cfg: StreamConfig, layout, activate=None):
    """Run two chunks, refresh the bank, then one layer-0 denoising attention at chunk 2 with
    random q/k/v; returns (state, q, k, v, attended keys, attended values)."""
    frames = 9
    state = _state(model, cfg, frames, layout)
    _run(model, cfg, state, 6)
    state.refresh_memory(StreamCall.denoise(6, refresh_memory=True))
    if activate is not None:
        activate()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 3 * state.frame_len, TINY.num_heads, TINY.head_dim, generator=g)
               for _ in range(3))
    seen = {}

    def spy(q_, keys, values, kernel=None):
        seen["kv"] = (keys, values)
        return attention(q_, keys, values, kernel=kernel)

    original = streaming.attention
    streaming.attention = spy
    try:
        ctx = state.begin(StreamCall.denoise(6), 3)
        out = ctx.layer(0)(q, k, v)
    finally:
        streaming.attention = original
    keys, values = seen["kv"]
    assert torch.equal(out, attention(q, keys, values)) and ctx.key_tokens == keys.shape[1]
    return state, q, k, v, keys, values


def _expected(state: StreamState, k: torch.Tensor, buffers: str) -> tuple[torch.Tensor, ...]:
    """[sink | bank slots | window] of layer 0 at chunk 2, read straight from the buffers
    (cache of 12 frames, no roll yet: [sink frames 0-2 | window frames 3-5], then the call)."""
    sink = state.kv.sink
    buf = getattr(state.kv, buffers)[0]
    slots = getattr(bank_of(state), buffers)[0]
    assert len(slots) == 2
    return buf[:, :sink], torch.cat(slots, dim=1), buf[:, sink : state.kv.fill], k


@torch.no_grad()
def test_sources_are_concatenated_in_list_order():
    """A source placed between the bank and the window is attended exactly there; the
    standard list is [sink | bank | window] (spec §2.3)."""
    model = tiny_dit()
    cfg = StreamConfig(local_attn_size=12, sink_size=3, bank_size=2, record_interval=1)
    state, _, k, v, keys, _ = _probe(model, cfg, standard_sources)
    sink, bank, window, new = _expected(state, k, "k")
    assert torch.equal(keys, torch.cat([sink, bank, window, new], dim=1))
    const = ConstantFrame(state.frame_len, selectable=False)

    def layout(s):
        sink_src, bank_src, window_src = standard_sources(s)
        return [sink_src, bank_src, const, window_src]

    activate = lambda: setattr(const, "active", True)  # noqa: E731
    state2, _, _, _, keys2, values2 = _probe(model, cfg, layout, activate)
    assert torch.equal(state2.kv.k[0], state.kv.k[0])  # dormant until the probe: same history
    assert torch.equal(keys2, torch.cat([sink, bank, const.k, window, new], dim=1))
    vs = _expected(state, v, "v")
    assert torch.equal(values2, torch.cat([vs[0], vs[1], const.v, vs[2], vs[3]], dim=1))


@torch.no_grad()
def test_sma_selects_among_the_selectable_sources():
    """With SMA, the frames of every selectable source (sink, bank, and here a test source
    listed last) are narrowed to the top k per head in the place of the first of them; the
    window is attended whole."""
    model = tiny_dit()
    cfg = StreamConfig(local_attn_size=12, sink_size=3, bank_size=2, record_interval=1, sma=True,
                       sma_top_k=2)
    const = ConstantFrame(model.config.tokens_per_frame(H, W), selectable=True)
    state, q, k, v, keys, values = _probe(
        model, cfg, lambda s: [*standard_sources(s), const], lambda: setattr(const, "active", True))
    sink_k, bank_k, window_k, new_k = _expected(state, k, "k")
    sink_v, bank_v, window_v, new_v = _expected(state, v, "v")
    sel_k, sel_v = sma_select(q, torch.cat([sink_k, bank_k, const.k], dim=1),
                              torch.cat([sink_v, bank_v, const.v], dim=1), state.frame_len, 2)
    assert torch.equal(keys, torch.cat([sel_k, window_k, new_k], dim=1))
    assert torch.equal(values, torch.cat([sel_v, window_v, new_v], dim=1))
    assert keys.shape[1] == (2 + 3 + 3) * state.frame_len


def _bank_mask(frames: int, record_interval: int, bank_read: bool, frame_len: int) -> torch.Tensor:
    """One-frame chunks, a window of the chunk alone and no sink: frame n sees itself and, when
    the bank is read, the frames recorded before it (m % record_interval == 0, m < n)."""
    mask = torch.eye(frames, dtype=torch.bool)
    if bank_read:
        for n in range(frames):
            for m in range(0, n, record_interval):
                mask[n, m] = True
    return mask.repeat_interleave(frame_len, 0).repeat_interleave(frame_len, 1)


def _stream_with_bank(model, cfg: StreamConfig, x, t, ctx) -> torch.Tensor:
    """Each chunk: refresh the bank, then one committing call recording the bank's prototype."""
    frames = x.shape[2]
    state = _state(model, cfg, frames)
    outs = []
    for n in range(frames):
        state.refresh_memory(StreamCall.denoise(n, refresh_memory=True))
        call = StreamCall.commit_chunk(n, record_memory=bank_of(state).wants_prototype(n))
        c = state.begin(call, 1)
        outs.append(model(x[:, :, n : n + 1], t[:, n : n + 1], ctx, stream=c))
        state.finish(c)
    assert bank_of(state).opened == len(range(0, frames, cfg.record_interval))  # never compressed
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("requires_sink", [False, True])
@torch.no_grad()
def test_bank_without_a_sink_equals_masked_forward(requires_sink):
    """sink_size 0: the bank is attended (clean), or ignored (`bank_requires_sink`, the
    reference's Q10); either way streaming equals a full forward with the matching mask."""
    model = tiny_dit()
    frames, interval = 8, 2
    memory = dataclasses.replace(MemoryOptions.clean(), bank_requires_sink=requires_sink)
    cfg = StreamConfig(num_frame_per_block=1, local_attn_size=1, sink_size=0, bank_size=4,
                       record_interval=interval, memory=memory)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, TINY.in_dim, frames, H, W, generator=g)
    t = torch.rand(1, frames, generator=g) * 1000
    ctx = tiny_prompt()
    streamed = _stream_with_bank(model, cfg, x, t, ctx)
    frame_len = model.config.tokens_per_frame(H, W)
    full = model(x, t, ctx, stream=DenseMask(_bank_mask(frames, interval, not requires_sink, frame_len)))
    err = (streamed - full).abs().max().item()
    assert err <= 1e-5, f"max |streamed - masked full| = {err}"
    other = model(x, t, ctx, stream=DenseMask(_bank_mask(frames, interval, requires_sink, frame_len)))
    assert (streamed - other).abs().max().item() > 1e-4  # the bank matters


def test_bank_requires_sink_is_a_compat_quirk():
    assert MemoryOptions.compat().bank_requires_sink
    assert not MemoryOptions.clean().bank_requires_sink
