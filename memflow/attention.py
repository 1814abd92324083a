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
