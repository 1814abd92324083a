"""What the videos were made from: the prompt file, the generation config, and which MP4 belongs
to which prompt line.

Videos are matched to prompt lines by the names the pipeline gives them
(`utils.naming.video_filename`): ``{line}-{seed_idx}_{model_type}.mp4`` (``behaviour: clean``) or
``rank{r}-{line}-{seed_idx}_{model_type}.mp4`` (the reference's, compat), or the sanitised first
prompt in place of the line with `save_with_index: false`. A rank in the name does not matter,
so videos generated on any number of GPUs evaluate the same.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from config.checker import config_key
from config.schema import InferenceConfig
from memflow.errors import InputError
from utils.distributed import prompt_seed
from utils.naming import sanitize_filename
from utils.prompts import load_interactive_prompts, load_prompts, parse_switch_frame_indices

_NAME = re.compile(r"(?:rank\d+-)?(?P<middle>.+)-\d+_(?:lora|ema|regular)\.mp4")


@dataclass(frozen=True)
class Generation:
    """The generation settings the evaluation needs, and those the report records."""

    interactive: bool
    switch_frames: tuple[int, ...] = ()  # latent frames where prompts 2.. start (config value)
    frames_per_block: int = 3
    num_latent_frames: int | None = None  # None: taken from each video's length
    seed: int | None = None
    seed_mode: str | None = None
    config_path: str | None = None
    config_sha256: str | None = None
    model_kwargs: dict = field(default_factory=dict)  # sink, bank, SMA: the memory mode
    behaviour: str | None = None

    def video_seed(self, line: int) -> int | None:
        if self.seed is None or self.seed_mode is None:
            return None
        return prompt_seed(self.seed, line, self.seed_mode)


def generation_from_config(c: InferenceConfig, config_path: str | None) -> Generation:
    """Read mode, switches, length and seeds as `pipeline.runner` does (the same typed settings,
    so the same defaults). The config's hash is taken over every setting (file, overrides and
    the schema's defaults), so two runs that differ in any setting differ, and spelling out a
    default does not change it."""
    from pipeline.runner import is_interactive

    interactive = is_interactive(c)
    settings = json.dumps(dataclasses.asdict(c), sort_keys=True, default=str)
    mk = c.model_kwargs
    return Generation(
        interactive=interactive,
        switch_frames=tuple(_switch_list(c.switch_frame_indices if interactive else None)),
        frames_per_block=int(c.num_frame_per_block),
        num_latent_frames=int(c.num_output_frames),
        seed=int(c.seed),
        seed_mode=str(c.seed_mode),
        config_path=config_path,
        config_sha256=hashlib.sha256(settings.encode()).hexdigest(),
        # as the YAML spells them (`SMA`), the memory mode of the run
        model_kwargs={config_key(f): getattr(mk, f.name) for f in dataclasses.fields(mk)} if mk else {},
        behaviour=str(c.behaviour),
    )


def _switch_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(p) for p in value.split(",") if p.strip()] if value.strip() else []
    return [int(v) for v in value]


def load_stories(prompt_file: Path, generation: Generation) -> list[list[str]]:
    """One prompt list per video line: K+1 segments in interactive mode, one prompt otherwise."""
    if not generation.interactive:
        return [[p] for p in load_prompts(prompt_file)]
    stories = load_interactive_prompts(prompt_file)
    if len(generation.switch_frames) != len(stories[0]) - 1:
        raise InputError(
            f"{prompt_file}: {len(stories[0])} prompt segments need {len(stories[0]) - 1} "
            f"switch_frame_indices, got {len(generation.switch_frames)} "
            "(pass the generation's --config_path or --switch_frame_indices)"
        )
    return stories


def check_switches(generation: Generation, num_segments: int, num_latent_frames: int) -> None:
    parse_switch_frame_indices(list(generation.switch_frames), num_segments, num_latent_frames,
                               generation.frames_per_block)


def match_videos(folder: Path, stories: list[list[str]], limit: int | None) -> list[Path]:
    """The MP4 of each of the first `limit` prompt lines (all lines when None), in line order."""
    if not folder.is_dir():
        raise InputError(f"video folder not found: {folder}")
    count = len(stories) if limit is None else min(limit, len(stories))
    by_index = {str(i): i for i in range(len(stories))}
    by_prompt = {sanitize_filename(s[0]): i for i, s in enumerate(stories)}
    found: dict[int, Path] = {}
    for path in sorted(folder.glob("*.mp4")):
        match = _NAME.fullmatch(path.name)
        if match is None or path.name.startswith("."):
            continue
        middle = match["middle"]
        line = by_index.get(middle, by_prompt.get(middle))
        if line is None:
            raise InputError(f"{path}: no line of the prompt file matches this video's name")
        if line in found:
            raise InputError(f"two videos for prompt line {line}: {found[line].name}, {path.name}")
        found[line] = path
    missing = [i for i in range(count) if i not in found]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise InputError(
            f"{folder}: {len(found)} videos for {count} prompt lines; none for line(s) "
            f"{missing[:5]}{more}"
        )
    return [found[i] for i in range(count)]
