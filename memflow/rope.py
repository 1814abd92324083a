"""3-axis rotary position embedding (spec §1.7).

The head dimension is split into (frame, row, column) sections of complex pairs. A frame position
is an index: the frame's place in the video (`positions: absolute`, the reference: a key keeps
the rotation of the frame it came from) or its slot in the attended context of one call
(`positions: relative`, memflow/streaming.py). Frame angles come from a float64 table of
`max_frames` rows, and past it are computed the same way on the fly, so no index is too large.
"""
from __future__ import annotations

import torch


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

    def __init__(self, head_dim: int, max_frames: int = 1024, max_side: int = 1024):
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
        """Per-token phases [frames*height*width, 1, pairs] for tokens in (f, h, w) order, frames
        at indices start_frame..start_frame+frames-1."""
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
            self._cache[key] = table.reshape(frames * height * width, 1, -1).to(device)
        return self._cache[key]


def apply_rope(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate [B, L, H, D] queries or keys by [L, 1, D/2] phases, in float64 like the reference."""
    b, length, heads, dim = x.shape
    rotated = torch.view_as_complex(x.to(torch.float64).reshape(b, length, heads, dim // 2, 2))
    return torch.view_as_real(rotated * phases).flatten(3).type_as(x)
