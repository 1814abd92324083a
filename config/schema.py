"""Every config key of inference and training, in one place: its type, default, bounds, allowed
values and, where the reference spells it differently, its spelling as an alias.

The keys are grouped in sections, one dataclass each (stream, sampling, model, runtime, output,
optimisation, long tuning, ...). `InferenceConfig` and `TrainConfig` compose the sections they
use, so a key the two share (``model_kwargs.sink_size``, ``denoising_step_list``, ``behaviour``)
has one definition and one default. `settings_from_config` builds the typed object of a schema
from a loaded YAML (+ ``key=value`` overrides): absent keys take the defaults written here.

Field metadata (read by `config.checker`, which checks a config against a schema before anything
loads): ``minimum`` / ``maximum`` / ``below``, ``positive``, ``nonempty``, ``choices`` (a
function giving the allowed values when a config is checked: a registry's names); ``alias`` is the key as the YAML
spells it when that is no Python name we want (the reference's ``model_kwargs.SMA``);
``overrides``: the section is a mapping of per-option overrides of a behaviour preset
(``memory:``, ``switch:``), kept as a mapping for the code that applies them.

Adding a config key: add one field (its type, default and bounds) to the section it belongs to,
here; that is the only place. It is then checked on load, in files and ``key=value`` overrides,
takes its default when absent, and is read where it is used: inference from the typed
`InferenceConfig` that `pipeline.runner` and `pipeline.build` receive, training from
`TrainSettings.config` (a `TrainConfig`). ``configs/default_config.yaml`` may document it (a
value written there must be the default; tests/test_config_schema.py checks). A key backed by a
model-library object takes that object's default (`_library`: the library sits below the
configuration); the training objects (`trainer.rollout.RolloutConfig`, ...) read theirs from
here. Either way the value itself has one home.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from omegaconf import DictConfig

from memflow.attention import backend_names
from memflow.config import (
    DiTConfig,
    MemoryOptions,
    Positions,
    SamplingConfig,
    StreamConfig,
    SwitchOptions,
)
from memflow.errors import InputError
from memflow.lora import LoraSettings
from memflow.text_encoder import umt5_encoder_config
from memflow.vae import WAN21_VAE_CONFIG

from .checker import config_key, plain_value, section_of
from .loader import DTYPES

SEED_MODES = ("per_prompt", "per_rank", "shared")  # how a run's seed spreads over prompts, ranks
DtypeName = Literal[tuple(DTYPES)]  # type: ignore[valid-type]
SeedMode = Literal[SEED_MODES]  # type: ignore[valid-type]
Device = Literal["auto", "cpu", "cuda"]

_POSITIVE = {"positive": True}
_NONEMPTY = {"nonempty": True}
SEED_RANGE = {"minimum": 0, "maximum": 2**63 - 1}  # what a torch generator takes, with room for
# the per-prompt (seed + line) and per-rank (seed + rank) offsets
_OVERRIDES = {"overrides": True}
_BETA = {"minimum": 0, "below": 1}  # Adam betas and the EMA decay
_UNUSED = {"ignored": True}  # accepted so the reference's configs load; named in IGNORED_KEYS


def _library(cls: type, name: str, **metadata: Any) -> Any:
    """A schema field whose default is the library object's own default of field `name` (the
    one home of that value); `metadata` are its bounds."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=metadata)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ---- sections ---------------------------------------------------------------------------------
@dataclass
class ModelKwargs:
    """`model_kwargs:` (the reference's name for the streaming sizes, in latent frames)."""

    local_attn_size: int = _library(StreamConfig, "local_attn_size", minimum=-1)  # -1: all frames
    timestep_shift: float = _library(SamplingConfig, "timestep_shift", positive=True)
    sink_size: int = _library(StreamConfig, "sink_size", minimum=0)
    bank_size: int = _library(StreamConfig, "bank_size", minimum=0)
    record_interval: int = _library(StreamConfig, "record_interval", minimum=1)  # chunks/prototype
    sma: bool = _library(StreamConfig, "sma", alias="SMA")  # sparse memory activation
    sma_top_k: int = _library(StreamConfig, "sma_top_k", minimum=1)
    memory_layout: str = _library(StreamConfig, "memory_layout")  # memflow.memory_sources
    memory_options: dict[str, Any] = _library(StreamConfig, "memory_options")  # the layout's


