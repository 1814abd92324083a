"""3-axis rotary position embedding (spec §1.7).

The head dimension is split into (frame, row, column) sections of complex pairs. A frame position
is an index: the frame's place in the video (`positions: absolute`, the reference: a key keeps
the rotation of the frame it came from) or its slot in the attended context of one call
(`positions: relative`, memflow/streaming.py). Frame angles come from a float64 table of
`max_frames` rows, and past it are computed the same way on the fly, so no index is too large.

Precision: angles are always float64. `float64` applies them as the reference does (queries and
keys cast to float64, complex128 multiply); `float32` takes cos/sin of the float64 angles in
float32 and rotates in float32 real arithmetic: half the bytes, no complex dtype (which neither
inductor nor the fast attention kernels handle well), and within float32 round-off of the other.
`behaviour: clean` uses float32, `compat` float64.
"""
from __future__ import annotations

from typing import Literal

import torch

RopePrecision = Literal["float64", "float32"]


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """Number of complex pairs for (frame, height, width); (22, 21, 21) for head_dim 128."""
    pairs = head_dim // 2
    spatial = pairs // 3
    return pairs - 2 * spatial, spatial, spatial


def _axis_phases(start: int, stop: int, num_pairs: int, theta: float = 10000.0) -> torch.Tensor:
    """Unit complex128 phases [stop - start, num_pairs] of positions start..stop-1."""
    dim = 2 * num_pairs
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(start, stop, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles)


class RotaryEmbedding:
    """Complex128 phase tables, kept off the module's parameters so casting the model to bf16
    never rounds them."""

    def __init__(self, head_dim: int, max_frames: int = 1024, max_side: int = 1024,
                 precision: RopePrecision = "float64"):
        if precision not in ("float64", "float32"):
            raise ValueError(f"RoPE precision must be float64 or float32, got {precision!r}")
        self.precision = precision
        f, h, w = rope_sections(head_dim)
        self.frame_pairs = f
        self.frame = _axis_phases(0, max_frames, f)
        self.height = _axis_phases(0, max_side, h)
        self.width = _axis_phases(0, max_side, w)
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def max_frames(self) -> int:
        return self.frame.shape[0]

    def phases(
        self, start_frame: int, frames: int, height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        """Per-token phases for tokens in (f, h, w) order, frames at indices
        start_frame..start_frame+frames-1: complex128 [frames*height*width, 1, pairs] in float64
        precision, float32 (cos, sin) pairs [frames*height*width, 1, pairs, 2] in float32."""
        key = (start_frame, frames, height, width, str(device))
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            stop = start_frame + frames
            fr = (self.frame[start_frame:stop] if stop <= self.max_frames
                  else _axis_phases(start_frame, stop, self.frame_pairs))
            table = torch.cat(
                [
                    fr.view(frames, 1, 1, -1).expand(frames, height, width, -1),
                    self.height[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
                    self.width[:width].view(1, 1, width, -1).expand(frames, height, width, -1),
                ],
                dim=-1,
            )
            table = table.reshape(frames * height * width, 1, -1)
            if self.precision == "float32":
                table = torch.view_as_real(table).to(torch.float32)
            self._cache[key] = table.to(device)
        return self._cache[key]


def apply_rope(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate [B, L, H, D] queries or keys by `RotaryEmbedding.phases`: complex128 ones in
    float64 like the reference, (cos, sin) float32 ones in float32."""
    b, length, heads, dim = x.shape
    pairs = x.reshape(b, length, heads, dim // 2, 2)
    if phases.is_complex():
        rotated = torch.view_as_complex(pairs.to(torch.float64)) * phases
        return torch.view_as_real(rotated).flatten(3).type_as(x)
    re, im = pairs.float().unbind(-1)
    cos, sin = phases.unbind(-1)
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(3).type_as(x)
