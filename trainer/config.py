"""Training configs: loading and merging (TRAINING.md §1.1) and typed, validated settings.

`load_train_config` reproduces the reference's layering, with its gaps closed:
1. ``configs/default_config.yaml`` of **this repository** (not of the working directory) is the
   base; it lists every key a training config may use, so it doubles as the schema;
2. the specific YAML (``--config_path``) is merged on top (nested sections key by key); a key it
   has that the defaults lack is rejected with a "did you mean" hint (a typo such as
   ``dfake_gen_update_raito: 5`` would otherwise be silently ignored);
3. ``key=value`` overrides (new: the reference has none), checked like `utils.config` does;
4. the command-line flags (``--logdir``, ``--no_save``, ``--disable-wandb``, ...) set their keys.
   Unlike the reference, a flag that is not given leaves the YAML value alone;
5. ``config_name`` = the config file's stem ("train_init"; the reference takes the directory
   name, "configs", spec §10 item 17). It only names the wandb run.

`TrainSettings.from_config` then validates everything the training loop reads, section by
section, and builds the shared typed objects (`StreamConfig`, `SamplingConfig` by the same
functions as inference, `RolloutConfig`, `ScoreConfig`), so a bad value fails in one line naming
its key, before any model is built. Every key's type and default is the one schema of
`utils.settings_schema` (`TrainConfig`, which shares its stream, sampling, model and runtime
sections with inference); `TrainSettings.config` is the whole config as that typed object.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from memflow.attention import backend_names
from memflow.config import DiTConfig, MemoryOptions, SamplingConfig, StreamConfig, SwitchOptions
from memflow.lora import LoraSettings
from memflow.checkpoint import WAN_T5_CHECKPOINT, WAN_T5_TOKENIZER, WAN_VAE_CHECKPOINT
from trainer.rollout import RolloutConfig, training_memory_options
from trainer.score import ScoreConfig
from trainer.long_sequence import LongTuningConfig, SwitchSchedule
from utils.config import _OVERRIDE, DTYPES, _check_known, _load_yaml, require_path
from utils.errors import InputError
from utils.schema import check_section
from utils.stream_settings import PATCH, sampling_config, stream_config, with_overrides
from utils.settings_schema import (
    Adapter,
    ModelKwargs,
    SamplingKeys,
    TrainConfig,
    schema_defaults,
    settings_from_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default_config.yaml"

# FSDP2 always shards over every rank (a hybrid strategy's inter-node replication is not
# modelled, which on one node is the same); "zero2" keeps the gathered weights from the forward
# to the backward (reshard_after_forward=False)
SHARDING_STRATEGIES = ("full", "hybrid_full", "hybrid_zero2")
DATA_SHUFFLE = ("epoch", "fixed", "none")
WANDB_MODES = ("offline", "disabled")
DEVICES = ("auto", "cpu", "cuda")
TINY_ROLES = ("teacher", "critic")
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
def _check_file_keys(node: DictConfig, schema: DictConfig, path: Path, prefix: str = "") -> None:
    """Every key of `node` must exist in `schema`. Sections that the schema leaves empty or null
    (``memory: {}``, ``tiny: {}``, ``adapter: null``) take any keys: their readers validate them."""
    for key in node:
        full = f"{prefix}{key}"
        if key not in schema:
            siblings = [f"{prefix}{k}" for k in schema]
            close = difflib.get_close_matches(full, siblings, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise InputError(f"{path}: unknown config key `{full}` (not in {DEFAULT_CONFIG.name}){hint}")
        sub, default = node._get_node(key), schema._get_node(key)
        if isinstance(sub, DictConfig) and isinstance(default, DictConfig) and len(default) > 0:
            _check_file_keys(sub, default, path, f"{full}.")


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str], where: str) -> DictConfig:
    """``key=value`` overrides with values parsed as YAML, each key checked against `cfg` (as
    `utils.config.load_config` checks them against its file)."""
    for item in overrides:
        match = _OVERRIDE.fullmatch(item)
        if match is None:
            raise InputError(f"malformed override {item!r}; expected key=value, e.g. max_iters=100")
        _check_known(cfg, match.group(1), where)
        try:
            patch = OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e
            raise InputError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        cfg = OmegaConf.merge(cfg, patch)
    return cfg


def load_train_config(
    config_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    cli_flags: CliFlags | Mapping[str, Any] | argparse.Namespace | None = None,
    *,
    defaults_path: str | os.PathLike[str] = DEFAULT_CONFIG,
) -> DictConfig:
    """The merged training config: defaults < `config_path` < `overrides` < `cli_flags`.

    Raises `InputError` (one line) for a missing or malformed file and for any key unknown to
    the defaults, in the file or in an override, with the closest known key as a suggestion.
    """
    config_path, defaults_path = Path(config_path), Path(defaults_path)
    defaults = _load_yaml(defaults_path)
    specific = _load_yaml(config_path)
    _check_file_keys(specific, defaults, config_path)
    cfg = OmegaConf.merge(defaults, specific)
    cfg = _apply_overrides(cfg, overrides, f"{config_path} or {defaults_path.name}")
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
class TinyModels:
    """`preset: tiny` shapes. Each role's mapping is what `pipeline.build.build_tiny_generator`
    takes (DiTConfig fields + ``seed``); the critic defaults to the generator's shape and seed
    (the reference's critic starts from the generator's base model, Wan 1.3B)."""

    generator: Mapping[str, Any]
    teacher: Mapping[str, Any]
    critic: Mapping[str, Any]
    text_len: int
    seed: int

    def section(self, role: str) -> dict[str, Any]:
        """The `build_tiny_generator` mapping of "generator", "teacher" or "critic"."""
        if role not in ("generator", *TINY_ROLES):
            raise ValueError(f"unknown tiny model role {role!r}")
        return dict(getattr(self, role))


@dataclass(frozen=True)
class WandbSettings:
    """wandb logging (rank 0 only). Never online: `mode` is offline or disabled."""

    enabled: bool
    mode: str
    project: str | None
    entity: str | None
    save_dir: str | None
    run_name: str


@dataclass(frozen=True)
class TrainSettings:
    """Everything the training loop reads, typed and validated (TRAINING.md §1.2)."""

    compat: bool
    stage: int  # 1: Self-Forcing rollouts (dmd); 2: streaming long tuning (dmd_switch)
    device: str  # auto | cpu | cuda (resolved at start-up, see pipeline.build.resolve_device)
    attn_backend: str
    # models
    preset: str | None
    tiny: TinyModels | None
    wan_models_root: Path
    generator_name: str
    real_name: str
    fake_name: str
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
    negative_prompt: str
    # precision
    mixed_precision: bool
    param_dtype: torch.dtype
    compute_dtype: torch.dtype  # bf16 (compute_dtype) with mixed_precision, else param_dtype
    vae_dtype: torch.dtype
    gradient_checkpointing: bool
    # optimisation
    generator_optim: OptimSettings
    critic_optim: OptimSettings
    dfake_gen_update_ratio: int
    gradient_accumulation_steps: int
    batch_size: int
    max_iters: int
    seed: int  # 0: draw a random seed on rank 0 and broadcast (spec §7.3)
    ema_weight: float | None  # None: no EMA (LoRA mode, or ema_weight null)
    ema_start_step: int
    gc_interval: int
    sharding_strategy: str
    text_encoder_cpu_offload: bool
    # data
    data_path: Path
    val_data_path: Path
    switch_prompt_path: Path | None
    val_switch_prompt_path: Path | None
    data_seed: int
    data_shuffle: str  # epoch | fixed | none
    # output
    logdir: Path | None
    no_save: bool
    auto_resume: bool
    log_iters: int  # checkpoint period
    max_checkpoints: int
    vis_interval: int
    vis_video_lengths: tuple[int, ...]
    val_batch_size: int
    wandb: WandbSettings
    # every key, typed, with the schema's defaults: a new key is read here as config.<key>
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @property
    def frames_per_block(self) -> int:
        return self.stream.num_frame_per_block

    @property
    def reshard_after_forward(self) -> bool:
        """FSDP2's reading of `sharding_strategy`: free gathered weights after each forward."""
        return not self.sharding_strategy.endswith("zero2")

    def train_generator(self, step: int) -> bool:
        """Whether iteration `step` (read before its increment) updates the generator."""
        return step % self.dfake_gen_update_ratio == 0

    @classmethod
    def from_config(cls, cfg: DictConfig, *, check_files: bool = True) -> TrainSettings:
        """Validate `cfg` (from `load_train_config`). `check_files` also checks that the prompt
        files and (unless ``preset: tiny``) the model folders and checkpoints exist."""
        return _parse(cfg, check_files)


