"""Memory bank (NAM) timelines and retrieval, and sparse memory activation (SMA) routing."""
from __future__ import annotations

import pytest
import torch

from memflow.config import MemoryOptions, StreamConfig
from memflow.memory_bank import nam_scores, nam_select, sma_select
from memflow.config import SamplingConfig
from memflow.chunk_loop import ChunkStepper
from memflow.noise import SeededNoise
from pipeline.causal_inference import CausalInferencePipeline

from conftest import bank_of, tiny_dit, tiny_prompt

H, W = 4, 6


def _run_timeline(options: MemoryOptions, num_chunks: int, steps=(1000, 500)):
    """Generate chunk by chunk and record, per chunk, the frames the bank holds while the chunk
    is denoised (layer 0), checking every slot's tensor against the prototype it claims."""
    model = tiny_dit()
    cfg = StreamConfig(memory=options)
    pipe = CausalInferencePipeline(model, cfg, SamplingConfig(denoising_step_list=steps))
    frames = 3 * num_chunks
    state = pipe.stepper.new_state(1, (H, W), frames, track_frames=True)
    noise = SeededNoise(seed=0, dtype=torch.float32)
    x = noise.initial((1, frames, 16, H, W))
    ctx = tiny_prompt()
    prototypes: dict[int, torch.Tensor] = {}
    timeline = []
    for n in range(num_chunks):
        x0 = pipe.stepper.denoise(state, n, x[:, 3 * n : 3 * n + 3], ctx, noise)
        bank = bank_of(state)
        used = bank.used_slots
        timeline.append(bank.slot_frames[0][:used])
        for layer in range(bank.num_layers):
            for slot, frame in enumerate(bank.slot_frames[layer][:used]):
                got = bank.k[layer][slot]
                assert torch.equal(got, prototypes[frame][layer]), (n, layer, slot, frame)
        pipe.stepper.commit(state, n, x0, ctx, noise)
        if bank.prototype_frame is not None:
            prototypes[bank.prototype_frame] = list(bank.proto_k)
    return timeline, state


@torch.no_grad()
def test_single_prompt_compat_timeline():
    """Spec §3.7, single prompt: every chunk records; slots hold f6, f15, then compress."""
    timeline, _ = _run_timeline(MemoryOptions.compat("every_chunk"), 13)
    assert timeline[:10] == [
        [], [0], [3], [6], [6, 9], [6, 12], [6, 15], [6, 15, 18], [6, 15, 21], [6, 15, 24],
    ]
    for n in (10, 11, 12):
        assert timeline[n][-1] == 3 * n - 3 and len(timeline[n]) == 3
        assert set(timeline[n][:2]) <= set(timeline[n - 1])


@torch.no_grad()
def test_interactive_compat_timeline_reinserts_stale_prototype():
    """Spec §3.7, interactive/training policy with the reference's stale re-insertion (Q7)."""
    timeline, _ = _run_timeline(MemoryOptions.compat("every_interval"), 13)
    assert timeline[:10] == [[], [0], [0], [0], [0, 9], [0, 9], [0, 9], [0, 9, 18], [0, 9, 18], [0, 9, 18]]
    for n in (10, 11, 12):
        assert timeline[n][-1] == 27
    # f27 is compressed in on chunks 10, 11 and 12: it can now occupy more than one slot
    assert timeline[12].count(27) >= timeline[10].count(27)


@torch.no_grad()
def test_clean_timeline_inserts_each_prototype_once():
    timeline, state = _run_timeline(MemoryOptions.clean(), 13)
    assert timeline[:10] == [[], [0], [0], [0], [0, 9], [0, 9], [0, 9], [0, 9, 18], [0, 9, 18], [0, 9, 18]]
    assert timeline[10][-1] == 27 and timeline[10].count(27) == 1
    assert timeline[11] == timeline[10] == timeline[12]
    assert bank_of(state).opened == 13 // 3 + 1


@torch.no_grad()
def test_denoising_calls_only_read():
    """Without a refresh, a denoising call changes no cache or bank buffer or pointer; with the
    refresh (first step of a chunk) only the bank's K/V change."""
    from memflow.stream_call import StreamCall

    _, state = _run_timeline(MemoryOptions.compat("every_chunk"), 11)
    stepper = ChunkStepper(tiny_dit(), state.config, SamplingConfig())
    ctx = tiny_prompt()
    x = torch.randn(1, 3, 16, H, W)

    def snapshot():
        s = state
        slots = [torch.stack([torch.stack(layer) for layer in bank]) for bank in (bank_of(s).k, bank_of(s).v)]
        return [torch.stack(s.kv.k), torch.stack(s.kv.v), *slots, torch.stack(bank_of(s).proto_k),
                torch.stack(bank_of(s).proto_v), s.kv.end, s.kv.fill, bank_of(s).opened]

    def same(a, b):
        return [torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(a, b)]

    before = snapshot()
    stepper.dit(state, x, 500.0, ctx, StreamCall.denoise(33, refresh_memory=False))
    assert all(same(before, snapshot()))
    stepper.dit(state, x, 500.0, ctx, StreamCall.denoise(33, refresh_memory=True))
    changed = same(before, snapshot())
    assert changed == [True, True, False, False, True, True, True, True, True]
    stepper.dit(state, x, 0.0, ctx, StreamCall.commit_chunk(33, True))
    after = snapshot()
    assert after[6] == before[6] + 3 * state.frame_len and not torch.equal(after[4], before[4])


