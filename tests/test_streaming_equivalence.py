"""Cached chunk-by-chunk streaming equals a full forward with the matching attention mask."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY, DenseMask, block_causal_mask, tiny_dit, tiny_prompt

from memflow.config import MemoryOptions, StreamConfig
from memflow.stream_call import StreamCall
from memflow.streaming import StreamState

H, W = 4, 6  # latent size -> 2x3 = 6 tokens per frame


def _call(model, state, x, t, ctx, call):
    """One streaming DiT call at the lowest level: open the call's context, run, apply writes."""
    c = state.begin(call, x.shape[2])
    out = model(x, t, ctx, stream=c)
    state.finish(c)
    return out


def _stream_all(model, x, t, ctx, cfg: StreamConfig, commit: bool = True):
    """Feed x [B, C, F, h, w] chunk by chunk through the cache; return the concatenated outputs."""
    b, _, frames = x.shape[:3]
    state = StreamState(model.config, cfg, b, H, W, num_frames=frames)
    fpb = cfg.num_frame_per_block
    outs = []
    for start in range(0, frames, fpb):
        sl = slice(start, start + fpb)
        if not commit:
            # a read-only call must give the same output as the commit that follows it
            ro = _call(model, state, x[:, :, sl], t[:, sl], ctx, StreamCall.denoise(start))
        out = _call(model, state, x[:, :, sl], t[:, sl], ctx,
                    StreamCall.commit_chunk(start, record_memory=False))
        if not commit:
            torch.testing.assert_close(ro, out, rtol=0, atol=0)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def _inputs(frames: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY.in_dim, frames, H, W, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    return x, t, tiny_prompt(batch)


@pytest.mark.parametrize("fpb", [1, 3, 4])
@torch.no_grad()
def test_cached_streaming_equals_block_causal_forward(fpb):
    model = tiny_dit()
    frames = 3 * fpb
    x, t, ctx = _inputs(frames)
    cfg = StreamConfig(num_frame_per_block=fpb, local_attn_size=frames, sink_size=fpb, bank_size=0)
    streamed, _ = _stream_all(model, x, t, ctx, cfg, commit=False)
    mask = block_causal_mask(frames, fpb, model.config.tokens_per_frame(H, W))
    full = model(x, t, ctx, stream=DenseMask(mask))
    err = (streamed - full).abs().max().item()
    assert err <= 1e-5, f"max |streamed - full| = {err}"
    # the mask matters: plain bidirectional attention differs
    assert (model(x, t, ctx) - full).abs().max().item() > 1e-3


def _sink_window_mask(frames: int, fpb: int, sink: int, cap: int, frame_len: int) -> torch.Tensor:
    """Frame-level mask of a rolling cache: chunk n sees the sink frames and the newest
    cap - sink frames up to its own end (spec §2.3, §2.5)."""
    mask = torch.zeros(frames, frames, dtype=torch.bool)
    for f in range(frames):
        end = (f // fpb + 1) * fpb
        for j in range(end):
            in_sink = j < sink
            in_window = j >= max(sink, end - (cap - sink))
            mask[f, j] = in_sink or in_window
    return mask.repeat_interleave(frame_len, 0).repeat_interleave(frame_len, 1)


@pytest.mark.parametrize("fpb,cap,sink", [(3, 9, 3), (2, 6, 2), (1, 4, 1), (3, 12, 0)])
@torch.no_grad()
def test_rolling_window_equals_masked_forward(fpb, cap, sink):
    """Past the window, eviction keeps exactly the sink plus the newest frames."""
    model = tiny_dit()
    frames = 8 * fpb
    x, t, ctx = _inputs(frames, seed=3)
    cfg = StreamConfig(num_frame_per_block=fpb, local_attn_size=cap, sink_size=sink, bank_size=0)
    streamed, state = _stream_all(model, x, t, ctx, cfg)
    frame_len = model.config.tokens_per_frame(H, W)
    full = model(x, t, ctx, stream=DenseMask(_sink_window_mask(frames, fpb, sink, cap, frame_len)))
    err = (streamed - full).abs().max().item()
    assert err <= 1e-5, f"max |streamed - masked full| = {err}"
    assert state.kv.end == frames * frame_len and state.kv.fill == cap * frame_len


@torch.no_grad()
def test_batch_of_two_equals_two_runs_of_one():
    model = tiny_dit()
    frames = 9
    x, t, ctx = _inputs(frames, batch=2, seed=5)
    cfg = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1,
                       memory=MemoryOptions.compat())
    both, _ = _stream_all(model, x, t, ctx, cfg)
    for i in range(2):
        one, _ = _stream_all(model, x[i : i + 1], t[i : i + 1], ctx[i : i + 1], cfg)
        assert (both[i : i + 1] - one).abs().max().item() <= 1e-5
