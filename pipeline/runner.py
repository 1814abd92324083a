"""Run a prompt file through the streaming pipeline and write one MP4 per prompt (and seed).

Used by `inference.py` for both modes. Per prompt: encode the prompt(s), generate latents chunk
by chunk, decode each finished chunk at once with the streaming VAE decoder and append its frames
to the MP4, so the pixel video is never held in memory whole. MP4s are written under a temporary
name and renamed when complete.

Under torchrun every rank holds a full replica and takes prompts i = rank, rank + W, ... (no
prompt dropped or duplicated); every rank writes its own files. Every rank plans the names of
all videos, so a name clash or an existing video stops every rank alike, before loading.

A video whose chunk comes out NaN/inf (bad weights, overflow) is not written: the error names
the prompt's line and the chunk, the remaining prompts are still generated, and the run reports
the failures at the end.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config.inference import InferenceSettings, check_rope_table
from config.schema import InferenceConfig
from memflow.errors import InputError
from memflow.noise import NoiseOrder, SeededNoise
from memflow.prompt_blend import weighted_embedding
from memflow.stream import ControlChange
from memflow.text_encoder import TextEncoder, clean_prompt
from memflow.vae import VAE_STRIDE
from utils.distributed import DistInfo, barrier, prompt_seed, rank_seed
from utils.prompts import (
    InteractiveStory,
    Segment,
    effective_switch_chunks,
    line_starts,
    load_interactive_stories,
    load_prompt_lines,
    parse_switch_frame_indices,
    segment_texts,
)
from utils.video_writer import Mp4Writer, prepare_output_folder, removed_if_left_empty

from .build import (
    CheckpointPaths,
    Components,
    InferenceSetup,
    load_components,
    model_type,
    prepare_inference,
)
from .causal_inference import CausalInferencePipeline
from .interactive_inference import InteractiveInferencePipeline
from .outputs import Job, PlannedVideo, check_existing, plan_videos
from .start import Start, check_start, encode_start

log = logging.getLogger(__name__)


class NonFiniteVideo(RuntimeError):
    """A chunk's latents or pixels hold NaN/inf; its video is not written."""


@dataclass
class RunResult:
    written: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one message per video not written


def is_interactive(c: InferenceConfig) -> bool:
    """`mode`, or when unset whether the config gives switch frames (eval reads any config)."""
    if c.mode is None:
        return c.switch_frame_indices is not None
    return c.mode == "interactive"


def load_jobs(c: InferenceConfig, interactive: bool, settings: InferenceSettings) -> list[Job]:
    """Read and validate the prompt file; an interactive job carries its switch chunks."""
    data_path = c.data_path
    if not data_path:
        raise InputError("config key `data_path` is not set")
    starts = {line: Start(kind, media) for line, (kind, media) in line_starts(data_path).items()}
    for line, start in starts.items():  # an unusable file stops the run before it writes
        try:
            check_start(start, settings.stream.num_frame_per_block)
        except InputError as err:
            raise InputError(f"{data_path}:{line}: {err}") from None
    if not interactive:
        return [Job(i, line, [p], start=starts.get(line))
                for i, (line, p) in enumerate(load_prompt_lines(data_path))]
    return [Job(i, story.line, story.prompts, story_switch_chunks(c, story, settings, data_path),
                None if story.transitions is None else tuple(story.transitions),
                starts.get(story.line), story_controls(story, settings, data_path))
            for i, story in enumerate(load_interactive_stories(data_path))]


def story_controls(story: InteractiveStory, settings: InferenceSettings,
                   data_path: str) -> tuple[ControlChange, ...]:
    """A line's `chunk_steps` (values of the config's step list) and `chunk_seeds` as the
    stream's runtime control changes."""
    listed = list(settings.sampling.denoising_step_list)
    changes = []
    for chunk in sorted({*story.chunk_steps, *story.chunk_seeds}):
        steps = story.chunk_steps.get(chunk)
        if steps is not None and any(v not in listed for v in steps):
            raise InputError(f"{data_path}:{story.line}: chunk_steps at chunk {chunk}: {steps} is "
                             f"not a subset of the denoising_step_list {listed}")
        indices = None if steps is None else tuple(listed.index(v) for v in steps)
        changes.append(ControlChange(chunk, indices, story.chunk_seeds.get(chunk)))
    return tuple(changes)