_MISSING = object()
_DEFAULTS = schema_defaults(TrainConfig)


def _schema_default(key: str) -> Any:
    """The schema's default of dotted `key` (`TrainConfig`, the one home of the defaults)."""
    node: Any = _DEFAULTS
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """The value of `key`; absent, `default` when given, else the schema's default."""
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if value is _MISSING:
        value = _schema_default(key) if default is None else default
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _int(cfg: DictConfig, key: str, default: Any = None, *, minimum: int | None = None) -> int:
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"config key `{key}` must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"config key `{key}` must be >= {minimum}, got {value}")
    return value


def _float(cfg: DictConfig, key: str, default: Any = None, *, positive: bool = False,
           low: float | None = None, high_open: float | None = None) -> float:
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"config key `{key}` must be a finite number, got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise InputError(f"config key `{key}` must be > 0, got {value}")
    if low is not None and value < low or high_open is not None and value >= high_open:
        raise InputError(f"config key `{key}` must be in [{low}, {high_open}), got {value}")
    return value


def _bool(cfg: DictConfig, key: str, default: Any = None) -> bool:
    value = _get(cfg, key, default)
    if not isinstance(value, bool):
        raise InputError(f"config key `{key}` must be true or false, got {value!r}")
    return value


def _choice(cfg: DictConfig, key: str, choices: Sequence[Any], default: Any = None) -> Any:
    value = _get(cfg, key, default)
    if value not in choices:
        raise InputError(
            f"config key `{key}` must be one of {', '.join(map(str, choices))}; got {value!r}"
        )
    return value


