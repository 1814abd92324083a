"""Sample videos during training (every `vis_interval` iterations, TRAINING.md §8.3).

Every rank generates its fixed visualisation prompts with the live generator through the same
chunk stepper as inference (all ranks take part: the generator may be FSDP-sharded), decodes
them chunk by chunk with the streaming VAE decoder and writes
`<logdir>/../vis/step_{s:07d}/step_{s:07d}_rank_{r}_sample_{i}_len_{frames}[_lora][_switch_frame_{p}].mp4`
(the reference's layout: the vis folder is a sibling of the run folder). Nothing here carries
gradients; the noise is seeded by step and rank, so a resumed run draws the same videos.

Stage 2 samples prompt A switching to B at a frame drawn with the training switch rule, through
the recache of interactive inference (the reference's two-prompt visualisation cannot run and
its failure is swallowed, so it never writes a video, TRAINING.md §8.3 / §10 item 28).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from memflow.config import SwitchOptions

from memflow.text_encoder import TextEncoder
from memflow.vae import WAN_VAE_CHECKPOINT, WanVAE
from pipeline.noise import SeededNoise
from pipeline.stepper import ChunkStepper
from utils.video_writer import Mp4Writer

from .config import TrainSettings
from .draws import stable_seed


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
    switch_prompts: list[str] | None = None,
) -> list[Path]:
    """One video per prompt and per length in `vis_video_lengths` (switching to
    `switch_prompts[i]` when given); returns the files written."""
    device = stepper.generator.device
    folder = out_dir / f"step_{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    lora = "_lora" if settings.lora is not None else ""
    written = []
    for i, prompt in enumerate(prompts):
        context = text_encoder.encode([prompt]).to(device, stepper.dtype)
        switch_context = None
        if switch_prompts is not None:
            switch_context = text_encoder.encode([switch_prompts[i]]).to(device, stepper.dtype)
        for frames in settings.vis_video_lengths:
            switch_frame = None
            if switch_context is not None:
                found = settings.streaming.switch.candidates(frames, stepper.frames_per_block)
                if found:
                    switch_frame = random.Random(stable_seed(settings.seed, "vis", step)).choice(found)
            noise = SeededNoise(settings.seed + 1000 * step + rank, dtype=stepper.dtype, device=device)
            name = f"step_{step:07d}_rank_{rank}_sample_{i}_len_{frames}{lora}"
            if switch_frame is not None:
                name += f"_switch_frame_{switch_frame}"
            path = folder / f"{name}.mp4"
            decoder = vae.stream()
            with Mp4Writer(path, fps=16) as writer:
                stepper.rollout(
                    1, frames, settings.latent_hw, noise,
                    _prompt_for_chunk(stepper, context, switch_context, switch_frame,
                                      SwitchOptions.compat() if settings.compat else SwitchOptions()),
                    hooks=_decode_hook(decoder, writer),
                )
            written.append(path)
    return written


def _prompt_for_chunk(stepper: ChunkStepper, context: torch.Tensor,
                      switch_context: torch.Tensor | None, switch_frame: int | None,
                      switch: SwitchOptions):
    """The rollout's prompt rule: A, then B from `switch_frame` on, with the interactive
    pipeline's recache at the switch."""
    switch_chunk = None if switch_frame is None else switch_frame // stepper.frames_per_block

    def prompt(n: int, state, generated: list[torch.Tensor]) -> torch.Tensor:
        if switch_chunk is None or n < switch_chunk:
            return context
        if n == switch_chunk:
            stepper.switch_prompt(state, n, torch.cat(generated, dim=1), switch_context, switch)
        return switch_context

    return prompt


def _decode_hook(decoder, writer):
    from pipeline.stepper import ChunkHooks

    return ChunkHooks(on_chunk=lambda n, x0: writer.write(decoder.decode(x0[:1])[0]))
