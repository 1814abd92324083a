"""Turn a checked inference config into typed settings: the library's `StreamConfig`,
`SamplingConfig` and `SwitchOptions`, plus the geometry.

Every default comes from the one schema (`utils.settings_schema.InferenceConfig`); what is
checked here are the rules that relate keys to each other (resolution a multiple of 16, frames a
whole number of chunks, sink smaller than the window), before any model is built, so a bad
config fails in one line and not deep inside torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from memflow.config import DiTConfig, MemoryOptions, SamplingConfig, StreamConfig, SwitchOptions
from utils.errors import InputError
from utils.settings_schema import InferenceConfig, ModelKwargs
from utils.stream_settings import (VAE_STRIDE, latent_size, sampling_config, stream_config,
                                   with_overrides)


@dataclass(frozen=True)
class InferenceSettings:
    stream: StreamConfig
    sampling: SamplingConfig
    switch: SwitchOptions
    latent_hw: tuple[int, int]
    num_frames: int
    compat: bool


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
    return with_overrides(base, c.switch, "switch")


def check_rope_table(num_frames: int) -> None:
    """A video must fit the model's RoPE position table (`DiTConfig.rope_max_frames` latent
    frames): past it no position exists, so a longer run would die at the table after minutes
    of generation. Checked before anything is loaded."""
    limit = DiTConfig.rope_max_frames
    if num_frames > limit:
        raise InputError(
            f"num_output_frames ({num_frames}) is past the RoPE position table: at most {limit} "
            f"latent frames ({1 + VAE_STRIDE[0] * (limit - 1)} video frames) can be generated")


def parse_settings(c: InferenceConfig, interactive: bool) -> InferenceSettings:
    """Check the cross-key rules and build the stream, sampling and switch settings."""
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
    check_rope_table(num_frames)
    if c.lora_ckpt and not c.adapter:
        raise InputError(f"`lora_ckpt` is set ({c.lora_ckpt}) but `adapter` is null, so the LoRA "
                         "would not be loaded: set `adapter` as the LoRA was trained (e.g. "
                         "\"adapter={type: lora, rank: 256, alpha: 256}\") or drop lora_ckpt")
    mk = c.model_kwargs or ModelKwargs()
    memory = with_overrides(inference_memory(compat, interactive), c.memory, "memory")
    stream = stream_config(mk, fpb, memory)
    sampling = sampling_config(c, mk)
    switch = switch_options(c, compat)
    if int(c.num_samples) != 1:
        raise InputError("num_samples must be 1 (one video per prompt and seed)")
    return InferenceSettings(stream, sampling, switch, latent_hw, num_frames, compat)
