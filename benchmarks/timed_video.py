"""One streamed video, timed block by block, driven by the model library's chunk loop.

`run_video` generates the video with `ChunkStepper.rollout` (memflow/chunk_loop.py), the loop
every caller of the streaming core runs, and times each chunk through the rollout's hooks:
`before_chunk` starts the block, `on_chunk` (x0 final, before the commit) ends the denoising
calls and runs the per-chunk decode and MP4 write, `after_commit` ends the commit call. The
attended key lengths come from the state's debug record (`StreamState(debug=True)`). Nothing
in the model or the pipeline is changed.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from common import (
    MemoryProbe,
    Mode,
    Preset,
    RegionTimer,
    block_flops,
    now,
    stream_config,
    time_layers,
)

from memflow.chunk_loop import ChunkHooks, ChunkStepper
from memflow.config import DiTConfig, SamplingConfig
from memflow.noise import SeededNoise


@dataclass
class BlockRecord:
    index: int
    denoise_s: float  # the denoising calls of the chunk (steps x DiT), first one refreshes the bank
    commit_s: float  # the clean re-run that writes the chunk's K/V (and stages a prototype)
    decode_s: float = 0.0  # streaming VAE decode of the chunk
    write_s: float = 0.0  # MP4 writing of its frames
    pixel_frames: int = 0
    key_frames_denoise: int = 0  # attended key length (sink + bank + window) in frames
    key_frames_commit: int = 0
    bank_slots: int = 0
    flops: float = 0.0
    mem_current: int = 0
    mem_peak: int = 0
    layers_s: float = 0.0  # per-layer time (common.time_layers; for --layers extrapolation)
    fast_fill: bool = False

    @property
    def dit_s(self) -> float:
        return self.denoise_s + self.commit_s

    @property
    def e2e_s(self) -> float:
        return self.dit_s + self.decode_s + self.write_s


@dataclass
class VideoRecord:
    mode: str
    blocks: list[BlockRecord] = field(default_factory=list)
    setup_s: float = 0.0  # state allocation + initial noise
    first_latents_s: float = 0.0  # start -> first chunk's x0 ready
    first_pixels_s: float = 0.0  # start -> first chunk's frames written
    finish_s: float = 0.0  # closing the MP4 (ffmpeg flush)
    total_s: float = 0.0
    state_bytes: int = 0  # KV cache + bank + prototype buffers
    video_bytes: int = 0  # whole-video latent tensors (initial noise + output), O(frames)
    video_path: str | None = None


def sampling_config(args: Any) -> SamplingConfig:
    steps = tuple(int(s) for s in str(args.steps).split(","))
    return SamplingConfig(denoising_step_list=steps)


def state_bytes(state) -> int:
    """Bytes of the state's KV cache buffers plus its bank at full size: every slot and the
    staged prototype, K and V, one frame each per layer. The bank's slot tensors are allocated
    as the bank fills (per-layer lists), so its size is computed, not summed, and the figure
    does not depend on when it is taken or on the video's length."""
    kv = state.kv
    kv_bytes = sum(t.numel() * t.element_size() for t in (*kv.k, *kv.v))
    frame = kv.k[0][:, : state.frame_len]  # [B, frame_len, H, D]: what one slot holds
    frames = sum(source.capacity_frames for source in state.sources)  # bank slots + prototype
    return kv_bytes + 2 * state.num_layers * frames * frame.numel() * frame.element_size()


def latent_video_bytes(model, preset: Preset, batch: int, num_frames: int,
                       dtype: torch.dtype) -> int:
    """Bytes of the whole-video latent tensors a rollout holds: the initial noise of every
    frame and every chunk's x0. Reported apart from the state because it grows with the
    video's length (O(frames)) while the cache and bank do not."""
    latent_numel = batch * num_frames * model.config.in_dim * math.prod(preset.latent_hw)
    return 2 * latent_numel * torch.empty((), dtype=dtype).element_size()


def open_video(rec: VideoRecord, preset: Preset, mode: Mode, video_dir: str | None):
    """The MP4 writer of a decode pass; its path goes into `rec.video_path`. Imported here so
    that a DiT-only run needs neither ffmpeg nor the video writer."""
    from utils.video_writer import Mp4Writer

    folder = Path(video_dir or tempfile.mkdtemp(prefix="memflow-bench-"))
    rec.video_path = str(folder / f"bench-{preset.name}-{mode.key}.mp4")
    return Mp4Writer(rec.video_path, fps=16)


@dataclass
class BlockMarks:
    """Clock readings and attended sizes of the block in progress, taken by the hooks."""

    t0: float  # block start
    calls: int  # DiT calls recorded before the block (index into state.debug.key_frames)
    t1: float = 0.0  # x0 final: the denoising calls are done
    t4: float = 0.0  # decode and write done: the commit call starts
    key_frames_denoise: int = 0
    bank_slots: int = 0
    decode_s: float = 0.0
    write_s: float = 0.0
    pixel_frames: int = 0