@dataclass
class Adapter:
    """`adapter:` (LoRA, TRAINING.md §6.2: every linear of every block); apply_to_critic is read
    by training. dtype and verbose are the reference's, which only prints them: accepted, never
    read (`IGNORED_KEYS`)."""

    type: Literal["lora"] = "lora"
    rank: int = field(default=16, metadata={"minimum": 1})
    alpha: float | None = field(default=None, metadata=_POSITIVE)  # null: rank
    dropout: float = field(default=0.0, metadata={"minimum": 0, "below": 1})
    dtype: str = field(default="bfloat16", metadata=_UNUSED)
    verbose: bool = field(default=False, metadata=_UNUSED)
    apply_to_critic: bool = True

    def lora_settings(self) -> LoraSettings:
        """The library's LoRA settings; alpha defaults to the rank, as in the reference."""
        return LoraSettings(rank=int(self.rank), alpha=float(self.alpha or self.rank),
                            dropout=float(self.dropout))


def _shape_section(name: str, fields: dict[str, Any], doc: str,
                   metadata: dict[str, dict[str, Any]] | None = None) -> type:
    """A section whose keys are another object's arguments (a mapping passed on as it is)."""
    specs = [(n, t, field(default=None, metadata=(metadata or {}).get(n, {})))
             for n, t in fields.items()]
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
class StreamKeys:
    """The streaming window, sink and memory bank (`memflow.config.StreamConfig`)."""

    behaviour: Literal["clean", "compat"] = "clean"  # compat: the reference's numerics
    num_frame_per_block: int = _library(StreamConfig, "num_frame_per_block", minimum=1)
    model_kwargs: ModelKwargs | None = field(default_factory=ModelKwargs)
    memory: MemoryOptions | None = field(default_factory=dict, metadata=_OVERRIDES)
    # RoPE frame positions: absolute (the reference's; a stream ends at the RoPE table) or
    # relative (placed in the attended context at every call; endless). docs/behaviour.md
    positions: Positions = _library(StreamConfig, "positions")


@dataclass
class SamplingKeys:
    """The few-step sampler (`memflow.config.SamplingConfig`)."""

    denoising_step_list: list[int] = _library(SamplingConfig, "denoising_step_list")
    # map the list through the shifted timestep table
    warp_denoising_step: bool = _library(SamplingConfig, "warp_denoising_step")
    context_noise: float = _library(SamplingConfig, "context_noise", minimum=0)


@dataclass
class SwitchKeys:
    """Prompt switches (`memflow.config.SwitchOptions`)."""

    global_sink: bool = True  # false: the reference's all-zero sink after a switch (compat)


@dataclass
class ModelKeys:
    """Where the weights come from."""

    preset: Literal["tiny"] | None = None  # tiny: random tiny models built in memory
    wan_models_root: str = field(default="wan_models", metadata=_NONEMPTY)
    lora_ckpt: str | None = None
    adapter: Adapter | None = None
    trust_checkpoints: bool = False  # load checkpoints holding pickled objects (runs their code)


@dataclass
class RuntimeKeys:
    """Device, precision and kernels."""

    device: Device = "auto"
    vae_dtype: DtypeName = "bfloat16"  # type: ignore[valid-type]
    # the registry's names when checked, so a backend added by `register_backend` is selectable
    attn_backend: str = field(default="auto", metadata={"choices": backend_names})
    # torch.compile the DiT's blocks; inference then keeps the stream in fixed-shape buffers
    # (memflow/static_stream.py: a few graphs, never a recompilation)
    compile: bool = False
    # inference on CUDA: also capture each compiled call as a CUDA graph and replay it
    cuda_graphs: bool = False


# ---- inference --------------------------------------------------------------------------------
@dataclass
class InferenceOnlyKeys:
    """Keys only inference reads: models, switches, prompts, seeds, output and execution."""

    mode: Literal["single", "interactive"] | None = None
    tiny: TinyShape | None = None  # type: ignore[valid-type]
    model_name: str = field(default="Wan2.1-T2V-1.3B", metadata=_NONEMPTY)
    generator_ckpt: str | None = None
    use_ema: bool = False
    lora_merge: bool = False
    text_encoder_config: TextEncoderShape | None = None  # type: ignore[valid-type]
    vae_config: VaeShape | None = None  # type: ignore[valid-type]
    num_output_frames: int = field(default=120, metadata={"minimum": 1})
    # a prompt line's "video" to continue: write the source clip before the new frames
    prepend_source: bool = False
    switch_frame_indices: str | int | list[int] | None = None
    switch: SwitchOptions | None = field(default=None, metadata=_OVERRIDES)
    height: int = field(default=480, metadata=_POSITIVE)
    width: int = field(default=832, metadata=_POSITIVE)
    data_path: str | None = field(default=None, metadata=_NONEMPTY)
    inference_iter: int = field(default=-1, metadata={"minimum": -1})
    num_samples: Literal[1] = 1  # one video per prompt and seed
    seed: int = field(default=0, metadata=SEED_RANGE)
    seed_mode: SeedMode = "per_prompt"  # type: ignore[valid-type]
    output_folder: str = field(default="videos", metadata=_NONEMPTY)
    save_with_index: bool = True
    skip_existing: bool = False
    overwrite: bool = False
    fps: float = field(default=16.0, metadata=_POSITIVE)
    cpu_threads: int | None = field(default=None, metadata={"minimum": 1})
    dtype: DtypeName = "bfloat16"  # type: ignore[valid-type]
    text_encoder_offload: bool = False


