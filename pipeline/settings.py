"""Turn a (reference-compatible) OmegaConf inference config into typed settings.

Reference configs carry `model_kwargs` (local_attn_size, timestep_shift, sink_size, bank_size,
record_interval, SMA); this project adds `behaviour` (clean | compat), `memory:` and `switch:`
overrides and the geometry keys `height`/`width`. Everything is validated here, before any
model is built, so a bad config fails in one line and not deep inside torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memflow.config import MemoryOptions, SamplingConfig, StreamConfig, SwitchOptions
from utils.errors import InputError

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


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value


def _options(cls, base, overrides: Any, section: str):
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


def parse_settings(cfg: DictConfig, interactive: bool) -> InferenceSettings:
    """Validate the config and build the stream, sampling and switch settings."""
    behaviour = _get(cfg, "behaviour", "clean")
    if behaviour not in ("clean", "compat"):
        raise InputError(f"config key `behaviour` must be clean or compat, got {behaviour!r}")
    compat = behaviour == "compat"

    height, width = int(_get(cfg, "height", 480)), int(_get(cfg, "width", 832))
    unit = VAE_STRIDE[1] * PATCH
    if height <= 0 or width <= 0 or height % unit or width % unit:
        raise InputError(
            f"resolution {height}x{width} must be positive multiples of {unit} "
            "(config keys `height`, `width`)"
        )
    latent_hw = (height // VAE_STRIDE[1], width // VAE_STRIDE[2])

    mk = _get(cfg, "model_kwargs", {}) or {}
    fpb = int(_get(cfg, "num_frame_per_block", 3))
    num_frames = int(_get(cfg, "num_output_frames", 120))
    if fpb <= 0 or num_frames <= 0 or num_frames % fpb:
        raise InputError(
            f"num_output_frames ({num_frames}) must be a positive whole number of chunks of "
            f"num_frame_per_block ({fpb}) latent frames"
        )

    if compat:
        # the single-prompt script's re-run never inherits q_bank (a one-step schedule shows it)
        memory = (MemoryOptions.compat("every_interval") if interactive else
                  MemoryOptions.compat("every_chunk", commit_refreshes_after_step0_exit=False))
    else:
        memory = MemoryOptions.clean()
    memory = _options(MemoryOptions, memory, _get(cfg, "memory"), "memory")

    try:
        stream = StreamConfig(
            num_frame_per_block=fpb,
            local_attn_size=int(mk.get("local_attn_size", 12)),
            sink_size=int(mk.get("sink_size", 3)),
            bank_size=int(mk.get("bank_size", 3)),
            record_interval=int(mk.get("record_interval", 3)),
            sma=bool(mk.get("SMA", False)),
            sma_top_k=int(mk.get("sma_top_k", 3)),
            memory=memory,
        )
    except ValueError as err:
        raise InputError(f"config key `model_kwargs`: {err}") from None

    steps = [int(s) for s in _get(cfg, "denoising_step_list", [1000, 750, 500, 250])]
    warp = bool(_get(cfg, "warp_denoising_step", True))
    if not steps or (warp and any(not 0 < s <= 1000 for s in steps)):
        raise InputError(
            f"denoising_step_list {steps} must be non-empty, and in (0, 1000] when "
            "warp_denoising_step is true"
        )
    sampling = SamplingConfig(
        denoising_step_list=tuple(steps),
        warp_denoising_step=warp,
        timestep_shift=float(mk.get("timestep_shift", 5.0)),
        context_noise=float(_get(cfg, "context_noise", 0)),
    )

    global_sink = bool(_get(cfg, "global_sink", True))
    switch_base = SwitchOptions.compat(global_sink) if compat else None
    if switch_base is None:
        if not global_sink:
            raise InputError(
                "global_sink: false is only available with behaviour: compat (the reference "
                "attends an all-zero sink after a switch, spec K2)"
            )
        switch_base = SwitchOptions()
    switch = _options(SwitchOptions, switch_base, _get(cfg, "switch"), "switch")

    if int(_get(cfg, "num_samples", 1)) != 1:
        raise InputError("num_samples must be 1 (one video per prompt and seed)")
    return InferenceSettings(stream, sampling, switch, latent_hw, num_frames, compat)
