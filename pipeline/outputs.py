"""Which video file each prompt gets, planned for every rank before anything is generated.

Planning all names up front is what makes two promises checkable before the models load:
* no two videos share a file (with ``save_with_index: false`` prompts such as "." and "..", or
  two stories that start alike, sanitise to one name; the later ones in the file get
  ``_line<N>`` added);
* in ``behaviour: clean`` a video's name depends only on the prompt file, not on the number of
  processes, so ``skip_existing`` resumes a run on another number of GPUs. The reference's names
  (kept under ``compat``) start with the rank that wrote the video: ``rank1-1-0`` on 2 processes
  is ``rank0-1-0`` on 1;
* no finished video is replaced by accident: if some already exist, the run stops unless the
  config says what to do with them, ``skip_existing: true`` (keep them and generate the rest,
  e.g. to resume a big prompt file after a crash) or ``overwrite: true``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from memflow.errors import InputError
from memflow.prompt_blend import Transition
from memflow.stream import ControlChange
from utils.distributed import shard_indices
from utils.naming import video_filename
from utils.prompts import Segment, segment_texts

from .start import Start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    index: int  # position in the prompt file (what `save_with_index` names)
    line: int  # 1-based line in the prompt file, for messages
    prompts: list[Segment]  # one prompt, or the segments of an interactive story
    switch_chunks: tuple[int, ...] = ()  # interactive: the chunk at which each next prompt starts
    transitions: tuple[Transition, ...] | None = None  # interactive: how each switch moves
    start: Start | None = None  # the line's start image or video to continue
    controls: tuple[ControlChange, ...] = ()  # interactive: a session's runtime controls


@dataclass(frozen=True)
class PlannedVideo:
    job: Job
    rank: int
    path: Path


def plan_videos(
    jobs: list[Job],
    world_size: int,
    out_dir: Path,
    model_type: str,
    *,
    save_with_index: bool,
    rank_in_names: bool = False,
    limit: int = -1,
    data_path: str = "",
) -> list[PlannedVideo]:
    """Every rank's videos, in generation order per rank; names are unique.

    Rank r takes jobs r, r + W, ... (`shard_indices`), the first ``limit + 1`` of them when
    `limit` (``inference_iter``) is not negative. `rank_in_names` gives the reference's names
    (``rank{r}-...``, compat); without it a name depends only on the prompt file.
    """
    rank_of = {i: rank for rank in range(world_size) for i in shard_indices(len(jobs), rank, world_size)}
    order = []  # (rank, position in `jobs`) in generation order per rank
    for rank in range(world_size):
        mine = shard_indices(len(jobs), rank, world_size)
        order += [(rank, i) for i in (mine[: limit + 1] if limit >= 0 else mine)]

    def name(i: int, suffix: str = "") -> str:
        return video_filename(rank_of[i] if rank_in_names else None, jobs[i].index, 0, model_type,
                              prompt=segment_texts(jobs[i].prompts[0])[0],
                              save_with_index=save_with_index,
                              suffix=suffix)

    planned = {i for _, i in order}
    names: list[str] = []
    taken: dict[str, Job] = {}
    for i, job in enumerate(jobs):  # file order, so that the `_line<N>` go to the same lines
        chosen, extra = name(i), 1
        while chosen in taken:
            chosen = name(i, f"_line{job.line}" + (f"_{extra}" if extra > 1 else ""))
            extra += 1
        if chosen != name(i) and i in planned:
            log.warning("%s:%d and %s:%d give the same file name %s; line %d is written as %s",
                        data_path, taken[name(i)].line, data_path, job.line, name(i), job.line,
                        chosen)
        taken[chosen] = job
        names.append(chosen)
    return [PlannedVideo(jobs[i], rank, out_dir / names[i]) for rank, i in order]


def check_existing(plan: list[PlannedVideo], *, skip_existing: bool, overwrite: bool) -> None:
    """Stop before generating when finished videos would be replaced without being asked to."""
    if skip_existing and overwrite:
        raise InputError("config keys `skip_existing` and `overwrite` are both true; choose one")
    existing = [video.path for video in plan if video.path.exists()]
    if not existing or overwrite:
        return
    if skip_existing:
        log.info("skip_existing: %d of %d videos exist already and are kept", len(existing), len(plan))
        return
    raise InputError(
        f"{len(existing)} of the {len(plan)} videos exist already (e.g. {existing[0]}); set "
        "skip_existing=true to keep them and generate the rest, or overwrite=true to replace them"
    )
