"""Training configs: loading and merging (TRAINING.md §1.1) and the typed settings of a run.

`load_train_config` reproduces the reference's layering, with its gaps closed:
1. ``configs/default_config.yaml`` of **this repository** (not of the working directory) is the
   base: the reference's stage-1 values, commented;
2. the specific YAML (``--config_path``) is merged on top (nested sections key by key);
3. ``key=value`` overrides (new: the reference has none);
4. the command-line flags (``--logdir``, ``--no_save``, ``--disable-wandb``, ...) set their keys.
   Unlike the reference, a flag that is not given leaves the YAML value alone;
5. ``config_name`` = the config file's stem ("train_init"; the reference takes the directory
   name, "configs", spec §10 item 17). It only names the wandb run.

Every key's type, default, bounds and allowed values are the one schema's
(`config.schema.TrainConfig`, which shares its stream, sampling, model and runtime sections
with inference): files and overrides are checked against it as they load (an unknown key such as
``dfake_gen_update_raito`` fails with a "did you mean" hint), and an absent key takes the schema's
default. `TrainSettings.from_config` then composes the typed config into the objects the training
loop reads (`StreamConfig` and `SamplingConfig` built by the same functions as inference's,
`RolloutConfig`, `ScoreConfig`, `LongTuningConfig`, the optimisers), checking only the rules that
relate keys to each other, so a bad value fails in one line naming its key before any model is
built.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from config.checker import check_known_keys, check_section, unknown_key_error
from config.loader import DTYPES, _load_yaml, load_config, require_path, require_wan_folder
from config.schema import TrainConfig, settings_from_config
from config.stream import (PATCH, check_tiny_shape, memory_preset, sampling_config, stream_config,
                           with_overrides)
from memflow.config import DiTConfig, SamplingConfig, StreamConfig
from memflow.errors import InputError
from memflow.lora import LoraSettings
from memflow.tiny import tiny_rope_frames, tiny_seed, tiny_text_len
from trainer.long_sequence import LongTuningConfig
from trainer.rollout import RolloutConfig
from trainer.score import ScoreConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default_config.yaml"

ADAM_EPS = 1e-8  # torch default, as in the reference (spec §10 "hard-coded constants")


# ------------------------------------------------------------------------------------------------
# Command-line flags
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CliFlags:
    """The reference's command-line flags (spec §1.1 item 4). None = flag not given: the YAML
    value stays."""

    logdir: str | None = None
    no_save: bool | None = None
    no_visualize: bool | None = None
    wandb_save_dir: str | None = None
    disable_wandb: bool | None = None
    auto_resume: bool | None = None
    use_one_logger: bool | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping[str, Any]) -> CliFlags:
        """From `add_train_arguments`' namespace (or any mapping / object with these names)."""
        get = args.get if isinstance(args, Mapping) else lambda k, d=None: getattr(args, k, d)
        return cls(**{f.name: get(f.name, None) for f in dataclasses.fields(cls)})

    def as_updates(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training script's arguments: the reference's flags plus positional key=value
    overrides. `CliFlags.from_args(parser.parse_args())` reads them back."""
    parser.add_argument("--config_path", required=True, help="training YAML (see configs/)")
    parser.add_argument("--logdir", default=None, help="run folder: checkpoints, log.jsonl")
    parser.add_argument("--no_save", action="store_true", default=None, help="write no checkpoints")
    parser.add_argument("--no_visualize", action="store_true", default=None, help="(unused)")
    parser.add_argument("--wandb-save-dir", dest="wandb_save_dir", default=None)
    parser.add_argument("--disable-wandb", dest="disable_wandb", action="store_true", default=None)
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--auto_resume", "--auto-resume", dest="auto_resume",
                        action="store_true", default=None,
                        help="resume from the newest checkpoint in --logdir (the default)")
    resume.add_argument("--no-auto-resume", "--no_auto_resume", dest="auto_resume",
                        action="store_false", default=None)
    parser.add_argument("--no-one-logger", "--no_one_logger", dest="use_one_logger",
                        action="store_false", default=None, help="(accepted; One Logger is omitted)")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    return parser


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load_train_config(
    config_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    cli_flags: CliFlags | Mapping[str, Any] | argparse.Namespace | None = None,
    *,
    defaults_path: str | os.PathLike[str] = DEFAULT_CONFIG,
) -> DictConfig:
    """The merged training config: defaults < `config_path` < `overrides` < `cli_flags`.

    Raises `InputError` (one line) for a missing or malformed file, and for a key unknown to the
    schema or a value of the wrong type, in either file or in an override, with the closest known
    key as a suggestion. The relations between keys are checked by `TrainSettings.from_config`.
    """
    config_path, defaults_path = Path(config_path), Path(defaults_path)
    defaults = _load_yaml(defaults_path)
    check_known_keys(defaults, TrainConfig, where=str(defaults_path))
    cfg = OmegaConf.merge(defaults, load_config(config_path, overrides, schema=TrainConfig))
    if cli_flags is not None:
        if not isinstance(cli_flags, CliFlags):
            cli_flags = CliFlags.from_args(cli_flags)
        cfg = OmegaConf.merge(cfg, cli_flags.as_updates())
    cfg.config_name = config_path.stem
    return cfg


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimSettings:
    """One AdamW optimiser (constant learning rate) and its gradient clipping."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    max_grad_norm: float
    eps: float = ADAM_EPS


@dataclass(frozen=True)
class WandbSettings:
    """wandb logging (rank 0 only). Never online: `mode` is offline or disabled."""

    enabled: bool
    mode: str
    project: str | None
    entity: str | None
    save_dir: str | None
    run_name: str


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
        generator["seed"] = tiny_seed(generator)
        text_len = tiny_text_len(generator)
        roles = {}
        for role in TINY_ROLES:
            own = _tiny_role(section.get(role), f"tiny.{role}", shape_keys)
            if "text_len" in own and own["text_len"] != text_len:
                raise InputError(
                    f"config key `tiny.{role}.text_len` ({own['text_len']}) must equal "
                    f"`tiny.text_len` ({text_len}): all models read the same text embedding"
                )
            roles[role] = {**generator, **own}
        for key, shape in (("tiny", generator), *((f"tiny.{r}", s) for r, s in roles.items())):
            check_tiny_shape(shape, key)
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
            raise unknown_key_error(f"{where}.{k}", [f"{where}.{a}" for a in sorted(allowed)])
    return dict(mapping)


@dataclass(frozen=True)
class TrainSettings:
    """A run's settings (TRAINING.md §1.2): the typed config itself (`config`: every key as the
    schema defines it; a key that needs no conversion is read there, ``settings.config.max_iters``)
    and what is derived from it, each in one field: the library's objects, resolved paths and
    dtypes, and the values whose meaning depends on other keys."""

    config: TrainConfig
    compat: bool
    stage: int  # 1: Self-Forcing rollouts (dmd); 2: streaming long tuning (dmd_switch)
    # models
    tiny: TinyModels | None  # preset: tiny
    wan_models_root: Path
    generator_ckpt: Path | None
    # rollout, schedule and losses
    stream: StreamConfig
    sampling: SamplingConfig
    rollout: RolloutConfig
    streaming: LongTuningConfig | None  # stage 2 only
    lora: LoraSettings | None  # `adapter:` set: only LoRA weights train (TRAINING.md §6)
    lora_on_critic: bool  # adapter.apply_to_critic (else the whole critic trains)
    lora_ckpt: Path | None  # LoRA weights to start from when nothing is auto-resumed
    inherit_base_step: bool  # compat: the step counter starts at generator_ckpt's "step"
    score: ScoreConfig
    latent_channels: int
    latent_hw: tuple[int, int]
    # precision
    param_dtype: torch.dtype
    compute_dtype: torch.dtype  # bf16 (compute_dtype) with mixed_precision, else param_dtype
    vae_dtype: torch.dtype
    # optimisation
    generator_optim: OptimSettings
    critic_optim: OptimSettings
    seed: int  # 0: draw a random seed on rank 0 and broadcast (spec §7.3); train.py resolves it
    ema_weight: float | None  # None: no EMA (LoRA mode, or ema_weight null)
    # data
    data_path: Path
    val_data_path: Path
    switch_prompt_path: Path | None
    val_switch_prompt_path: Path | None
    data_shuffle: str  # epoch | fixed | none (null in the config: by behaviour)
    # output
    logdir: Path | None
    wandb: WandbSettings

    @property
    def frames_per_block(self) -> int:
        return self.stream.num_frame_per_block

    @property
    def reshard_after_forward(self) -> bool:
        """FSDP2's reading of `sharding_strategy`: free gathered weights after each forward."""
        return not self.config.sharding_strategy.endswith("zero2")

    def train_generator(self, step: int) -> bool:
        """Whether iteration `step` (read before its increment) updates the generator."""
        return step % self.config.dfake_gen_update_ratio == 0

    @classmethod
    def from_config(cls, cfg: DictConfig, *, check_files: bool = True) -> TrainSettings:
        """Validate `cfg` (from `load_train_config`). `check_files` also checks that the prompt
        files and (unless ``preset: tiny``) the model folders and checkpoints exist."""
        return _parse(cfg, check_files)



# ------------------------------------------------------------------------------------------------
# Composing the typed config into the settings (the schema has checked types, enums and bounds;
# what is checked here relates keys to each other)
# ------------------------------------------------------------------------------------------------
def _typed(cfg: DictConfig) -> TrainConfig:
    """The config checked against the schema, as its typed object (absent keys: defaults).
    `config_name` is set by the loader, not by a file."""
    values = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "config_name"}
    check_section(values, TrainConfig)
    return settings_from_config(values, TrainConfig)


