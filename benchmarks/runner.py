"""One streamed video, timed block by block, with the pipeline's own chunk methods.

`run_video` repeats `CausalInferencePipeline.generate_latents` step for step (initial noise for
the whole video, a fresh `StreamState`, then per chunk `denoise_chunk` -> on-chunk work ->
`commit_chunk`) so that the denoising calls, the commit call and the per-chunk decode/write can
be timed apart. Nothing in the model or the pipeline is changed.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common import MemoryProbe, Preset, RegionTimer, Mode, block_flops, now, stream_config, time_layers
from pipeline.causal_inference import CausalInferencePipeline, SamplingConfig
from pipeline.noise import SeededNoise


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
    layers_s: float = 0.0  # time inside DiT blocks (for --layers extrapolation)
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
    `fast_fill_blocks`: the first N blocks run a single denoising step (to fill the cache and
    bank quickly before the timed blocks; their timings are flagged and never summarised).
    `block_hook(block_record)` runs after every block (instrumentation, profiling).
    """
    cfg = stream_config(mode, args)
    sampling = sampling_config(args)
    pipe = CausalInferencePipeline(model, cfg, sampling)
    fill_pipe = CausalInferencePipeline(
        model, cfg, SamplingConfig(denoising_step_list=sampling.denoising_step_list[:1])
    )
    steps = len(pipe.timesteps)
    fpb = cfg.num_frame_per_block
    num_frames = args.frames
    num_chunks = pipe.check_num_frames(num_frames)
    probe = MemoryProbe(device)
    timer = RegionTimer(device)
    undo = time_layers(model, timer) if time_layer_blocks else (lambda: None)
    rec = VideoRecord(mode.key)
    writer = None
    try:
        if decoder is not None:
            from utils.video_writer import Mp4Writer

            folder = Path(video_dir or tempfile.mkdtemp(prefix="memflow-bench-"))
            rec.video_path = str(folder / f"bench-{preset.name}-{mode.key}.mp4")
            writer = Mp4Writer(rec.video_path, fps=16)
            decoder.reset()
        probe.reset_peak()
        t_start = now(device)
        noise = SeededNoise(seed, dtype=dtype)
        initial = noise.initial((context.shape[0], num_frames, model.config.in_dim,
                                 *preset.latent_hw)).to(device, dtype)
        state = pipe.new_state(context.shape[0], preset.latent_hw, num_frames)
        out = torch.empty_like(initial)  # generate_latents keeps every chunk's x0
        rec.video_bytes = 2 * initial.numel() * initial.element_size()
        rec.state_bytes = sum(t.numel() * t.element_size() for t in (
            state.kv.k, state.kv.v, state.bank.k, state.bank.v, state.bank.proto_k,
            state.bank.proto_v))
        rec.setup_s = now(device) - t_start
        for n in range(num_chunks):
            probe.reset_peak()
            fill = n < fast_fill_blocks
            runner = fill_pipe if fill else pipe
            t0 = now(device)
            x0 = runner.denoise_chunk(state, n, initial[:, n * fpb:(n + 1) * fpb], context, noise)
            t1 = now(device)
            key_den = state.last_key_frames
            out[:, n * fpb:(n + 1) * fpb] = x0
            slots = state.bank.used_slots
            if n == 0:
                rec.first_latents_s = t1 - t_start
            decode_s = write_s = 0.0
            pixels = 0
            if decoder is not None:
                frames = decoder.decode(x0)
                t2 = now(device)
                writer.write(frames)
                t3 = time.perf_counter()
                decode_s, write_s, pixels = t2 - t1, t3 - t2, int(frames.shape[0])
                if n == 0:
                    rec.first_pixels_s = t3 - t_start
            t4 = now(device)
            pipe.commit_chunk(state, n, x0, context)
            t5 = now(device)
            block = BlockRecord(
                index=n,
                denoise_s=t1 - t0,
                commit_s=t5 - t4,
                decode_s=decode_s,
                write_s=write_s,
                pixel_frames=pixels,
                key_frames_denoise=key_den,
                key_frames_commit=state.last_key_frames,
                bank_slots=slots,
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
                      f"{key_den} frames, e2e {block.e2e_s * 1000:.1f} ms", flush=True)
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