def _dtype(cfg: DictConfig, key: str) -> torch.dtype:
    name = _get(cfg, key)
    if name not in DTYPES:
        raise InputError(f"config key `{key}`: unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def _path(cfg: DictConfig, key: str, *, required: bool, kind: str = "file",
          check: bool = True) -> Path | None:
    """The path config key `key` names (None when unset and not required); with `check` it must
    exist (`utils.config.require_path`)."""
    value = _get(cfg, key)
    if value is None or value == "":
        if required:
            raise InputError(f"config key `{key}` is not set")
        return None
    if check:
        return require_path(cfg, key, kind)
    if not isinstance(value, str):
        raise InputError(f"config key `{key}`: expected a path, got {value!r}")
    return Path(value).expanduser()


def _prompt_file(cfg: DictConfig, key: str, *, required: bool, check: bool) -> Path | None:
    path = _path(cfg, key, required=required, check=check)
    if path is not None and check and path.stat().st_size == 0:
        raise InputError(f"config key `{key}`: prompt file {path} is empty")
    return path


def _tiny(cfg: DictConfig) -> TinyModels:
    section = _get(cfg, "tiny") or {}
    if not isinstance(section, dict):
        raise InputError(f"config key `tiny` must be a mapping, got {section!r}")
    shape_keys = {f.name for f in dataclasses.fields(DiTConfig)} | {"seed"}
    known = shape_keys | set(TINY_ROLES)

    def check(mapping: Any, where: str, allowed: set[str]) -> dict[str, Any]:
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

    section = check(section, "tiny", known)
    generator = {k: v for k, v in section.items() if k not in TINY_ROLES}
    generator.setdefault("seed", 0)
    text_len = generator.get("text_len", 64)
    roles = {}
    for role in TINY_ROLES:
        own = check(section.get(role), f"tiny.{role}", shape_keys)
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
    return TinyModels(generator, roles["teacher"], roles["critic"], int(text_len),
                      int(generator["seed"]))


