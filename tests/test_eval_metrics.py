"""The scores and their aggregation, checked against hand computations (eval/metrics.py,
eval/report.py)."""
from __future__ import annotations

import math

import pytest
import torch

from eval.metrics import Consistency, clip_scores, consistency
from eval.report import aggregate


def _rotating(n: int, step: float) -> torch.Tensor:
    """Unit features turning by `step` radians per frame: a smooth video in feature space."""
    angles = torch.arange(n, dtype=torch.float64) * step
    return torch.stack([angles.cos(), angles.sin(), torch.zeros(n)], dim=1)


def test_identical_frames_are_perfectly_consistent():
    features = torch.randn(1, 8).repeat(10, 1) * 3.0  # scale does not matter
    c = consistency(features)
    assert c.pairs == 9
    assert c.score == pytest.approx(1.0, abs=1e-12)


def test_consistency_by_hand():
    """Frame i >= 1 scores (max(0, cos to previous) + max(0, cos to first)) / 2."""
    c = consistency(_rotating(4, 0.3))
    expected = [(math.cos(0.3) + math.cos(0.3 * i)) / 2 for i in (1, 2, 3)]
    assert c.total == pytest.approx(sum(expected))
    assert c.score == pytest.approx(sum(expected) / 3)
    # beyond 90 degrees a cosine counts as 0, not negative
    c = consistency(_rotating(3, 2.0))
    assert c.score == pytest.approx((0 + 0 + 0 + 0) / 2 / 2, abs=1e-12)


def test_shuffled_frames_score_lower():
    """Shuffling frames 1.. keeps the cosine-to-first terms (same set) and breaks the smooth
    cosine-to-previous chain, so the score must drop."""
    features = _rotating(16, 0.15)
    order = torch.cat([torch.zeros(1, dtype=torch.long),
                       1 + torch.randperm(15, generator=torch.Generator().manual_seed(0))])
    assert consistency(features[order]).score < consistency(features).score - 0.02


def test_one_frame_scores_one_as_vbench_reports_it():
    assert consistency(torch.randn(1, 4)) == Consistency(0.0, 0)
    assert Consistency(0.0, 0).score == 1.0


def test_clip_score_is_100_max_cos_0():
    text = torch.tensor([1.0, 0.0, 0.0])
    images = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert clip_scores(images, text).tolist() == pytest.approx([100.0, 100 / math.sqrt(2), 0.0, 0.0])


def test_wrong_prompt_is_detectable_with_hand_built_embeddings():
    """A segment whose frames match prompt A scores 100 against A and 0 against an orthogonal B."""
    prompt_a, prompt_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    frames = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    right, wrong = clip_scores(frames, prompt_a).mean(), clip_scores(frames, prompt_b).mean()
    assert right > 90 and wrong < 10


def _record(segment_scores, subject, background, drift=None):
    rec = {
        "segments": [{"seconds": [10.0 * j, 10.0 * (j + 1)], "clip_score": s}
                     for j, s in enumerate(segment_scores)],
        "clip_score": sum(segment_scores) / len(segment_scores),
        "subject_consistency": {"score": subject[0] / subject[1], "total": subject[0], "pairs": subject[1]},
        "background_consistency": {"score": background[0] / background[1], "total": background[0],
                                   "pairs": background[1]},
    }
    if drift is not None:
        rec["drift"] = drift
    return rec


def test_aggregation_by_hand():
    a = _record([30.0, 20.0, 10.0], subject=(9.0, 10), background=(8.0, 10))
    b = _record([20.0, 10.0, 30.0], subject=(18.0, 20), background=(19.0, 20))
    agg = aggregate([a, b])
    assert agg["videos"] == 2
    assert [s["clip_score"] for s in agg["segments"]] == pytest.approx([25.0, 15.0, 20.0])
    assert agg["clip_score"] == pytest.approx((20.0 + 20.0) / 2)
    # VBench pools frames: (9 + 18) / (10 + 20), not the mean of 0.9 and 0.9
    assert agg["subject_consistency"]["score"] == pytest.approx(27 / 30)
    assert agg["background_consistency"]["score"] == pytest.approx(27 / 30)
    assert agg["background_consistency"]["video_mean"] == pytest.approx((0.8 + 0.95) / 2)
    assert agg["consistency"] == pytest.approx(27 / 30)


def test_drift_aggregation_by_hand():
    def window(k, clip, cons, first_clip, first_cons):
        return {"index": k, "seconds": [10.0 * k, 10.0 * (k + 1)], "clip_score": clip,
                "subject_consistency": cons, "background_consistency": cons, "consistency": cons,
                "delta_clip_score": clip - first_clip, "delta_subject_consistency": cons - first_cons,
                "delta_background_consistency": cons - first_cons, "delta_consistency": cons - first_cons}

    a = _record([30.0], (1.0, 1), (1.0, 1), drift=[window(0, 30, 0.9, 30, 0.9), window(1, 24, 0.8, 30, 0.9)])
    b = _record([20.0], (1.0, 1), (1.0, 1), drift=[window(0, 20, 0.95, 20, 0.95)])
    rows = aggregate([a, b])["drift"]
    assert [r["videos"] for r in rows] == [2, 1]
    assert rows[0]["clip_score"] == pytest.approx(25.0)
    assert rows[1]["delta_clip_score"] == pytest.approx(-6.0)
    assert rows[1]["delta_consistency"] == pytest.approx(-0.1)