@dataclass
class BlockTimer:
    """Times one rollout block by block through `ChunkStepper.rollout`'s hooks.

    Each hook reads the clock after a device sync (`common.now`), so a block's time is split
    at the rollout's own boundaries without touching the model: `before_chunk` starts the
    block, `on_chunk` ends its denoising calls and runs the chunk's decode and MP4 write,
    `after_commit` ends the commit call and files the block's `BlockRecord` in `rec`.
    """

    rec: VideoRecord
    state: Any  # the rollout's StreamState, built with debug=True (attended key lengths)
    model_config: DiTConfig  # for the analytic FLOP count
    steps: int  # denoising calls of a full block
    frames_per_block: int
    device: torch.device
    t_start: float  # the video's start, before the state was allocated
    probe: MemoryProbe
    fast_fill_blocks: int = 0
    decoder: Any = None
    writer: Any = None
    layer_timer: RegionTimer | None = None  # set when per-layer time is collected
    block_hook: Callable[[BlockRecord], None] | None = None
    progress: bool = False
    marks: BlockMarks | None = None

    def hooks(self) -> ChunkHooks:
        return ChunkHooks(before_chunk=self.before_chunk, on_chunk=self.on_chunk,
                          after_commit=self.after_commit)

    def before_chunk(self, n: int, stream: Any) -> None:
        """Start block n (the prompt stays); the first one also closes the setup time (state +
        initial noise, which the rollout draws before its first chunk)."""
        if n == 0:
            self.rec.setup_s = now(self.device) - self.t_start
        self.probe.reset_peak()
        self.marks = BlockMarks(t0=now(self.device), calls=len(self.state.debug.key_frames))

    def on_chunk(self, n: int, x0: torch.Tensor) -> None:
        """x0 of block n is final: end the denoising calls, then decode and write the chunk
        the way a streaming viewer would, before the commit call runs."""
        m = self.marks
        m.t1 = now(self.device)
        m.key_frames_denoise = self.state.debug.key_frames[-1]
        m.bank_slots = sum(source.frames_held for source in self.state.sources)
        if n == 0:
            self.rec.first_latents_s = m.t1 - self.t_start
        if self.decoder is not None:
            self.decode_and_write(n, x0)
        m.t4 = now(self.device)

    def decode_and_write(self, n: int, x0: torch.Tensor) -> None:
        """Decode block n to frames and write them; the write is timed without a device sync
        (it runs on the host once the frames are there)."""
        m = self.marks
        frames = self.decoder.decode(x0)
        t2 = now(self.device)
        self.writer.write(frames)
        t3 = time.perf_counter()
        m.decode_s, m.write_s, m.pixel_frames = t2 - m.t1, t3 - t2, int(frames.shape[0])
        if n == 0:
            self.rec.first_pixels_s = t3 - self.t_start

    def after_commit(self, n: int) -> None:
        """Block n is in the cache: end the commit call and file the block's record."""
        t5 = now(self.device)
        block = self.block_record(n, t5)
        self.rec.blocks.append(block)
        if self.block_hook is not None:
            self.block_hook(block)
        if self.progress:
            print(f"  [{self.rec.mode}] block {n}: dit {block.dit_s * 1000:.1f} ms, keys "
                  f"{block.key_frames_denoise} frames, e2e {block.e2e_s * 1000:.1f} ms",
                  flush=True)

    def block_record(self, n: int, t5: float) -> BlockRecord:
        """The record of block n from the marks; checks first that the block made exactly the
        DiT calls its step count implies, so a timing is never charged to the wrong calls."""
        m = self.marks
        fill = n < self.fast_fill_blocks
        calls = self.state.debug.key_frames[m.calls:]
        steps = 1 if fill else self.steps
        if len(calls) != steps + 1:
            raise RuntimeError(f"block {n}: {len(calls)} DiT calls recorded, expected {steps + 1}")
        block = BlockRecord(
            index=n, denoise_s=m.t1 - m.t0, commit_s=t5 - m.t4, decode_s=m.decode_s,
            write_s=m.write_s, pixel_frames=m.pixel_frames,
            key_frames_denoise=m.key_frames_denoise, key_frames_commit=calls[-1],
            bank_slots=m.bank_slots, mem_current=self.probe.current(),
            mem_peak=self.probe.peak(), fast_fill=fill,
        )
        block.flops = block_flops(self.model_config, self.state.frame_len, self.frames_per_block,
                                  steps, block.key_frames_denoise, block.key_frames_commit)
        if self.layer_timer is not None:
            block.layers_s = self.layer_timer.collect().get("layers", 0.0)
        return block


