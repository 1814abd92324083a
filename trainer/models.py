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

The settings check what these need before anything is built, with this module's `TinyModels`
(the tiny preset's shape per role).

A trainer takes a `TrainModels` in place of building one, so a test or a parity check can give
it other networks, a text encoder that replays recorded prompt embeddings, or its own VAE.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memflow.checkpoint import load_wan_generator
from memflow.config import DiTConfig
from memflow.model import WanDiT
from memflow.text_encoder import TextEncoder
from utils.errors import InputError

if TYPE_CHECKING:  # trainer.config reads this module's tiny shapes and folder check
    from .config import TrainSettings


TINY_ROLES = ("teacher", "critic")


@dataclass(frozen=True)
class TinyModels:
    """`preset: tiny` shapes. Each role's mapping is what `memflow.tiny.build_tiny_generator`
    takes (DiTConfig fields + ``seed``); the critic defaults to the generator's shape and seed
    (the reference's critic starts from the generator's base model, Wan 1.3B)."""

    generator: Mapping[str, Any]
    teacher: Mapping[str, Any]
    critic: Mapping[str, Any]
    text_len: int
    seed: int

    @classmethod
    def from_section(cls, tiny: Any) -> TinyModels:
        """From the config's `tiny:` section: the generator's keys, and a `teacher:` / `critic:`
        override each; every shape must make a DiT, all with the generator's text length."""
        shape_keys = {f.name for f in dataclasses.fields(DiTConfig)} | {"seed"}
        section = _tiny_role(tiny, "tiny", shape_keys | set(TINY_ROLES))
        generator = {k: v for k, v in section.items() if k not in TINY_ROLES}
        generator.setdefault("seed", 0)
        text_len = generator.get("text_len", 64)
        roles = {}
        for role in TINY_ROLES:
            own = _tiny_role(section.get(role), f"tiny.{role}", shape_keys)
            if "text_len" in own and own["text_len"] != text_len:
                raise InputError(
                    f"config key `tiny.{role}.text_len` ({own['text_len']}) must equal "
                    f"`tiny.text_len` ({text_len}): all models read the same text embedding"
                )
            roles[role] = {**generator, **own}
        for role, shape in (("tiny", generator), *((f"tiny.{r}", s) for r, s in roles.items())):
            try:
                DiTConfig.from_dict({k: v for k, v in shape.items() if k != "seed"})
            except (TypeError, ValueError) as err:
                raise InputError(f"config key `{role}`: {err}") from None
        return cls(generator, roles["teacher"], roles["critic"], int(text_len),
                          int(generator["seed"]))

    def section(self, role: str) -> dict[str, Any]:
        """The `build_tiny_generator` mapping of "generator", "teacher" or "critic"."""
        if role not in ("generator", *TINY_ROLES):
            raise ValueError(f"unknown tiny model role {role!r}")
        return dict(getattr(self, role))


def _tiny_role(mapping: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    """One `tiny:` mapping (the generator's, or a role's override) with known keys only."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise InputError(f"config key `{where}` must be a mapping, got {mapping!r}")
    for k in mapping:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = f"; did you mean `{where}.{close[0]}`?" if close else ""
            raise InputError(f"unknown config key `{where}.{k}`{hint}")
    return dict(mapping)


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
        model.train()
    teacher.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return TrainModels(generator, critic, teacher, text_encoder)
