"""The EMA memory (memflow/ema_memory.py): frames that leave the window are folded into running
averages attended between the sink and the window, in relative positions."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_YAML, tiny_dit, tiny_prompt

from memflow.chunk_loop import ChunkHooks, ChunkStepper
from memflow.config import SamplingConfig, StreamConfig
from memflow.ema_memory import EmaSource
from memflow.memory_sources import memory_layouts
from memflow.noise import SeededNoise

HW = (4, 4)
STEPS = SamplingConfig(denoising_step_list=(1000, 500))
SINK, WINDOW, FPB = 3, 6, 3


def _stream(layout: str = "ema", **options) -> StreamConfig:
    return StreamConfig(local_attn_size=SINK + WINDOW, sink_size=SINK, bank_size=2,
                        record_interval=1, positions="relative", memory_layout=layout,
                        memory_options=options)


def _run(stream: StreamConfig, frames: int, cache_frames: int | None = None, hooks=None):
    stepper = ChunkStepper(tiny_dit(), stream, STEPS)
    state = stepper.new_state(1, HW, frames, cache_frames=cache_frames)
    video = stepper.rollout(tiny_prompt(), frames, HW, SeededNoise(0, dtype=torch.float32),
                            state=state, hooks=hooks)
    return video, state


def test_the_layouts_are_registered_without_importing_the_module():
    assert {"ema", "nam_ema"} <= set(memory_layouts())


@torch.no_grad()
def test_frames_leaving_the_window_are_folded_in_order():
    """The averages equal folding, oldest first, every committed frame past the sink that the
    last chunk no longer attends (the committed keys read from the cache after each chunk)."""
    frames = 24
    stepper_state = {}
    committed: dict[int, torch.Tensor] = {}  # absolute frame -> layer 0's un-rotated keys

    def after_commit(n: int) -> None:
        kv = stepper_state["state"].kv
        fl = kv.capacity // (SINK + WINDOW)
        for j in range(FPB):
            lo = kv.fill - (FPB - j) * fl
            committed[n * FPB + j] = kv.k[0][:, lo:lo + fl].clone()

    stream = _stream(ema_rates=[0.5, 0.25])
    stepper = ChunkStepper(tiny_dit(), stream, STEPS)
    state = stepper_state["state"] = stepper.new_state(1, HW, frames)
    stepper.rollout(tiny_prompt(), frames, HW, SeededNoise(0, dtype=torch.float32), state=state,
                    hooks=ChunkHooks(after_commit=after_commit))
    ema = state.source("ema")
    last_window_first = frames - WINDOW  # the last chunk attended the newest 6 frames
    folded = [committed[f] for f in range(SINK, last_window_first)]
    for rate, average in zip((0.5, 0.25), ema.k[0]):
        expected = folded[0]
        for frame in folded[1:]:
            expected = torch.lerp(expected, frame, rate)
        assert torch.equal(average, expected)
    assert ema.frames_held == 2


@torch.no_grad()
def test_a_training_sized_buffer_folds_the_same_frames():
    """A buffer holding the whole video evicts nothing until it is full, yet the EMA folds what
    leaves the window at the same chunks: the video is the same, bit for bit."""
    video, _ = _run(_stream(), 24)
    big, _ = _run(_stream(), 24, cache_frames=24)
    assert torch.equal(video, big)


@torch.no_grad()
def test_the_memory_is_attended():
    """Once frames have been folded the EMA changes the video; before, it is absent."""
    ema, _ = _run(_stream(), 18)
    sink_only, _ = _run(StreamConfig(local_attn_size=SINK + WINDOW, sink_size=SINK, bank_size=0,
                                     positions="relative"), 18)
    assert torch.equal(ema[:, :SINK + WINDOW + FPB], sink_only[:, :SINK + WINDOW + FPB])
    assert not torch.equal(ema, sink_only)


@torch.no_grad()
def test_ema_with_the_bank_and_resume():
    """nam_ema holds both memories; a state saved mid-stream and loaded into a fresh one goes on
    to the same latents."""
    stream = _stream("nam_ema")
    stepper = ChunkStepper(tiny_dit(), stream, STEPS)
    ctx = tiny_prompt()
    whole = stepper.rollout(ctx, 24, HW, SeededNoise(0, dtype=torch.float32, order="per_chunk"))
    noise = SeededNoise(0, dtype=torch.float32, order="per_chunk")
    state = stepper.new_state(1, HW, 24)
    first = stepper.rollout(ctx, 15, HW, noise, state=state)
    assert [s.name for s in state.sources] == ["sink", "bank", "ema", "window"]
    saved = state.state_dict()
    fresh = stepper.new_state(1, HW, 24)
    fresh.load_state_dict(saved)
    rest = stepper.rollout(ctx, 9, HW, noise, first_chunk=5, state=fresh,
                           recent=first[:, -WINDOW:])
    assert torch.equal(torch.cat([first, rest], dim=1), whole)


def test_bad_ema_settings_are_one_line(tmp_path, capsys):
    import inference

    base = ["--config_path", TINY_YAML, "model_kwargs.memory_layout=ema",
            f"output_folder={tmp_path / 'out'}"]
    for extra, message in (([], "memory layout 'ema' needs positions: relative"),
                           (["positions=relative", "model_kwargs.memory_options={rates: [1]}"],
                            "has no option 'rates' (its options: ema_rates)")):
        assert inference.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    with pytest.raises(ValueError, match="ema_rates"):
        EmaSource(tiny_kv(), 4, rates=[0.0])


def tiny_kv():
    from memflow.kv_cache import KVCache

    return KVCache(1, 1, 8, 4, 8, 2, 4)


def test_ema_runs_offline_and_live(tmp_path):
    """The tiny preset with the EMA memory past its RoPE table: inference.py writes the video and
    a live session holds the two averages after the window rolled (no bank frames to show)."""
    from conftest import TINY_INTERACTIVE_YAML

    import inference
    from config.inference import load_inference_config
    from pipeline.session import Session

    overrides = ["model_kwargs.memory_layout=ema", "positions=relative", "tiny.rope_max_frames=6",
                 "height=48", "width=64"]
    out = tmp_path / "out"
    assert inference.main(["--config_path", TINY_YAML, *overrides, "num_output_frames=15",
                           f"output_folder={out}"]) == 0
    assert list(out.glob("*.mp4"))
    session = Session.from_settings(load_inference_config(TINY_INTERACTIVE_YAML, overrides))
    session.start("a cat on a red chair", seed=3)
    for _ in range(5):
        session.next_chunk()
    assert session._video.stream.state.source("ema").frames_held == 2
    assert session.memory().bank == []
