"""The model library's streaming and sampler settings built from the schema sections that
inference and training share (`model_kwargs:`, the step list, `memory:` / `switch:` overrides),
and the latent geometry. Both `config.inference` and `trainer.config` build them here, so a
shared key is turned into a library setting by one function and fails with one message.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from memflow.config import DiTConfig, MemoryOptions, SamplingConfig, StreamConfig
from memflow.errors import InputError
from memflow.memory_sources import check_memory_layout, memory_layouts
from memflow.vae import VAE_STRIDE

from .schema import ModelKwargs, SamplingKeys, StreamKeys

PATCH = 2  # DiT spatial patch: pixels must be multiples of 8 * 2 = 16

Options = TypeVar("Options")


def with_overrides(base: Options, overrides: dict[str, Any] | None, section: str) -> Options:
    """`base` (a behaviour preset: `MemoryOptions`, `SwitchOptions`) with the per-option
    `overrides` of the config section `section`; a bad option is one line naming the section."""
    if overrides in (None, {}):
        return base
    if not isinstance(overrides, dict):
        raise InputError(f"config key `{section}` must be a mapping, got {overrides!r}")
    try:
        if hasattr(base, "with_overrides"):
            return base.with_overrides(overrides)
        return type(base)(**{**base.__dict__, **overrides})
    except (TypeError, ValueError) as err:
        raise InputError(f"config key `{section}`: {err}") from None


MemoryRun = Literal["single", "interactive", "stage1", "stage2"]


def memory_preset(compat: bool, run: MemoryRun) -> MemoryOptions:
    """The memory behaviour of a kind of run, before the `memory:` overrides.

    Clean: this project's defaults everywhere (record every interval, compress once per new
    prototype, retrieve with the current prompt, no refresh on a commit). Compat: the reference's
    scripts differ. Its single-prompt script and stage-1 rollout stage a prototype on every
    committing pass (`every_chunk`; the slot pointer still advances every record_interval
    chunks), its interactive script and stage 2 every record_interval chunks; the re-run after an
    exit at step 0 refreshes the bank once more (the leaked q_bank), except in the single-prompt
    script, whose re-run never inherits it (only a one-step schedule tells).
    """
    if not compat:
        return MemoryOptions.clean()
    if run == "single":
        return MemoryOptions.compat("every_chunk", commit_refreshes_after_step0_exit=False)
    return MemoryOptions.compat("every_chunk" if run == "stage1" else "every_interval")


def check_tiny_shape(section: Mapping[str, Any], key: str) -> None:
    """A `tiny:` section (config key `key`) as a whole makes a DiT (e.g. `dim` divisible by
    `num_heads`): the relations between its keys, which a per-key schema cannot express."""
    try:
        DiTConfig.from_dict({k: v for k, v in section.items() if k != "seed"})
    except (TypeError, ValueError) as err:
        raise InputError(f"config key `{key}`: {err}") from None


def whole_chunks(key: str, value: int, fpb: int) -> int:
    """`value` (config key `key`, latent frames) if it is a whole number of chunks."""
    if value % fpb:
        raise InputError(
            f"config key `{key}` ({value}) must be a multiple of num_frame_per_block ({fpb})"
        )
    return value


def latent_size(height: int, width: int) -> tuple[int, int]:
    """The latent (h, w) of a `height` x `width` video; both must be multiples of 16."""
    unit = VAE_STRIDE[1] * PATCH
    if height <= 0 or width <= 0 or height % unit or width % unit:
        raise InputError(
            f"resolution {height}x{width} must be positive multiples of {unit} "
            "(config keys `height`, `width`)"
        )
    return height // VAE_STRIDE[1], width // VAE_STRIDE[2]


def stream_config(c: StreamKeys, memory: MemoryOptions) -> StreamConfig:
    """The library's `StreamConfig` from the stream keys (`model_kwargs:`, the chunk size, the
    positions) and a memory behaviour; the relations between its sizes (sink inside the window,
    ...) are checked by `StreamConfig` and named here."""
    mk = c.model_kwargs or ModelKwargs()
    try:
        stream = StreamConfig(
            num_frame_per_block=int(c.num_frame_per_block),
            positions=c.positions,
            local_attn_size=int(mk.local_attn_size),
            sink_size=int(mk.sink_size),
            bank_size=int(mk.bank_size),
            record_interval=int(mk.record_interval),
            sma=bool(mk.sma),
            sma_top_k=int(mk.sma_top_k),
            memory=memory,
            memory_layout=memory_layout_name(mk.memory_layout),
            memory_options=dict(mk.memory_options or {}),
        )
    except ValueError as err:
        raise InputError(f"config key `model_kwargs`: {err}") from None
    return checked_layout(stream)


def memory_layout_name(name: str) -> str:
    """`model_kwargs.memory_layout`, if a layout of that name is registered."""
    if name not in memory_layouts():
        raise InputError(f"config key `model_kwargs.memory_layout` must be one of "
                         f"{', '.join(memory_layouts())}; got {name!r}")
    return name


def checked_layout(stream: StreamConfig) -> StreamConfig:
    """`stream` if its memory layout works with its positions and knows its options."""
    try:
        check_memory_layout(stream.memory_layout, stream.positions, stream.memory_options)
    except ValueError as err:
        raise InputError(f"config key `model_kwargs.memory_layout`: {err}") from None
    return stream


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
