"""An inference config, from its file to typed settings: the YAML file and ``key=value``
overrides checked against the one schema (`config.schema`) into the typed `InferenceConfig`, then
the rules that relate keys to each other, into the library's `StreamConfig`, `SamplingConfig` and
`SwitchOptions` plus the geometry (`InferenceSettings`).

Every default comes from the schema. `load_inference_config` rejects an unknown key (with a "did
you mean" hint) or a value of the wrong type before any model is loaded; `parse_settings` checks
the cross-key rules (resolution a multiple of 16, frames a whole number of chunks, sink smaller
than the window), so a bad config fails in one line and not deep inside torch. The reference's
configs use a subset of these keys, so they load as they are. The runner, the builders and the
live session take an `InferenceConfig` and never see the YAML mapping.
"""
from __future__ import annotations


import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from memflow.config import SamplingConfig, StreamConfig, SwitchOptions
from memflow.errors import InputError
from memflow.tiny import tiny_rope_frames
from memflow.vae import video_frames

from .loader import load_config
from .schema import InferenceConfig, ModelKwargs, settings_from_config
from .stream import (
    check_tiny_shape,
    latent_size,
    memory_preset,
    sampling_config,
    stream_config,
    with_overrides,
)


@dataclass(frozen=True)
class InferenceSettings:
    stream: StreamConfig
    sampling: SamplingConfig
    switch: SwitchOptions
    latent_hw: tuple[int, int]
    num_frames: int
    compat: bool


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


def rope_table_frames(c: InferenceConfig) -> int:
    """The model's RoPE table in latent frames: the tiny preset's `tiny.rope_max_frames`, else
    Wan2.1's (`DiTConfig.rope_max_frames`, 1024)."""
    return tiny_rope_frames(c.tiny if c.preset == "tiny" and c.tiny else {})


def check_rope_table(c: InferenceConfig, num_frames: int) -> None:
    """With `positions: absolute` a video must fit the model's RoPE position table: past it the
    reference has no position, so a longer run would die at the table after minutes of
    generation. Checked before anything is loaded; `positions: relative` has no such end."""
    limit = rope_table_frames(c)
    if c.positions == "absolute" and num_frames > limit:
        raise InputError(
            f"num_output_frames ({num_frames}) is past the RoPE position table: with positions: "
            f"absolute at most {limit} latent frames ({video_frames(limit)} video frames) can be "
            "generated; positions: relative has no such limit")


def parse_settings(c: InferenceConfig, interactive: bool) -> InferenceSettings:
    """Check the cross-key rules and build the stream, sampling and switch settings."""
    compat = c.behaviour == "compat"
    latent_hw = latent_size(int(c.height), int(c.width))
    fpb, num_frames = int(c.num_frame_per_block), int(c.num_output_frames)
    if num_frames % fpb:  # both are positive (the schema's bounds)
        raise InputError(
            f"num_output_frames ({num_frames}) must be a whole number of chunks of "
            f"num_frame_per_block ({fpb}) latent frames"
        )
    if c.lora_ckpt and not c.adapter:
        raise InputError(f"`lora_ckpt` is set ({c.lora_ckpt}) but `adapter` is null, so the LoRA "
                         "would not be loaded: set `adapter` as the LoRA was trained (e.g. "
                         "\"adapter={type: lora, rank: 256, alpha: 256}\") or drop lora_ckpt")
    mk = c.model_kwargs or ModelKwargs()
    memory = with_overrides(memory_preset(compat, "interactive" if interactive else "single"),
                            c.memory, "memory")
    stream = stream_config(c, memory)
    if c.compile or c.cuda_graphs:
        stream = replace(stream, static_shapes=True)
        try:
            stream.check_static()
        except ValueError as err:
            raise InputError(f"config key `compile`: {err}") from None
    sampling = sampling_config(c, mk)
    switch = switch_options(c, compat)
    return InferenceSettings(stream, sampling, switch, latent_hw, num_frames, compat)

def load_inference_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> InferenceConfig:
    """The typed settings of the config file at `path` with ``key=value`` `overrides`, checked
    against the schema (keys, types, allowed values, the tiny shape) before any model loads."""
    cfg = load_config(path, overrides, schema=InferenceConfig)
    c = settings_from_config(cfg, InferenceConfig)
    if c.tiny:
        check_tiny_shape(c.tiny, "tiny")
    return c