@dataclass
class InferenceConfig(InferenceOnlyKeys, RuntimeKeys, ModelKeys, SwitchKeys, SamplingKeys,
                      StreamKeys):
    """The schema of `configs/*inference*.yaml` and `configs/tiny*.yaml`."""


# ---- training ---------------------------------------------------------------------------------
NEGATIVE_PROMPT = '色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走'  # Wan's


@dataclass
class TrainModelKeys:
    """The networks of a run (TRAINING.md §2): generator, frozen teacher, trainable critic."""

    trainer: Literal["score_distillation"] = "score_distillation"
    distribution_loss: Literal["dmd", "dmd_switch"] = "dmd"  # dmd_switch: stage 2
    real_name: str = field(default="Wan2.1-T2V-14B", metadata=_NONEMPTY)  # teacher, in wan_models_root
    fake_name: str = field(default="Wan2.1-T2V-1.3B", metadata=_NONEMPTY)  # critic folder
    generator_name: str = field(default="Wan2.1-T2V-1.3B", metadata=_NONEMPTY)  # generator's base
    generator_ckpt: str | None = "checkpoints/ode_init.pt"
    tiny: Any = field(default_factory=dict)  # preset: tiny; also `teacher:` / `critic:` shapes


@dataclass
class ScoreKeys:
    """The DMD and critic losses (`trainer.score.ScoreConfig`)."""

    num_train_timestep: int = field(default=1000, metadata={"minimum": 1})
    timestep_shift: float = field(default=5.0, metadata=_POSITIVE)
    guidance_scale: float = field(default=3.0, metadata={"minimum": 0})  # teacher CFG
    real_guidance_scale: float | None = field(default=None, metadata={"minimum": 0})  # overrides
    # guidance_scale when set
    fake_guidance_scale: float | None = None  # critic CFG: only 0 / null
    negative_prompt: str = NEGATIVE_PROMPT
    denoising_loss_type: Literal["flow"] = "flow"
    ts_schedule: bool = False
    ts_schedule_max: bool = False
    min_score_timestep: int = field(default=0, metadata={"minimum": 0})


@dataclass
class RolloutKeys:
    """Stage-1 rollouts (`trainer.rollout.RolloutConfig`) and the latent geometry."""

    same_step_across_blocks: bool = True
    last_step_only: bool = False
    independent_first_frame: bool = False  # unsupported (as in the reference)
    num_training_frames: int = field(default=21, metadata={"minimum": 1})
    min_num_training_frames: int = field(default=21, metadata={"minimum": 1})
    slice_last_frames: int = field(default=21, metadata={"minimum": 1})
    image_or_video_shape: list[int] = field(default_factory=lambda: [1, 21, 16, 60, 104])
    i2v: bool = False  # unsupported (as in the reference)


@dataclass
class PrecisionKeys:
    gradient_checkpointing: bool = True
    mixed_precision: bool = True  # compute in compute_dtype
    param_dtype: DtypeName = "float32"  # type: ignore[valid-type]  # master weights
    compute_dtype: DtypeName = "bfloat16"  # type: ignore[valid-type]


@dataclass
class OptimKeys:
    """The two AdamW optimisers, their clipping, the update ratio and the EMA."""

    lr: float = field(default=2.0e-6, metadata=_POSITIVE)
    lr_critic: float = field(default=4.0e-7, metadata=_POSITIVE)
    beta1: float = field(default=0.0, metadata=_BETA)
    beta2: float = field(default=0.999, metadata=_BETA)
    beta1_critic: float = field(default=0.0, metadata=_BETA)
    beta2_critic: float = field(default=0.999, metadata=_BETA)
    weight_decay: float = field(default=0.01, metadata={"minimum": 0})
    max_grad_norm_generator: float = field(default=10.0, metadata=_POSITIVE)
    max_grad_norm_critic: float = field(default=10.0, metadata=_POSITIVE)
    dfake_gen_update_ratio: int = field(default=5, metadata={"minimum": 1})
    ema_weight: float | None = field(default=0.99, metadata=_BETA)  # null: no EMA
    ema_start_step: int = field(default=200, metadata={"minimum": 0})
    batch_size: int = field(default=1, metadata={"minimum": 1})
    gradient_accumulation_steps: int = field(default=1, metadata={"minimum": 1})
    max_iters: int = field(default=700, metadata={"minimum": 0})
    seed: int = field(default=0, metadata=SEED_RANGE)  # 0: a random seed, kept in checkpoints
    gc_interval: int = field(default=100, metadata={"minimum": 1})


