"""Cross-check: run the `vbench` package itself on the evaluated videos.

Only when `vbench` is installed with its weights (it loads DINO through torch.hub and CLIP through
OpenAI's `clip`, from its cache folder, `VBENCH_CACHE_DIR`); this project never installs or
downloads them. VBench evaluates every video of a folder ("custom_input" mode), so the videos are
linked into a folder of their own first. Its per-video numbers are returned next to the
aggregate, keyed by file name, and `report.md` shows them beside ours.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from memflow.errors import InputError

DIMENSIONS = ("subject_consistency", "background_consistency")


def require_vbench() -> None:
    try:
        import vbench  # noqa: F401
    except ImportError:
        raise InputError(
            "--vbench needs the vbench package and its weights (pip install vbench; weights "
            "under VBENCH_CACHE_DIR); run without --vbench to use this project's implementation only"
        ) from None


def run_vbench(paths: list[Path], work: Path, device: str) -> dict:
    """VBench's subject and background consistency of `paths`: aggregate and per video."""
    import vbench

    videos = work / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for path in paths:
        link = videos / path.name
        if not link.exists():
            os.symlink(path.resolve(), link)
    info = Path(vbench.__file__).parent / "VBench_full_info.json"
    bench = vbench.VBench(device, str(info), str(work))
    bench.evaluate(videos_path=str(videos), name="memflow", dimension_list=list(DIMENSIONS),
                   local=True, mode="custom_input")
    results = json.loads((work / "memflow_eval_results.json").read_text(encoding="utf-8"))
    out: dict = {"aggregate": {}, "videos": {}}
    for dim in DIMENSIONS:
        score, per_video = results[dim]
        out["aggregate"][dim] = float(score)
        for row in per_video:
            out["videos"].setdefault(Path(row["video_path"]).name, {})[dim] = float(row["video_results"])
    return out
