"""Evaluate a folder of generated MP4s against the prompt file that made them.

    python -m eval.evaluate --videos videos/interactive \\
        --prompts ../shared/data/interactive_benchmark.jsonl \\
        --config_path configs/interactive_inference.yaml [key=value ...] [--limit 10]
    torchrun --nproc_per_node=8 -m eval.evaluate ...      # videos sharded over ranks

Writes `<out>/report.json` and `<out>/report.md` (per video, per segment, aggregated, with the
models' hashes, the sampling rates, the generation config's hash and the seeds), plus one record
per video in `<out>/records/`. A rerun skips every video whose record matches its sha256 and the
protocol, so an interrupted run resumes. Give the generation's config (and the same overrides)
so that the segments follow its `switch_frame_indices` and the report names its hash and seed;
without one, `--switch_frame_indices` marks an interactive file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config.inference import load_inference_config
from memflow.errors import InputError
from memflow.files import atomic_write_text
from memflow.vae import video_frames
from utils.distributed import (
    DistInfo,
    barrier,
    cleanup_distributed,
    init_distributed,
    pick_device,
    shard_indices,
)
from utils.video_writer import check_folder_path

from .inputs import Generation, check_switches, generation_from_config, load_stories, match_videos
from .models import ClipScorer, DinoEncoder
from .report import aggregate, render_markdown, write_json
from .score import Protocol, VideoScorer
from .segments import Span, latent_frames, segment_spans
from .video import file_sha256, probe

log = logging.getLogger(__name__)

DEFAULT_CLIP = "eval_models/clip-vit-base-patch32"
DEFAULT_DINO = "eval_models/dino-vitb16"


def _spans(generation: Generation, num_frames: int, num_prompts: int, path: Path) -> list[Span]:
    """The video's prompt segments; one span for a single-prompt video."""
    latent = generation.num_latent_frames or latent_frames(num_frames)
    if num_frames != video_frames(latent):
        raise InputError(
            f"{path}: {num_frames} frames, but num_output_frames={latent} decodes to "
            f"{video_frames(latent)}; evaluate with the config that generated it"
        )
    if not generation.interactive:
        return [Span(0, 0, num_frames, 0)]
    check_switches(generation, num_prompts, latent)
    return segment_spans(generation.switch_frames, latent, generation.frames_per_block)


def evaluate_video(scorer: VideoScorer, path: Path, line: int, prompts: list[str],
                   generation: Generation, record_path: Path) -> dict:
    """Score one video, or return its stored record when the video and protocol are unchanged."""
    sha = file_sha256(path)
    info = probe(path)
    spans = _spans(generation, info.num_frames, len(prompts), path)
    key = scorer.key(prompts, spans, info)
    if record_path.is_file():
        old = json.loads(record_path.read_text(encoding="utf-8"))
        if old.get("sha256") == sha and old.get("eval_key") == key:
            return old
    record = {
        "file": path.name, "sha256": sha, "line": line, "seed": generation.video_seed(line),
        "prompts": prompts, "eval_key": key,
        **scorer.score(path, info, prompts, spans, drift=not generation.interactive),
    }
    write_json(record_path, record)
    return record


