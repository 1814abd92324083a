"""Attention kernels, chosen in one place.

Every attention call in the model goes through `attention(q, k, v, mask)` with tensors laid out
as [B, L, H, D] (the Wan layout). The default kernel is PyTorch's `scaled_dot_product_attention`;
flash-attn (2 or 3) is used on CUDA when installed, when no mask is given and the dtype is half
precision. Results agree within bf16 round-off; the reference itself used flash-attn.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "sdpa", "flash"]

_backend: Backend = os.environ.get("MEMFLOW_ATTN_BACKEND", "auto")  # type: ignore[assignment]


def set_attention_backend(name: Backend) -> None:
    """Select the kernel for every later call: "auto" (flash-attn when usable, else SDPA),
    "sdpa" (always PyTorch) or "flash" (require flash-attn; fails if it is not installed)."""
    global _backend
    if name not in ("auto", "sdpa", "flash"):
        raise ValueError(f"unknown attention backend {name!r}; use auto, sdpa or flash")
    if name == "flash" and _flash_fn() is None:
        raise RuntimeError("attention backend 'flash' requested but flash-attn is not installed")
    _backend = name


def get_attention_backend() -> Backend:
    return _backend


@lru_cache(maxsize=1)
def _flash_fn() -> Callable | None:
    """flash-attn 3 (`flash_attn_interface`) if importable, else flash-attn 2, else None."""
    try:
        from flash_attn_interface import flash_attn_func  # type: ignore

        def fa3(q, k, v):
            out = flash_attn_func(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        return fa3
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # type: ignore

        return flash_attn_func
    except ImportError:
        return None


def _use_flash(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    if _backend == "sdpa" or mask is not None or not q.is_cuda:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    return _flash_fn() is not None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v over [B, L, H, D] tensors.

    `mask` is an optional boolean [Lq, Lk] (or broadcastable [B, H, Lq, Lk]) tensor where True
    means "may attend". Returns [B, Lq, H, D].
    """
    if _use_flash(q, mask):
        return _flash_fn()(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _key_lens_list(key_lens: torch.Tensor, batch: int, lk: int) -> list[int]:
    """key_lens [B] as Python ints, checked to lie in [1, Lk] (an empty key set would give NaN)."""
    if key_lens.shape != (batch,):
        raise ValueError(f"key_lens must have shape [{batch}], got {tuple(key_lens.shape)}")
    lens = [int(n) for n in key_lens.tolist()]
    if any(n < 1 or n > lk for n in lens):
        raise ValueError(f"key_lens must lie in [1, {lk}], got {lens}")
    return lens


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lens: torch.Tensor | None
) -> torch.Tensor:
    """Bidirectional `attention` where only the first key_lens[b] keys of batch element b are real.

    For the bidirectional teacher/critic models, whose inputs the reference pads. Padding is
    dropped by slicing the keys per batch element rather than building a mask, so the flash-attn
    path of `attention` stays usable. Queries at padded positions are computed the same way
    (they attend to the real keys) and are finite; callers should ignore them. key_lens=None,
    or all lengths equal to Lk, is a single plain `attention` call.
    """
    lk = k.shape[1]
    if key_lens is None:
        return attention(q, k, v)
    lens = _key_lens_list(key_lens, q.shape[0], lk)
    if all(n == lk for n in lens):
        return attention(q, k, v)
    return torch.cat(
        [attention(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n]) for b, n in enumerate(lens)]
    )


def _chunk_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    # k/v may be shorter than q (truncated to a key length): k[:, :end] then clips by itself.
    lq = q.shape[1]
    if chunk_tokens >= lq:
        return attention(q, k, v)
    outs = []
    for start in range(0, lq, chunk_tokens):
        end = min(start + chunk_tokens, lq)
        outs.append(attention(q[:, start:end], k[:, :end], v[:, :end]))
    return torch.cat(outs, dim=1)


def chunk_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_tokens: int,
    key_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-causal attention over [B, L, H, D] tensors (same L for q and k), without a mask.

    Tokens are grouped into chunks of `chunk_tokens` consecutive tokens (the last chunk may be
    shorter); a query in chunk i attends to every key in chunks 0..i, bidirectionally inside its
    own chunk. The result equals `attention(q, k, v, mask)` with the dense block-causal [L, L]
    mask, but that mask is never built: at 21 latent frames of 832x480 (32,760 tokens) it is
    ~1 GiB, and any mask disables flash-attn. Instead each query chunk calls the unmasked `attention` on the key
    prefix it may see (one call when chunk_tokens >= L). Differentiable.

    key_lens: optional [B] ints; only the first key_lens[b] keys of element b are real (padding
    is dropped by slicing per batch element, again with no mask). Queries at padded positions
    attend to the real keys of chunks 0..i, as the dense mask would give; they are finite and
    should be ignored by callers.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    lk = k.shape[1]
    if key_lens is None:
        return _chunk_causal(q, k, v, chunk_tokens)
    lens = _key_lens_list(key_lens, q.shape[0], lk)
    if all(n == lk for n in lens):
        return _chunk_causal(q, k, v, chunk_tokens)
    return torch.cat(
        [
            _chunk_causal(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], chunk_tokens)
            for b, n in enumerate(lens)
        ]
    )
