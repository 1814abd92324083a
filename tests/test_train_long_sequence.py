"""Stage 2's long sequences (trainer/streaming.py) on a tiny DiT: the window schedule of
TRAINING.md §5.2, the switch (§5.5-§5.7), the sink after a switch (clean vs the reference's
bug), the bank across windows, first-frame re-encoding and exact gradients in a switch window."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import memflow.memory_bank as memory_bank
from conftest import bank_of, TINY, tiny_dit, tiny_prompt
from memflow.chunk_loop import ChunkStepper
from memflow.config import MemoryOptions, SamplingConfig, StreamConfig, SwitchOptions
from trainer.draws import SeededDraws
from trainer.long_sequence import (LongSequence, LongTuningConfig, SwitchSchedule, can_generate_more,
                               new_frame_choices, window_schedule)

HW = (4, 4)


# ------------------------------------------------------------------------------------------------
# The schedule (pure)
# ------------------------------------------------------------------------------------------------
def test_window_schedule_for_240_frames_matches_the_spec_table():
    cfg = LongTuningConfig()  # 21-frame windows, 18 new frames, T = 240
    table = window_schedule(240, cfg, 3)
    assert table == [(0, 21)] + [(21 + 18 * k, 18) for k in range(12)]
    assert len(table) == 13 and sum(n for _, n in table) == 237
    assert table[-1] == (219, 18)
    assert not can_generate_more(237, 240, 18)  # the next request starts a new sequence
    assert new_frame_choices(21, 240, cfg, 3) == [18]  # always 18 at T = 240
    # a shorter tail: only lengths that still fit are offered
    assert new_frame_choices(9, 20, LongTuningConfig(window_frames=12, min_new_frames=3), 3) == [3, 6, 9]


def test_released_switch_choices_are_window_starts():
    schedule = SwitchSchedule("random_choice", choices=tuple(range(21, 202, 18)))
    starts = {s for s, _ in window_schedule(240, LongTuningConfig(), 3)}
    assert set(schedule.candidates(240, 3)) <= starts
    assert schedule.candidates(60, 3) == [21, 39, 57]
    assert SwitchSchedule("fixed", fixed_index=21).candidates(240, 3) == [21]
    assert SwitchSchedule("random", min_index=9, max_index=18).candidates(240, 3) == [9, 12, 15]
    assert SwitchSchedule("random", min_index=9, max_index=9).candidates(240, 3) == [9]


# ------------------------------------------------------------------------------------------------
# A tiny sequence
# ------------------------------------------------------------------------------------------------
def _stepper(compat: bool, record_interval: int = 1, seed: int = 0) -> ChunkStepper:
    memory = MemoryOptions.compat("every_interval") if compat else MemoryOptions.clean()
    stream = StreamConfig(local_attn_size=6, sink_size=3, bank_size=2,
                          record_interval=record_interval, memory=memory)
    return ChunkStepper(tiny_dit(TINY, seed), stream, SamplingConfig())


def _config(compat: bool, switch_frame: int, max_length: int = 18) -> LongTuningConfig:
    return LongTuningConfig(
        window_frames=6, max_length=max_length, min_new_frames=3,
        switch=SwitchSchedule("fixed", fixed_index=switch_frame),
        switch_options=SwitchOptions.compat(global_sink=False) if compat else SwitchOptions(),
        recache_frames=6 if compat else None, refresh_text_per_window=not compat,
    )


class StubEncoder:
    """Records the clips it is asked to re-encode; returns a recognisable constant latent."""

    def __init__(self):
        self.clips: list[torch.Tensor] = []

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        self.clips.append(clip.clone())
        return torch.full_like(clip[:, :1], 7.0)


def _sequence(stepper, config, switch_frame, encoder=None, track=False, max_length=None):
    return LongSequence(
        stepper, config, prompts=["a"], switch_prompts=["b"], cond=tiny_prompt(seed=1),
        switch_cond=tiny_prompt(seed=2, length=7), latent_hw=HW,
        max_length=max_length or config.max_length, switch_frame=switch_frame, index=0,
        reencode=encoder or StubEncoder(), track_frames=track,
    )


def _draws(seed: int = 0) -> SeededDraws:
    return SeededDraws(torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("compat", [False, True], ids=["clean", "compat"])
def test_switch_window_uses_b_and_recaches_once(monkeypatch, compat):
    """Windows before the switch run (and are judged) with A, the switch window and every later
    one with B; exactly one recache, of the raw frames just before the switch, at the reference's
    21-frame training window (compat, here 6) or the inference window (clean)."""
    stepper = _stepper(compat)
    seq = _sequence(stepper, _config(compat, 9), 9)
    calls = []
    original = stepper.dit

    def spy(state, x, t, context, call):
        calls.append((call, context, x.detach().clone()))
        return original(state, x, t, context, call)

    monkeypatch.setattr(stepper, "dit", spy)
    windows, raw_before = [], []
    with torch.no_grad():
        while seq.can_generate_more():
            first = len(calls)
            raw_before.append(None if seq.previous is None else seq.previous.clone())
            windows.append((seq.next_window(_draws(len(windows)), grad=False), calls[first:]))
    assert [(w.start_frame, w.new_frames) for w, _ in windows] == [(0, 6), (6, 3), (9, 3), (12, 3), (15, 3)]
    recaches = [(c, ctx, x) for c, ctx, x in calls if c.recache]
    assert len(recaches) == 1 and seq.recaches == 1
    call, ctx, x = recaches[0]
    assert ctx is seq.switch_cond
    assert call.start_frame == 3 and x.shape[1] == 6  # frames 3..8: min(6, 9) = 6 in both modes
    # the raw latents of frames 3..8 (the previous window before re-encoding)
    assert torch.equal(x, raw_before[2])
    for w, window_calls in windows:
        switched = w.start_frame >= 9
        assert w.uses_switch_prompt == switched and w.switched_here == (w.start_frame == 9)
        assert w.cond is (seq.switch_cond if switched else seq.cond)
        for c, context, _ in window_calls:
            if not c.recache:
                assert context is (seq.switch_cond if switched else seq.cond)


@pytest.mark.parametrize("compat", [False, True], ids=["clean", "compat"])
def test_sink_after_the_switch_is_intact_clean_or_zero_compat(compat):
    """TRAINING.md §5.7 / §10 item 1: the reference zeroes the whole KV cache at a switch and the
    recache protects the sink, so the sink stays zero for the rest of the sequence; clean keeps
    it (global_sink)."""
    stepper = _stepper(compat)
    seq = _sequence(stepper, _config(compat, 9), 9)
    sink = 3 * seq.state.frame_len
    with torch.no_grad():
        seq.next_window(_draws(0), grad=False)
        seq.next_window(_draws(1), grad=False)
        before = [k[:, :sink].clone() for k in seq.state.kv.k]
        assert all(b.abs().sum() > 0 for b in before)
        while seq.can_generate_more():
            seq.next_window(_draws(seq.generated), grad=False)
    after = [k[:, :sink] for k in seq.state.kv.k]
    for b, a in zip(before, after):
        if compat:
            assert a.abs().max() == 0
        else:
            assert torch.equal(a, b)


def test_window_re_encodes_its_first_frame_from_the_decoded_prefix():
    """§5.2: window k > 0 = [enc(last pixel frame of prev[0 : n_new + 1]), prev[-overlap+1:],
    new frames]; the previous window is stored before re-encoding; mask = frames >= overlap."""
    stepper = _stepper(False)
    encoder = StubEncoder()
    seq = _sequence(stepper, _config(False, 9), 9, encoder)
    with torch.no_grad():
        first = seq.next_window(_draws(0), grad=False)
        raw_first = seq.previous.clone()
        second = seq.next_window(_draws(1), grad=False)
    assert first.gradient_mask is None and first.latents.shape[1] == 6
    assert torch.equal(raw_first, first.latents)
    assert len(encoder.clips) == 1 and torch.equal(encoder.clips[0], raw_first[:, :4])  # n_new + 1
    assert torch.all(second.latents[:, 0] == 7.0)
    assert torch.equal(second.latents[:, 1:3], raw_first[:, 4:6])
    assert torch.equal(second.latents[:, 3:], seq.previous[:, 3:])
    assert second.gradient_mask[:, :3].sum() == 0 and second.gradient_mask[:, 3:].all()


@pytest.mark.parametrize("compat", [False, True], ids=["clean", "compat"])
def test_bank_holds_distinct_frames_and_retrieves_with_the_new_prompt(monkeypatch, compat):
    """The bank fills, compresses and persists across windows and the switch. Clean: compressed
    once per new prototype (distinct frames) and scored with B's text keys from the recache on;
    compat: the stale prototype is re-compressed every chunk (duplicates, §10 item 2) and the
    recache scores with all-zero text keys (item 3)."""
    stepper = _stepper(compat, record_interval=3)
    cfg = dataclasses.replace(_config(compat, 27, max_length=36))
    seq = _sequence(stepper, cfg, 27, track=True)
    scored = []
    original = memory_bank.nam_scores

    def spy(text_keys, *args, **kwargs):
        scored.append((seq.generated, seq.switched, text_keys.clone()))
        return original(text_keys, *args, **kwargs)

    monkeypatch.setattr(memory_bank, "nam_scores", spy)
    with torch.no_grad():
        while seq.can_generate_more():
            seq.next_window(_draws(seq.generated), grad=False)
    frames = bank_of(seq.state).slot_frames[0]
    assert len(frames) == 2 and None not in frames
    b_keys = stepper.generator.text_kv(seq.switch_cond)
    after_switch = [keys for _, switched, keys in scored if switched]
    assert after_switch, "the bank was never scored after the switch"
    if compat:
        assert any(keys.abs().max() == 0 for keys in after_switch)
    else:
        assert len(set(frames)) == 2
        layers = len(b_keys)
        for i, keys in enumerate(after_switch):
            assert torch.equal(keys, b_keys[i % layers][0])


def test_switch_window_gradients_are_exact_under_checkpointing():
    """A generator window right after the switch (cache rolled, bank compressed, recache done):
    gradients with activation checkpointing equal those without, bitwise (each recomputation
    reads the cache and bank its forward saw, §10 item 6)."""
    results = []
    for checkpointing in (False, True):
        stepper = _stepper(False)
        stepper.generator.train()
        stepper.generator.gradient_checkpointing = checkpointing
        seq = _sequence(stepper, _config(False, 12), 12)
        with torch.no_grad():
            for i in range(3):
                seq.next_window(_draws(i), grad=False)
        window = seq.next_window(_draws(3), grad=True)
        assert window.switched_here
        weights = torch.randn(window.latents.shape, generator=torch.Generator().manual_seed(5))
        (window.latents * weights * window.gradient_mask).sum().backward()
        results.append({n: p.grad.clone() for n, p in stepper.generator.named_parameters()
                        if p.grad is not None})
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    worst = max((plain[k] - checkpointed[k]).abs().max().item() for k in plain)
    print(f"\n[stage-2 switch window] max |grad plain - grad checkpointed| = {worst:.3e}")
    assert worst == 0.0
    assert max(g.abs().max().item() for g in plain.values()) > 0


def test_sequence_state_round_trip_continues_bit_for_bit():
    """A sequence saved between windows and restored into a fresh one produces the same next
    windows as the original, bitwise (the basis of resuming a run with a sequence in flight),
    although only the frames a later call can attend are saved."""
    stepper = _stepper(False)
    original = _sequence(stepper, _config(False, 9), 9)
    with torch.no_grad():
        original.next_window(_draws(0), grad=False)
        original.next_window(_draws(1), grad=False)
        saved = original.state_dict()
        # only the sink and the attended window are kept (6 of the 9 buffered frames)
        assert saved["stream"]["kv"]["fill"] == 6 * original.state.frame_len < original.state.kv.fill
        restored = _sequence(stepper, _config(False, 9), 9)
        restored.load_state_dict(saved)
        for i in range(2, 5):
            a = original.next_window(_draws(i), grad=False)
            b = restored.next_window(_draws(i), grad=False)
            assert torch.equal(a.latents, b.latents)


def test_recache_longer_than_the_compacted_buffer_matches_the_window_recache():
    """The reference's 21-frame training recache can cover more frames than the (compacted)
    buffer still holds; the frames outside every later attention window are computed and not
    written, so the following windows agree with a recache of just the attention window."""

    def config(switch_frame: int, recache: int | None) -> LongTuningConfig:
        return dataclasses.replace(_config(True, switch_frame, max_length=36), window_frames=9,
                                   recache_frames=recache)

    # find a window start where the buffer holds fewer than 9 frames (just after a compaction)
    probe = _sequence(_stepper(True), config(35, 9), 35)
    switch_frame = None
    with torch.no_grad():
        while probe.can_generate_more():
            if probe.generated and probe.state.kv.fill < 9 * probe.state.frame_len:
                switch_frame = probe.generated
                break
            probe.next_window(_draws(probe.generated), grad=False)
    assert switch_frame is not None
    outs = []
    for recache in (9, 6):
        seq = _sequence(_stepper(True), config(switch_frame, recache), switch_frame)
        with torch.no_grad():
            while seq.generated <= switch_frame:
                window = seq.next_window(_draws(seq.generated), grad=False)
            outs.append([window.latents, seq.next_window(_draws(seq.generated), grad=False).latents])
        assert seq.recaches == 1
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_training_buffer_is_copied_once_per_window_not_per_chunk():
    """The cache holds local_attn_size + window frames; a roll compacts it to the attended
    frames, so a window of new chunks copies it at most once (each copy stays alive while the
    window's graph needs it) and appends in place otherwise."""
    stepper = _stepper(False)
    seq = _sequence(stepper, _config(False, 9, max_length=36), 9, max_length=36)
    copies = []
    with torch.no_grad():
        while seq.can_generate_more():
            buffers = list(seq.state.kv.k)  # held, so no new buffer can take a freed one's id
            start = seq.generated
            seq.next_window(_draws(start), grad=False)
            new = [k for k in seq.state.kv.k if not any(k is b for b in buffers)]
            copies.append(len(new) // len(buffers))
    assert max(copies) <= 1 and sum(copies) >= 1
