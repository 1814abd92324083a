"""Attention backend selection and the SDPA path against an explicit softmax."""
from __future__ import annotations

import pytest
import torch

from memflow import attention as attn


def test_sdpa_matches_explicit_softmax_with_and_without_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
    assert torch.allclose(attn.attention(q, k, v), ref, atol=1e-6)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    ref_masked = torch.einsum(
        "bhqk,bkhd->bqhd", logits.masked_fill(~mask, float("-inf")).softmax(-1), v
    )
    assert torch.allclose(attn.attention(q, k, v, mask), ref_masked, atol=1e-6)


def test_backend_selection():
    previous = attn.get_attention_backend()
    try:
        attn.set_attention_backend("sdpa")
        assert attn.get_attention_backend() == "sdpa"
        with pytest.raises(ValueError, match="unknown attention backend"):
            attn.set_attention_backend("xformers")  # type: ignore[arg-type]
        if attn._flash_fn() is None:
            with pytest.raises(RuntimeError, match="flash-attn is not installed"):
                attn.set_attention_backend("flash")
    finally:
        attn.set_attention_backend(previous)