def _check_compile(c: TrainConfig) -> None:
    if c.cuda_graphs:
        raise InputError("config key `cuda_graphs`: CUDA graphs are for inference (a training "
                         "rollout's shapes and graph change every step); use compile: true")


def _stage(c: TrainConfig) -> tuple[bool, int]:
    """(compat, stage) from `behaviour` and the loss; the unsupported reference switches fail."""
    streaming = c.streaming_training
    if streaming != (c.distribution_loss == "dmd_switch"):
        raise InputError(
            "config keys `distribution_loss` and `streaming_training` disagree: stage 1 is "
            "dmd without streaming_training, stage 2 dmd_switch with streaming_training: true"
        )
    for key in ("i2v", "independent_first_frame", "vis_ema"):
        if getattr(c, key):
            raise InputError(f"config key `{key}`: true is not supported (nor working in the reference)")
    if c.fake_guidance_scale not in (None, 0):
        raise InputError(f"config key `fake_guidance_scale`: critic CFG is not supported, "
                         f"got {c.fake_guidance_scale!r}")
    return c.behaviour == "compat", 2 if streaming else 1


def _latent_shape(c: TrainConfig) -> tuple[int, tuple[int, int]]:
    """(channels, (h, w)) of `image_or_video_shape` [B, F, C, h, w]."""
    shape = c.image_or_video_shape
    if len(shape) != 5 or any(v <= 0 for v in shape):
        raise InputError(
            f"config key `image_or_video_shape` must be 5 positive integers [B, F, C, h, w], got {shape!r}"
        )
    channels, h, w = shape[2:]
    if h % PATCH or w % PATCH:
        raise InputError(
            f"config key `image_or_video_shape`: latent size {h}x{w} must be even (patch {PATCH})"
        )
    return channels, (h, w)