def evaluate_folder(
    scorer: VideoScorer,
    videos: Path,
    prompt_file: Path,
    generation: Generation,
    out: Path,
    limit: int | None = None,
    dist: DistInfo = DistInfo(),
    vbench_device: str | None = None,
) -> dict | None:
    """Evaluate this rank's share of the videos; rank 0 then writes and returns the report."""
    stories = load_stories(prompt_file, generation)
    paths = match_videos(videos, stories, limit)
    records_dir = out / "records"
    mine = shard_indices(len(paths), dist.rank, dist.world_size)
    for i in tqdm(mine, desc=f"rank {dist.rank} evaluating", disable=not dist.is_main):
        evaluate_video(scorer, paths[i], i, stories[i], generation, records_dir / f"{paths[i].stem}.json")
    barrier()
    if not dist.is_main:
        return None
    records = [json.loads((records_dir / f"{p.stem}.json").read_text(encoding="utf-8")) for p in paths]
    report = {
        "videos_folder": str(videos),
        "prompt_file": str(prompt_file),
        "prompt_sha256": file_sha256(prompt_file),
        "limit": limit,
        "generation": asdict(generation),
        "protocol": scorer.describe(),
        "environment": {"torch": torch.__version__, "transformers": _version("transformers")},
        "aggregate": aggregate(records),
        "videos": records,
    }
    if vbench_device is not None:
        from .vbench_check import run_vbench

        report["vbench"] = run_vbench(paths, out / "vbench", vbench_device)
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The --device option (auto | cpu | cuda) for this rank."""
    return pick_device(name, local_rank, "--device")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared with `eval.compare`: the backbones and the sampling protocol."""
    g = parser.add_argument_group("protocol")
    g.add_argument("--clip_model", default=DEFAULT_CLIP,
                   help="local transformers CLIP folder (default: %(default)s)")
    g.add_argument("--dino_model", default=DEFAULT_DINO,
                   help="local transformers DINO ViT-B/16 folder (default: %(default)s)")
    g.add_argument("--clip_fps", type=float, default=Protocol.clip_fps,
                   help="frames per second scored by CLIP (0: every frame; default %(default)s)")
    g.add_argument("--consistency_fps", type=float, default=Protocol.consistency_fps,
                   help="frames per second for consistency (0: every frame, as VBench; default %(default)s)")
    g.add_argument("--window_s", type=float, default=Protocol.window_s,
                   help="drift window of single-prompt videos, seconds (default %(default)s)")
    g.add_argument("--batch_size", type=int, default=32, help="frames per model call")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--vbench", action="store_true",
                   help="also run the vbench package (installed, with its weights) on the same "
                        "videos and report both")


def build_scorer(args: argparse.Namespace, device: torch.device) -> VideoScorer:
    protocol = Protocol(args.clip_fps, args.consistency_fps, args.window_s)
    if min(protocol.clip_fps, protocol.consistency_fps) < 0 or protocol.window_s <= 0:
        raise InputError("--clip_fps and --consistency_fps must be >= 0, --window_s positive")
    if args.vbench:
        from .vbench_check import require_vbench

        require_vbench()
    return VideoScorer(ClipScorer(args.clip_model, device), DinoEncoder(args.dino_model, device),
                       protocol, args.batch_size)


def _generation(args: argparse.Namespace) -> Generation:
    if args.config_path:
        cfg = load_inference_config(args.config_path, args.overrides)
        generation = generation_from_config(cfg, args.config_path)
        if args.switch_frame_indices is not None:
            raise InputError("give the switches in the config or --switch_frame_indices, not both")
        return generation
    if args.overrides:
        raise InputError(f"config overrides {args.overrides} need --config_path")
    if args.switch_frame_indices is None:
        return Generation(interactive=False, frames_per_block=args.frames_per_block)
    switches = tuple(int(p) for p in args.switch_frame_indices.split(",") if p.strip())
    return Generation(interactive=True, switch_frames=switches, frames_per_block=args.frames_per_block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", required=True, help="folder of generated MP4s")
    parser.add_argument("--prompts", required=True, help="the prompt file (.txt or .jsonl) that made them")
    parser.add_argument("--out", help="report folder (default: <videos>/eval)")
    parser.add_argument("--config_path", help="the generation config (switches, length, seed)")
    parser.add_argument("overrides", nargs="*", help="the generation's config overrides, key=value")
    parser.add_argument("--switch_frame_indices", help="latent switch frames, e.g. 40,80,120 "
                        "(without --config_path)")
    parser.add_argument("--frames_per_block", type=int, default=3,
                        help="latent frames per chunk (without --config_path; default %(default)s)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N prompt lines")
    add_model_args(parser)
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be >= 1, got {args.limit}")
        generation = _generation(args)
        dist = init_distributed()
        try:
            device = resolve_device(args.device, dist.local_rank)
            scorer = build_scorer(args, device)
            videos = Path(args.videos)
            out = check_folder_path(args.out if args.out else videos / "eval")
            report = evaluate_folder(scorer, videos, Path(args.prompts), generation, out,
                                     args.limit, dist, vbench_device=str(device) if args.vbench else None)
        finally:
            cleanup_distributed()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:
        print(render_markdown(report))
        print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
