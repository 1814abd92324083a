"""Score one video: segment CLIP scores, subject/background consistency and, for single-prompt
videos, drift over fixed windows.

Every frame is decoded once; CLIP and DINO see only the frames a metric uses. The per-video
record is plain JSON, written by `eval.evaluate` and read back when a run resumes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .metrics import Consistency, clip_scores, consistency
from .models import ClipScorer, DinoEncoder
from .segments import Span, sample_frames, window_spans
from .video import VideoInfo, iter_frames

PROTOCOL_VERSION = 1  # bump when a change alters any score, so old records are not reused
DRIFT_METRICS = ("clip_score", "subject_consistency", "background_consistency", "consistency")


@dataclass(frozen=True)
class Protocol:
    """The sampling choices; with the model fingerprints they decide every number."""

    clip_fps: float = 2.0  # frames per second scored by CLIP against the prompt
    consistency_fps: float = 0.0  # frames per second for consistency; 0: every frame (VBench)
    window_s: float = 10.0  # drift window length, seconds


def _consistency_json(c: Consistency) -> dict:
    return {"score": c.score, "total": c.total, "pairs": c.pairs}


class VideoScorer:
    def __init__(self, clip: ClipScorer, dino: DinoEncoder, protocol: Protocol, batch_size: int = 32):
        self.clip = clip
        self.dino = dino
        self.protocol = protocol
        self.batch_size = batch_size

    def describe(self) -> dict:
        """The protocol section of a report: every choice that changes a number."""
        return {
            "version": PROTOCOL_VERSION,
            **asdict(self.protocol),
            "clip_model": {"path": str(self.clip.folder), "sha256": self.clip.fingerprint,
                           "name_or_path": self.clip.model.config.name_or_path or None,
                           "text_max_tokens": self.clip.max_tokens},
            "dino_model": {"path": str(self.dino.folder), "sha256": self.dino.fingerprint,
                           "name_or_path": self.dino.model.config.name_or_path or None},
            "clip_score": "100 * max(cos(CLIP image embedding, CLIP text embedding), 0) per "
                          "sampled frame; a segment's score is the mean over its frames; prompts "
                          "longer than the text context are truncated",
            "frame_sampling": "per segment (or window), from its first frame: frame "
                              "start + floor(k * video_fps / rate); rate 0 = every frame",
            "segments": "latent switch_frame_indices rounded up to chunk boundaries as the "
                        "pipeline fires them; latent frame s >= 1 starts at pixel frame 4s-3",
            "subject_consistency": "VBench: DINO class token, L2-normalised; mean over frames "
                                   "i >= 1 of (max(0, cos(f_i-1, f_i)) + max(0, cos(f_0, f_i))) / 2",
            "background_consistency": "the same formula over CLIP image embeddings",
            "consistency": "(subject_consistency + background_consistency) / 2",
            "transforms": "VBench: short side to 224 without antialiasing (CLIP bicubic + centre "
                          "crop to the model's image size; DINO bilinear, no crop, position "
                          "embeddings interpolated), rounded to uint8, then normalised",
            "aggregation": "segment CLIP: mean over videos per segment index; overall CLIP: mean "
                           "over videos of each video's mean over its segments; consistency: "
                           "VBench's frame-weighted pool over all videos",
        }

    def key(self, prompts: list[str], segments: list[Span], info: VideoInfo) -> str:
        """Hash of everything a record depends on except the video bytes (hashed separately)."""
        payload = {
            "version": PROTOCOL_VERSION,
            "protocol": asdict(self.protocol),
            "models": [self.clip.fingerprint, self.dino.fingerprint],
            "prompts": prompts,
            "segments": [[s.start, s.stop] for s in segments],
            "fps": info.fps,
            "frames": info.num_frames,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _features(self, path: Path, clip_frames: set[int], dino_frames: set[int]):
        clip_f: dict[int, torch.Tensor] = {}
        dino_f: dict[int, torch.Tensor] = {}
        for indices, frames in iter_frames(path, clip_frames | dino_frames, self.batch_size):
            for i, f in zip(indices, self.clip.image_features(frames)):
                clip_f[i] = f
            rows = [k for k, i in enumerate(indices) if i in dino_frames]
            if rows:
                picked = [indices[k] for k in rows]
                for i, f in zip(picked, self.dino.image_features(frames[rows])):
                    dino_f[i] = f
        return clip_f, dino_f

    def score(self, path: Path, info: VideoInfo, prompts: list[str], segments: list[Span],
              drift: bool) -> dict:
        """The per-video record (without file name and hashes, added by the caller). With
        `drift`, also per window: the CLIP score against the first prompt and the consistency
        within the window (each sampled from the window's own first frame), and each one's
        change from the first window (negative = decay)."""
        p = self.protocol
        windows = window_spans(info.num_frames, info.fps, p.window_s) if drift else []
        seg_clip = [sample_frames(s, info.fps, p.clip_fps) for s in segments]
        win_clip = [sample_frames(w, info.fps, p.clip_fps) for w in windows]
        cons = sample_frames(Span(0, 0, info.num_frames), info.fps, p.consistency_fps)
        win_cons = [sample_frames(w, info.fps, p.consistency_fps) for w in windows]
        dino_needed = set(cons).union(*win_cons)
        clip_f, dino_f = self._features(path, dino_needed.union(*seg_clip, *win_clip), dino_needed)
        text = self.clip.text_features(prompts)

        def clip_mean(frames: list[int], prompt: int) -> float:
            return float(clip_scores(torch.stack([clip_f[i] for i in frames]), text[prompt]).mean())

        def both(frames: list[int]) -> tuple[Consistency, Consistency]:
            return (consistency(torch.stack([dino_f[i] for i in frames])),
                    consistency(torch.stack([clip_f[i] for i in frames])))

        seg_records = [{
            "index": span.index, "latent_start": span.latent_start,
            "frames": [span.start, span.stop], "seconds": list(span.seconds(info.fps)),
            "sampled_frames": len(frames), "clip_score": clip_mean(frames, span.index),
        } for span, frames in zip(segments, seg_clip)]
        subject, background = both(cons)
        record = {
            "fps": info.fps, "num_frames": info.num_frames, "size": [info.width, info.height],
            "segments": seg_records,
            "clip_score": sum(s["clip_score"] for s in seg_records) / len(seg_records),
            "subject_consistency": _consistency_json(subject),
            "background_consistency": _consistency_json(background),
            "consistency": (subject.score + background.score) / 2,
        }
        if not drift:
            return record
        rows = []
        for span, frames, cons_frames in zip(windows, win_clip, win_cons):
            w_subject, w_background = both(cons_frames)
            rows.append({
                "index": span.index, "frames": [span.start, span.stop],
                "seconds": list(span.seconds(info.fps)), "clip_score": clip_mean(frames, 0),
                "subject_consistency": w_subject.score, "background_consistency": w_background.score,
                "consistency": (w_subject.score + w_background.score) / 2,
            })
        for row in rows:
            for name in DRIFT_METRICS:
                row[f"delta_{name}"] = row[name] - rows[0][name]
        record["drift"] = rows
        return record
