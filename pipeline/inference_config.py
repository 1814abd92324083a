"""Every key an inference config may hold, with its type, as one schema checked at load time.

`load_inference_config` rejects an unknown key in the YAML file or in a ``key=value`` override
with a "did you mean" hint, and a value of the wrong type or outside its allowed set with a
message naming the key, the value and what is allowed, all before any model is loaded. The
reference's configs (spec §0) use a subset of these keys, so they load as they are.

Only types and plain bounds live here; the defaults of absent keys and the checks that relate
keys to each other (resolution multiple of 16, frames a whole number of chunks, sink smaller
than the window) stay with the code that reads them (`pipeline.settings`, `pipeline.runner`,
`pipeline.build`).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from memflow.attention import backend_names
from memflow.config import DiTConfig, MemoryOptions, SwitchOptions
from memflow.text_encoder import umt5_encoder_config
from memflow.vae import WAN21_VAE_CONFIG
from utils.config import DTYPES, load_config
from utils.distributed import SEED_MODES
from utils.errors import InputError
from utils.schema import check_section

DtypeName = Literal[tuple(DTYPES)]  # type: ignore[valid-type]
SeedMode = Literal[SEED_MODES]  # type: ignore[valid-type]
AttnBackend = Literal[backend_names()]  # type: ignore[valid-type]
Device = Literal["auto", "cpu", "cuda"]

_POSITIVE = {"positive": True}
_NONEMPTY = {"nonempty": True}


@dataclass
class ModelKwargs:
    """`model_kwargs:` (the reference's name for the streaming sizes, in latent frames)."""

    local_attn_size: int = field(metadata={"minimum": -1})
    timestep_shift: float = field(metadata=_POSITIVE)
    sink_size: int = field(metadata={"minimum": 0})
    bank_size: int = field(metadata={"minimum": 0})
    record_interval: int = field(metadata={"minimum": 1})
    SMA: bool
    sma_top_k: int = field(metadata={"minimum": 1})


@dataclass
class Adapter:
    """`adapter:` (LoRA). dtype, verbose and apply_to_critic are accepted and ignored."""

    type: Literal["lora"]
    rank: int = field(metadata={"minimum": 1})
    alpha: float | None = field(metadata=_POSITIVE)
    dropout: float = field(metadata={"minimum": 0})
    dtype: str
    verbose: bool
    apply_to_critic: bool


SEED_RANGE = {"minimum": 0, "maximum": 2**63 - 1}  # what a torch generator takes, with room for
# the per-prompt (seed + line) and per-rank (seed + rank) offsets


def _shape_section(name: str, fields: dict[str, Any], doc: str,
                   metadata: dict[str, dict[str, Any]] | None = None) -> type:
    specs = [(n, t, field(metadata=(metadata or {}).get(n, {}))) for n, t in fields.items()]
    return dataclasses.make_dataclass(name, specs, namespace={"__doc__": doc})


_DIT_FIELDS = typing.get_type_hints(DiTConfig)
TinyShape = _shape_section(
    "TinyShape", {**_DIT_FIELDS, "seed": int},
    "`tiny:` (preset: tiny): the DiT shape fields and the random seed.",
    {**{n: {"minimum": 1} for n, t in _DIT_FIELDS.items() if t is int}, "eps": _POSITIVE,
     "seed": SEED_RANGE},
)
TextEncoderShape = _shape_section(
    "TextEncoderShape", {n: int for n in inspect.signature(umt5_encoder_config).parameters},
    "`text_encoder_config:`: the arguments of `umt5_encoder_config`, read from its signature.",
)
VaeShape = _shape_section(
    "VaeShape", {n: Any for n in WAN21_VAE_CONFIG},
    "`vae_config:`: overrides of the Wan2.1 VAE config (values are checked by the VAE).",
)


@dataclass
class InferenceConfig:
    """The schema of `configs/*inference*.yaml` and `configs/tiny*.yaml`."""

    # mode and models
    mode: Literal["single", "interactive"] | None
    preset: Literal["tiny"] | None
    tiny: TinyShape | None  # type: ignore[valid-type]
    model_name: str = field(metadata=_NONEMPTY)
    wan_models_root: str = field(metadata=_NONEMPTY)
    generator_ckpt: str | None
    lora_ckpt: str | None
    adapter: Adapter | None
    use_ema: bool
    lora_merge: bool
    trust_checkpoints: bool
    text_encoder_config: TextEncoderShape | None  # type: ignore[valid-type]
    vae_config: VaeShape | None  # type: ignore[valid-type]
    # sampling and streaming
    denoising_step_list: list[int]
    warp_denoising_step: bool
    num_frame_per_block: int = field(metadata={"minimum": 1})
    model_kwargs: ModelKwargs | None
    num_output_frames: int = field(metadata={"minimum": 1})
    context_noise: float = field(metadata={"minimum": 0})
    global_sink: bool
    switch_frame_indices: str | int | list[int] | None
    switch: SwitchOptions | None
    behaviour: Literal["clean", "compat"]
    memory: MemoryOptions | None
    height: int = field(metadata=_POSITIVE)
    width: int = field(metadata=_POSITIVE)
    # prompts, seeds, output
    data_path: str = field(metadata=_NONEMPTY)
    inference_iter: int = field(metadata={"minimum": -1})
    num_samples: int
    seed: int = field(metadata=SEED_RANGE)
    seed_mode: SeedMode  # type: ignore[valid-type]
    output_folder: str = field(metadata=_NONEMPTY)
    save_with_index: bool
    skip_existing: bool
    overwrite: bool
    fps: float = field(metadata=_POSITIVE)
    # execution
    device: Device
    cpu_threads: int | None = field(metadata={"minimum": 1})
    dtype: DtypeName  # type: ignore[valid-type]
    vae_dtype: DtypeName  # type: ignore[valid-type]
    attn_backend: AttnBackend  # type: ignore[valid-type]
    text_encoder_offload: bool


def check_tiny_shape(cfg: DictConfig) -> None:
    """The `tiny:` section as a whole makes a DiT (e.g. `dim` divisible by `num_heads`): the
    relations between its keys, which a per-key schema cannot express."""
    tiny = cfg.get("tiny") if isinstance(cfg, DictConfig) else None
    if not tiny:
        return
    shape = {k: v for k, v in OmegaConf.to_container(tiny).items() if k != "seed"}
    try:
        DiTConfig.from_dict(shape)
    except ValueError as err:
        raise InputError(f"config key `tiny`: {err}") from None


def check_inference_config(cfg: DictConfig) -> None:
    """Check every key, type and allowed value of an already loaded config."""
    check_section(cfg, InferenceConfig)
    check_tiny_shape(cfg)


def load_inference_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> DictConfig:
    """The config file at `path` with ``key=value`` `overrides`, checked against the schema."""
    cfg = load_config(path, overrides, schema=InferenceConfig)
    check_tiny_shape(cfg)
    return cfg