@dataclass
class DistributedKeys:
    """FSDP2 sharding. FSDP2 always shards over every rank (a hybrid strategy's inter-node
    replication is not modelled, which on one node is the same): full / hybrid_full reshard after
    each forward (ZeRO-3), hybrid_zero2 keeps the gathered weights until the backward (ZeRO-2)."""

    sharding_strategy: Literal["full", "hybrid_full", "hybrid_zero2"] = "hybrid_full"
    text_encoder_cpu_offload: bool = False


@dataclass
class DataKeys:
    data_path: str | None = "prompts/vidprom_filtered_extended.txt"  # required
    switch_prompt_path: str | None = None  # stage 2, line-aligned with data_path
    val_data_path: str | None = "prompts/vidprom_filtered_extended.txt"
    val_switch_prompt_path: str | None = None
    data_seed: int = field(default=0, metadata={"minimum": 0})
    data_shuffle: Literal["epoch", "fixed", "none"] | None = None  # null: by behaviour


@dataclass
class TrainOutputKeys:
    """Checkpoints, visualisation, logging and the command-line flags' keys."""

    log_iters: int = field(default=100, metadata={"minimum": 1})  # checkpoint period
    max_checkpoints: int = field(default=5, metadata={"minimum": 0})
    vis_interval: int = field(default=200, metadata={"minimum": 0})
    vis_video_lengths: list[int] = field(default_factory=lambda: [21])
    val_batch_size: int = field(default=1, metadata={"minimum": 1})
    vis_ema: bool = False  # true is not implemented (as in the reference)
    wandb_entity: str | None = None
    wandb_project: str | None = "memflow"
    wandb_mode: Literal["offline", "disabled"] = "offline"
    logdir: str | None = ""
    no_save: bool = False
    wandb_save_dir: str | None = ""
    disable_wandb: bool = False
    auto_resume: bool = True


@dataclass
class LongTuningKeys:
    """Stage 2, streaming long tuning (`trainer.long_sequence.LongTuningConfig`, TRAINING.md §5)."""

    streaming_training: bool = False
    # the window the losses see, latent frames
    streaming_chunk_size: int = field(default=21, metadata={"minimum": 1})
    streaming_max_length: int | None = field(default=None, metadata={"minimum": 1})  # null: 57
    streaming_possible_max_length: list[int] | None = None
    streaming_min_new_frame: int = field(default=18, metadata={"minimum": 1})
    train_first_chunk: bool = True
    switch_mode: Literal["random_choice", "fixed", "random"] = "random_choice"
    switch_choices: list[int] | None = None
    fixed_switch_index: int | None = None  # null: 21
    min_switch_frame_index: int | None = None
    max_switch_frame_index: int | None = None
    # stage 2: every sequence starts from an image of this folder (sequence i: the i-th, in
    # name order, cycling), encoded as its first latent frame; null: from nothing
    start_images: str | None = field(default=None, metadata=_NONEMPTY)




@dataclass
class ReferenceOnlyKeys:
    """Keys of the reference's configs that this project accepts, so that they load unchanged,
    and never reads (each is named in `IGNORED_KEYS` with the reason)."""

    total_batch_size: int | None = field(default=64, metadata=_UNUSED)
    generator_fsdp_wrap_strategy: str | None = field(default="size", metadata=_UNUSED)
    real_score_fsdp_wrap_strategy: str | None = field(default="size", metadata=_UNUSED)
    fake_score_fsdp_wrap_strategy: str | None = field(default="size", metadata=_UNUSED)
    text_encoder_fsdp_wrap_strategy: str | None = field(default="size", metadata=_UNUSED)
    causal: bool = field(default=True, metadata=_UNUSED)
    wandb_key: str | None = field(default=None, metadata=_UNUSED)
    one_logger_project: str | None = field(default=None, metadata=_UNUSED)
    load_raw_video: bool = field(default=False, metadata=_UNUSED)
    no_visualize: bool = field(default=False, metadata=_UNUSED)
    use_one_logger: bool = field(default=False, metadata=_UNUSED)
    ckpt_step: Any = field(default=None, metadata=_UNUSED)
    prompt_name: Any = field(default=None, metadata=_UNUSED)
    prompt_path: Any = field(default=None, metadata=_UNUSED)
    eval_first_n: Any = field(default=None, metadata=_UNUSED)
    num_samples: int = field(default=1, metadata=_UNUSED)
    height: int = field(default=480, metadata=_UNUSED)
    width: int = field(default=832, metadata=_UNUSED)
    num_frames: int = field(default=81, metadata=_UNUSED)
    discriminator_lr_multiplier: float = field(default=1.0, metadata=_UNUSED)