def _adapter(cfg: DictConfig) -> LoraSettings | None:
    """The `adapter:` section (TRAINING.md §6.2), or None without one."""
    adapter = _get(cfg, "adapter")
    if not adapter:
        return None
    if not isinstance(adapter, dict):
        raise InputError(f"config key `adapter` must be a mapping or null, got {adapter!r}")
    for key in ("rank", "alpha"):
        value = adapter.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"config key `adapter.{key}` must be a number, got {value!r}")
    apply_to_critic = adapter.get("apply_to_critic", True)
    if not isinstance(apply_to_critic, bool):
        raise InputError(f"config key `adapter.apply_to_critic` must be true or false, got {apply_to_critic!r}")
    try:
        return settings_from_config(adapter, Adapter).lora_settings()
    except ValueError as err:
        raise InputError(f"config key `adapter`: {err}") from None


def _frames(cfg: DictConfig, key: str, fpb: int, default: Any = None, *, minimum: int = 1) -> int:
    value = _int(cfg, key, default, minimum=minimum)
    if value % fpb:
        raise InputError(
            f"config key `{key}` ({value}) must be a multiple of num_frame_per_block ({fpb})"
        )
    return value


def _streaming(cfg: DictConfig, compat: bool, fpb: int) -> LongTuningConfig:
    """Stage-2 keys (TRAINING.md §1.2, §5): window schedule, sequence lengths, switch rule."""
    window = _frames(cfg, "streaming_chunk_size", fpb, minimum=fpb)
    min_new = _frames(cfg, "streaming_min_new_frame", fpb, minimum=fpb)
    if min_new >= window:
        raise InputError(
            f"config key `streaming_min_new_frame` ({min_new}) must be smaller than "
            f"streaming_chunk_size ({window}): later windows overlap the previous one"
        )
    # absent: the reference's streaming model falls back to 57 frames
    raw = _get(cfg, "streaming_max_length")
    max_length = 57 if raw is None else _int(cfg, "streaming_max_length", minimum=1)
    if max_length < window:
        raise InputError(f"config key `streaming_max_length` ({max_length}) must be at least "
                         f"streaming_chunk_size ({window})")
    possible = _get(cfg, "streaming_possible_max_length")
    if possible is not None:
        if (not isinstance(possible, list) or not possible or any(
                isinstance(v, bool) or not isinstance(v, int) or v < window for v in possible)):
            raise InputError(
                f"config key `streaming_possible_max_length` must be a list of lengths >= "
                f"streaming_chunk_size ({window}), got {possible!r}"
            )
    lengths = tuple(possible) if possible else (max_length,)
    mode = _choice(cfg, "switch_mode", ("random_choice", "fixed", "random"))
    switch_key = {"random_choice": "switch_choices", "fixed": "fixed_switch_index",
                  "random": "min_switch_frame_index"}[mode]
    if mode == "random_choice":
        choices = _get(cfg, "switch_choices")
        if (not isinstance(choices, list) or not choices
                or any(isinstance(v, bool) or not isinstance(v, int) for v in choices)):
            raise InputError(f"config key `switch_choices` must be a list of latent frames, got {choices!r}")
        schedule = SwitchSchedule(mode, choices=tuple(choices))
        frames = list(choices)
    elif mode == "fixed":
        fixed = 21 if _get(cfg, "fixed_switch_index") is None else _int(cfg, "fixed_switch_index",
                                                                        minimum=1)
        schedule = SwitchSchedule(mode, fixed_index=fixed)
        frames = [schedule.fixed_index]
    else:
        lo = _int(cfg, "min_switch_frame_index", minimum=1)
        hi = _int(cfg, "max_switch_frame_index", minimum=lo)
        schedule = SwitchSchedule(mode, min_index=lo, max_index=hi)
        frames = schedule.candidates(10**9, fpb)
    for p in frames:
        if p <= 0 or p % fpb:
            raise InputError(
                f"config key `{switch_key}`: switch frame {p} must be a positive multiple of "
                f"num_frame_per_block ({fpb})"
            )
    for length in lengths:
        if not schedule.candidates(length, fpb):
            raise InputError(
                f"config key `{switch_key}`: no switch frame below streaming_max_length "
                f"({length}); every sequence needs one"
            )
    if compat:
        switch = SwitchOptions.compat(global_sink=False)  # the reference ignores global_sink (§10.1)
    else:
        global_sink = _bool(cfg, "global_sink")
        if not global_sink:
            raise InputError("config key `global_sink`: false (an all-zero sink after the switch) "
                             "exists only as the reference's bug, under behaviour: compat")
        switch = SwitchOptions()
    return LongTuningConfig(
        window_frames=window,
        max_length=max_length,
        possible_max_lengths=tuple(possible) if possible else (),
        min_new_frames=min_new,
        train_first_chunk=_bool(cfg, "train_first_chunk"),
        switch=schedule,
        switch_options=switch,
        recache_frames=window if compat else None,
        refresh_text_per_window=not compat,
    )


