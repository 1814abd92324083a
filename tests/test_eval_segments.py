"""Segment boundaries and frame sampling of the quality evaluation (eval/segments.py)."""
from __future__ import annotations

import pytest
import torch

from eval.segments import (
    Span,
    latent_frames,
    sample_frames,
    segment_spans,
    window_spans,
)
from memflow.errors import InputError
from memflow.tiny import build_tiny_vae
from memflow.vae import video_frames


def test_benchmark_segments_by_hand():
    """The released interactive run: 240 latent frames, switches 40, 80, 120, 160, 200 fire at the
    chunk boundaries 42, 81, 120, 162, 201 (spec §6.2), which start at pixel frames 4s-3."""
    spans = segment_spans([40, 80, 120, 160, 200], 240, 3)
    assert [s.latent_start for s in spans] == [0, 42, 81, 120, 162, 201]
    assert [(s.start, s.stop) for s in spans] == [
        (0, 165), (165, 321), (321, 477), (477, 645), (645, 801), (801, 957)
    ]
    assert video_frames(240) == 957 and video_frames(120) == 477


def test_two_switches_in_one_chunk_are_serialised():
    # 40 and 41 both round up to chunk 14; the second fires one chunk later (spec K4)
    spans = segment_spans([40, 41], 60, 3)
    assert [s.latent_start for s in spans] == [0, 42, 45]
    assert [s.start for s in spans] == [0, 165, 177]


def test_pixel_mapping_matches_the_streaming_vae_decoder():
    """Decode chunk by chunk with the tiny Wan VAE: the frames decoded before chunk n are exactly
    where a segment starting at latent frame 3n begins, and F latent frames give 1 + 4(F-1)."""
    vae = build_tiny_vae()
    decoder = vae.stream()
    latents = torch.randn(1, 12, vae.z_dim, 4, 4, generator=torch.Generator().manual_seed(0))
    decoded = 0
    for n in range(4):
        assert video_frames(3 * n) == decoded
        decoded += decoder.decode(latents[:, 3 * n : 3 * n + 3]).shape[1]
    assert decoded == video_frames(12) == 45
    assert latent_frames(45) == 12


def test_impossible_video_length_is_an_input_error():
    with pytest.raises(InputError, match="1 \\+ 4\\(F-1\\)"):
        latent_frames(44)


def test_sampling_takes_every_nth_frame_from_the_segment_start():
    span = Span(1, 165, 321)
    frames = sample_frames(span, 16.0, 2.0)
    assert frames == list(range(165, 321, 8))
    assert sample_frames(span, 16.0, 0) == list(range(165, 321))
    assert sample_frames(span, 16.0, 16.0) == list(range(165, 321))
    assert sample_frames(Span(0, 0, 10), 16.0, 3.0) == [0, 5]  # floor(k * 16 / 3)


def test_windows_cover_the_video_once():
    spans = window_spans(957, 16.0, 10.0)
    assert [(s.start, s.stop) for s in spans] == [
        (0, 160), (160, 320), (320, 480), (480, 640), (640, 800), (800, 957)
    ]
