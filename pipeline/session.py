"""Live interactive generation: one open-ended streaming video, steered while it runs.

A `Session` holds the models of an inference config, one stream (KV cache, memory bank, noise,
streaming VAE decoder) and the prompt in effect. The caller asks for one chunk at a time
(`next_chunk`) and may change the prompt at any time, from any thread (`set_prompt`); the new
prompt takes effect at the next chunk boundary through the same switch (`switch_prompt`:
text cache dropped, the attention window re-encoded with the new prompt) as
`interactive_inference.sh`. So a session is the offline interactive pipeline whose switch
frames are decided while it runs:

    s = Session.from_config("configs/tiny_interactive.yaml")
    s.start("a cat on a chair", seed=3)
    r = s.next_chunk()          # r.frames: uint8 [T, H, W, 3]
    s.set_prompt("the cat jumps down")
    r = s.next_chunk()          # r.switched: the switch happened at r.latent_start
    s.save_mp4("videos/live/clip.mp4")   # + clip.json: timeline and the replayable jsonl line

Same seed, prompts and switch frames give the same latents as `interactive_inference.sh`
(`behaviour: clean`): both draw each chunk's initial noise when the chunk starts
(memflow/noise.py, ``per_chunk``). A session has no length set in advance, so

* the KV cache must have a finite window (`model_kwargs.local_attn_size` > 0): a global cache
  (-1) is sized by the video length, which a session does not have (sizing it to the RoPE limit
  would hold K/V of every frame up to 1024, hundreds of GB at 480x832);
* with `positions: absolute` it stops at the RoPE position limit, `rope_max_frames` latent
  frames (1024 for Wan2.1: about 4.3 minutes at 16 fps), with `SessionLimitReached`, instead of
  wrapping positions around; with `positions: relative` it has no end.

Memory stays bounded: the stream keeps the window's latents on the device and the decoded
frames in a temporary file on disk (what `save_mp4` writes and `thumbnail` reads).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shlex
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from config.inference import InferenceSettings, load_inference_config
from config.schema import SEED_RANGE, InferenceConfig
from memflow.errors import InputError
from memflow.files import atomic_write, atomic_write_text
from memflow.noise import SeededNoise
from memflow.prompt_blend import Transition, prompt_weights
from memflow.stream import Stream
from memflow.streaming import StreamState
from memflow.vae import VAE_STRIDE, latent_frames_within, video_frames
from utils.distributed import rank_seed
from utils.media import Source
from utils.prompts import Segment, prompt_problem, segment_label
from utils.video_writer import Mp4Writer, to_uint8_frames

from .build import Components, load_components, prepare_inference
from .causal_inference import inference_stepper
from .runner import NonFiniteVideo, encode_segment
from .start import Start, encode_start

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "memflow-session/1"


class SessionLimitReached(RuntimeError):
    """The next chunk would pass the RoPE position table (`rope_max_frames`): the session ends."""


@dataclass(frozen=True)
class ChunkResult:
    """One generated chunk, decoded. `latents` [1, F, C, h, w] on the CPU, for comparisons."""

    index: int  # chunk number in the session, from 0
    latent_start: int  # first latent frame of the chunk, counted from the first generated one
    pixel_start: int  # first video frame of the chunk
    frames: np.ndarray  # uint8 [T, H, W, 3]
    prompt: str  # the prompt the chunk was generated under
    switched: bool  # a prompt switch took effect at this chunk
    request: Any  # the `request` of the `set_prompt` that took effect at this chunk (or None)
    generate_s: float  # switch (encode + recache), denoise and commit
    decode_s: float  # streaming VAE decode to uint8
    latents: torch.Tensor


@dataclass(frozen=True)
class TimelineEntry:
    """From generated latent frame `latent_frame` (video frame `pixel_frame`; a start image or
    the continued video's context frames come first in the video) on, the video follows
    `prompt` (its text: a weighted prompt as "text:weight | ..."; `segment`: the prompt as a
    prompt file holds it), reached over `transition_chunks` chunks by `blend` (0: at once)."""

    latent_frame: int
    pixel_frame: int
    prompt: str
    transition_chunks: int = 0
    blend: str = "linear"
    segment: Segment | None = None


@dataclass(frozen=True)
class MemoryView:
    """Which latent frames the stream's memory holds after the last chunk.

    `sink`: the frame sink; `window`: the recent frames in the KV cache; `bank`: every frame some
    layer's memory bank holds (NAM retrieval picks per layer, so layers may differ), and
    `bank_layers` each layer's slots in slot order."""

    sink: list[int]
    bank: list[int]
    window: list[int]
    bank_layers: list[list[int]]


def check_prompt(text: object) -> str:
    """A prompt must be a non-empty string; anything else is the caller's bug or bad input."""
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("prompt is empty")
    problem = prompt_problem(text)
    if problem is not None:
        raise ValueError(f"the prompt {problem}")
    return text


def check_seed(seed: object) -> int:
    """A seed a torch generator takes (the config's range)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {type(seed).__name__}")
    low, high = SEED_RANGE["minimum"], SEED_RANGE["maximum"]
    if not low <= seed <= high:
        raise ValueError(f"seed must be in [{low}, {high}] (what a torch generator takes), got {seed}")
    return seed


def check_segment(prompt: object) -> Segment:
    """A prompt, or a weighted prompt: a non-empty sequence of (text, weight) pairs with finite
    weights >= 0, not all 0."""
    if isinstance(prompt, str):
        return check_prompt(prompt)
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("a prompt must be a string or a list of (text, weight) pairs")
    if any(not isinstance(pair, (list, tuple)) or len(pair) != 2 for pair in prompt):
        raise ValueError(f"a weighted prompt's parts are (text, weight) pairs, got {prompt!r:.80}")
    texts = [check_prompt(text) for text, _ in prompt]
    return tuple(zip(texts, prompt_weights([weight for _, weight in prompt])))


class FrameSpool:
    """The decoded frames of one stream, appended to an anonymous temporary file.

    A session may run for minutes: 4093 frames at 480x832 are 4.9 GB, too much to keep in
    memory, and a video encoded on the fly could not be cut at an arbitrary `save_mp4`. Reads
    and writes use explicit offsets (pread/pwrite), so a reader thread never moves a shared
    file position."""

    def __init__(self, height: int, width: int):
        self.shape = (height, width, 3)
        self.frame_bytes = height * width * 3
        self.count = 0
        self._file = tempfile.TemporaryFile(prefix="memflow_session_")

    def append(self, frames: np.ndarray) -> None:
        if frames.dtype != np.uint8 or frames.shape[1:] != self.shape:
            raise ValueError(f"expected uint8 [T, {self.shape}] frames, got {frames.dtype} {frames.shape}")
        data = np.ascontiguousarray(frames).tobytes()
        written = os.pwrite(self._file.fileno(), data, self.count * self.frame_bytes)
        if written != len(data):
            raise OSError(f"short write to the frame spool ({written} of {len(data)} bytes)")
        self.count += frames.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) as uint8 [T, H, W, 3]."""
        return _read_frames(self._file.fileno(), self.shape, self.count, start, stop)

    def snapshot(self) -> SpoolSnapshot:
        """The frames stored now, on a handle of their own: a save encodes them while the
        stream appends more, and a reset that closes the spool leaves the snapshot readable
        (the anonymous file lives while any handle is open)."""
        return SpoolSnapshot(os.dup(self._file.fileno()), self.shape, self.count)

    def close(self) -> None:
        self._file.close()


def _read_frames(fd: int, shape: tuple[int, int, int], count: int, start: int, stop: int) -> np.ndarray:
    if not 0 <= start <= stop <= count:
        raise ValueError(f"frames {start}..{stop} outside the {count} stored")
    out = np.empty((stop - start, *shape), dtype=np.uint8)
    read = os.preadv(fd, [memoryview(out).cast("B")], start * math.prod(shape))
    if read != out.nbytes:
        raise OSError(f"short read from the frame spool ({read} of {out.nbytes} bytes)")
    return out


class SpoolSnapshot:
    """The first `count` frames of a `FrameSpool`, read through a duplicated file handle;
    a context manager that closes the handle."""

    def __init__(self, fd: int, shape: tuple[int, int, int], count: int):
        self._fd, self.shape, self.count = fd, shape, count

    def blocks(self, block: int = 64) -> Iterator[np.ndarray]:
        """All its frames in blocks, for writing a video without loading it whole."""
        for start in range(0, self.count, block):
            yield _read_frames(self._fd, self.shape, self.count, start, min(self.count, start + block))

    def __enter__(self) -> SpoolSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


class PendingSave:
    """A video and its sidecar taken at a chunk boundary, to be encoded by `write` (once)."""

    def __init__(self, path: Path, sidecar: dict, frames: SpoolSnapshot, fps: float,
                 lock: threading.Lock, start_file: tuple[Path, bytes] | None = None):
        self.path, self.sidecar, self.fps = path, sidecar, fps
        self._frames, self._lock = frames, lock
        self._start_file = start_file  # the start image or video, for the replay line
        self.video_frames = frames.count

    def write(self) -> tuple[Path, Path]:
        """Encode the MP4 and write the JSON (temporary names, then rename); saves of one
        session run one at a time."""
        json_path = self.path.with_suffix(".json")
        with self._lock:
            with self._frames, Mp4Writer(self.path, fps=self.fps) as writer:  # makes the folder
                for block in self._frames.blocks():
                    writer.write(block)
            try:
                if self._start_file is not None:
                    start_path, data = self._start_file
                    atomic_write(start_path, lambda tmp: tmp.write_bytes(data))
                atomic_write_text(json_path, json.dumps(self.sidecar, indent=2, ensure_ascii=False) + "\n")
            except BaseException:
                self.path.unlink(missing_ok=True)  # a video without its timeline is half a save
                raise
        return self.path, json_path


class _Video:
    """Everything one session video carries between chunks besides the stream itself (its
    decoder, frames on disk, seed, memory readout); `reset` drops it whole."""

    def __init__(self, session: "Session", prompt: Segment, context: torch.Tensor, seed: int,
                 start: Start | None = None):
        s = session
        self.seed = seed
        window = s.settings.stream.local_attn_size  # a session's cache is its window
        state = s.stepper.new_state(1, s.settings.latent_hw, window,
                                    track_frames=True)
        gen = s.stepper.generator
        noise = SeededNoise(seed, dtype=gen.dtype, device=gen.device, order="per_chunk")
        self.start = start
        prefix = None
        if start is not None:
            encoded = encode_start(start, s.components.vae, s.height, s.width, window,
                                   s.frames_per_chunk)
            prefix = encoded.latents.to(gen.device, gen.dtype)
            # the fitted image's own pixels (x = u / 255 exactly: rounding gives u back)
            self.start_image = (encoded.source_frames[0, 0].permute(1, 2, 0) * 255).round() \
                .to(torch.uint8) if start.kind == "image" else None
        self.stream = Stream(s.stepper, context, noise, latent_hw=s.settings.latent_hw,
                             state=state, label=prompt, switch=s.settings.switch, prefix=prefix)
        self.decoder = s.components.vae.stream()
        self.spool = FrameSpool(s.height, s.width)
        if prefix is not None:  # the start opens the live video: the image, or the context
            # frames of the continued video (decoded), so latent frame f is always video frame
            # video_frames(f); it also primes the decoder for chunk 0
            self.spool.append(to_uint8_frames(self.decoder.decode(prefix)[0]).cpu().contiguous()
                              .numpy())
        self.memory = MemoryView([], [], [], [])
        self.broken: str | None = None  # why no further chunk can be generated

    @property
    def chunk(self) -> int:
        return self.stream.chunk

    @property
    def prompt(self) -> str:
        return segment_label(self.stream.label)

    @property
    def timeline(self) -> list[TimelineEntry]:
        prefix = self.stream.state.prefix_frames
        return [TimelineEntry(c.latent_frame, video_frames(prefix + c.latent_frame),
                              segment_label(c.label), c.transition.chunks, c.transition.blend,
                              c.label)
                for c in self.stream.timeline]


class Session:
    """One device's live generation: models, one video, the prompt in effect.

    Threads: `next_chunk`, `start` and `reset` run one at a time (one lock); `save_mp4` takes
    that lock only to snapshot the frames and the timeline (`prepare_save`), then encodes while
    generation goes on; `set_prompt` only records the wish under a second lock, so it never waits for a chunk, and
    `timeline`, `memory`, `thumbnail` and the counters read a snapshot taken at the last chunk
    boundary.
    """

    def __init__(
        self,
        components: Components,
        settings: InferenceSettings,
        *,
        seed: int = 0,
        fps: float = 16.0,
        config_path: str | None = None,
        overrides: Sequence[str] = (),
    ):
        window = settings.stream.local_attn_size
        if window == -1:
            raise InputError(
                "a live session needs a finite attention window: model_kwargs.local_attn_size "
                "is -1 (global attention), whose KV cache is sized by the video length, and a "
                "session has none; set local_attn_size (the released configs use 12)"
            )
        self.components = components
        self.settings = settings
        self.stepper = inference_stepper(components.generator, settings.stream, settings.sampling)
        self.default_seed = int(seed)
        self._fps = float(fps)
        self.config_path, self.overrides = config_path, list(overrides)
        self._run_lock = threading.Lock()  # generation: one chunk / start / reset at a time
        self._save_lock = threading.Lock()  # one save at a time (it encodes outside _run_lock)
        self._view_lock = threading.Lock()  # the snapshot other threads read
        self._video: _Video | None = None
        # the memory view after each chunk (`memory()`): a readout the page may switch off
        self.memory_view_enabled = True
        if settings.compat:
            log.warning("behaviour: compat draws a video's initial noise up front; a session draws "
                        "it per chunk, so interactive_inference.sh replays its timeline with other "
                        "noise (use behaviour: clean to replay a session exactly)")

    @classmethod
    def from_config(cls, config_path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> "Session":
        """Build the models of an inference config (the same keys and checks as inference.py:
        `preset: tiny` on a CPU or the Wan2.1 + MemFlow checkpoints on a GPU). The file and
        overrides are kept for the replay command of `save_mp4`'s sidecar."""
        overrides = list(overrides)
        return cls.from_settings(load_inference_config(config_path, overrides),
                                 config_path=str(config_path), overrides=overrides)

    @classmethod
    def from_settings(
        cls, c: InferenceConfig, *, config_path: str | None = None, overrides: Sequence[str] = ()
    ) -> "Session":
        """Build the models of typed inference settings with the setup of `pipeline.runner.run`
        (`pipeline.build.prepare_inference`, `load_components`); `config_path` and `overrides`
        only name where they came from."""
        setup = prepare_inference(c, interactive=True)
        seed = int(c.seed)
        parts = load_components(c, setup, rank_seed(seed, 0, c.seed_mode))
        return cls(parts, setup.settings, seed=seed, fps=float(c.fps),
                   config_path=config_path, overrides=overrides)

    # -- geometry and counters -------------------------------------------------------------------
    @property
    def fps(self) -> float:
        return self._fps

    @property
    def height(self) -> int:
        return self.settings.latent_hw[0] * VAE_STRIDE[1]

    @property
    def width(self) -> int:
        return self.settings.latent_hw[1] * VAE_STRIDE[2]

    @property
    def frames_per_chunk(self) -> int:
        return self.stepper.frames_per_block

    @property
    def positions(self) -> str:
        """The stream's position policy (`positions`: absolute or relative)."""
        return self.settings.stream.positions

    @property
    def max_latent_frames(self) -> int | None:
        """The most latent frames a session can generate: with `positions: absolute`, whole
        chunks within the RoPE table (`rope_max_frames`); None with `positions: relative`, which
        has no end."""
        if self.settings.stream.positions == "relative":
            return None
        limit = self.stepper.generator.config.rope_max_frames
        return limit // self.frames_per_chunk * self.frames_per_chunk

    @property
    def started(self) -> bool:
        return self._video is not None

    @property
    def chunks(self) -> int:
        """Chunks generated so far in this video."""
        video = self._video
        return 0 if video is None else video.chunk

    @property
    def latent_frames(self) -> int:
        """Latent frames generated so far in this video."""
        video = self._video
        return 0 if video is None else video.chunk * self.frames_per_chunk

    @property
    def frames_generated(self) -> int:
        """Video (pixel) frames generated so far in this video."""
        video = self._video
        return 0 if video is None else video.spool.count

    @property
    def prompt(self) -> str | None:
        """The prompt of the last chunk (or the starting prompt before the first chunk)."""
        video = self._video
        return None if video is None else video.prompt

    @property
    def pending_prompt(self) -> str | None:
        """A prompt set with `set_prompt` that takes effect at the next chunk."""
        video = self._video
        label = None if video is None else video.stream.pending_label
        return None if label is None else segment_label(label)

    @property
    def seed(self) -> int | None:
        video = self._video
        return None if video is None else video.seed

    # -- control ----------------------------------------------------------------------------------
    def start(self, prompt: str | Sequence[tuple[str, float]], seed: int | None = None, *,
              image: Source | None = None, video: Source | None = None) -> None:
        """Begin a fresh video under `prompt` (a text, or a weighted prompt: (text, weight)
        pairs; the previous video is dropped); `seed` defaults to the config's `seed`. `image`
        (a path or the file's bytes) is the video's first frame; `video` (likewise) is continued
        from its last frames (pipeline/start.py). The first chunk comes from `next_chunk`."""
        prompt = check_segment(prompt)
        if image is not None and video is not None:
            raise ValueError("start from an image or a video, not both")
        start = Start("image", image) if image is not None else \
            Start("video", video) if video is not None else None
        if seed is None:
            seed = self.default_seed
        seed = check_seed(seed)
        with self._run_lock:
            self._drop_stream()
            video = _Video(self, prompt, self._encode(prompt), seed, start)
            with self._view_lock:
                self._video = video

    def set_prompt(self, text: str | Sequence[tuple[str, float]], request: Any = None,
                   transition_chunks: int = 0, blend: str = "linear") -> None:
        """Ask for `text` (or a weighted prompt: (text, weight) pairs) from the next chunk
        boundary on (any thread, never blocks on a chunk): at once, with the switch's recache,
        or moving the conditioning there over `transition_chunks` chunks by `blend` ("linear" or
        "slerp"; memflow/stream.py). Several calls before a boundary: the last one wins (one
        switch per chunk). Asking for the prompt already in effect cancels a pending switch.
        `request` (e.g. when the ask arrived) comes back on the `ChunkResult` of the chunk it
        takes effect at."""
        segment = check_segment(text)
        transition = Transition(transition_chunks, blend)  # ValueError for bad values
        video = self._video
        if video is None:
            raise RuntimeError("the session is not started; call start(prompt) first")
        # encoded at the boundary, on the generation thread
        video.stream.set_prompt(lambda: self._encode(segment), segment, request, transition)

    def set_steps(self, steps: Sequence[int] | None) -> None:
        """Denoise with these steps of the config's `denoising_step_list` (values, in the list's
        order, at least one; None: all) from the next chunk on. Fewer steps: faster chunks."""
        listed = list(self.settings.sampling.denoising_step_list)
        if steps is not None:
            if isinstance(steps, (str, bytes)) or any(
                    isinstance(v, bool) or v not in listed for v in steps):
                raise ValueError(f"steps must be values of the denoising_step_list {listed}, "
                                 f"got {steps!r}")
            steps = [listed.index(v) for v in steps]
        self._require_video().stream.set_steps(steps)  # ValueError: not increasing, or none

    @property
    def steps(self) -> list[int] | None:
        """The denoising steps (values) of the last chunk; None before a video."""
        video = self._video
        if video is None:
            return None
        listed = list(self.settings.sampling.denoising_step_list)
        return [listed[i] for i in self.stepper.step_indices(video.stream.steps)]

    def set_seed(self, seed: int) -> None:
        """Draw the next chunk's noise, and what follows, from `seed`."""
        self._require_video().stream.reseed(check_seed(seed))

    def reset(self) -> None:
        """Drop the video (cache, bank, frames, timeline); the models stay. `start` again."""
        with self._run_lock:
            self._drop_stream()

    def _drop_stream(self) -> None:
        with self._view_lock:
            video, self._video = self._video, None
        if video is not None:
            video.spool.close()

    def _encode(self, prompt: Segment) -> torch.Tensor:
        gen = self.stepper.generator
        return encode_segment(self.components.text_encoder, prompt).to(gen.device, gen.dtype)

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def next_chunk(self) -> ChunkResult:
        """Generate, commit and decode the next chunk (switching prompts first when one is
        pending). The chunk is the chunk loop's `ChunkStepper.step`, the function an offline
        rollout runs for each chunk. Raises `SessionLimitReached` at the RoPE position limit."""
        with self._run_lock:
            video = self._require_video()
            n = video.chunk
            start = n * self.frames_per_chunk
            self._check_limit(video.stream.state.prefix_frames + start)
            began = time.perf_counter()
            x0 = video.stream.next_chunk()  # a pending prompt switches first
            self._sync()
            decoded = time.perf_counter()
            frames = self._decode(video, n, x0)
            done = time.perf_counter()
            pixel_start = video.spool.count
            with self._view_lock:
                video.spool.append(frames)
                if self.memory_view_enabled:  # a readout: the bank's choices come to the host
                    video.memory = memory_view(video.stream.state)
            change = video.stream.last_change
            return ChunkResult(n, start, pixel_start, frames, video.prompt, video.stream.switched,
                               None if change is None else change.request,
                               decoded - began, done - decoded, x0.detach().cpu())

    def _require_video(self) -> _Video:
        video = self._video
        if video is None:
            raise RuntimeError("the session is not started; call start(prompt) first")
        if video.broken is not None:
            raise RuntimeError(f"{video.broken}; reset or start the session again")
        return video

    def _check_limit(self, start: int) -> None:
        end = start + self.frames_per_chunk
        limit = self.max_latent_frames
        if limit is not None and end > limit:
            raise SessionLimitReached(
                f"the next chunk would need latent frames {start}..{end - 1}, past the RoPE "
                f"position limit rope_max_frames={self.stepper.generator.config.rope_max_frames} "
                f"of positions: absolute; the session generated {start} latent frames "
                f"({self.frames_generated} video frames). Save it and start a new one (or run "
                "with positions: relative, which has no such limit)"
            )

    def _decode(self, video: _Video, chunk: int, x0: torch.Tensor) -> np.ndarray:
        """Streaming VAE decode of one chunk to uint8 [T, H, W, 3], as the offline runner
        decodes (and writes) each chunk; a NaN/inf chunk ends the video."""
        frames = video.decoder.decode(x0[:1])[0]
        finite = bool(torch.isfinite(x0).all() & torch.isfinite(frames).all())
        if not finite:
            video.broken = f"chunk {chunk} (latent frames from {chunk * self.frames_per_chunk}) came out NaN/inf"
            raise NonFiniteVideo(video.broken)
        return to_uint8_frames(frames).cpu().contiguous().numpy()

    def _sync(self) -> None:
        """Wait for the device, so that generate_s and decode_s time their own work."""
        device = self.stepper.generator.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # -- views ------------------------------------------------------------------------------------
    @property
    def timeline(self) -> list[TimelineEntry]:
        """The prompts in effect from each latent frame on (the start, then each switch)."""
        with self._view_lock:
            return [] if self._video is None else list(self._video.timeline)

    def memory(self) -> MemoryView:
        """Sink, window and bank frames after the last chunk (empty before the first)."""
        with self._view_lock:
            return MemoryView([], [], [], []) if self._video is None else self._video.memory

    def start_frames(self) -> np.ndarray:
        """The frames the video opens with before chunk 0: a start image's, a continued clip's
        context (decoded); none ([0, H, W, 3]) for a prompt-only start."""
        with self._view_lock:
            video = self._video
            if video is None:
                raise RuntimeError("the session is not started; call start(prompt) first")
            opening = video_frames(video.stream.state.prefix_frames)
            return video.spool.read(0, min(opening, video.spool.count))

    def thumbnail(self, latent_frame: int, max_side: int | None = None) -> np.ndarray:
        """The first video frame decoded from `latent_frame`, uint8 [H, W, 3]; with `max_side`
        subsampled by a whole stride so that neither side exceeds it (for memory readouts)."""
        if isinstance(latent_frame, bool) or not isinstance(latent_frame, int):
            raise ValueError(f"latent_frame must be an integer, got {type(latent_frame).__name__}")
        with self._view_lock:
            video = self._video
            stored = 0 if video is None else video.spool.count  # the frames decoded so far
            if not (0 <= latent_frame and video_frames(latent_frame) < stored):
                generated = latent_frames_within(stored)
                raise ValueError(f"latent frame {latent_frame} is not generated (0..{generated - 1})")
            frame = video.spool.read(video_frames(latent_frame), video_frames(latent_frame) + 1)[0]
        if max_side is not None:
            stride = max(1, math.ceil(max(frame.shape[:2]) / max_side))
            frame = np.ascontiguousarray(frame[::stride, ::stride])
        return frame

    # -- saving -----------------------------------------------------------------------------------
    def save_mp4(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write the video so far to `path` (.mp4) and its timeline to the same stem .json.

        Both appear only complete (temporary names, then rename). The JSON holds the prompt
        timeline and the `interactive_jsonl` line (prompts + switch_frame_indices) with the
        overrides under which `interactive_inference.sh` regenerates the same latents.
        `prepare_save(path).write()`, in two steps for a caller that encodes on another thread."""
        return self.prepare_save(path).write()

    def prepare_save(self, path: str | os.PathLike[str]) -> PendingSave:
        """Take the video and its sidecar as of this chunk boundary (quick: the frames are a
        snapshot of the spool, not a copy); the returned `PendingSave.write()` encodes them,
        from any thread, while generation goes on."""
        path = Path(path)
        if path.suffix.lower() != ".mp4":
            raise ValueError(f"save_mp4 writes an .mp4 file, got {path}")
        with self._run_lock:
            video = self._video
            if video is None or video.chunk == 0:
                raise ValueError("nothing generated yet: start the session and generate a chunk first")
            start_file = self._start_file(video, path)
            sidecar = self._sidecar(video, path.name, start_file and start_file[0].name)
            return PendingSave(path, sidecar, video.spool.snapshot(), self.fps, self._save_lock,
                               start_file)

    @staticmethod
    def _start_file(video: _Video, path: Path) -> tuple[Path, bytes] | None:
        """The start image (as the fitted frame, a PNG: reading it again gives the same pixels)
        or video (its bytes) to save next to the clip, for the replay line."""
        start = video.start
        if start is None:
            return None
        if start.kind == "image":
            buffer = io.BytesIO()
            Image.fromarray(video.start_image.numpy()).save(buffer, format="PNG")
            return path.with_suffix(".start.png"), buffer.getvalue()
        data = start.source if isinstance(start.source, bytes) else Path(start.source).read_bytes()
        return path.with_suffix(".start.mp4"), data

    def _sidecar(self, video: _Video, video_name: str, start_name: str | None = None) -> dict:
        """The JSON written next to a saved video: timeline, replay line and settings."""
        latents = video.chunk * self.frames_per_chunk
        timeline = [{**{k: v for k, v in asdict(e).items() if k != "segment"},
                     "time_s": e.pixel_frame / self.fps} for e in video.timeline]
        line: dict[str, Any] = {
            "prompts": [e.segment if isinstance(e.segment, str) else [list(p) for p in e.segment]
                        for e in video.timeline],
            "switch_frame_indices": [e.latent_frame for e in video.timeline[1:]]}
        switches = video.timeline[1:]
        if any(e.transition_chunks for e in switches):
            line["transition_chunks"] = [e.transition_chunks for e in switches]
            line["blend"] = [e.blend for e in switches]
        if start_name is not None:
            line[video.start.kind] = start_name
        listed = list(self.settings.sampling.denoising_step_list)
        controls = [c for c in video.stream.controls if c.chunk < video.chunk]
        if any(c.steps is not None for c in controls):
            line["chunk_steps"] = [[c.chunk, [listed[i] for i in c.steps]] for c in controls
                                   if c.steps is not None]
        if any(c.seed is not None for c in controls):
            line["chunk_seeds"] = [[c.chunk, c.seed] for c in controls if c.seed is not None]
        data_path = Path(video_name).with_suffix(".jsonl").name
        replay = [*self.overrides, "mode=interactive", f"data_path={data_path}",
                  f"num_output_frames={latents}", f"seed={video.seed}"]
        command = ["bash", "interactive_inference.sh"]
        if self.config_path is not None:
            command += ["--config_path", self.config_path]
        return {
            "format": SIDECAR_FORMAT, "video": video_name, "fps": self.fps,
            "height": self.height, "width": self.width, "latent_frames": latents,
            "video_frames": video.spool.count, "seed": video.seed,
            "behaviour": "compat" if self.settings.compat else "clean",
            "config_path": self.config_path, "overrides": self.overrides,
            "timeline": timeline, "interactive_jsonl": line,
            "replay": {"data_path": data_path, "overrides": replay,
                       "command": shlex.join(command + replay)},
        }


def memory_view(state: StreamState) -> MemoryView:
    """Which latent frames a video state's sink, window and bank hold (bank frames need
    `track_frames`). The KV buffer holds the sink, then the newest window frames; every other
    source says what it holds."""
    sink, window = state.cache_frames()
    held = [frames for s in state.sources if (frames := s.held_frames()) is not None]
    layers = [sorted(set().union(*per_layer)) if len(held) > 1 else list(per_layer[0])
              for per_layer in zip(*held)] if held else []
    bank = sorted(set().union(*layers)) if layers else []
    return MemoryView(sink, bank, window, layers)