def _check_wan_folder(root: Path, cfg: DictConfig, key: str, codecs: bool) -> None:
    name = _get(cfg, key)
    folder = root / str(name)
    where = f"wan_models_root/{key}"
    if not folder.is_dir():
        raise InputError(f"config key `{where}`: directory not found: {folder}")
    needed = [(folder / "config.json", "file")]
    if codecs:  # T5 and VAE come from the generator's folder
        needed += [(folder / WAN_T5_CHECKPOINT, "file"), (folder / WAN_T5_TOKENIZER, "dir"),
                   (folder / WAN_VAE_CHECKPOINT, "file")]
    for path, kind in needed:
        if not (path.is_file() if kind == "file" else path.is_dir()):
            raise InputError(f"config key `{where}`: {kind} not found: {path}")


def _stage(cfg: DictConfig) -> tuple[bool, int]:
    """(compat, stage) from `behaviour` and the loss; the unsupported reference switches fail."""
    if _get(cfg, "trainer") != "score_distillation":
        raise InputError(f"config key `trainer` must be score_distillation, got {_get(cfg, 'trainer')!r}")
    compat = _choice(cfg, "behaviour", ("clean", "compat")) == "compat"
    loss = _choice(cfg, "distribution_loss", ("dmd", "dmd_switch"))
    streaming = _bool(cfg, "streaming_training")
    if streaming != (loss == "dmd_switch"):
        raise InputError(
            "config keys `distribution_loss` and `streaming_training` disagree: stage 1 is "
            "dmd without streaming_training, stage 2 dmd_switch with streaming_training: true"
        )
    for key in ("i2v", "independent_first_frame", "vis_ema"):
        if _bool(cfg, key, False):
            raise InputError(f"config key `{key}`: true is not supported (nor working in the reference)")
    _choice(cfg, "denoising_loss_type", ("flow",))
    fake_cfg = _get(cfg, "fake_guidance_scale")
    if fake_cfg not in (None, 0, 0.0):
        raise InputError(f"config key `fake_guidance_scale`: critic CFG is not supported, got {fake_cfg!r}")
    return compat, 2 if streaming else 1


def _latent_shape(cfg: DictConfig) -> tuple[int, tuple[int, int]]:
    """(channels, (h, w)) of `image_or_video_shape` [B, F, C, h, w]."""
    shape = _get(cfg, "image_or_video_shape")
    if (not isinstance(shape, list) or len(shape) != 5
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in shape)):
        raise InputError(
            f"config key `image_or_video_shape` must be 5 positive integers [B, F, C, h, w], got {shape!r}"
        )
    channels, h, w = shape[2:]
    if h % PATCH or w % PATCH:
        raise InputError(
            f"config key `image_or_video_shape`: latent size {h}x{w} must be even (patch {PATCH})"
        )
    return channels, (h, w)


def _rollout(cfg: DictConfig, stage: int, fpb: int) -> RolloutConfig:
    """Stage-1 rollout lengths: whole chunks, min <= max, the kept frames hold a rollout."""
    num_frames = _int(cfg, "num_training_frames", minimum=1)
    min_frames = _int(cfg, "min_num_training_frames", num_frames, minimum=1)
    slice_last = _int(cfg, "slice_last_frames", num_frames, minimum=1)
    for key, value in (("num_training_frames", num_frames), ("min_num_training_frames", min_frames)):
        if value % fpb:
            raise InputError(
                f"config key `{key}` ({value}) must be a multiple of num_frame_per_block ({fpb})"
            )
    if min_frames > num_frames:
        raise InputError(
            f"config key `min_num_training_frames` ({min_frames}) must not exceed "
            f"num_training_frames ({num_frames})"
        )
    if stage == 1 and num_frames > slice_last:
        raise InputError(
            f"config key `slice_last_frames` ({slice_last}) is smaller than num_training_frames "
            f"({num_frames}); re-encoding the first kept frame is not implemented"
        )
    return RolloutConfig(
        num_training_frames=num_frames,
        min_num_training_frames=min_frames,
        slice_last_frames=slice_last,
        same_step_across_blocks=_bool(cfg, "same_step_across_blocks"),
        last_step_only=_bool(cfg, "last_step_only"),
    )