def close_video(writer) -> float:
    """Close the MP4 (ffmpeg flushes its last frames); returns the seconds it took."""
    t6 = time.perf_counter()
    writer.close()
    return time.perf_counter() - t6


@torch.no_grad()
def run_video(
    model,
    preset: Preset,
    mode: Mode,
    args: Any,
    context: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    decoder=None,
    fast_fill_blocks: int = 0,
    time_layer_blocks: bool = False,
    seed: int = 0,
    video_dir: str | None = None,
    progress: bool = False,
    block_hook=None,
) -> VideoRecord:
    """Generate one video of `args.frames` latent frames and time every block.

    `decoder`: an object with `reset()`, `decode(x0 [B, F, C, h, w]) -> [T, 3, H, W] in [0, 1]`;
    when given, every chunk is decoded and written to an MP4 as it is produced.
    `fast_fill_blocks`: the first N blocks stop after the first denoising step (`exit_step` 0:
    one DiT call at t = 1000, then the commit), to fill the cache and bank quickly before the
    timed blocks; their timings are flagged and never summarised.
    `block_hook(block_record)` runs after every block (instrumentation, profiling).
    """
    cfg = stream_config(mode, args)
    stepper = ChunkStepper(model, cfg, sampling_config(args))
    num_frames = args.frames
    stepper.num_chunks(num_frames)  # validates the length before anything runs
    batch = context.shape[0]
    probe = MemoryProbe(device)
    layer_timer = RegionTimer(device) if time_layer_blocks else None
    undo = time_layers(model, layer_timer) if layer_timer is not None else (lambda: None)
    rec = VideoRecord(mode.key,
                      video_bytes=latent_video_bytes(model, preset, batch, num_frames, dtype))
    writer = None
    try:
        if decoder is not None:
            writer = open_video(rec, preset, mode, video_dir)
            decoder.reset()
        probe.reset_peak()
        t_start = now(device)
        state = stepper.new_state(batch, preset.latent_hw, num_frames, debug=True)
        rec.state_bytes = state_bytes(state)
        timer = BlockTimer(rec, state, model.config, len(stepper.timesteps),
                           cfg.num_frame_per_block, device, t_start, probe, fast_fill_blocks,
                           decoder, writer, layer_timer, block_hook, progress)
        stepper.rollout(
            context, num_frames, preset.latent_hw, SeededNoise(seed, dtype=dtype),
            exit_step=(lambda n: 0 if n < fast_fill_blocks else None),
            hooks=timer.hooks(), state=state,
        )
        if writer is not None:
            rec.finish_s = close_video(writer)
            writer = None
        rec.total_s = now(device) - t_start
    finally:
        undo()
        if writer is not None:
            writer.abort()
    return rec


class ChunkDecoder:
    """Adapts `memflow.vae.StreamingDecoder` to `run_video`: x0 [1, F, C, h, w] -> [T, 3, H, W]."""

    def __init__(self, vae, label: str):
        self.vae = vae
        self.label = label
        self.stream = vae.stream()

    def reset(self) -> None:
        self.stream.reset()

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.stream.decode(x0)[0]


def make_decoder(kind: str, preset: Preset, device: torch.device, dtype: torch.dtype):
    """The streaming VAE decoder for the end-to-end figures, or (None, reason).

    kind "tiny": the tiny random Wan2.1-structured VAE of memflow/tiny.py (base dim 8);
    "wan": the real Wan2.1 VAE shape (base dim 96) with random weights; "auto": wan for
    --preset wan1.3b, tiny otherwise, and none for 832x480 on CPU; "none": DiT only.
    """
    if kind == "none":
        return None, "decode disabled (--vae none)"
    if kind == "auto":
        if device.type == "cpu" and preset.latent_hw[0] * preset.latent_hw[1] > 1000:
            return None, ("skipped on CPU: decoding 832x480 chunks with torch's CPU conv3d takes "
                          "tens of seconds to minutes per chunk (force with --vae tiny/wan)")
        kind = "wan" if preset.name == "wan1.3b" else "tiny"
    try:
        from memflow.tiny import build_tiny_vae
        from memflow.vae import WanVAE, wan_vae_config
    except ImportError as err:  # the VAE adapter is not in this checkout
        return None, f"memflow.vae unavailable ({err})"
    if kind == "tiny":
        vae = build_tiny_vae(dtype=dtype)
        label = "tiny random Wan2.1-structured VAE (base dim 8)"
    else:
        from diffusers import AutoencoderKLWan

        torch.manual_seed(0)
        vae = WanVAE(AutoencoderKLWan(**wan_vae_config()), dtype=dtype)
        label = "Wan2.1 VAE shape (base dim 96), random weights"
    vae = vae.to(device)
    return ChunkDecoder(vae, label), label
