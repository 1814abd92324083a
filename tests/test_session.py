"""The live session API (pipeline/session.py): the same video as interactive inference, switches
at chunk boundaries, the RoPE limit, saving and replaying, bad input."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from conftest import REPO, bank_of

from config.inference import load_inference_config, parse_settings
from memflow.chunk_loop import ChunkHooks, ChunkStepper
from memflow.errors import InputError
from memflow.vae import video_frames as first_video_frame
from pipeline import runner
from pipeline.interactive_inference import InteractiveInferencePipeline
from pipeline.session import Session, SessionLimitReached
from utils.distributed import DistInfo

CONFIG = str(REPO / "configs" / "tiny_interactive.yaml")
SMALL = ["height=48", "width=64", "cpu_threads=1"]  # small frames: the VAE decode dominates
PROMPTS = ["a cat on a red chair", "the cat jumps down", "the cat watches birds"]
SWITCH_CHUNKS = (1, 3)  # set_prompt before these chunks
NUM_CHUNKS = 4
SEED = 5


@pytest.fixture(scope="module")
def threads():
    """The session sets torch's thread count from the config; give the old one back after."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def session(threads) -> Session:
    return Session.from_config(CONFIG, SMALL)


@pytest.fixture(scope="module")
def recorded(session: Session, tmp_path_factory):
    """A session steered by set_prompt between chunks, saved with its sidecar."""
    session.start(PROMPTS[0], seed=SEED)
    results, prompts = [], iter(PROMPTS[1:])
    for n in range(NUM_CHUNKS):
        if n in SWITCH_CHUNKS:
            session.set_prompt(next(prompts))
        results.append(session.next_chunk())
    mp4, sidecar = session.save_mp4(tmp_path_factory.mktemp("live") / "clip.mp4")
    return SimpleNamespace(results=results, timeline=session.timeline, mp4=mp4, sidecar=sidecar)


def run_offline(tmp_path: Path, overrides: list[str]) -> tuple[torch.Tensor, Path]:
    """`interactive_inference.sh` in-process (pipeline.runner.run, the code path inference.py
    takes); returns the latents it generated and the video it wrote."""
    latents = []

    class Recording(InteractiveInferencePipeline):
        def generate_latents_interactive(self, *args, **kwargs):
            latents.append(super().generate_latents_interactive(*args, **kwargs))
            return latents[-1]

    cfg = load_inference_config(CONFIG, [*SMALL, *overrides, f"output_folder={tmp_path / 'out'}"])
    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "InteractiveInferencePipeline", Recording)
    try:
        result = runner.run(cfg, DistInfo())
    finally:
        mp.undo()
    assert not result.failed and len(result.written) == 1 and len(latents) == 1
    return latents[0], result.written[0]