def story_switch_chunks(
    c: InferenceConfig, story: InteractiveStory, settings: InferenceSettings, data_path: str
) -> tuple[int, ...]:
    """The chunks where a story's prompts switch: from its line's own `switch_frame_indices`
    (a saved live session) or the config's; the first chunk boundary at or after each frame,
    at most one switch per chunk (spec K4)."""
    fpb = settings.stream.num_frame_per_block
    own = story.switch_frame_indices is not None
    value = story.switch_frame_indices if own else c.switch_frame_indices
    try:
        frames = parse_switch_frame_indices(value, len(story.prompts), settings.num_frames, fpb)
    except InputError as err:
        if not own:
            raise
        raise InputError(f"{data_path}:{story.line}: {err}") from None
    return tuple(effective_switch_chunks(frames, fpb, settings.num_frames // fpb))


def encode_segment(encoder: TextEncoder, segment: Segment) -> torch.Tensor:
    """A segment's conditioning: its prompt's embedding, or a weighted prompt's mix of its
    texts' embeddings (memflow.prompt_blend.weighted_embedding)."""
    if isinstance(segment, str):
        return encoder.encode([segment])
    texts, weights = zip(*segment)
    return weighted_embedding([encoder.encode([t]) for t in texts], weights)


def noise_order(settings: InferenceSettings) -> NoiseOrder:
    """The reference draws a video's initial noise up front (compat); clean draws it chunk by
    chunk, so a live session (pipeline/session.py) with the same seed gives the same video."""
    return "upfront" if settings.compat else "per_chunk"


def warn_unused_switches(c: InferenceConfig, interactive: bool) -> None:
    """Single-prompt mode has no prompt switches: name the switch keys it ignores."""
    if interactive:
        return
    unused = [k for k in ("switch_frame_indices", "switch") if getattr(c, k) not in (None, {}, "")]
    if unused:
        log.warning("mode: single ignores %s (prompt switches need mode: interactive and a .jsonl "
                    "file of {\"prompts\": [...]} lines)", ", ".join(f"`{k}`" for k in unused))


def warn_long_prompts(encoder: TextEncoder, plan: list[PlannedVideo], data_path: str) -> None:
    """Name the file line of each prompt that the encoder will truncate (its own warning can
    only count prompts within one call)."""
    for video in plan:
        for segment, prompt in ((k, text) for k, seg in enumerate(video.job.prompts)
                                for text in segment_texts(seg)):
            tokens = len(encoder.tokenizer([clean_prompt(prompt)], add_special_tokens=True,
                                           verbose=False)["input_ids"][0])
            if tokens > encoder.text_len:
                where = f" (segment {segment})" if len(video.job.prompts) > 1 else ""
                log.warning("%s:%d%s: the prompt has %d tokens; the text encoder keeps %d "
                            "(text_len), so its last %d tokens are cut", data_path,
                            video.job.line, where, tokens, encoder.text_len,
                            tokens - encoder.text_len)


def plan_run(c: InferenceConfig, dist: DistInfo, interactive: bool,
             settings: InferenceSettings, paths: CheckpointPaths) -> list[PlannedVideo]:
    """Every video's name and rank; existing files are checked (skip / overwrite / error) and
    the output folder is made, before anything is loaded."""
    jobs = load_jobs(c, interactive, settings)
    out_dir = Path(c.output_folder)
    plan = plan_videos(
        jobs, dist.world_size, out_dir, model_type(c),
        save_with_index=c.save_with_index, rank_in_names=settings.compat,
        limit=c.inference_iter, data_path=str(c.data_path),
    )
    if c.skip_existing and c.seed_mode != "per_prompt":
        log.warning("skip_existing with seed_mode %s: skipped videos do not draw noise, so the "
                    "others differ from an uninterrupted run (per_prompt does not have this)",
                    c.seed_mode)
    check_existing(plan, skip_existing=c.skip_existing, overwrite=c.overwrite)
    if dist.is_main:
        prepare_output_folder(out_dir)
    barrier()
    return plan


def run(c: InferenceConfig, dist: DistInfo) -> RunResult:
    """Generate every prompt assigned to this rank; returns the files written and the videos
    that failed. All the input is checked (settings, paths, attention backend, device) before
    `plan_run` makes the output folder, so bad input leaves nothing on disk."""
    interactive = is_interactive(c)
    setup = prepare_inference(c, interactive, dist.local_rank)
    check_rope_table(c, setup.settings.num_frames)  # a live session has no length to check
    warn_unused_switches(c, interactive)
    with removed_if_left_empty(c.output_folder if dist.is_main else None):
        return _run_planned(c, dist, interactive, setup)


def _run_planned(c: InferenceConfig, dist: DistInfo, interactive: bool,
                 setup: InferenceSetup) -> RunResult:
    """`run` from making the output folder on: load the models, generate every video."""
    settings, device = setup.settings, setup.device
    plan = plan_run(c, dist, interactive, settings, setup.paths)
    data_path, skip_existing = str(c.data_path), c.skip_existing

    seed, seed_mode = c.seed, c.seed_mode
    process_seed = rank_seed(seed, dist.rank if seed_mode != "per_rank" else dist.local_rank, seed_mode)
    parts = load_components(c, setup, process_seed)

    pipe_cls = InteractiveInferencePipeline if interactive else CausalInferencePipeline
    pipe = pipe_cls(parts.generator, settings.stream, settings.sampling)
    mine = [video for video in plan if video.rank == dist.rank]
    warn_long_prompts(parts.text_encoder, mine, data_path)
    fps = float(c.fps)
    noise = SeededNoise(process_seed, dtype=parts.generator.dtype, device=device,
                        order=noise_order(settings))

    result = RunResult()
    for video in tqdm(mine, desc=f"rank {dist.rank} prompts", disable=not dist.is_main):
        job_seed = prompt_seed(seed, video.job.index, seed_mode)
        if job_seed is not None:
            noise.generator.manual_seed(job_seed)
        if skip_existing and video.path.exists():
            log.info("skip %s (exists; skip_existing is set)", video.path)
            continue
        try:
            _generate_one(pipe, parts, settings, video.job, noise, video.path, fps, interactive,
                          c.prepend_source)
        except NonFiniteVideo as err:
            message = f"{data_path}:{video.job.line}: {err}; {video.path.name} was not written"
            log.error("%s", message)
            result.failed.append(message)
            continue
        result.written.append(video.path)
        log.info("wrote %s", video.path)
    return result


def _generate_one(
    pipe: CausalInferencePipeline,
    parts: Components,
    settings: InferenceSettings,
    job: Job,
    noise: SeededNoise,
    path: Path,
    fps: float,
    interactive: bool,
    prepend_source: bool = False,
) -> None:
    with warnings.catch_warnings():  # `warn_long_prompts` named the lines already
        warnings.filterwarnings("ignore", message=r"prompt \d+ has \d+ tokens; truncated")
        embeds = [encode_segment(parts.text_encoder, p) for p in job.prompts]
    decoder = parts.vae.stream()
    fpb = settings.stream.num_frame_per_block
    num_chunks = settings.num_frames // fpb
    prefix = None
    if job.start is not None:
        height, width = (n * stride for n, stride in zip(settings.latent_hw, VAE_STRIDE[1:]))
        start = encode_start(job.start, parts.vae, height, width,
                             settings.stream.local_attn_size, fpb)
        gen = parts.generator
        prefix = start.latents.to(gen.device, gen.dtype)
    with Mp4Writer(path, fps=fps) as writer:
        if prefix is not None:  # primes the decoder; an image's frame opens the video
            context_frames = decoder.decode(prefix)[0]
            if job.start.kind == "image":
                writer.write(context_frames)
            elif prepend_source:
                writer.write(start.source_frames[0])

        def on_chunk(n: int, x0: torch.Tensor) -> None:
            frames = decoder.decode(x0[:1])[0]
            finite = torch.isfinite(x0).all() & torch.isfinite(frames).all()  # no sync yet
            writer.write(frames)  # copies the frames to the host: the device is synced here
            if not finite:  # computed before that copy, so reading it adds no wait
                first, last = n * fpb, n * fpb + fpb - 1
                raise NonFiniteVideo(f"chunk {n + 1} of {num_chunks} (latent frames {first}-{last}) "
                                     "came out NaN/inf")

        if interactive:
            assert isinstance(pipe, InteractiveInferencePipeline)
            pipe.generate_latents_interactive(
                embeds, list(job.switch_chunks), settings.num_frames, settings.latent_hw, noise,
                switch=settings.switch, on_chunk=on_chunk, progress=True,
                transitions=job.transitions, prefix=prefix, controls=job.controls,
            )
        else:
            pipe.generate_latents(
                embeds[0], settings.num_frames, settings.latent_hw, noise,
                on_chunk=on_chunk, progress=True, prefix=prefix,
            )
