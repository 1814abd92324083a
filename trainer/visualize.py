"""Sample videos during training (every `vis_interval` iterations, TRAINING.md §8.3).

Every rank generates its fixed visualisation prompts with the live generator through the same
chunk stepper as inference (all ranks take part: the generator may be FSDP-sharded), decodes
them chunk by chunk with the streaming VAE decoder and writes
`<logdir>/../vis/step_{s:07d}/step_{s:07d}_rank_{r}_sample_{i}_len_{frames}.mp4` (the reference's
layout: the vis folder is a sibling of the run folder). Nothing here carries gradients; the
noise is seeded by step and rank, so a resumed run draws the same videos.
"""
from __future__ import annotations

from pathlib import Path

import torch

from memflow.text_encoder import TextEncoder
from memflow.vae import WAN_VAE_CHECKPOINT, WanVAE
from pipeline.noise import SeededNoise
from pipeline.stepper import ChunkStepper
from utils.video_writer import Mp4Writer

from .config import TrainSettings


def build_vae(settings: TrainSettings, device: torch.device) -> WanVAE:
    """The tiny random VAE for `preset: tiny`, else the Wan2.1 VAE of the generator's folder."""
    if settings.tiny is not None:
        from memflow.tiny import build_tiny_vae

        vae = build_tiny_vae(seed=settings.tiny.seed, dtype=settings.vae_dtype)
    else:
        folder = settings.wan_models_root / settings.generator_name
        vae = WanVAE.from_wan_checkpoint(folder / WAN_VAE_CHECKPOINT, dtype=settings.vae_dtype)
    return vae.to(device)


@torch.no_grad()
def write_samples(
    stepper: ChunkStepper,
    text_encoder: TextEncoder,
    vae: WanVAE,
    prompts: list[str],
    settings: TrainSettings,
    step: int,
    rank: int,
    out_dir: Path,
) -> list[Path]:
    """One video per prompt and per length in `vis_video_lengths`; returns the files written."""
    device = stepper.generator.device
    folder = out_dir / f"step_{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        context = text_encoder.encode([prompt]).to(device, stepper.dtype)
        for frames in settings.vis_video_lengths:
            noise = SeededNoise(settings.seed + 1000 * step + rank, dtype=stepper.dtype, device=device)
            path = folder / f"step_{step:07d}_rank_{rank}_sample_{i}_len_{frames}.mp4"
            decoder = vae.stream()
            with Mp4Writer(path, fps=16) as writer:
                stepper.rollout(
                    1, frames, settings.latent_hw, noise, lambda n, s, g: context,
                    hooks=_decode_hook(decoder, writer),
                )
            written.append(path)
    return written


def _decode_hook(decoder, writer):
    from pipeline.stepper import ChunkHooks

    return ChunkHooks(on_chunk=lambda n, x0: writer.write(decoder.decode(x0[:1])[0]))