def _stream_and_sampling(c: TrainConfig, compat: bool, stage: int) -> tuple[StreamConfig, SamplingConfig]:
    """The library's stream and sampler settings, built by the same functions as inference's
    from the shared schema sections (`model_kwargs:`, the step list, `memory:`)."""
    memory = with_overrides(memory_preset(compat, f"stage{stage}"), c.memory, "memory")
    return (stream_config(c, memory),
            sampling_config(c, c.model_kwargs))


def _optimisation(c: TrainConfig, lora: LoraSettings | None) -> dict[str, Any]:
    """The two optimisers, the update ratio, the EMA (none with LoRA, spec §2.4) and the seed."""
    return dict(
        generator_optim=OptimSettings(c.lr, (c.beta1, c.beta2), c.weight_decay,
                                      c.max_grad_norm_generator),
        critic_optim=OptimSettings(c.lr_critic, (c.beta1_critic, c.beta2_critic), c.weight_decay,
                                   c.max_grad_norm_critic),
        seed=c.seed,
        ema_weight=None if lora is not None else c.ema_weight,
    )


def _precision(c: TrainConfig) -> dict[str, Any]:
    param_dtype = DTYPES[c.param_dtype]
    return dict(
        param_dtype=param_dtype,
        compute_dtype=DTYPES[c.compute_dtype] if c.mixed_precision else param_dtype,
        vae_dtype=DTYPES[c.vae_dtype],
    )


def _path(c: TrainConfig, key: str, *, required: bool, check: bool) -> Path | None:
    """The path config key `key` names (None when unset and not required); with `check` it must
    exist (`config.loader.require_path`)."""
    value = getattr(c, key)
    if value is None or value == "":
        if required:
            raise InputError(f"config key `{key}` is not set")
        return None
    return require_path(c, key) if check else Path(value).expanduser()


def _prompt_file(c: TrainConfig, key: str, *, required: bool, check: bool) -> Path | None:
    path = _path(c, key, required=required, check=check)
    if path is not None and check and path.stat().st_size == 0:
        raise InputError(f"config key `{key}`: prompt file {path} is empty")
    return path


def _models(c: TrainConfig, check_files: bool, lora: LoraSettings | None) -> dict[str, Any]:
    """Where the networks come from; unless tiny, the model folders and checkpoints exist."""
    tiny = TinyModels.from_section(c.tiny) if c.preset == "tiny" else None
    root = Path(c.wan_models_root).expanduser()
    real_files = check_files and tiny is None
    generator_ckpt = _path(c, "generator_ckpt", required=False, check=real_files)
    lora_ckpt = _path(c, "lora_ckpt", required=False, check=check_files)
    if lora_ckpt is not None and lora is None:
        raise InputError("config key `lora_ckpt` is set but `adapter` is null: LoRA weights need "
                         "an adapter section (type, rank, alpha)")
    if real_files:
        for key, codecs in (("generator_name", True), ("real_name", False), ("fake_name", False)):
            require_wan_folder(root / getattr(c, key), f"wan_models_root/{key}", codecs=codecs)
    return dict(tiny=tiny, wan_models_root=root, generator_ckpt=generator_ckpt, lora_ckpt=lora_ckpt)


