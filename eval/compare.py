"""Generate the benchmark videos for each memory mode, evaluate them, and print the paper's
Table 3 side by side (consistency, segment CLIP scores, FPS).

    python -m eval.compare --config_path configs/tiny_interactive.yaml --out eval_runs/tiny \\
        --clip_model eval_models/tiny/clip --dino_model eval_models/tiny/dino --limit 2
    torchrun --nproc_per_node=8 -m eval.compare --config_path configs/interactive_inference.yaml \\
        data_path=../shared/data/interactive_benchmark.jsonl --out eval_runs/table3

Generation is `pipeline.runner.run`, unchanged, once per mode with these overrides of the config:

    none     sink_size=0, bank_size=0, SMA=false   (local window only)
    sink     bank_size=0, SMA=false                (frame sink, as LongLive)
    nam      SMA=false                             (sink + Narrative Adaptive Memory)
    nam_sma  SMA=true                              (NAM + Sparse Memory Activation)

The sink and bank sizes are the config's. FPS is video frames per second of generation on one
rank, timed between the pipeline's own "wrote <video>" log records; the first video is left out
because its time includes building the models (with one video it is included, and marked).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from config.inference import load_inference_config
from config.schema import InferenceConfig
from memflow.errors import InputError
from memflow.files import atomic_write_text
from memflow.vae import video_frames
from utils.distributed import DistInfo, cleanup_distributed, init_distributed
from utils.video_writer import check_folder_path

from .evaluate import add_model_args, build_scorer, evaluate_folder, resolve_device
from .inputs import generation_from_config
from .report import fmt, markdown_table, span_label, write_json

MODES: dict[str, tuple[str, list[str]]] = {
    "none": ("no memory (window only)",
             ["model_kwargs.sink_size=0", "model_kwargs.bank_size=0", "model_kwargs.SMA=false"]),
    "sink": ("frame sink", ["model_kwargs.bank_size=0", "model_kwargs.SMA=false"]),
    "nam": ("sink + NAM", ["model_kwargs.SMA=false"]),
    "nam_sma": ("sink + NAM + SMA", ["model_kwargs.SMA=true"]),
}


class _WriteTimes(logging.Handler):
    """Timestamps of the runner's "wrote <video>" records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "wrote %s":
            self.times.append(time.perf_counter())


def generate(c: InferenceConfig, dist: DistInfo) -> tuple[int, float, bool]:
    """Run the pipeline; returns (videos written on this rank, FPS, whether the FPS includes
    building the models). The mode's folder must hold no videos yet: every video is generated
    and timed, none is reused."""
    folder = Path(c.output_folder)
    if folder.is_dir() and any(folder.glob("*.mp4")):
        raise InputError(f"{folder} already holds videos; give compare a new --out folder")
    from pipeline.runner import run

    logger = logging.getLogger("pipeline.runner")
    times = _WriteTimes()
    level = logger.level
    logger.addHandler(times)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        run(c, dist)
    finally:
        logger.removeHandler(times)
        logger.setLevel(level)
    frames = video_frames(int(c.num_output_frames))
    count = len(times.times)
    if count >= 2:
        return count, frames * (count - 1) / (times.times[-1] - times.times[0]), False
    if count == 1:
        return count, frames / (times.times[0] - start), True
    return 0, float("nan"), True


def _limited_prompts(path: Path, limit: int | None, out: Path) -> Path:
    """The prompt file, or a copy of its first `limit` non-blank lines (the runner reads whole
    files, so this is how every rank generates the same subset)."""
    if limit is None:
        return path
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}")
    lines = [l for l in path.read_text(encoding="utf-8-sig").split("\n") if l.strip()][:limit]
    copy = out / f"prompts_first{limit}{path.suffix}"
    atomic_write_text(copy, "\n".join(lines) + "\n")
    return copy


def render_table(rows: list[dict]) -> str:
    seg_count = max(len(r["report"]["aggregate"]["segments"]) for r in rows)
    first = rows[0]["report"]["aggregate"]["segments"]
    seg_names = [f"CLIP {span_label(s['seconds'])}" for s in first[:seg_count]]
    body = []
    for r in rows:
        agg = r["report"]["aggregate"]
        fps = fmt(r["fps"]) + (" (incl. load)" if r["fps_includes_load"] else "")
        body.append([r["mode"], r["label"], fmt(agg["subject_consistency"]["score"], 4),
                     fmt(agg["background_consistency"]["score"], 4), fmt(agg["consistency"], 4),
                     *[fmt(s["clip_score"]) for s in agg["segments"]], fmt(agg["clip_score"]), fps])
    header = ["mode", "memory", "subject", "background", "consistency", *seg_names, "CLIP overall", "FPS"]
    return "\n".join(markdown_table(header, body)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="generation config (its data_path is the benchmark)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of %(default)s")
    parser.add_argument("--out", required=True, help="folder: <mode>/ videos, <mode>/eval/ reports, compare.md")
    parser.add_argument("--limit", type=int, help="only the first N prompt lines")
    add_model_args(parser)
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise InputError(f"--modes: unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be >= 1, got {args.limit}")
        out = check_folder_path(args.out)  # a file there is one error line, not a traceback
        base = load_inference_config(args.config_path, args.overrides)
        prompts = _limited_prompts(Path(str(base.data_path)), args.limit, out)
        dist = init_distributed()
        try:
            scorer = build_scorer(args, resolve_device(args.device, dist.local_rank))
            rows = []
            for mode in modes:
                label, mode_overrides = MODES[mode]
                cfg = load_inference_config(args.config_path, [
                    *args.overrides, *mode_overrides,
                    f"output_folder={out / mode}", f"data_path={prompts}",
                ])
                count, fps, with_load = generate(cfg, dist)
                report = evaluate_folder(scorer, out / mode, prompts,
                                         generation_from_config(cfg, args.config_path),
                                         out / mode / "eval", None, dist)
                rows.append({"mode": mode, "label": label, "overrides": mode_overrides,
                             "videos_on_rank0": count, "fps": fps, "fps_includes_load": with_load,
                             "report": report})
        finally:
            cleanup_distributed()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dist.is_main:
        table = render_table(rows)
        write_json(out / "compare.json", {"config_path": args.config_path, "overrides": args.overrides,
                                          "prompts": str(prompts), "modes": [
                                              {k: v for k, v in r.items() if k != "report"}
                                              | {"aggregate": r["report"]["aggregate"],
                                                 "report": str(out / r["mode"] / "eval" / "report.json")}
                                              for r in rows]})
        atomic_write_text(out / "compare.md", f"# Memory modes: `{args.config_path}` {' '.join(args.overrides)}\n\n{table}")
        print(table)
        print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and one report per mode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
