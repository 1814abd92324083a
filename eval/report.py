"""Aggregate per-video records into `report.json` and render `report.md`; atomic writes.

Aggregation rules (also written into every report's protocol section):
* segment j's CLIP score: the mean over videos of their segment-j score;
* overall CLIP score: the mean over videos of each video's mean over its segments (equal to the
  mean of the per-segment means when every video has every segment);
* subject / background consistency: VBench's frame-weighted pool (all scored frames of all
  videos weigh the same; the plain mean over videos is reported next to it);
* consistency: the mean of the pooled subject and background scores (the paper's "Consistency");
* drift: per window index, the mean over the videos that are that long.
"""
from __future__ import annotations

import json
from pathlib import Path

from memflow.files import atomic_write_text

from .metrics import Consistency, mean
from .score import DRIFT_METRICS


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _pooled(records: list[dict], name: str) -> dict:
    pool = Consistency.pooled(Consistency(r[name]["total"], r[name]["pairs"]) for r in records)
    return {"score": pool.score, "video_mean": mean(r[name]["score"] for r in records)}


def aggregate(records: list[dict]) -> dict:
    """The dataset-level numbers of a list of per-video records."""
    num_segments = max(len(r["segments"]) for r in records)
    segments = []
    for j in range(num_segments):
        having = [r["segments"][j] for r in records if len(r["segments"]) > j]
        segments.append({"index": j, "seconds": having[0]["seconds"], "videos": len(having),
                         "clip_score": mean(s["clip_score"] for s in having)})
    subject = _pooled(records, "subject_consistency")
    background = _pooled(records, "background_consistency")
    out = {
        "videos": len(records),
        "segments": segments,
        "clip_score": mean(r["clip_score"] for r in records),
        "subject_consistency": subject,
        "background_consistency": background,
        "consistency": (subject["score"] + background["score"]) / 2,
    }
    drifting = [r["drift"] for r in records if "drift" in r]
    if drifting:
        rows = []
        for k in range(max(len(d) for d in drifting)):
            having = [d[k] for d in drifting if len(d) > k]
            row = {"index": k, "seconds": having[0]["seconds"], "videos": len(having)}
            for name in DRIFT_METRICS:
                row[name] = mean(w[name] for w in having)
                row[f"delta_{name}"] = mean(w[f"delta_{name}"] for w in having)
            rows.append(row)
        out["drift"] = rows
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def span_label(seconds: list[float]) -> str:
    return f"{round(seconds[0], 1):g}–{round(seconds[1], 1):g} s"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(report: dict) -> str:
    agg, proto, gen = report["aggregate"], report["protocol"], report["generation"]
    lines = [f"# Quality report: {report['videos_folder']}", ""]
    lines += [
        f"* prompts: `{report['prompt_file']}` (sha256 {report['prompt_sha256'][:12]}), "
        f"{agg['videos']} videos, {'interactive' if gen['interactive'] else 'single-prompt'}",
        (f"* generation config: `{gen['config_path']}` (sha256 {gen['config_sha256'][:12]}), "
         f"seed {gen['seed']} ({gen['seed_mode']})" if gen["config_path"] else
         "* generation config: not given (no config hash or seeds)")
        + f", switch_frame_indices {list(gen['switch_frames']) or '–'}",
        f"* CLIP: `{proto['clip_model']['path']}` (sha256 {proto['clip_model']['sha256'][:12]}), "
        f"{proto['clip_fps']} frames/s, text truncated to {proto['clip_model']['text_max_tokens']} "
        "tokens",
        f"* DINO: `{proto['dino_model']['path']}` (sha256 {proto['dino_model']['sha256'][:12]}); "
        f"consistency over {'every frame' if not proto['consistency_fps'] else str(proto['consistency_fps']) + ' frames/s'}",
        f"* protocol v{proto['version']}: see report.json `protocol` for every formula and choice",
        "",
        "## Aggregate",
        "",
    ]
    seg_names = [f"CLIP {span_label(s['seconds'])}" for s in agg["segments"]]
    lines += markdown_table(
        ["videos", "subject", "background", "consistency", *seg_names, "CLIP overall"],
        [[str(agg["videos"]), fmt(agg["subject_consistency"]["score"], 4),
          fmt(agg["background_consistency"]["score"], 4), fmt(agg["consistency"], 4),
          *[fmt(s["clip_score"]) for s in agg["segments"]], fmt(agg["clip_score"])]],
    )
    if "vbench" in report:
        lines += ["", "## Cross-check with VBench", ""]
        vb = report["vbench"]
        lines += markdown_table(["dimension", "this code", "VBench"], [
            [name, fmt(agg[name]["score"], 4), fmt(vb["aggregate"].get(name), 4)]
            for name in ("subject_consistency", "background_consistency")
        ])
    if "drift" in agg:
        lines += ["", f"## Drift over {proto['window_s']:g} s windows (change from the first)", ""]
        lines += markdown_table(["window", "videos", "CLIP", "ΔCLIP", "consistency", "Δconsistency"], [
            [span_label(w["seconds"]), str(w["videos"]), fmt(w["clip_score"]), fmt(w["delta_clip_score"]),
             fmt(w["consistency"], 4), fmt(w["delta_consistency"], 4)] for w in agg["drift"]
        ])
    lines += ["", "## Videos", ""]
    lines += markdown_table(
        ["file", "sha256", "seed", "subject", "background", *[f"seg {j}" for j in range(len(seg_names))], "CLIP"],
        [[v["file"], v["sha256"][:12], str(v["seed"]), fmt(v["subject_consistency"]["score"], 4),
          fmt(v["background_consistency"]["score"], 4),
          *[fmt(s["clip_score"]) for s in v["segments"]], fmt(v["clip_score"])]
         for v in report["videos"]],
    )
    return "\n".join(lines) + "\n"
