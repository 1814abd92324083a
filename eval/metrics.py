"""The scores, as pure functions of embeddings, so they can be checked by hand.

CLIP score: 100 * max(cos(image, text), 0) per frame (the CLIPScore scale used by torchmetrics).

Consistency (VBench's subject_consistency / background_consistency): with L2-normalised frame
features f_0 .. f_{N-1}, every frame i >= 1 scores
    (max(0, cos(f_{i-1}, f_i)) + max(0, cos(f_0, f_i))) / 2
and a video's score is the mean over i >= 1. VBench's dataset score is frame-weighted (the sum
over all videos' frames divided by the number of scored frames), so `Consistency` keeps the
sum and the count, not just the mean. A one-frame video scores 1.0, as VBench reports it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def clip_scores(image_features: torch.Tensor, text_feature: torch.Tensor) -> torch.Tensor:
    """[N] CLIP scores of N image embeddings against one text embedding."""
    cos = F.cosine_similarity(image_features.float(), text_feature.float().view(1, -1), dim=-1)
    return 100.0 * cos.clamp(min=0.0)


@dataclass(frozen=True)
class Consistency:
    total: float  # sum of the per-frame scores
    pairs: int  # number of scored frames (N - 1)

    @property
    def score(self) -> float:
        return self.total / self.pairs if self.pairs else 1.0

    @staticmethod
    def pooled(parts: Iterable[Consistency]) -> Consistency:
        """VBench's dataset aggregate: every scored frame of every video weighs the same."""
        parts = list(parts)
        return Consistency(sum(p.total for p in parts), sum(p.pairs for p in parts))


def consistency(features: torch.Tensor) -> Consistency:
    """VBench's temporal consistency of [N, D] frame features, in frame order."""
    f = F.normalize(features.double(), dim=-1)
    if f.shape[0] < 2:
        return Consistency(0.0, 0)
    to_previous = (f[1:] * f[:-1]).sum(-1).clamp(min=0.0)
    to_first = (f[1:] @ f[0]).clamp(min=0.0)
    return Consistency(float(((to_previous + to_first) / 2).sum()), f.shape[0] - 1)


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
