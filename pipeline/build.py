"""Build the generator, text encoder and VAE from an inference config.

Two sources:
* `preset: tiny` builds small random components in memory (no files needed), so the whole
  pipeline runs on a CPU in seconds;
* otherwise everything is read from local files: the Wan2.1 folder
  `<wan_models_root>/<model_name>/` (config.json, DiT weights, T5 + tokenizer, VAE) and the
  MemFlow `generator_ckpt` / `lora_ckpt`. Nothing is ever downloaded.

All paths are checked before anything heavy is loaded, and a missing one is reported with the
config key that names it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from memflow.checkpoint import load_generator_checkpoint, load_wan_config, load_wan_weights
from memflow.config import DiTConfig
from memflow.lora import LoraSettings, add_lora, load_lora_checkpoint, merge_lora
from memflow.model import WanDiT
from memflow.text_encoder import (
    WAN_T5_CHECKPOINT,
    WAN_T5_TOKENIZER,
    TextEncoder,
    umt5_encoder_config,
)
from memflow.vae import WAN_VAE_CHECKPOINT, WanVAE
from utils.errors import InputError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Components:
    generator: WanDiT
    text_encoder: TextEncoder
    vae: WanVAE
    model_type: str  # "lora", "ema" or "regular": part of the output file names


def parse_dtype(cfg: DictConfig, key: str, default: str) -> torch.dtype:
    name = str(OmegaConf.select(cfg, key, default=default))
    if name not in DTYPES:
        raise InputError(f"config key `{key}`: unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(cfg: DictConfig, local_rank: int = 0) -> torch.device:
    name = str(OmegaConf.select(cfg, "device", default="auto"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("config key `device`: cuda requested but no GPU is available")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise InputError(f"config key `device` must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def model_type(cfg: DictConfig) -> str:
    if OmegaConf.select(cfg, "adapter", default=None):
        return "lora"
    return "ema" if OmegaConf.select(cfg, "use_ema", default=False) else "regular"


def _lora_settings(cfg: DictConfig) -> LoraSettings | None:
    adapter = OmegaConf.select(cfg, "adapter", default=None)
    if not adapter:
        return None
    try:
        return LoraSettings.from_config(OmegaConf.to_container(adapter))
    except ValueError as err:
        raise InputError(f"config key `adapter`: {err}") from None


def _section(cfg: DictConfig, key: str) -> dict:
    """An optional mapping section of the config (e.g. shape overrides), {} when unset."""
    value = OmegaConf.select(cfg, key, default=None)
    return dict(OmegaConf.to_container(value)) if value else {}


def _existing(cfg: DictConfig, key: str, path: Path, kind: str = "file") -> Path:
    ok = path.is_file() if kind == "file" else path.is_dir()
    if not ok:
        raise InputError(f"config key `{key}`: {kind} not found: {path}")
    return path


@dataclass(frozen=True)
class CheckpointPaths:
    wan_folder: Path
    generator_ckpt: Path | None
    lora_ckpt: Path | None


def check_paths(cfg: DictConfig) -> CheckpointPaths | None:
    """Verify every file the real components need exists (None for the tiny preset)."""
    if OmegaConf.select(cfg, "preset", default=None) == "tiny":
        return None
    root = Path(str(OmegaConf.select(cfg, "wan_models_root", default="wan_models")))
    name = str(OmegaConf.select(cfg, "model_name", default="Wan2.1-T2V-1.3B"))
    folder = _existing(cfg, "wan_models_root/model_name", root / name, "dir")
    _existing(cfg, "wan_models_root/model_name", folder / "config.json")
    _existing(cfg, "wan_models_root/model_name", folder / WAN_T5_CHECKPOINT)
    _existing(cfg, "wan_models_root/model_name", folder / WAN_T5_TOKENIZER, "dir")
    _existing(cfg, "wan_models_root/model_name", folder / WAN_VAE_CHECKPOINT)
    gen = OmegaConf.select(cfg, "generator_ckpt", default=None)
    gen_path = _existing(cfg, "generator_ckpt", Path(str(gen))) if gen else None
    lora = OmegaConf.select(cfg, "lora_ckpt", default=None)
    lora_path = None
    if lora and OmegaConf.select(cfg, "adapter", default=None):
        lora_path = _existing(cfg, "lora_ckpt", Path(str(lora)))
    return CheckpointPaths(folder, gen_path, lora_path)


def build_components(
    cfg: DictConfig, device: torch.device, compat: bool, paths: CheckpointPaths | None
) -> Components:
    dtype = parse_dtype(cfg, "dtype", "bfloat16")
    vae_dtype = parse_dtype(cfg, "vae_dtype", "bfloat16")
    offload = bool(OmegaConf.select(cfg, "text_encoder_offload", default=False))
    lora = _lora_settings(cfg)
    merge = bool(OmegaConf.select(cfg, "lora_merge", default=False))
    if merge and compat:
        raise InputError("lora_merge: true changes bf16 rounding; it is not allowed with behaviour: compat")

    if paths is None:
        generator, text_encoder, vae = _build_tiny(cfg, device, dtype, vae_dtype, offload, compat)
    else:
        generator = WanDiT(load_wan_config(paths.wan_folder))
        t5_config = umt5_encoder_config(**_section(cfg, "text_encoder_config"))
        try:
            text_encoder = TextEncoder.from_wan_folder(
                paths.wan_folder, config=t5_config, text_len=generator.config.text_len,
                dtype=dtype, device=device, offload=offload,
            )
            vae = WanVAE.from_wan_checkpoint(
                paths.wan_folder / WAN_VAE_CHECKPOINT, config=_section(cfg, "vae_config"),
                dtype=vae_dtype, compat=compat,
            )
        except (ValueError, FileNotFoundError) as err:  # the loaders' one-line file errors
            raise InputError(str(err)) from None
        if paths.generator_ckpt is not None:
            use_ema = bool(OmegaConf.select(cfg, "use_ema", default=False))
            if use_ema:  # EMA checkpoints may be partial: start from the Wan weights
                load_wan_weights(generator, paths.wan_folder)
            load_generator_checkpoint(generator, paths.generator_ckpt, use_ema=use_ema)
        else:
            load_wan_weights(generator, paths.wan_folder)
    if lora is not None:
        generator = add_lora(generator, lora)
        if paths is not None and paths.lora_ckpt is not None:
            load_lora_checkpoint(generator, paths.lora_ckpt)
        if merge:
            generator = merge_lora(generator)
    generator = generator.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae = vae.to(device)
    return Components(generator, text_encoder, vae, model_type(cfg))


def _build_tiny(cfg, device, dtype, vae_dtype, offload, compat):
    """Random components at small width (the `tiny:` config section sets the DiT shape)."""
    from memflow.tiny import build_tiny_dit, build_tiny_text_encoder, build_tiny_vae

    tiny = OmegaConf.to_container(OmegaConf.select(cfg, "tiny", default={}) or {})
    seed = int(tiny.pop("seed", 0))
    text_len = int(tiny.get("text_len", 64))
    text_encoder = build_tiny_text_encoder(
        seed=seed, text_len=text_len, dtype=dtype, device=device, offload=offload
    )
    dit_cfg = DiTConfig.from_dict({"text_dim": text_encoder.encoder.config.d_model, **tiny})
    generator = build_tiny_dit(dit_cfg, seed=seed)
    vae = build_tiny_vae(seed=seed, dtype=vae_dtype, compat=compat)
    return generator, text_encoder, vae
