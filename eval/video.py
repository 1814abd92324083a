"""MP4 reading for evaluation: the frame rate and count, and selected frames in batches.

Frames are decoded by the ffmpeg binary that imageio-ffmpeg ships (the one `utils.video_writer`
writes with) and streamed, so a 957-frame 832x480 video is never held in memory whole: only the
frames a metric asks for are kept, a batch at a time.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

from memflow.errors import InputError


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    num_frames: int
    width: int
    height: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reader(path: Path):
    try:
        frames = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(frames)
    except (OSError, RuntimeError, StopIteration) as err:
        raise InputError(f"cannot read video {path}: {str(err).splitlines()[0]}") from None
    return frames, meta


def probe(path: Path) -> VideoInfo:
    """Frame rate from the container, frame count by decoding (container counts can be off)."""
    frames, meta = _reader(path)
    frames.close()
    count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    return VideoInfo(float(meta["fps"]), count, int(width), int(height))


def iter_frames(path: Path, wanted: set[int], batch: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, uint8 [n, H, W, 3]) batches of the frames in `wanted`, in frame order."""
    frames, meta = _reader(path)
    width, height = meta["size"]
    indices: list[int] = []
    pixels: list[np.ndarray] = []
    for i, raw in enumerate(frames):
        if i not in wanted:
            continue
        indices.append(i)
        pixels.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
        if len(indices) == batch:
            yield indices, torch.from_numpy(np.stack(pixels))
            indices, pixels = [], []
    if indices:
        yield indices, torch.from_numpy(np.stack(pixels))
