"""One streamed video, timed block by block, driven by the pipeline's own chunk stepper.

`run_video` generates the video with `ChunkStepper.rollout` (pipeline/stepper.py), the loop
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
from typing import Any

import torch

from common import MemoryProbe, Preset, RegionTimer, Mode, block_flops, now, stream_config, time_layers
from memflow.config import SamplingConfig
from pipeline.noise import SeededNoise
from pipeline.stepper import ChunkHooks, ChunkStepper


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
    bank = state.bank
    frames = bank.slots + (1 if bank.slots else 0)  # the slots and the prototype
    return kv_bytes + 2 * bank.num_layers * frames * frame.numel() * frame.element_size()


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
    steps = len(stepper.timesteps)
    fpb = cfg.num_frame_per_block
    num_frames = args.frames
    stepper.num_chunks(num_frames)  # validates the length before anything runs
    batch = context.shape[0]
    probe = MemoryProbe(device)
    timer = RegionTimer(device)
    undo = time_layers(model, timer) if time_layer_blocks else (lambda: None)
    rec = VideoRecord(mode.key)
    # the rollout keeps the initial noise of the whole video and every chunk's x0
    latent_numel = batch * num_frames * model.config.in_dim * math.prod(preset.latent_hw)
    rec.video_bytes = 2 * latent_numel * torch.empty((), dtype=dtype).element_size()
    writer = None
    # per-block marks, filled by the hooks
    mark: dict[str, Any] = {}

    def before_chunk(n: int) -> None:
        if n == 0:
            rec.setup_s = now(device) - t_start  # state + initial noise (drawn by the rollout)
        probe.reset_peak()
        mark.update(t0=now(device), calls=len(state.debug.key_frames), decode_s=0.0,
                    write_s=0.0, pixels=0)

    def on_chunk(n: int, x0: torch.Tensor) -> None:
        t1 = now(device)
        mark.update(t1=t1, key_den=state.debug.key_frames[-1], slots=state.bank.used_slots)
        if n == 0:
            rec.first_latents_s = t1 - t_start
        if decoder is not None:
            frames = decoder.decode(x0)
            t2 = now(device)
            writer.write(frames)
            t3 = time.perf_counter()
            mark.update(decode_s=t2 - t1, write_s=t3 - t2, pixels=int(frames.shape[0]))
            if n == 0:
                rec.first_pixels_s = t3 - t_start
        mark["t4"] = now(device)

    def after_commit(n: int) -> None:
        t5 = now(device)
        fill = n < fast_fill_blocks
        calls = state.debug.key_frames[mark["calls"]:]
        expected = (1 if fill else steps) + 1
        if len(calls) != expected:
            raise RuntimeError(f"block {n}: {len(calls)} DiT calls recorded, expected {expected}")
        block = BlockRecord(
            index=n,
            denoise_s=mark["t1"] - mark["t0"],
            commit_s=t5 - mark["t4"],
            decode_s=mark["decode_s"],
            write_s=mark["write_s"],
            pixel_frames=mark["pixels"],
            key_frames_denoise=mark["key_den"],
            key_frames_commit=calls[-1],
            bank_slots=mark["slots"],
            mem_current=probe.current(),
            mem_peak=probe.peak(),
            fast_fill=fill,
        )
        block.flops = block_flops(model.config, state.frame_len, fpb,
                                  1 if fill else steps, block.key_frames_denoise,
                                  block.key_frames_commit)
        if time_layer_blocks:
            block.layers_s = timer.collect().get("layers", 0.0)
        rec.blocks.append(block)
        if block_hook is not None:
            block_hook(block)
        if progress:
            print(f"  [{mode.key}] block {n}: dit {block.dit_s * 1000:.1f} ms, keys "
                  f"{block.key_frames_denoise} frames, e2e {block.e2e_s * 1000:.1f} ms", flush=True)

    try:
        if decoder is not None:
            from utils.video_writer import Mp4Writer

            folder = Path(video_dir or tempfile.mkdtemp(prefix="memflow-bench-"))
            rec.video_path = str(folder / f"bench-{preset.name}-{mode.key}.mp4")
            writer = Mp4Writer(rec.video_path, fps=16)
            decoder.reset()
        probe.reset_peak()
        t_start = now(device)
        state = stepper.new_state(batch, preset.latent_hw, num_frames, debug=True)
        rec.state_bytes = state_bytes(state)
        stepper.rollout(
            batch, num_frames, preset.latent_hw, SeededNoise(seed, dtype=dtype),
            lambda n, _state, _generated: context,
            exit_step=(lambda n: 0 if n < fast_fill_blocks else None),
            hooks=ChunkHooks(before_chunk=before_chunk, on_chunk=on_chunk,
                             after_commit=after_commit),
            state=state,
        )
        if writer is not None:
            t6 = time.perf_counter()
            writer.close()
            rec.finish_s = time.perf_counter() - t6
            writer = None
        rec.total_s = now(device) - t_start
    finally:
        undo()
        if writer is not None:
            writer.abort()
    return rec


class ChunkDecoder:
    """Adapts `memflow.vae.StreamingDecoder` to the runner: x0 [1, F, C, h, w] -> [T, 3, H, W]."""

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
        from memflow.vae import WanVAE, wan_vae_config
        from memflow.tiny import build_tiny_vae
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
