"""Turn a checked inference config into typed settings: the library's `StreamConfig`,
`SamplingConfig` and `SwitchOptions`, plus the geometry.

Every default comes from the one schema (`utils.settings_schema.InferenceConfig`); what is
checked here are the rules that relate keys to each other (resolution a multiple of 16, frames a
whole number of chunks, sink smaller than the window), before any model is built, so a bad
config fails in one line and not deep inside torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from memflow.config import MemoryOptions, SamplingConfig, StreamConfig, SwitchOptions
from utils.errors import InputError
from utils.settings_schema import InferenceConfig, ModelKwargs, SamplingKeys, settings_from_config

VAE_STRIDE = (4, 8, 8)  # Wan VAE: 4x in time, 8x in space
PATCH = 2  # DiT spatial patch: pixels must be multiples of 8 * 2 = 16


@dataclass(frozen=True)
class InferenceSettings:
    stream: StreamConfig
    sampling: SamplingConfig
    switch: SwitchOptions
    latent_hw: tuple[int, int]
    num_frames: int
    compat: bool

    @property
    def num_pixel_frames(self) -> int:
        return 1 + VAE_STRIDE[0] * (self.num_frames - 1)


def _options(cls, base, overrides: Any, section: str):
    """`base` (a behaviour preset) with the `section:` mapping's per-option `overrides`."""
    if overrides in (None, {}):
        return base
    if not isinstance(overrides, dict):
        raise InputError(f"config key `{section}` must be a mapping, got {overrides!r}")
    try:
        return base.with_overrides(overrides) if hasattr(base, "with_overrides") else cls(
            **{**base.__dict__, **overrides}
        )
    except (TypeError, ValueError) as err:
        raise InputError(f"config key `{section}`: {err}") from None


def latent_size(height: int, width: int) -> tuple[int, int]:
    """The latent (h, w) of a `height` x `width` video; both must be multiples of 16."""
    unit = VAE_STRIDE[1] * PATCH
    if height <= 0 or width <= 0 or height % unit or width % unit:
        raise InputError(
            f"resolution {height}x{width} must be positive multiples of {unit} "
            "(config keys `height`, `width`)"
        )
    return height // VAE_STRIDE[1], width // VAE_STRIDE[2]


def stream_config(mk: ModelKwargs, fpb: int, memory: MemoryOptions) -> StreamConfig:
    """The library's `StreamConfig` from the `model_kwargs:` section."""
    try:
        return StreamConfig(
            num_frame_per_block=fpb,
            local_attn_size=int(mk.local_attn_size),
            sink_size=int(mk.sink_size),
            bank_size=int(mk.bank_size),
            record_interval=int(mk.record_interval),
            sma=bool(mk.sma),
            sma_top_k=int(mk.sma_top_k),
            memory=memory,
        )
    except ValueError as err:
        raise InputError(f"config key `model_kwargs`: {err}") from None


def sampling_config(c: SamplingKeys, mk: ModelKwargs) -> SamplingConfig:
    """The few-step sampler; warped steps must lie in (0, 1000]."""
    steps = [int(s) for s in c.denoising_step_list]
    warp = bool(c.warp_denoising_step)
    if not steps or (warp and any(not 0 < s <= 1000 for s in steps)):
        raise InputError(
            f"denoising_step_list {steps} must be non-empty, and in (0, 1000] when "
            "warp_denoising_step is true"
        )
    return SamplingConfig(
        denoising_step_list=tuple(steps),
        warp_denoising_step=warp,
        timestep_shift=float(mk.timestep_shift),
        context_noise=float(c.context_noise),
    )


def inference_memory(compat: bool, interactive: bool) -> MemoryOptions:
    """The memory behaviour preset of a mode, before the `memory:` overrides."""
    if not compat:
        return MemoryOptions.clean()
    # the single-prompt script's re-run never inherits q_bank (a one-step schedule shows it)
    return (MemoryOptions.compat("every_interval") if interactive else
            MemoryOptions.compat("every_chunk", commit_refreshes_after_step0_exit=False))


def switch_options(c: InferenceConfig, compat: bool) -> SwitchOptions:
    global_sink = bool(c.global_sink)
    if compat:
        base = SwitchOptions.compat(global_sink)
    elif not global_sink:
        raise InputError(
            "global_sink: false is only available with behaviour: compat (the reference "
            "attends an all-zero sink after a switch, spec K2)"
        )
    else:
        base = SwitchOptions()
    return _options(SwitchOptions, base, c.switch, "switch")


def parse_settings(cfg: DictConfig | InferenceConfig, interactive: bool) -> InferenceSettings:
    """Check the cross-key rules and build the stream, sampling and switch settings."""
    c = cfg if isinstance(cfg, InferenceConfig) else settings_from_config(cfg, InferenceConfig)
    if c.behaviour not in ("clean", "compat"):
        raise InputError(f"config key `behaviour` must be clean or compat, got {c.behaviour!r}")
    compat = c.behaviour == "compat"
    latent_hw = latent_size(int(c.height), int(c.width))
    fpb, num_frames = int(c.num_frame_per_block), int(c.num_output_frames)
    if fpb <= 0 or num_frames <= 0 or num_frames % fpb:
        raise InputError(
            f"num_output_frames ({num_frames}) must be a positive whole number of chunks of "
            f"num_frame_per_block ({fpb}) latent frames"
        )
    mk = c.model_kwargs or ModelKwargs()
    memory = _options(MemoryOptions, inference_memory(compat, interactive), c.memory, "memory")
    stream = stream_config(mk, fpb, memory)
    sampling = sampling_config(c, mk)
    switch = switch_options(c, compat)
    if int(c.num_samples) != 1:
        raise InputError("num_samples must be 1 (one video per prompt and seed)")
    return InferenceSettings(stream, sampling, switch, latent_hw, num_frames, compat)