def test_nam_picks_hand_built_frames():
    """Text keys along +e0; frame 2 matches best, frame 0 second, frame 1 is opposed."""
    d, flen = 4, 2
    text = torch.zeros(1, 3, 1, d)
    text[..., 0] = 1.0
    frames = torch.zeros(1, 3 * flen, 1, d)
    frames[:, 0:2, :, 0] = 1.0
    frames[:, 2:4, :, 0] = -2.0
    frames[:, 4:6, :, 0] = 3.0
    scores = nam_scores(text, frames, flen, None, MemoryOptions.compat())
    assert scores.argmax().item() == 2
    assert nam_select(scores, 2, "score_desc").tolist() == [[2, 0]]
    assert nam_select(scores, 2, "temporal").tolist() == [[0, 2]]


def test_nam_masked_score_ignores_padding():
    """Many padding rows share one key that favours frame 0; the single real token favours
    frame 1. The reference score follows the padding, the masked softmax score the prompt."""
    d, flen = 2, 1
    text = torch.zeros(1, 8, 1, d)
    text[0, 0, 0] = torch.tensor([0.0, 4.0])  # the real token
    text[0, 1:, 0] = torch.tensor([4.0, 0.0])  # padding rows
    frames = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, d)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 0] = True
    ref = nam_scores(text, frames, flen, mask, MemoryOptions.compat())
    masked = nam_scores(text, frames, flen, mask, MemoryOptions(bank_score="softmax_masked"))
    assert ref.argmax().item() == 0 and masked.argmax().item() == 1


def test_sma_picks_top_k_frames_per_head_in_temporal_order():
    flen, d = 2, 3
    mem = torch.zeros(1, 5 * flen, 2, d)
    for f in range(5):
        mem[:, f * flen : (f + 1) * flen, :, 0] = f  # channel 0 grows with the frame index
        mem[:, f * flen : (f + 1) * flen, :, 1] = 4 - f  # channel 1 shrinks
    q = torch.zeros(1, 4, 2, d)
    q[:, :, 0, 0] = 1.0  # head 0 prefers late frames
    q[:, :, 1, 1] = 1.0  # head 1 prefers early frames
    k, v = sma_select(q, mem, mem + 100, flen, top_k=2)
    assert k[0, ::flen, 0, 0].tolist() == [3, 4]
    assert k[0, ::flen, 1, 0].tolist() == [0, 1]
    assert torch.equal(v, k + 100)


@pytest.mark.parametrize("sma", [False, True])
@torch.no_grad()
def test_sma_with_k_covering_all_frames_equals_dense(sma):
    model = tiny_dit()
    outs = []
    for top_k in (6, 100):
        cfg = StreamConfig(sma=sma, sma_top_k=top_k, memory=MemoryOptions.compat())
        pipe = CausalInferencePipeline(model, cfg, SamplingConfig(denoising_step_list=(1000, 500)))
        outs.append(pipe.generate_latents(tiny_prompt(), 36, (H, W), SeededNoise(0, dtype=torch.float32)))
    dense_cfg = StreamConfig(memory=MemoryOptions.compat())
    pipe = CausalInferencePipeline(model, dense_cfg, SamplingConfig(denoising_step_list=(1000, 500)))
    dense = pipe.generate_latents(tiny_prompt(), 36, (H, W), SeededNoise(0, dtype=torch.float32))
    for out in outs:
        assert (out - dense).abs().max().item() <= 1e-6


@torch.no_grad()
def test_sma_with_small_k_changes_output():
    model = tiny_dit()
    res = []
    for sma in (False, True):
        cfg = StreamConfig(sma=sma, sma_top_k=2, memory=MemoryOptions.compat())
        pipe = CausalInferencePipeline(model, cfg, SamplingConfig(denoising_step_list=(1000, 500)))
        res.append(pipe.generate_latents(tiny_prompt(), 36, (H, W), SeededNoise(0, dtype=torch.float32)))
    assert (res[0] - res[1]).abs().max().item() > 1e-4


@torch.no_grad()
def test_bookkeeping_is_off_by_default():
    """Without the flags, neither call lengths nor slot frames are recorded (no host sync per
    compression); the bank's tensors are the same either way."""
    cfg = StreamConfig(bank_size=2, record_interval=1, memory=MemoryOptions.clean())
    pipe = CausalInferencePipeline(tiny_dit(), cfg, SamplingConfig(denoising_step_list=(1000,)))
    states = [pipe.stepper.new_state(1, (H, W), 18),
              pipe.stepper.new_state(1, (H, W), 18, debug=True, track_frames=True)]
    for state in states:
        pipe.generate_latents(tiny_prompt(), 18, (H, W), SeededNoise(0, dtype=torch.float32), state=state)
    plain, tracked = states
    assert plain.debug is None and bank_of(plain).last_selection is None
    assert all(frames == [] for frames in bank_of(plain).slot_frames)
    assert bank_of(tracked).last_selection is not None and tracked.debug.key_frames
    for a, b in zip(bank_of(plain).k, bank_of(tracked).k):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