def _data(c: TrainConfig, stage: int, compat: bool, check_files: bool) -> dict[str, Any]:
    """The prompt files (stage 2: line-aligned switch prompts) and their order."""
    data_path = _prompt_file(c, "data_path", required=True, check=check_files)
    val_data_path = _prompt_file(c, "val_data_path", required=False, check=check_files) or data_path
    switch_path = _prompt_file(c, "switch_prompt_path", required=stage == 2, check=check_files)
    val_switch_path = (_prompt_file(c, "val_switch_prompt_path", required=False, check=check_files)
                       or switch_path)
    if stage == 2 and check_files:
        from .data import read_switch_prompts

        read_switch_prompts(data_path, switch_path)  # line-aligned, before any model is built
        if val_switch_path is not None:
            read_switch_prompts(val_data_path, val_switch_path)
    shuffle = c.data_shuffle or ("fixed" if compat else "epoch")
    return dict(data_path=data_path, val_data_path=val_data_path, switch_prompt_path=switch_path,
                val_switch_prompt_path=val_switch_path, data_shuffle=shuffle)


def _output(c: TrainConfig, run_name: str, fpb: int) -> dict[str, Any]:
    """Run folder, checkpoints, visualisation and wandb."""
    if any(v <= 0 or v % fpb for v in c.vis_video_lengths):
        raise InputError(
            f"config key `vis_video_lengths` must be a list of positive multiples of "
            f"num_frame_per_block ({fpb}), got {c.vis_video_lengths!r}"
        )
    wandb = WandbSettings(
        enabled=not c.disable_wandb and c.wandb_mode != "disabled",
        mode=c.wandb_mode,
        project=c.wandb_project,
        entity=c.wandb_entity,
        save_dir=c.wandb_save_dir or None,
        run_name=run_name,
    )
    return dict(logdir=Path(c.logdir) if c.logdir else None, wandb=wandb)


def _parse(cfg: DictConfig, check_files: bool) -> TrainSettings:
    """`TrainSettings` from a loaded config: the typed config, composed section by section."""
    c = _typed(cfg)
    compat, stage = _stage(c)
    _check_compile(c)
    fpb = c.num_frame_per_block
    channels, latent_hw = _latent_shape(c)
    stream, sampling = _stream_and_sampling(c, compat, stage)
    lora = _adapter(c)
    models = _models(c, check_files, lora)
    rollout = RolloutConfig.from_config(c, stage)
    streaming = LongTuningConfig.from_config(c, compat) if stage == 2 else None
    longest = max(rollout.num_training_frames, *c.vis_video_lengths,
                  *((streaming.max_length, *streaming.possible_max_lengths) if streaming else ()))
    _check_rope_table(c, models["tiny"], longest)
    return TrainSettings(
        config=c, compat=compat, stage=stage, **models, stream=stream, sampling=sampling,
        rollout=rollout, streaming=streaming,
        lora=lora,
        lora_on_critic=lora is not None and c.adapter.apply_to_critic,
        inherit_base_step=compat,
        score=ScoreConfig.from_config(c, compat),
        latent_channels=channels,
        latent_hw=latent_hw,
        **_precision(c),
        **_optimisation(c, lora),
        **_data(c, stage, compat, check_files),
        **_output(c, str(cfg.get("config_name", "train")), fpb),
    )


def _check_rope_table(c: TrainConfig, tiny: TinyModels | None, longest: int) -> None:
    """With `positions: absolute` every generated sequence (rollouts, stage-2 sequences,
    training videos) must fit the generator's RoPE table: the reference has no position past
    it. `positions: relative` has no such limit."""
    table = tiny_rope_frames(tiny.generator if tiny is not None else {})
    if c.positions == "absolute" and longest > table:
        raise InputError(
            f"sequences of {longest} latent frames are past the generator's RoPE table ({table} "
            "frames) with positions: absolute; positions: relative has no such limit")


def _adapter(c: TrainConfig) -> LoraSettings | None:
    """The `adapter:` section (TRAINING.md §6.2: LoRA on every block linear), or None."""
    if c.adapter is None:
        return None
    try:
        return c.adapter.lora_settings()
    except ValueError as err:
        raise InputError(f"config key `adapter`: {err}") from None