def video_frames(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def test_session_equals_interactive_inference(recorded, tmp_path: Path) -> None:
    """Same seed, prompts and switch frames (the config's switch_frame_indices) => the same
    latents, bit for bit on the CPU."""
    results = recorded.results
    fpb = results[0].latents.shape[1]
    story = tmp_path / "story.jsonl"
    story.write_text(json.dumps({"prompts": PROMPTS}) + "\n")
    switches = ",".join(str(c * fpb) for c in SWITCH_CHUNKS)
    offline, _ = run_offline(tmp_path, [f"data_path={story}", f"switch_frame_indices=[{switches}]",
                                        f"num_output_frames={NUM_CHUNKS * fpb}", f"seed={SEED}"])
    live = torch.cat([r.latents for r in results], dim=1)
    assert offline.shape == live.shape
    assert torch.equal(offline.cpu(), live)


def test_sidecar_replays_the_session(recorded, tmp_path: Path) -> None:
    """The sidecar's jsonl line and overrides make interactive inference regenerate the same
    latents, and its video holds the frames the session returned."""
    results, mp4, sidecar = recorded.results, recorded.mp4, recorded.sidecar
    meta = json.loads(sidecar.read_text())
    assert sidecar.with_suffix(".mp4") == mp4 and meta["video"] == mp4.name
    assert [e["prompt"] for e in meta["timeline"]] == meta["interactive_jsonl"]["prompts"] == PROMPTS
    line = tmp_path / meta["replay"]["data_path"]
    line.write_text(json.dumps(meta["interactive_jsonl"]) + "\n")
    overrides = [o for o in meta["replay"]["overrides"] if not o.startswith("data_path=")]
    offline, video = run_offline(tmp_path, [*overrides, f"data_path={line}"])
    assert torch.equal(offline.cpu(), torch.cat([r.latents for r in results], dim=1))
    shown = np.concatenate([r.frames for r in results])
    assert meta["video_frames"] == len(shown)
    assert np.array_equal(video_frames(mp4), video_frames(video))  # the same encode of the same frames


def test_switch_takes_effect_at_the_next_chunk(recorded) -> None:
    """Each set_prompt between chunks switches at the next chunk; the timeline names the latent
    frame and the first returned video frame of that chunk."""
    results, timeline = recorded.results, recorded.timeline
    expected_prompt, prompts = PROMPTS[0], iter(PROMPTS[1:])
    for r in results:
        switched = r.index in SWITCH_CHUNKS
        if switched:
            expected_prompt = next(prompts)
        assert (r.prompt, r.switched) == (expected_prompt, switched)
    assert [r.pixel_start for r in results] == list(np.cumsum([0] + [len(r.frames) for r in results[:-1]]))
    assert [(e.latent_frame, e.pixel_frame, e.prompt) for e in timeline] == [(0, 0, PROMPTS[0])] + [
        (results[c].latent_start, results[c].pixel_start, p) for c, p in zip(SWITCH_CHUNKS, PROMPTS[1:])]


def test_timeline_memory_and_thumbnails(session: Session) -> None:
    """The timeline's pixel frames are where the returned frames of the switch chunk begin;
    the memory view names generated frames; a thumbnail is the frame the chunk returned."""
    session.start(PROMPTS[0], seed=SEED)
    first = session.next_chunk()
    session.set_prompt(PROMPTS[1])
    second = session.next_chunk()
    assert [(e.latent_frame, e.pixel_frame, e.prompt) for e in session.timeline] == [
        (0, 0, PROMPTS[0]), (second.latent_start, second.pixel_start, PROMPTS[1])]
    assert session.frames_generated == len(first.frames) + len(second.frames)
    view = session.memory()
    generated = set(range(session.latent_frames))
    assert set(view.sink) <= generated and set(view.bank) <= generated and set(view.window) <= generated
    assert view.window == list(range(session.latent_frames - len(view.window), session.latent_frames))
    state = session._video.stream.state
    assert view.bank_layers == [[f for f in fr if f is not None] for fr in bank_of(state).slot_frames]
    frames = np.concatenate([first.frames, second.frames])
    for latent in range(session.latent_frames):
        assert np.array_equal(session.thumbnail(latent), frames[first_video_frame(latent)])
    small = session.thumbnail(0, max_side=16)
    assert max(small.shape[:2]) <= 16 and np.array_equal(small, frames[0][:: 4, :: 4])
    with pytest.raises(ValueError, match="not generated"):
        session.thumbnail(session.latent_frames)


def test_set_prompt_from_another_thread_lands_at_the_following_chunk(session: Session) -> None:
    """set_prompt while a chunk is being generated neither waits for it nor changes it."""
    session.start(PROMPTS[0], seed=SEED)
    inside, release = threading.Event(), threading.Event()
    denoise = session.stepper.denoise

    def blocking_denoise(*args, **kwargs):
        inside.set()
        assert release.wait(120)
        return denoise(*args, **kwargs)

    result = {}
    session.stepper.denoise = blocking_denoise
    try:
        worker = threading.Thread(target=lambda: result.setdefault("r", session.next_chunk()))
        worker.start()
        assert inside.wait(120)
        session.set_prompt(PROMPTS[1])  # returns although the chunk holds the session
        assert session.pending_prompt == PROMPTS[1]
        release.set()
        worker.join()
    finally:
        release.set()
        session.stepper.denoise = denoise
    assert (result["r"].prompt, result["r"].switched) == (PROMPTS[0], False)
    after = session.next_chunk()
    assert (after.prompt, after.switched, after.index) == (PROMPTS[1], True, 1)
    assert session.timeline[-1].latent_frame == after.latent_start


def test_prompt_before_the_first_chunk_replaces_the_start(session: Session) -> None:
    session.start(PROMPTS[0], seed=SEED)
    session.set_prompt(PROMPTS[1])
    r = session.next_chunk()
    assert (r.prompt, r.switched) == (PROMPTS[1], False)
    assert [e.prompt for e in session.timeline] == [PROMPTS[1]]
    session.set_prompt(PROMPTS[1])  # the prompt in effect: no switch
    assert not session.next_chunk().switched


def test_stops_at_the_rope_limit(threads, tmp_path: Path) -> None:
    """With a 7-frame RoPE table two 3-frame chunks fit; the third stops with the limit named,
    the stream stays usable for saving, and a new start runs again."""
    s = Session.from_config(CONFIG, [*SMALL, "tiny.rope_max_frames=7"])
    s.start(PROMPTS[0])
    s.next_chunk(), s.next_chunk()
    frames = s.frames_generated
    for _ in range(2):
        with pytest.raises(SessionLimitReached, match=r"rope_max_frames=7.*6 latent frames"):
            s.next_chunk()
    assert s.frames_generated == frames and s.max_latent_frames == 6
    mp4, _ = s.save_mp4(tmp_path / "limit.mp4")
    assert len(video_frames(mp4)) == frames
    s.start(PROMPTS[1])
    assert s.next_chunk().index == 0


@pytest.mark.parametrize("bad,message", [("", "empty"), ("   \n", "empty"), (3, "must be a string"),
                                         (None, "must be a string"), (b"a cat", "must be a string")])
def test_bad_prompts_are_rejected(session: Session, bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        session.start(bad)
    session.start(PROMPTS[0])
    with pytest.raises(ValueError, match=message):
        session.set_prompt(bad)
    assert session.pending_prompt is None


def test_bad_calls_are_rejected(session: Session, tmp_path: Path) -> None:
    session.reset()
    with pytest.raises(RuntimeError, match="not started"):
        session.next_chunk()
    with pytest.raises(RuntimeError, match="not started"):
        session.set_prompt("a dog")
    with pytest.raises(ValueError, match="seed must be an integer"):
        session.start("a dog", seed="3")
    with pytest.raises(ValueError, match=r"seed must be in \[0, "):
        session.start("a dog", seed=-1)
    session.start("a dog")
    with pytest.raises(ValueError, match="nothing generated"):
        session.save_mp4(tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match=r"\.mp4"):
        session.save_mp4(tmp_path / "clip.avi")
    assert not any(tmp_path.iterdir())


def test_a_global_attention_window_is_refused(threads) -> None:
    with pytest.raises(InputError, match="finite attention window"):
        Session.from_config(CONFIG, [*SMALL, "model_kwargs.local_attn_size=-1"])


# ---------------------------------------------------------------- replay lines (utils/prompts.py)


def jobs_of(tmp_path: Path, lines: list[str], *overrides: str):
    story = tmp_path / "stories.jsonl"
    story.write_text("\n".join(lines) + "\n")
    cfg = load_inference_config(CONFIG, [f"data_path={story}", *overrides])
    settings = parse_settings(cfg, interactive=True)
    return story, lambda: runner.load_jobs(cfg, True, settings)


def test_a_line_may_carry_its_own_switch_frames(tmp_path: Path) -> None:
    """A saved session's line switches where it says; other lines use the config's frames
    (tiny_interactive: 6, 12 of 18 latent frames) and may have another number of prompts."""
    _, load = jobs_of(tmp_path, [json.dumps({"prompts": ["a", "b"], "switch_frame_indices": [4]}),
                                 json.dumps({"prompts": ["a", "b", "c"]}),
                                 json.dumps({"prompts": ["a"], "switch_frame_indices": []})])
    assert [job.switch_chunks for job in load()] == [(2,), (2, 4), ()]


@pytest.mark.parametrize("value,message", [
    ('"x"', "is not an integer"), ("3", "must be an array of integers"),
    ("[20]", "out of range"), ("[3, 6]", "need 1 switch"),
])
def test_bad_line_switch_frames_name_the_line(tmp_path: Path, value: str, message: str) -> None:
    good = json.dumps({"prompts": ["a", "b", "c"]})
    story, load = jobs_of(tmp_path, [good, '{"prompts": ["a", "b"], "switch_frame_indices": %s}' % value])
    with pytest.raises(InputError, match=message) as info:
        load()
    assert str(info.value).startswith(f"{story}:2: ")


def test_each_noise_order_has_only_its_own_initial_draw() -> None:
    """A per-chunk source cannot be read up front (nor the reverse): that would silently give
    another video than its order promises. Recorded noise can be sliced per chunk."""
    from memflow.noise import InjectedNoise, SeededNoise

    shape = (1, 3, 4, 2, 2)
    with pytest.raises(RuntimeError, match="upfront"):
        SeededNoise(0, order="per_chunk").initial(shape)
    with pytest.raises(RuntimeError, match="per_chunk"):
        SeededNoise(0).chunk_initial(0, shape)
    with pytest.raises(ValueError, match="noise order"):
        SeededNoise(0, order="sideways")
    recorded = torch.randn(1, 6, 4, 2, 2)
    injected = InjectedNoise(recorded, torch.zeros(2, 1, 3, 4, 2, 2))
    assert torch.equal(torch.cat([injected.chunk_initial(n, shape) for n in range(2)], 1), recorded)
    with pytest.raises(ValueError, match="no frames 6..8"):
        injected.chunk_initial(2, shape)


def test_saving_does_not_hold_up_generation(session: Session, tmp_path: Path, monkeypatch) -> None:
    """`save_mp4` encodes outside the generation lock: while a save is stuck in the encoder the
    next chunk is generated and a reset goes through, and the saved video and sidecar hold the
    frames of the chunk boundary at which the save was asked."""
    from utils.video_writer import Mp4Writer

    session.start(PROMPTS[0], seed=SEED)
    first = session.next_chunk()
    in_encoder, release = threading.Event(), threading.Event()
    write = Mp4Writer.write

    def stuck(self, frames):
        in_encoder.set()
        release.wait()
        return write(self, frames)

    monkeypatch.setattr(Mp4Writer, "write", stuck)
    saved: list = []
    saver = threading.Thread(target=lambda: saved.append(session.save_mp4(tmp_path / "early.mp4")))
    saver.start()
    assert in_encoder.wait(timeout=600)
    generated = threading.Event()
    worker = threading.Thread(target=lambda: (session.next_chunk(), session.reset(), generated.set()))
    worker.start()
    # a save that held the lock would block the chunk until the encoder is let go
    unblocked = generated.wait(timeout=300)
    release.set()
    saver.join()
    worker.join()
    assert unblocked, "next_chunk and reset waited for the save"
    mp4, sidecar = saved[0]
    assert len(video_frames(mp4)) == len(first.frames)
    assert json.loads(sidecar.read_text())["video_frames"] == len(first.frames)


def test_a_hook_of_the_inference_stepper_reaches_offline_and_live_alike(threads, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A per-chunk hook added in the one place inference makes its steppers
    (`pipeline.causal_inference.inference_stepper`) sees the same chunks, prompts switched
    included, in a live session and in interactive_inference.sh."""
    import pipeline.causal_inference as causal

    seen: list[tuple] = []  # ("before", chunk, prompts so far) or ("x0", chunk, x0)

    def stepper_with_hook(*args):
        stepper = ChunkStepper(*args)
        stepper.hooks.append(ChunkHooks(
            before_chunk=lambda n, stream: seen.append(("before", n, len(stream.timeline))),
            on_chunk=lambda n, x0: seen.append(("x0", n, x0.detach().cpu().clone()))))
        return stepper

    monkeypatch.setattr(causal, "ChunkStepper", stepper_with_hook)
    session = Session.from_config(CONFIG, SMALL)
    session.start(PROMPTS[0], seed=SEED)
    for chunk in range(3):
        if chunk == 2:
            session.set_prompt(PROMPTS[1])
        session.next_chunk()
    live, seen[:] = list(seen), []
    fpb = session.frames_per_chunk
    story = tmp_path / "story.jsonl"
    story.write_text(json.dumps({"prompts": PROMPTS[:2]}) + "\n")
    run_offline(tmp_path, [f"data_path={story}", f"switch_frame_indices=[{2 * fpb}]",
                           f"num_output_frames={3 * fpb}", f"seed={SEED}"])
    assert [e[:2] for e in live] == [e[:2] for e in seen] == [
        (kind, n) for n in range(3) for kind in ("before", "x0")]
    for mine, theirs in zip(live, seen):
        assert mine[2] == theirs[2] if mine[0] == "before" else torch.equal(mine[2], theirs[2])


def test_a_relative_session_runs_past_the_rope_table_and_replays_offline(threads, tmp_path: Path,
                                                                         ) -> None:
    """positions: relative with a 6-frame RoPE table: a session goes on past it (a switch
    included) and its sidecar's replay through interactive inference gives the same latents."""
    overrides = [*SMALL, "tiny.rope_max_frames=6", "positions=relative"]
    s = Session.from_config(CONFIG, overrides)
    assert s.max_latent_frames is None
    s.start(PROMPTS[0], seed=SEED)
    results = []
    for n in range(6):  # 18 latent frames: three tables
        if n == 3:
            s.set_prompt(PROMPTS[1])
        results.append(s.next_chunk())
    _, sidecar = s.save_mp4(tmp_path / "long.mp4")
    meta = json.loads(sidecar.read_text())
    assert "positions=relative" in meta["replay"]["overrides"]
    line = tmp_path / meta["replay"]["data_path"]
    line.write_text(json.dumps(meta["interactive_jsonl"]) + "\n")
    replay = [o for o in meta["replay"]["overrides"] if not o.startswith("data_path=")]
    offline, _ = run_offline(tmp_path, [*replay, f"data_path={line}"])
    assert torch.equal(offline.cpu(), torch.cat([r.latents for r in results], dim=1))
