"""Position policies of a stream (`positions`): `relative` lays the attended frames out
compactly at every call, so a stream runs past the RoPE table with bounded indices, and equals
`absolute` as long as the cache has not rolled."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_prompt

from memflow.chunk_loop import ChunkHooks, ChunkStepper
from memflow.config import DiTConfig, SamplingConfig, StreamConfig
from memflow.model import WanDiT
from memflow.noise import SeededNoise

HW = (4, 4)
STEPS = SamplingConfig(denoising_step_list=(1000, 500))


def _stepper(stream: StreamConfig, rope_max_frames: int = 1024) -> ChunkStepper:
    torch.manual_seed(0)
    model = WanDiT(DiTConfig(**{**TINY.to_dict(), "rope_max_frames": rope_max_frames})).eval()
    return ChunkStepper(model, stream, STEPS)


def _video(stepper: ChunkStepper, frames: int, switch_chunk: int | None = None) -> torch.Tensor:
    a, b = tiny_prompt(seed=1), tiny_prompt(seed=2)
    hooks = None
    if switch_chunk is not None:
        hooks = ChunkHooks(before_chunk=stepper.prompt_switches({switch_chunk: b}))
    noise = SeededNoise(0, dtype=torch.float32, order="per_chunk")
    return stepper.rollout(a, frames, HW, noise, hooks=hooks)


@pytest.mark.parametrize("sink,bank", [(3, 0), (0, 0)], ids=["sink", "window-only"])
@pytest.mark.parametrize("switch_chunk", [None, 2], ids=["one-prompt", "switch"])
@torch.no_grad()
def test_relative_equals_absolute_while_the_cache_has_not_rolled(sink, bank, switch_chunk):
    """12 frames in a 12-frame window: every frame's slot is its frame index, so the two modes
    compute the same numbers, bit for bit, the switch's recache included."""
    videos = []
    for positions in ("absolute", "relative"):
        stream = StreamConfig(local_attn_size=12, sink_size=sink, bank_size=bank,
                              positions=positions)
        videos.append(_video(_stepper(stream), 12, switch_chunk))
    assert torch.equal(videos[0], videos[1])


@torch.no_grad()
def test_relative_differs_from_absolute_once_the_window_rolls():
    """Past the window the sink is nearer the queries in relative positions: the numbers move
    (so the equality above is not a test that cannot fail)."""
    videos = [_video(_stepper(StreamConfig(local_attn_size=6, sink_size=3, bank_size=0,
                                           positions=p)), 12) for p in ("absolute", "relative")]
    assert torch.equal(videos[0][:, :6], videos[1][:, :6])
    assert not torch.equal(videos[0][:, 6:], videos[1][:, 6:])


def _elements(obj) -> int:
    """Tensor elements held in nested containers."""
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_elements(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_elements(v) for v in obj)
    return 0


@torch.no_grad()
def test_a_relative_stream_runs_twenty_tables_with_bounded_indices_and_memory():
    """A 12-frame RoPE table, 240 frames of video: no index above the attended context (sink 3
    + bank 2 + window 6 = 11 frames), the same layout at every call once the bank and the
    window are full, and the same cache memory."""
    stream = StreamConfig(local_attn_size=9, sink_size=3, bank_size=2, record_interval=1,
                          positions="relative")
    stepper = _stepper(stream, rope_max_frames=12)
    rope = stepper.generator.rope
    calls: list[list[tuple[int, int]]] = [[]]
    real_phases = rope.phases

    def recording(start_frame, frames, *args, **kwargs):
        calls[-1].append((start_frame, frames))
        return real_phases(start_frame, frames, *args, **kwargs)

    rope.phases = recording
    state = stepper.new_state(1, HW, 240, debug=True)
    sizes = []

    def after_commit(n: int) -> None:
        held = [*state.kv.k, *state.kv.v, state.source("bank").state_dict()]
        sizes.append(_elements(held))
        calls.append([])

    video = stepper.rollout(tiny_prompt(), 240, HW, SeededNoise(0, dtype=torch.float32),
                            state=state, hooks=ChunkHooks(after_commit=after_commit))
    assert video.shape[1] == 240 and torch.isfinite(video).all()
    used = [start + frames for chunk in calls for start, frames in chunk]
    assert max(used) <= 3 + 2 + 6
    steady = calls[5:-1]  # from chunk 5 on the bank and the window are full
    assert all(chunk == steady[0] for chunk in steady)
    assert len(set(sizes[5:])) == 1


def test_inference_past_the_table_needs_relative_positions(tmp_path, capsys):
    """inference.py with a 6-frame table and 12 frames: refused in one line with absolute
    positions (naming relative), written in full with relative ones."""
    from conftest import TINY_YAML

    import inference
    from utils.video_writer import read_video_info

    args = ["--config_path", TINY_YAML, "tiny.rope_max_frames=6", "num_output_frames=12",
            "height=48", "width=64"]
    assert inference.main([*args, f"output_folder={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "positions: relative has no such limit" in err
    assert not (tmp_path / "a").exists()
    out = tmp_path / "r"
    assert inference.main([*args, "positions=relative", f"output_folder={out}"]) == 0
    videos = sorted(out.glob("*.mp4"))
    assert videos and all(read_video_info(v)[0] == 1 + 4 * 11 for v in videos)


def test_stage1_training_runs_relative_past_the_table(tmp_path):
    """A stage-1 step with 6-frame rollouts on a 3-frame RoPE table: absolute positions refuse
    the config in one line, relative ones train (the same policy the LoRA is long-tuned for)."""
    from conftest import REPO

    import train

    args = ["--config_path", str(REPO / "configs" / "tiny_train_init.yaml"), "max_iters=1",
            "tiny.rope_max_frames=3", "vis_video_lengths=[6]"]
    assert train.main([*args, "--logdir", str(tmp_path / "a")]) == 2
    assert train.main([*args, "positions=relative", "--logdir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "checkpoint_model_000001" / "model.pt").is_file()


@torch.no_grad()
def test_a_stream_keeps_only_the_window_of_its_latents():
    """Driven chunk by chunk (as the live session and the benchmarks do), a stream keeps the
    window's latents for a switch's recache, not the whole video."""
    from memflow.stream import Stream

    stepper = _stepper(StreamConfig(local_attn_size=9, sink_size=3, bank_size=2,
                                    positions="relative"))
    stream = Stream(stepper, tiny_prompt(), SeededNoise(0, dtype=torch.float32, order="per_chunk"),
                    latent_hw=HW,
                    num_frames=9)
    for _ in range(8):
        stream.next_chunk()
    assert stream.recent.shape[1] == 9
