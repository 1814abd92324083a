"""Build the generator, text encoder and VAE from an inference config.

Two sources of the base components:
* `preset: tiny` builds small random components in memory (no Wan files needed), so the whole
  pipeline runs on a CPU in seconds;
* otherwise they are read from the Wan2.1 folder `<wan_models_root>/<model_name>/` (config.json,
  DiT weights, T5 + tokenizer, VAE). Nothing is ever downloaded.
Either way the MemFlow `generator_ckpt` and `lora_ckpt` are then loaded by the same code, so a
tiny training run's checkpoints can be tried on a CPU exactly as the released ones on a GPU.

All paths are checked before anything heavy is loaded, and a missing one is reported with the
config key that names it. Every function takes the typed `InferenceConfig` of
`config.schema` (what `config.inference.load_inference_config` returns), so the
defaults of absent keys are the schema's.

The generator is made in steps: `load_generator` (fp32, CPU, trainable), `memflow.lora.apply_lora`,
then `finalize_for_inference` (merge, cast, freeze), the only inference-specific one. The loaders
of the first steps live in the model library (`memflow.checkpoint.load_wan_generator`,
`memflow.tiny.build_tiny_generator`, `memflow.lora.apply_lora`), where training calls them too
without importing this application package.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from config.inference import InferenceSettings, parse_settings
from config.loader import DTYPES, existing_path, require_wan_folder
from config.schema import InferenceConfig
from memflow.attention import AttentionKernel
from memflow.checkpoint import load_checkpoint_weights, load_wan_config, load_wan_generator
from memflow.errors import InputError
from memflow.lora import LoraSettings, apply_lora
from memflow.lora import merge_lora as merge_adapter
from memflow.model import WanDiT
from memflow.text_encoder import TextEncoder, umt5_encoder_config
from memflow.vae import WAN_VAE_CHECKPOINT, WanVAE
from utils.distributed import pick_device

log = logging.getLogger(__name__)


@dataclass
class Components:
    generator: WanDiT
    text_encoder: TextEncoder
    vae: WanVAE
    model_type: str  # "lora", "ema" or "regular": part of the output file names


def model_type(c: InferenceConfig) -> str:
    """The model part of the output file names: which weights made the video."""
    if c.adapter:
        return "lora"
    return "ema" if c.use_ema else "regular"


def _lora_settings(c: InferenceConfig) -> LoraSettings | None:
    if not c.adapter:
        return None
    try:
        return c.adapter.lora_settings()
    except ValueError as err:
        raise InputError(f"config key `adapter`: {err}") from None


# a checkpoint key naming a folder: training writes checkpoint_model_<step>/ folders
CHECKPOINT_FOLDER_HINT = ("give the checkpoint file inside it "
                          "(e.g. .../checkpoint_model_<step>/model.pt)")


@dataclass(frozen=True)
class CheckpointPaths:
    wan_folder: Path | None  # None: `preset: tiny` builds the base components in memory
    generator_ckpt: Path | None
    lora_ckpt: Path | None  # only when an `adapter` will load it


def check_paths(c: InferenceConfig) -> CheckpointPaths:
    """Verify every file the components need exists: the Wan folder's (none for the tiny
    preset) and the MemFlow checkpoints (for both)."""
    folder = None
    if c.preset != "tiny":
        folder = require_wan_folder(Path(c.wan_models_root) / c.model_name,
                                    "wan_models_root/model_name", codecs=True)
    gen_path = lora_path = None
    if c.generator_ckpt:
        gen_path = existing_path("generator_ckpt", Path(c.generator_ckpt),
                                 directory_hint=CHECKPOINT_FOLDER_HINT)
    if c.lora_ckpt and c.adapter:
        lora_path = existing_path("lora_ckpt", Path(c.lora_ckpt), directory_hint=CHECKPOINT_FOLDER_HINT)
    return CheckpointPaths(folder, gen_path, lora_path)


def build_components(
    c: InferenceConfig, device: torch.device, compat: bool, paths: CheckpointPaths
) -> Components:
    """The generator, text encoder and VAE of a run, on `device` in the config's dtypes (the
    schema allows only names of `DTYPES`), frozen; `paths` from `check_paths`."""
    dtype, vae_dtype = DTYPES[c.dtype], DTYPES[c.vae_dtype]
    offload = bool(c.text_encoder_offload)
    lora = _lora_settings(c)
    merge = bool(c.lora_merge)
    if merge and compat:
        raise InputError("lora_merge: true changes bf16 rounding; it is not allowed with behaviour: compat")

    if paths.wan_folder is None:
        text_encoder, vae = _build_tiny_codecs(c, device, dtype, vae_dtype, offload, compat)
    else:
        text_encoder, vae = _load_wan_codecs(c, paths.wan_folder, device, dtype, vae_dtype, offload, compat)
    generator = load_generator(c, paths)
    if lora is not None:
        generator = apply_lora(generator, lora, paths.lora_ckpt, trust=c.trust_checkpoints)
    generator.set_attention_backend(c.attn_backend)
    generator.set_rope_precision("float64" if compat else "float32")
    generator = finalize_for_inference(
        generator, merge_lora=merge and lora is not None, device=device, dtype=dtype
    )
    if c.compile or c.cuda_graphs:
        generator.compile_blocks(fullgraph=True, mode="reduce-overhead" if c.cuda_graphs else None)
    return Components(generator, text_encoder, vae.to(device), model_type(c))


def load_generator(c: InferenceConfig, paths: CheckpointPaths) -> WanDiT:
    """The base DiT (Wan weights, or the tiny preset's random ones) with `generator_ckpt` loaded
    on top when set (paths from `check_paths`). The tiny preset goes through the same
    checkpoint loading as the real one, so a tiny training run's model.pt changes its videos."""
    use_ema = bool(c.use_ema)
    if paths.wan_folder is None:
        from memflow.tiny import build_tiny_generator

        generator = build_tiny_generator(c.tiny or {})  # its random init plays the Wan weights
        return load_checkpoint_weights(generator, paths.generator_ckpt, use_ema=use_ema,
                                       trust=c.trust_checkpoints)
    return load_wan_generator(paths.wan_folder, paths.generator_ckpt, use_ema=use_ema,
                              trust=c.trust_checkpoints)


def finalize_for_inference(
    generator: WanDiT, *, merge_lora: bool, device: torch.device, dtype: torch.dtype
) -> WanDiT:
    """Merge the adapter (when asked), cast, move, and freeze in eval mode: inference only."""
    if merge_lora:
        generator = merge_adapter(generator)
    return generator.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _build_tiny_codecs(
    c: InferenceConfig, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype,
    offload: bool, compat: bool,
) -> tuple[TextEncoder, WanVAE]:
    """Random tiny text encoder and VAE, seeded by the `tiny:` section like the tiny DiT."""
    from memflow.tiny import build_tiny_text_encoder, build_tiny_vae, tiny_seed, tiny_text_len

    tiny = c.tiny or {}
    seed = tiny_seed(tiny)
    text_encoder = build_tiny_text_encoder(
        seed=seed, text_len=tiny_text_len(tiny), dtype=dtype, device=device, offload=offload
    )
    vae = build_tiny_vae(seed=seed, dtype=vae_dtype, compat=compat)
    return text_encoder, vae


def _load_wan_codecs(
    c: InferenceConfig, wan_folder: Path, device: torch.device, dtype: torch.dtype,
    vae_dtype: torch.dtype, offload: bool, compat: bool,
) -> tuple[TextEncoder, WanVAE]:
    """umT5 and VAE of a Wan2.1 folder. Loaded before the DiT so that a bad file among them is
    reported before the (large) DiT weights are read."""
    text_len = load_wan_config(wan_folder).text_len
    t5_config = umt5_encoder_config(**(c.text_encoder_config or {}))
    try:
        text_encoder = TextEncoder.from_wan_folder(
            wan_folder, config=t5_config, text_len=text_len, dtype=dtype, device=device, offload=offload,
        )
        vae = WanVAE.from_wan_checkpoint(
            wan_folder / WAN_VAE_CHECKPOINT, config=dict(c.vae_config or {}),
            dtype=vae_dtype, compat=compat,
        )
    except (ValueError, FileNotFoundError) as err:  # the loaders' one-line file errors
        raise InputError(str(err)) from None
    return text_encoder, vae


# ---- the one setup of a run and of a live session --------------------------------------------
@dataclass(frozen=True)
class InferenceSetup:
    """What is known once every input is checked, before anything is loaded or written."""

    settings: InferenceSettings
    paths: CheckpointPaths
    device: torch.device


def prepare_inference(c: InferenceConfig, interactive: bool, local_rank: int = 0) -> InferenceSetup:
    """Check everything a run or a live session needs (the settings' cross-key rules, the files,
    the attention kernel, the device) and warn about settings without effect, so that bad input
    fails in one line before any output folder exists or any weight is read."""
    settings = parse_settings(c, interactive)
    paths = check_paths(c)
    warn_ignored_settings(c, paths)
    AttentionKernel(c.attn_backend)  # an uninstalled kernel is bad input
    device = pick_device(c.device, local_rank)
    if c.cuda_graphs and device.type != "cuda":
        raise InputError(f"cuda_graphs: true needs a CUDA device; this run is on {device.type}")
    return InferenceSetup(settings, paths, device)


def load_components(c: InferenceConfig, setup: InferenceSetup, seed: int) -> Components:
    """The models of a prepared run on its device; `seed` seeds torch first (the tiny preset's
    random weights and anything else drawn while building come from it)."""
    set_cpu_threads(c, setup.device)
    torch.manual_seed(seed)
    return build_components(c, setup.device, setup.settings.compat, setup.paths)


def _is_set(c: InferenceConfig, key: str) -> bool:
    """Whether the user set `key`: non-empty and not the schema's default (a key set to its
    default changes nothing, so it is not worth a warning)."""
    value = getattr(c, key)
    return bool(value) and value != getattr(InferenceConfig(), key)


def warn_ignored_settings(c: InferenceConfig, paths: CheckpointPaths) -> None:
    """Warn about settings that look meaningful but have no effect on this run."""
    adapter, lora_ckpt = c.adapter, c.lora_ckpt
    if paths.wan_folder is None:
        ignored = [k for k in ("wan_models_root", "text_encoder_config", "vae_config")
                   if _is_set(c, k)]
        if ignored:
            log.warning("preset: tiny builds random base models in memory and ignores %s (its "
                        "generator_ckpt and lora_ckpt are loaded)", ", ".join(f"`{k}`" for k in ignored))
    if adapter and not lora_ckpt:
        log.warning("`adapter` is set but `lora_ckpt` is null: the LoRA keeps its initial "
                    "weights (no effect on the video), yet the files are named _lora")


def set_cpu_threads(c: InferenceConfig, device: torch.device) -> None:
    """On the CPU, use `cpu_threads` threads per process (default: every core this process may
    run on), whatever the launcher set. torchrun sets OMP_NUM_THREADS=1 for several processes,
    and a different thread count changes the floating-point sums, hence the pixels; fixing the
    count keeps a video independent of the number of processes (README, "Seeds")."""
    if device.type != "cpu":
        return
    threads = c.cpu_threads
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(int(threads or 1))