IGNORED_KEYS = {
    "total_batch_size": "documents the reference's 64-GPU runs; the batch is batch_size per rank",
    "generator_fsdp_wrap_strategy": "FSDP2 wraps every DiT block (memflow.fsdp)",
    "real_score_fsdp_wrap_strategy": "FSDP2 wraps every DiT block (memflow.fsdp)",
    "fake_score_fsdp_wrap_strategy": "FSDP2 wraps every DiT block (memflow.fsdp)",
    "text_encoder_fsdp_wrap_strategy": "the text encoder is not sharded",
    "causal": "the generator is always causal",
    "wandb_key": "this project never logs in (no network)",
    "one_logger_project": "One Logger is omitted",
    "load_raw_video": "training is data-free (prompts only)",
    "no_visualize": "unused in the reference too",
    "use_one_logger": "One Logger is omitted",
    "ckpt_step": "an inference key of the reference's default config",
    "prompt_name": "an inference key of the reference's default config",
    "prompt_path": "an inference key of the reference's default config",
    "eval_first_n": "an inference key of the reference's default config",
    "num_samples": "an inference key of the reference's default config",
    "height": "training geometry comes from image_or_video_shape",
    "width": "training geometry comes from image_or_video_shape",
    "num_frames": "training lengths come from num_training_frames",
    "discriminator_lr_multiplier": "there is no discriminator",
    "adapter.dtype": "the LoRA weights take the model's dtype (the reference only prints it)",
    "adapter.verbose": "the reference only prints it",
}


@dataclass
class TrainConfig(ReferenceOnlyKeys, LongTuningKeys, TrainOutputKeys, DataKeys, DistributedKeys,
                  OptimKeys, PrecisionKeys, RolloutKeys, ScoreKeys, TrainModelKeys, RuntimeKeys,
                  ModelKeys, SwitchKeys, SamplingKeys, StreamKeys):
    """The schema of a training config (`configs/default_config.yaml` lists its defaults)."""


# ---- building typed settings ------------------------------------------------------------------
def settings_from_config(values: Mapping[str, Any] | DictConfig, schema: type) -> Any:
    """The `schema` dataclass holding `values` (a checked config), defaults for absent keys.

    A section given as a mapping becomes its dataclass (absent sub-keys take their defaults),
    except the override sections (``memory:``, ``switch:``) and the shape sections whose
    fields have no defaults of their own (``tiny:``), which stay plain mappings.
    """
    values = plain_value(values) or {}
    hints = typing.get_type_hints(schema)
    kwargs, known = {}, set()
    for f in dataclasses.fields(schema):
        key = config_key(f)
        known.add(key)
        if key not in values:
            continue
        value, section = values[key], section_of(hints[f.name])
        if value == {} and f.default is None and not f.metadata.get("overrides"):
            value = None  # `adapter: {}` is no adapter
        if (isinstance(value, dict) and section is not None and not f.metadata.get("overrides")
                and section.__module__ == __name__ and section not in _SHAPES):
            value = settings_from_config(value, section)
        kwargs[f.name] = _as_annotated(value, hints[f.name])
    unknown = [k for k in values if k not in known]
    if unknown:
        raise InputError(f"unknown config key `{unknown[0]}`")
    return schema(**kwargs)


def _as_annotated(value: Any, annotation: Any) -> Any:
    """A checked number as its field's type: YAML's ``3.0`` for an int key is 3 and ``1`` for a
    float key is 1.0, so typed settings hold what their annotations say."""
    kinds = set(typing.get_args(annotation)) or {annotation}
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and int in kinds and float not in kinds and value.is_integer():
        return int(value)
    if isinstance(value, int) and float in kinds and int not in kinds:
        return float(value)
    return value


def schema_defaults(schema: type) -> dict[str, Any]:
    """The defaults of `schema` as a YAML mapping would write them (aliases as keys)."""
    out = {}
    for f in dataclasses.fields(schema):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[config_key(f)] = schema_defaults(type(value)) if dataclasses.is_dataclass(value) else value
    return out


_SHAPES = (TinyShape, TextEncoderShape, VaeShape)
