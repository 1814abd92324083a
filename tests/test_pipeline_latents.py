"""The latent streaming loop: geometry, chunk sizes, batching, seeding."""
from __future__ import annotations

import pytest
import torch

from memflow.config import DiTConfig, MemoryOptions, SamplingConfig, StreamConfig
from memflow.noise import InjectedNoise, SeededNoise
from pipeline.causal_inference import CausalInferencePipeline

from conftest import bank_of, TINY, tiny_dit, tiny_prompt

STEPS = SamplingConfig(denoising_step_list=(1000, 750, 500))


@pytest.mark.parametrize(
    "fpb,frames,hw,cap,sink,bank",
    [(3, 3, (32, 48), 12, 3, 3), (1, 8, (4, 6), 4, 1, 2), (4, 16, (6, 4), 8, 4, 2), (3, 24, (4, 6), 12, 3, 3)],
)
@torch.no_grad()
def test_any_geometry_and_chunk_size_runs(fpb, frames, hw, cap, sink, bank):
    model = tiny_dit()
    cfg = StreamConfig(num_frame_per_block=fpb, local_attn_size=cap, sink_size=sink, bank_size=bank,
                       record_interval=1)
    pipe = CausalInferencePipeline(model, cfg, STEPS)
    state = pipe.new_state(1, hw, frames)
    chunks = []
    out = pipe.generate_latents(tiny_prompt(), frames, hw, SeededNoise(0, dtype=torch.float32),
                                on_chunk=lambda n, x0: chunks.append(n), state=state)
    assert out.shape == (1, frames, 16, *hw) and torch.isfinite(out).all()
    assert chunks == list(range(frames // fpb))
    flen = (hw[0] // 2) * (hw[1] // 2)
    assert state.kv.end == frames * flen and state.frame_len == flen


@torch.no_grad()
def test_bad_frame_count_is_rejected():
    pipe = CausalInferencePipeline(tiny_dit(), StreamConfig(), STEPS)
    with pytest.raises(ValueError, match="multiple of num_frame_per_block"):
        pipe.generate_latents(tiny_prompt(), 10, (4, 6), SeededNoise(0, dtype=torch.float32))


@pytest.mark.parametrize("options", [MemoryOptions.compat(), MemoryOptions.clean()])
@torch.no_grad()
def test_batch_of_two_equals_two_runs_of_one(options):
    """Memory selection is per batch element: a batch of two reproduces each video alone."""
    model = tiny_dit()
    cfg = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2, record_interval=1, memory=options)
    pipe = CausalInferencePipeline(model, cfg, STEPS)
    frames, hw = 21, (4, 6)
    g = torch.Generator().manual_seed(0)
    initial = torch.randn(2, frames, 16, *hw, generator=g)
    steps = torch.randn(frames // 3, 2, 2 * 3, 16, *hw, generator=g)
    ctx = torch.cat([tiny_prompt(seed=1), tiny_prompt(seed=2, length=9)])
    state = pipe.new_state(2, hw, frames)
    both = pipe.generate_latents(ctx, frames, hw, InjectedNoise(initial, steps), state=state)
    assert bank_of(state).opened > bank_of(state).slots  # compression happened
    per_video = steps.view(frames // 3, 2, 2, 3, 16, *hw)
    for i in range(2):
        one = pipe.generate_latents(ctx[i : i + 1], frames, hw,
                                    InjectedNoise(initial[i : i + 1], per_video[:, :, i]))
        err = (both[i : i + 1] - one).abs().max().item()
        assert err <= 1e-5, err


@torch.no_grad()
def test_same_seed_same_video_and_memory_matters():
    model = tiny_dit()
    hw = (4, 6)
    outs = {}
    for name, bank in (("a", 3), ("b", 3), ("nobank", 0)):
        pipe = CausalInferencePipeline(model, StreamConfig(bank_size=bank), STEPS)
        outs[name] = pipe.generate_latents(tiny_prompt(), 36, hw, SeededNoise(7, dtype=torch.float32))
    assert torch.equal(outs["a"], outs["b"])
    assert (outs["a"] - outs["nobank"]).abs().max().item() > 1e-4


def test_config_validation():
    with pytest.raises(ValueError, match="sink_size"):
        StreamConfig(local_attn_size=6, sink_size=6)
    with pytest.raises(ValueError, match="at least one chunk"):
        StreamConfig(num_frame_per_block=4, local_attn_size=3, sink_size=1)
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        TINY.tokens_per_frame(5, 6)
