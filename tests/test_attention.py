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


def _block_causal_mask(length: int, chunk_tokens: int) -> torch.Tensor:
    """Dense [L, L] block-causal mask from token chunk indices (True = may attend)."""
    chunk = torch.arange(length) // chunk_tokens
    return chunk[:, None] >= chunk[None, :]


def _qkv(batch: int, length: int, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, length, 3, 8, generator=g).requires_grad_(grad) for _ in range(3)
    )


@pytest.mark.parametrize("chunk_tokens", [1, 3, 4, 5, 12, 20])
def test_chunk_causal_matches_dense_block_causal_mask(chunk_tokens):
    # L=12: 3 and 4 divide it, 5 does not (last chunk of 2), 12 and 20 are one call.
    q, k, v = _qkv(2, 12)
    out = attn.chunk_causal_attention(q, k, v, chunk_tokens)
    ref = attn.attention(q, k, v, _block_causal_mask(12, chunk_tokens))
    assert out.shape == q.shape
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [4, 5])
def test_chunk_causal_gradients_match_dense(chunk_tokens):
    q, k, v = _qkv(2, 12, grad=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    w = torch.randn(2, 12, 3, 8, generator=torch.Generator().manual_seed(1))
    (attn.chunk_causal_attention(q, k, v, chunk_tokens) * w).sum().backward()
    (attn.attention(q2, k2, v2, _block_causal_mask(12, chunk_tokens)) * w).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_chunk_causal_differs_from_bidirectional():
    q, k, v = _qkv(2, 12)
    out = attn.chunk_causal_attention(q, k, v, 4)
    full = attn.attention(q, k, v)
    # Only the last chunk sees every key; the earlier chunks must differ from full attention.
    assert torch.allclose(out[:, 8:], full[:, 8:], atol=1e-6)
    assert not torch.allclose(out[:, :8], full[:, :8], atol=1e-3)
    # And a query must not see a future chunk: changing keys of chunk 2 leaves chunks 0-1 alone.
    k2 = k.clone()
    k2[:, 8:] += 1.0
    assert torch.equal(attn.chunk_causal_attention(q, k2, v, 4)[:, :8], out[:, :8])


@pytest.mark.parametrize("chunk_tokens", [4, 5, 12])
def test_chunk_causal_key_lens_matches_truncated_and_dense(chunk_tokens):
    q, k, v = _qkv(2, 12)
    key_lens = torch.tensor([12, 7])
    out = attn.chunk_causal_attention(q, k, v, chunk_tokens, key_lens)
    for b, n in enumerate(key_lens.tolist()):
        # Real queries: the element run on its truncated sequence.
        qb, kb, vb = (t[b : b + 1, :n] for t in (q, k, v))
        alone = attn.chunk_causal_attention(qb, kb, vb, chunk_tokens)
        assert torch.allclose(out[b : b + 1, :n], alone, atol=1e-6)
    # Every query, padded ones included: dense block-causal mask & key padding mask.
    pad = torch.arange(12)[None, :] < key_lens[:, None]  # [B, Lk]
    mask = _block_causal_mask(12, chunk_tokens)[None, None] & pad[:, None, None, :]
    assert torch.allclose(out, attn.attention(q, k, v, mask), atol=1e-6)
    assert torch.isfinite(out).all()
    # Padded keys' contents do not matter.
    k2, v2 = k.clone(), v.clone()
    k2[1, 7:], v2[1, 7:] = 1e4, -1e4
    out2 = attn.chunk_causal_attention(q, k2, v2, chunk_tokens, key_lens)
    assert torch.allclose(out2, out, atol=1e-6)


def test_padded_attention_matches_truncated_keys():
    q, k, v = _qkv(2, 12)
    key_lens = torch.tensor([5, 12])
    out = attn.padded_attention(q, k, v, key_lens)
    for b, n in enumerate(key_lens.tolist()):
        ref = attn.attention(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n])
        assert torch.allclose(out[b : b + 1], ref, atol=1e-6)
    assert not torch.allclose(out[:1], attn.attention(q, k, v)[:1], atol=1e-3)
    assert torch.allclose(attn.padded_attention(q, k, v, None), attn.attention(q, k, v))
    with pytest.raises(ValueError, match="key_lens"):
        attn.padded_attention(q, k, v, torch.tensor([0, 12]))
