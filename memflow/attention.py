"""Attention kernels, chosen by name in one registry.

Every attention call in the model goes through `attention(q, k, v, mask, kernel)` with tensors
laid out as [B, L, H, D] (the Wan layout). The kernel is a property of the model that calls it
(`WanDiT.set_attention_backend`: an `AttentionKernel`), so a teacher and a generator may use
different ones; nothing is selected process-wide. `BACKENDS` holds the kernels by the names a
config's `attn_backend` uses:

* ``sdpa``: PyTorch's `scaled_dot_product_attention`; the default, always available, takes
  every call (masks, any device and dtype);
* ``flash2``: flash-attn 2 (`flash_attn.flash_attn_func`), CUDA on Ampere or newer;
* ``flash3``: the flash-attn 3 interface (`flash_attn_interface.flash_attn_func`), Hopper;
* ``flash4``: flash-attn 4 (`flash_attn.cute.flash_attn_func`, the pure-Python CuTe-DSL wheel
  `flash-attn-4`), Hopper and Blackwell; `auto` prefers flash3 where both run;

and two selectors: ``auto`` (the highest-priority installed backend that supports the call,
else SDPA) and ``flash`` (flash3 if installed, else flash2; the name earlier configs used).
Each backend says whether it `supports` a call (device, dtype, mask, head dim); a call it cannot
take goes to SDPA, so an explicit name only fails, with one line naming the missing package,
when an `AttentionKernel` of that name is made while it is not installed. Flash results agree with SDPA within bf16 round-off;
the reference itself used flash-attn, and naming flash2 or flash3 matches a reference run's
kernel bit for bit (its FA3 check misses an H200, spec P7). `register_backend` is the one place
to add a kernel.

There is no flex_attention backend: flex pays off for structured masks, and the model has none
at run time (a streaming call attends to the whole context it is given, a bidirectional one to
every token; dense masks appear only in tests; the reference compiles flex but never calls it
at inference, spec P8). It would also need torch.compile to be fast and has no
backward on CPU.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from memflow.errors import InputError

Kernel = Callable[..., torch.Tensor]  # (q, k, v, mask) -> out, all [B, L, H, D]; mask may be None


@lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class AttentionBackend:
    """One attention kernel under its config name.

    `call(q, k, v, mask)` takes and returns [B, L, H, D] tensors; `supports(q, k, v, mask)` says
    whether it can take this call. `module` is what `available()` imports (None: always there)
    and `package` how the error describes it. `auto` tries backends from the highest `priority`.
    """

    name: str
    title: str
    call: Kernel
    supports: Callable[..., bool]  # (q, k, v, mask) -> can this kernel take the call?
    priority: int
    module: str | None = None
    package: str = ""

    def available(self) -> bool:
        return self.module is None or _importable(self.module)

    def requirement(self) -> str:
        return f"the {self.module} package ({self.package})"


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _flash2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: None) -> torch.Tensor:
    from flash_attn import flash_attn_func  # type: ignore

    return flash_attn_func(q, k, v)


def _flash3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: None) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func  # type: ignore

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE


@lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _flash4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: None) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func  # type: ignore

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # (out, lse)


def _flash_supports(min_arch: int, max_arch: int = 99) -> Callable[..., bool]:
    """Flash kernels take fp16/bf16 CUDA calls without a mask, head dim a multiple of 8 up to
    256, on a GPU whose compute capability (major) lies in [min_arch, max_arch]."""

    def supports(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> bool:
        if mask is not None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            return False
        if k.dtype != q.dtype or v.dtype != q.dtype or q.shape[-1] % 8 or q.shape[-1] > 256:
            return False
        return min_arch <= _capability(q.device)[0] <= max_arch

    return supports


SDPA = AttentionBackend("sdpa", "torch SDPA", _sdpa, lambda q, k, v, mask: True, priority=0)
BACKENDS: dict[str, AttentionBackend] = {}
# Selectors that are not kernels: `auto` (every backend by priority) and these aliases, each
# meaning the first installed backend of its list.
ALIASES: dict[str, tuple[str, ...]] = {"flash": ("flash3", "flash2")}


def register_backend(backend: AttentionBackend) -> None:
    """Add (or replace) a kernel; an `AttentionKernel` made later can select it by name, and
    `auto` considers it."""
    global _auto
    BACKENDS[backend.name] = backend
    _auto = None


register_backend(SDPA)
register_backend(AttentionBackend(
    "flash2", "flash-attn 2", _flash2, _flash_supports(8), priority=20,
    module="flash_attn", package="flash-attn 2, Ampere or newer",
))
register_backend(AttentionBackend(
    "flash3", "flash-attn 3", _flash3, _flash_supports(9, 9), priority=30,
    module="flash_attn_interface", package="flash-attn 3, Hopper",
))


register_backend(AttentionBackend(
    "flash4", "flash-attn 4", _flash4, _flash_supports(9, 12), priority=25,
    module="flash_attn.cute", package="flash-attn-4, Hopper or Blackwell",
))


def backend_names() -> tuple[str, ...]:
    """Every name `attn_backend` accepts, in the order messages list them."""
    return ("auto", *BACKENDS, *ALIASES)


def _chain(name: str) -> tuple[AttentionBackend, ...]:
    """The backends a call under `name` tries in order; SDPA last, as it takes every call."""
    if name not in backend_names():
        allowed = ", ".join(backend_names())
        raise InputError(f"unknown attention backend {name!r}; use one of {allowed}")
    if name == "auto":  # SDPA takes every call, so a backend ranked below it would never run
        ranked = (b for b in BACKENDS.values() if b.priority > SDPA.priority and b.available())
        picks = sorted(ranked, key=lambda b: -b.priority)
    else:
        options = [BACKENDS[n] for n in ALIASES.get(name, (name,))]
        picks = [b for b in options if b.available()][:1]
        if not picks:
            needs = " or ".join(b.requirement() for b in options)
            raise InputError(f"attention backend {name!r} needs {needs}; "
                             f"install it or use attn_backend: sdpa")
    return (*[b for b in picks if b is not SDPA], SDPA)


class AttentionKernel:
    """The attention of one model: the backends a name of `backend_names()` selects, resolved
    once. Making one for an unknown name, or a backend whose package is not installed, is an
    InputError (one line naming it). A call runs the first backend of the chain that supports
    it (SDPA, last, takes every call)."""

    def __init__(self, name: str = "auto"):
        self.name = name
        self.chain = _chain(name)

    def backend_for(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> AttentionBackend:
        """The backend that runs this call."""
        return next(b for b in self.chain if b.supports(q, k, v, mask))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.backend_for(q, k, v, mask).call(q, k, v, mask)

    def __repr__(self) -> str:
        return f"AttentionKernel({self.name!r})"


_auto: AttentionKernel | None = None  # `auto` for calls without a kernel, made on first use


def default_kernel() -> AttentionKernel:
    """`auto` over the registry as it is now (remade after `register_backend`)."""
    global _auto
    if _auto is None:
        _auto = AttentionKernel("auto")
    return _auto


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
    kernel: AttentionKernel | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v over [B, L, H, D] tensors, by `kernel` (default `auto`).

    `mask` is an optional boolean [Lq, Lk] (or broadcastable [B, H, Lq, Lk]) tensor where True
    means "may attend". Returns [B, Lq, H, D].
    """
    return (kernel or default_kernel())(q, k, v, mask)
