"""Where each prompt's segment lies in a decoded video, and which frames are scored.

The generator switches prompts at latent chunk boundaries (`utils.prompts.effective_switch_chunks`:
a switch index is rounded up to the next chunk, at most one switch per chunk). The Wan VAE turns
latent frame 0 into one pixel frame and every later latent frame k into the four pixel frames
4k-3 .. 4k, so F latent frames give 1 + 4(F-1) pixel frames and a segment that starts at latent
frame s >= 1 starts at pixel frame 4s-3.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from memflow.errors import InputError
from memflow.vae import latent_frames_within, video_frames
from utils.prompts import effective_switch_chunks


def latent_frames(pixel_count: int) -> int:
    """The latent length that decodes to `pixel_count` frames; an error if none does."""
    if pixel_count < 1 or video_frames(latent_frames_within(pixel_count)) != pixel_count:
        raise InputError(
            f"a video of {pixel_count} frames cannot come from the Wan VAE "
            f"(F latent frames decode to 1 + 4(F-1) frames)"
        )
    return latent_frames_within(pixel_count)


@dataclass(frozen=True)
class Span:
    """Pixel frames [start, stop) of one prompt segment (or drift window)."""

    index: int
    start: int
    stop: int
    latent_start: int | None = None  # the latent frame the segment starts at (segments only)

    def seconds(self, fps: float) -> tuple[float, float]:
        return self.start / fps, self.stop / fps


def segment_spans(
    switch_frames: Sequence[int], num_latent_frames: int, frames_per_block: int
) -> list[Span]:
    """Pixel spans of the prompt segments, switches placed exactly where the pipeline fires them.

    `switch_frames` are the config's latent `switch_frame_indices` (already validated); they are
    rounded to chunk boundaries as the generator does, then mapped through the VAE.
    """
    chunks = effective_switch_chunks(switch_frames, frames_per_block,
                                     num_latent_frames // frames_per_block)
    starts = [0] + [c * frames_per_block for c in chunks]
    bounds = [video_frames(s) for s in starts] + [video_frames(num_latent_frames)]
    return [Span(j, bounds[j], bounds[j + 1], starts[j]) for j in range(len(starts))]


def window_spans(num_frames: int, fps: float, window_s: float) -> list[Span]:
    """Consecutive windows of `window_s` seconds (the last one may be shorter), for drift."""
    if window_s <= 0:
        raise InputError(f"--window_s must be positive, got {window_s}")
    size = max(1, round(window_s * fps))
    return [Span(k, a, min(a + size, num_frames))
            for k, a in enumerate(range(0, num_frames, size))]


def sample_frames(span: Span, video_fps: float, rate: float) -> list[int]:
    """Frames of `span` taken at `rate` frames per second, starting at its first frame.

    Frame k of the sample is span.start + floor(k * video_fps / rate); a rate of 0, or one at or
    above the video's own rate, takes every frame.
    """
    if rate < 0:
        raise InputError(f"a sampling rate must be >= 0 frames per second, got {rate}")
    if rate == 0 or rate >= video_fps:
        return list(range(span.start, span.stop))
    step = video_fps / rate
    count = math.ceil((span.stop - span.start) / step)
    frames = [span.start + math.floor(k * step) for k in range(count)]
    return [f for f in frames if f < span.stop]
