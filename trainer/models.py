"""The networks of stage-1 training, built from the settings (TRAINING.md §2.1).

* generator: the causal DiT with the Wan weights of the folder `generator_name`; the trainer then
  loads `generator_ckpt` (an ODE-init / Self-Forcing / LongLive / MemFlow `base.pt`) on top,
  with whatever critic, EMA, optimiser state and step that file holds (TRAINING.md §8.4);
* critic ("fake score"): the bidirectional Wan folder `fake_name` (Wan2.1-T2V-1.3B), trainable;
* teacher ("real score"): the bidirectional Wan folder `real_name` (Wan2.1-T2V-14B, shapes from
  its config.json), frozen;
* text encoder: umT5 of the `generator_name` folder (Wan2.1-T2V-1.3B), frozen;
* VAE (visualisation, stage 2's first-frame re-encoding): built on first use from the settings
  unless given.

`preset: tiny` builds all four as tiny random models in memory. The DiTs come back on the CPU
in `param_dtype` (the master weights, fp32 as in the reference; placement and sharding are the
trainer's), and the generator must take latents of the config's `image_or_video_shape` channels. The frozen text
encoder is replicated on every rank in the compute dtype (bf16 with mixed precision, as the
reference's FSDP computes it), or kept on the CPU with `text_encoder_cpu_offload`.

The settings check what these need before anything is built (`trainer.config.TinyModels`: the
tiny preset's shape per role).

A trainer takes a `TrainModels` in place of building one, so a test or a parity check can give
it other networks, a text encoder that replays recorded prompt embeddings, or its own VAE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memflow.checkpoint import load_wan_generator
from memflow.errors import InputError
from memflow.model import WanDiT
from memflow.text_encoder import TextEncoder

from .config import TrainSettings


@dataclass
class TrainModels:
    """The networks of a run. `text_encoder`: anything with `encode(prompts) -> [B, T, dim]`;
    `vae`: anything with `dtype`, `encode` and `decode` like `memflow.vae.WanVAE`, on the
    training device (None: built from the settings when first needed)."""

    generator: WanDiT
    critic: WanDiT
    teacher: WanDiT
    text_encoder: TextEncoder
    vae: Any = None


def build_train_models(settings: TrainSettings, device: torch.device) -> TrainModels:
    """Load (or, for the tiny preset, build) the generator, critic, teacher and text encoder."""
    if settings.config.preset == "tiny":
        from memflow.tiny import build_tiny_generator, build_tiny_text_encoder

        tiny = settings.tiny
        models = [build_tiny_generator(tiny.section(role)) for role in ("generator", "critic", "teacher")]
        text_encoder = build_tiny_text_encoder(seed=tiny.seed, text_len=tiny.text_len,
                                               dtype=settings.compute_dtype, device=device)
    else:
        root = settings.wan_models_root
        models = [
            load_wan_generator(root / settings.config.generator_name),
            load_wan_generator(root / settings.config.fake_name),
            load_wan_generator(root / settings.config.real_name),
        ]
        text_encoder = TextEncoder.from_wan_folder(
            root / settings.config.generator_name, text_len=models[0].config.text_len,
            dtype=settings.compute_dtype, device=device, offload=settings.config.text_encoder_cpu_offload,
        )
    generator, critic, teacher = models
    if generator.config.in_dim != settings.latent_channels:
        raise InputError(
            f"config key `image_or_video_shape`: {settings.latent_channels} latent channels, but "
            f"the generator takes {generator.config.in_dim}"
        )
    for model in models:
        model.to(settings.param_dtype)
        model.set_rope_precision("float64" if settings.compat else "float32")
        model.train()
    teacher.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return TrainModels(generator, critic, teacher, text_encoder)
