"""Mixing prompt conditionings: weighted prompts and transitions between two prompts.

A prompt's conditioning is its text-encoder output [B, T, text_dim] (umT5 rows, exactly zero on
padding rows). Two mixes of such tensors, both per text row:

* `weighted_embedding`: several prompts at once, sum_i w_i e_i / sum_i w_i (a "weighted prompt",
  as Daydream Scope's prompt blends);
* `blend_embeddings(a, b, t, blend)`: a point on the way from a to b, linear
  ((1 - t) a + t b) or spherical (slerp of each row on the great circle between the two rows,
  their norms interpolated linearly; linear where a row is zero or the two are parallel).
  t = 1 returns b itself, so a transition ends exactly at its target.

`Transition` says how a prompt change moves: over `chunks` chunks (0: at once, with the
stream's recache) and by which `blend`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Blend = Literal["linear", "slerp"]
BLENDS: tuple[str, ...] = ("linear", "slerp")


@dataclass(frozen=True)
class Transition:
    """A prompt change spread over `chunks` chunks (0: a hard switch), mixed by `blend`."""

    chunks: int = 0
    blend: Blend = "linear"

    def __post_init__(self) -> None:
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 0:
            raise ValueError(f"transition_chunks must be an integer >= 0, got {self.chunks!r}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")

    def weight(self, step: int) -> float:
        """The target's share in the transition's chunk `step` (1-based): step / chunks."""
        return step / self.chunks


def prompt_weights(weights: Sequence[object]) -> tuple[float, ...]:
    """A weighted prompt's weights checked (ValueError naming the first bad one): numbers,
    finite and >= 0, not all 0. The one rule for the API, prompt files and the live page."""
    out = []
    for k, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ValueError(f"weight {k} must be a finite number >= 0, got {w!r}")
        out.append(float(w))
    if not out or sum(out) <= 0:
        raise ValueError("the weights are all 0")
    return tuple(out)


def weighted_embedding(embeds: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i e_i / sum_i w_i over prompt embeddings of one shape (in float32, returned in
    the first's dtype); `prompt_weights` checks the weights."""
    if len(embeds) != len(weights) or not embeds:
        raise ValueError(f"{len(embeds)} prompts and {len(weights)} weights")
    weights = prompt_weights(weights)
    total = sum(weights)
    mixed = sum(e.float() * (float(w) / total) for e, w in zip(embeds, weights))
    return mixed.to(embeds[0].dtype)


def blend_embeddings(a: torch.Tensor, b: torch.Tensor, t: float, blend: Blend) -> torch.Tensor:
    """The conditioning at fraction `t` in [0, 1] of the way from `a` to `b` (see the module
    docstring); `b` itself at t = 1."""
    if t >= 1:
        return b
    af, bf = a.float(), b.float()
    linear = (1 - t) * af + t * bf
    if blend == "linear":
        return linear.to(b.dtype)
    na, nb = af.norm(dim=-1, keepdim=True), bf.norm(dim=-1, keepdim=True)
    cos = ((af * bf).sum(dim=-1, keepdim=True) / (na * nb).clamp(min=1e-12)).clamp(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    ua, ub = af / na.clamp(min=1e-12), bf / nb.clamp(min=1e-12)
    arc = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / sin.clamp(min=1e-12)
    spherical = arc * ((1 - t) * na + t * nb)
    usable = (na > 0) & (nb > 0) & (sin > 1e-6)
    return torch.where(usable, spherical, linear).to(b.dtype)