def _stream_and_sampling(cfg: DictConfig, compat: bool, stage: int,
                         fpb: int) -> tuple[StreamConfig, SamplingConfig]:
    """The library's stream and sampler settings, built by the same functions as inference's
    from the shared schema sections (`model_kwargs:`, the step list, `memory:`)."""
    model_kwargs = _get(cfg, "model_kwargs") or {}
    if not isinstance(model_kwargs, dict):
        raise InputError(f"config key `model_kwargs` must be a mapping, got {model_kwargs!r}")
    check_section(model_kwargs, ModelKwargs, "model_kwargs.")
    mk = settings_from_config(model_kwargs, ModelKwargs)
    steps = _get(cfg, "denoising_step_list")
    if (not isinstance(steps, list) or not steps
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in steps)):
        raise InputError(f"config key `denoising_step_list` must be a non-empty list of timesteps, got {steps!r}")
    sampler = SamplingKeys(
        denoising_step_list=steps,
        warp_denoising_step=_bool(cfg, "warp_denoising_step"),
        context_noise=_float(cfg, "context_noise", low=0.0),
    )
    check_section(_get(cfg, "memory") or {}, MemoryOptions, "memory.")  # types and enums
    memory = with_overrides(training_memory_options(compat, stage), _get(cfg, "memory"), "memory")
    return stream_config(mk, fpb, memory), sampling_config(sampler, mk)


def _score(cfg: DictConfig, compat: bool) -> ScoreConfig:
    """The DMD / critic losses; `real_guidance_scale` overrides `guidance_scale` when set."""
    num_train_timestep = _int(cfg, "num_train_timestep", minimum=1)
    guidance_key = "guidance_scale" if _get(cfg, "real_guidance_scale") is None else "real_guidance_scale"
    guidance = _float(cfg, guidance_key, low=0.0)
    min_t = _int(cfg, "min_score_timestep", minimum=0)
    if min_t >= num_train_timestep:
        raise InputError(
            f"config key `min_score_timestep` ({min_t}) must be below num_train_timestep "
            f"({num_train_timestep})"
        )
    score_kwargs = dict(
        num_train_timestep=num_train_timestep,
        timestep_shift=_float(cfg, "timestep_shift", positive=True),
        min_score_timestep=min_t,
        guidance_scale=guidance,
        ts_schedule=_bool(cfg, "ts_schedule"),
        ts_schedule_max=_bool(cfg, "ts_schedule_max"),
    )
    return ScoreConfig.compat(**score_kwargs) if compat else ScoreConfig.clean(**score_kwargs)


def _optim(cfg: DictConfig, lr: str, beta1: str, beta2: str, grad_key: str) -> OptimSettings:
    return OptimSettings(
        lr=_float(cfg, lr, positive=True),
        betas=(_float(cfg, beta1, low=0.0, high_open=1.0),
               _float(cfg, beta2, low=0.0, high_open=1.0)),
        weight_decay=_float(cfg, "weight_decay", low=0.0),
        max_grad_norm=_float(cfg, grad_key, positive=True),
    )


