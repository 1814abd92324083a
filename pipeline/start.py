"""What a video starts from besides its prompt: an image, or a video to continue.

Both become clean latents that the stream commits before chunk 0 (`prefix`,
memflow.chunk_loop.ChunkStepper.commit_prefix), encoded by the Wan VAE:

* an image: fitted to the video size and encoded alone, which the Wan VAE does into one latent
  frame (its first frame is always encoded on its own). The stream's frame 0 is the image and
  chunk 0 covers frames 1..F: the chunk grid is shifted by one frame, as Self-Forcing's
  `initial_latent` does, so no chunk mixes a given frame with generated ones. The image is in the
  sink, and its decoded frame is the video's first.
* a video: its last 1 + 4(P - 1) frames are encoded into P latent frames, P = the attention
  window minus one chunk (as many as chunk 0 can still attend), fewer for a shorter video; the
  sink is the first of these encoded frames. The output starts with the new frames
  (`prepend_source: true` puts the source clip first).

A video shorter than one chunk (1 + 4(F - 1) frames) is refused, as is anything unreadable
(`utils.media`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from memflow.errors import InputError
from memflow.vae import WanVAE, latent_frames_within, video_frames
from utils.media import Source, read_image, read_video

StartKind = Literal["image", "video"]


@dataclass(frozen=True)
class Start:
    """A start image or video (a path, or the file's bytes)."""

    kind: StartKind
    source: Source


@dataclass(frozen=True)
class StartLatents:
    latents: torch.Tensor  # [1, P, C, h, w], normalised, float32
    source_frames: torch.Tensor  # the pixels read, [1, T, 3, H, W] in [0, 1]


def check_start(start: Start, frames_per_block: int) -> None:
    """Refuse now, in one line, a start file that `encode_start` could not use (unreadable, not
    an image, a clip shorter than one chunk), before any output exists: a prompt file's lines
    are checked this way before generation begins."""
    if start.kind == "image":
        read_image(start.source, 16, 16)
        return
    _require_a_chunk(read_video(start.source, 16, 16).shape[1], frames_per_block)


def _require_a_chunk(frames: int, frames_per_block: int) -> None:
    shortest = video_frames(frames_per_block)
    if frames < shortest:
        raise InputError(f"the video to continue has {frames} frame{'s' * (frames != 1)}; at "
                         f"least one chunk ({shortest} frames) is needed")


def encode_start(start: Start, vae: WanVAE, height: int, width: int, window: int,
                 frames_per_block: int) -> StartLatents:
    """The latents a stream of `window` attended frames and chunks of `frames_per_block`
    frames starts from."""
    if start.kind == "image":
        frames = read_image(start.source, height, width)
        return StartLatents(vae.encode(frames.to(vae.device)), frames)
    frames = read_video(start.source, height, width)
    _require_a_chunk(frames.shape[1], frames_per_block)
    keep = max(1, min(window - frames_per_block, latent_frames_within(frames.shape[1])))
    tail = frames[:, frames.shape[1] - video_frames(keep):]
    return StartLatents(vae.encode(tail.to(vae.device)), frames)
