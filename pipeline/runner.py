"""Run a prompt file through the streaming pipeline and write one MP4 per prompt (and seed).

Used by `inference.py` for both modes. Per prompt: encode the prompt(s), generate latents chunk
by chunk, decode each finished chunk at once with the streaming VAE decoder and append its frames
to the MP4, so the pixel video is never held in memory whole. MP4s are written under a temporary
name and renamed when complete.

Under torchrun every rank holds a full replica and takes prompts i = rank, rank + W, ... (no
prompt dropped or duplicated); every rank writes its own files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from memflow.attention import set_attention_backend
from memflow.checkpoint import set_trust_checkpoints
from utils.distributed import DistInfo, barrier, prompt_seed, rank_seed, shard_indices
from utils.errors import InputError
from utils.naming import video_filename
from utils.prompts import (
    effective_switch_chunks,
    load_interactive_prompts,
    load_prompts,
    parse_switch_frame_indices,
)
from utils.video_writer import Mp4Writer, prepare_output_folder

from .build import Components, build_components, check_paths, resolve_device
from .causal_inference import CausalInferencePipeline
from .interactive_inference import InteractiveInferencePipeline
from .noise import SeededNoise
from .settings import InferenceSettings, parse_settings

log = logging.getLogger(__name__)


@dataclass
class Job:
    index: int  # line of the prompt file
    prompts: list[str]  # one prompt, or the segments of an interactive story


def is_interactive(cfg: DictConfig) -> bool:
    mode = OmegaConf.select(cfg, "mode", default=None)
    if mode is None:
        return OmegaConf.select(cfg, "switch_frame_indices", default=None) is not None
    if mode not in ("single", "interactive"):
        raise InputError(f"config key `mode` must be single or interactive, got {mode!r}")
    return mode == "interactive"


def load_jobs(cfg: DictConfig, interactive: bool, settings: InferenceSettings) -> tuple[list[Job], list[int]]:
    """Read and validate the prompt file; returns the jobs and the switch chunks."""
    data_path = OmegaConf.select(cfg, "data_path", default=None)
    if not data_path:
        raise InputError("config key `data_path` is not set")
    fpb = settings.stream.num_frame_per_block
    if not interactive:
        return [Job(i, [p]) for i, p in enumerate(load_prompts(data_path))], []
    stories = load_interactive_prompts(data_path)
    switch_frames = parse_switch_frame_indices(
        OmegaConf.select(cfg, "switch_frame_indices", default=None),
        len(stories[0]), settings.num_frames, fpb,
    )
    # first chunk boundary at or after each frame, at most one switch per chunk (spec K4)
    switch_chunks = effective_switch_chunks(switch_frames, fpb, settings.num_frames // fpb)
    return [Job(i, s) for i, s in enumerate(stories)], switch_chunks


def _flag(cfg: DictConfig, key: str) -> bool:
    """A boolean config key; a string such as "false" is an error, not True."""
    value = OmegaConf.select(cfg, key, default=False)
    if not isinstance(value, bool):
        raise InputError(f"config key `{key}` must be true or false, got {value!r}")
    return value


def run(cfg: DictConfig, dist: DistInfo) -> list[Path]:
    """Generate every prompt assigned to this rank; returns the files written."""
    interactive = is_interactive(cfg)
    settings = parse_settings(cfg, interactive)
    jobs, switch_chunks = load_jobs(cfg, interactive, settings)
    paths = check_paths(cfg)
    out_dir = Path(str(OmegaConf.select(cfg, "output_folder", default="videos")))
    if dist.is_main:
        prepare_output_folder(out_dir)
    barrier()
    set_attention_backend(str(OmegaConf.select(cfg, "attn_backend", default="auto")))
    set_trust_checkpoints(_flag(cfg, "trust_checkpoints"))

    seed = int(OmegaConf.select(cfg, "seed", default=0))
    seed_mode = str(OmegaConf.select(cfg, "seed_mode", default="per_prompt"))
    device = resolve_device(cfg, dist.local_rank)
    process_seed = rank_seed(seed, dist.rank if seed_mode != "per_rank" else dist.local_rank, seed_mode)
    torch.manual_seed(process_seed)
    parts = build_components(cfg, device, settings.compat, paths)

    pipe_cls = InteractiveInferencePipeline if interactive else CausalInferencePipeline
    pipe = pipe_cls(parts.generator, settings.stream, settings.sampling)
    mine = [jobs[i] for i in shard_indices(len(jobs), dist.rank, dist.world_size)]
    limit = int(OmegaConf.select(cfg, "inference_iter", default=-1))
    if limit >= 0:
        mine = mine[: limit + 1]
    save_with_index = bool(OmegaConf.select(cfg, "save_with_index", default=True))
    fps = float(OmegaConf.select(cfg, "fps", default=16))
    noise = SeededNoise(process_seed, dtype=parts.generator.dtype, device=device)

    written = []
    for job in tqdm(mine, desc=f"rank {dist.rank} prompts", disable=not dist.is_main):
        job_seed = prompt_seed(seed, job.index, seed_mode)
        if job_seed is not None:
            noise.generator.manual_seed(job_seed)
        name = video_filename(dist.rank, job.index, 0, parts.model_type, prompt=job.prompts[0],
                              save_with_index=save_with_index)
        path = out_dir / name
        _generate_one(pipe, parts, settings, job, switch_chunks, noise, path, fps, interactive)
        written.append(path)
        log.info("wrote %s", path)
    return written


def _generate_one(
    pipe: CausalInferencePipeline,
    parts: Components,
    settings: InferenceSettings,
    job: Job,
    switch_chunks: list[int],
    noise: SeededNoise,
    path: Path,
    fps: float,
    interactive: bool,
) -> None:
    embeds = [parts.text_encoder.encode([p]) for p in job.prompts]
    decoder = parts.vae.stream()
    with Mp4Writer(path, fps=fps) as writer:

        def on_chunk(_: int, x0: torch.Tensor) -> None:
            writer.write(decoder.decode(x0[:1])[0])

        if interactive:
            assert isinstance(pipe, InteractiveInferencePipeline)
            pipe.generate_latents_interactive(
                embeds, switch_chunks, settings.num_frames, settings.latent_hw, noise,
                switch=settings.switch, on_chunk=on_chunk, progress=True,
            )
        else:
            pipe.generate_latents(
                embeds[0], settings.num_frames, settings.latent_hw, noise,
                on_chunk=on_chunk, progress=True,
            )