def _optimisation(cfg: DictConfig, lora: LoraSettings | None) -> dict[str, Any]:
    """The optimisers, the update ratio, the EMA (none with LoRA, spec §2.4) and the seed."""
    ema_weight = _get(cfg, "ema_weight")
    if ema_weight is not None:
        ema_weight = _float(cfg, "ema_weight", low=0.0, high_open=1.0)
    return dict(
        generator_optim=_optim(cfg, "lr", "beta1", "beta2", "max_grad_norm_generator"),
        critic_optim=_optim(cfg, "lr_critic", "beta1_critic", "beta2_critic", "max_grad_norm_critic"),
        dfake_gen_update_ratio=_int(cfg, "dfake_gen_update_ratio", minimum=1),
        gradient_accumulation_steps=_int(cfg, "gradient_accumulation_steps", minimum=1),
        batch_size=_int(cfg, "batch_size", minimum=1),
        max_iters=_int(cfg, "max_iters", minimum=0),
        seed=_int(cfg, "seed", minimum=0),
        ema_weight=None if lora is not None else ema_weight,
        ema_start_step=_int(cfg, "ema_start_step", minimum=0),
        gc_interval=_int(cfg, "gc_interval", minimum=1),
        sharding_strategy=_choice(cfg, "sharding_strategy", SHARDING_STRATEGIES),
        text_encoder_cpu_offload=_bool(cfg, "text_encoder_cpu_offload"),
    )


def _precision(cfg: DictConfig) -> dict[str, Any]:
    mixed = _bool(cfg, "mixed_precision")
    param_dtype = _dtype(cfg, "param_dtype")
    compute = _dtype(cfg, "compute_dtype")
    return dict(
        mixed_precision=mixed,
        param_dtype=param_dtype,
        compute_dtype=compute if mixed else param_dtype,
        vae_dtype=_dtype(cfg, "vae_dtype"),
        gradient_checkpointing=_bool(cfg, "gradient_checkpointing"),
    )


def _models(cfg: DictConfig, check_files: bool, lora: LoraSettings | None) -> dict[str, Any]:
    """Where the networks come from; unless tiny, the model folders and checkpoints exist."""
    preset = _get(cfg, "preset")
    if preset not in (None, "tiny"):
        raise InputError(f"config key `preset` must be tiny or null, got {preset!r}")
    tiny = _tiny(cfg) if preset == "tiny" else None
    root = Path(str(_get(cfg, "wan_models_root"))).expanduser()
    names = {}
    for key in ("generator_name", "real_name", "fake_name"):
        value = _get(cfg, key)
        if not isinstance(value, str) or not value:
            raise InputError(f"config key `{key}` must name a model folder, got {value!r}")
        names[key] = value
    real_files = check_files and tiny is None
    generator_ckpt = _path(cfg, "generator_ckpt", required=False, check=real_files)
    lora_ckpt = _path(cfg, "lora_ckpt", required=False, check=check_files)
    if lora_ckpt is not None and lora is None:
        raise InputError("config key `lora_ckpt` is set but `adapter` is null: LoRA weights need "
                         "an adapter section (type, rank, alpha)")
    if real_files:
        _check_wan_folder(root, cfg, "generator_name", codecs=True)
        _check_wan_folder(root, cfg, "real_name", codecs=False)
        _check_wan_folder(root, cfg, "fake_name", codecs=False)
    return dict(preset=preset, tiny=tiny, wan_models_root=root, **names,
                generator_ckpt=generator_ckpt, lora_ckpt=lora_ckpt)


def _data(cfg: DictConfig, stage: int, compat: bool, check_files: bool) -> dict[str, Any]:
    """The prompt files (stage 2: line-aligned switch prompts) and their order."""
    data_path = _prompt_file(cfg, "data_path", required=True, check=check_files)
    val_data_path = _prompt_file(cfg, "val_data_path", required=False, check=check_files) or data_path
    switch_path = _prompt_file(cfg, "switch_prompt_path", required=stage == 2, check=check_files)
    val_switch_path = (_prompt_file(cfg, "val_switch_prompt_path", required=False, check=check_files)
                       or switch_path)
    if stage == 2 and check_files:
        from .data import read_switch_prompts

        read_switch_prompts(data_path, switch_path)  # line-aligned, before any model is built
        if val_switch_path is not None:
            read_switch_prompts(val_data_path, val_switch_path)
    shuffle = _get(cfg, "data_shuffle")
    if shuffle is None:
        shuffle = "fixed" if compat else "epoch"
    elif shuffle not in DATA_SHUFFLE:
        raise InputError(f"config key `data_shuffle` must be one of {', '.join(DATA_SHUFFLE)} or null; got {shuffle!r}")
    return dict(data_path=data_path, val_data_path=val_data_path, switch_prompt_path=switch_path,
                val_switch_prompt_path=val_switch_path,
                data_seed=_int(cfg, "data_seed", minimum=0), data_shuffle=shuffle)


def _output(cfg: DictConfig, fpb: int) -> dict[str, Any]:
    """Run folder, checkpoints, visualisation and wandb."""
    logdir = _get(cfg, "logdir")
    if logdir is not None and not isinstance(logdir, str):
        raise InputError(f"config key `logdir` must be a path, got {logdir!r}")
    vis_lengths = _get(cfg, "vis_video_lengths") or []
    if not isinstance(vis_lengths, list) or any(
        isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % fpb for v in vis_lengths
    ):
        raise InputError(
            f"config key `vis_video_lengths` must be a list of positive multiples of "
            f"num_frame_per_block ({fpb}), got {vis_lengths!r}"
        )
    disable_wandb = _bool(cfg, "disable_wandb")
    wandb_mode = _choice(cfg, "wandb_mode", WANDB_MODES)
    save_dir = _get(cfg, "wandb_save_dir") or None
    wandb = WandbSettings(
        enabled=not disable_wandb and wandb_mode != "disabled",
        mode=wandb_mode,
        project=_get(cfg, "wandb_project"),
        entity=_get(cfg, "wandb_entity"),
        save_dir=str(save_dir) if save_dir else None,
        run_name=str(_get(cfg, "config_name", "train")),
    )
    return dict(
        logdir=Path(logdir) if logdir else None,
        no_save=_bool(cfg, "no_save"),
        auto_resume=_bool(cfg, "auto_resume"),
        log_iters=_int(cfg, "log_iters", minimum=1),
        max_checkpoints=_int(cfg, "max_checkpoints", minimum=0),
        vis_interval=_int(cfg, "vis_interval", minimum=0),
        vis_video_lengths=tuple(vis_lengths),
        val_batch_size=_int(cfg, "val_batch_size", minimum=1),
        wandb=wandb,
    )


def _typed(cfg: DictConfig) -> TrainConfig:
    """The whole config checked against the schema (after the checks above, whose messages say
    more) and as its typed object. `config_name` is set by the loader, not by a file."""
    values = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "config_name"}
    check_section(values, TrainConfig)
    return settings_from_config(values, TrainConfig)


def _parse(cfg: DictConfig, check_files: bool) -> TrainSettings:
    """`TrainSettings` from a loaded config, section by section (each checks its own keys)."""
    compat, stage = _stage(cfg)
    device = _choice(cfg, "device", DEVICES)
    attn_backend = _choice(cfg, "attn_backend", backend_names())
    fpb = _int(cfg, "num_frame_per_block", minimum=1)
    channels, latent_hw = _latent_shape(cfg)
    rollout = _rollout(cfg, stage, fpb)
    stream, sampling = _stream_and_sampling(cfg, compat, stage, fpb)
    score = _score(cfg, compat)
    negative_prompt = _get(cfg, "negative_prompt")
    if not isinstance(negative_prompt, str):
        raise InputError(f"config key `negative_prompt` must be a string, got {negative_prompt!r}")
    precision = _precision(cfg)
    lora = _adapter(cfg)
    optimisation = _optimisation(cfg, lora)
    models = _models(cfg, check_files, lora)
    data = _data(cfg, stage, compat, check_files)
    typed = _typed(cfg)
    return TrainSettings(
        compat=compat,
        stage=stage,
        device=device,
        attn_backend=attn_backend,
        **models,
        stream=stream,
        sampling=sampling,
        rollout=rollout,
        streaming=_streaming(cfg, compat, fpb) if stage == 2 else None,
        lora=lora,
        lora_on_critic=lora is not None and _bool(cfg, "adapter.apply_to_critic", Adapter().apply_to_critic),
        inherit_base_step=compat,
        score=score,
        latent_channels=channels,
        latent_hw=latent_hw,
        negative_prompt=negative_prompt,
        **precision,
        **optimisation,
        **data,
        **_output(cfg, fpb),
        config=typed,
    )
