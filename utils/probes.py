"""Probes of what a piece of code asks of the tensor runtime: host reads and allocations.

`HostReads` counts every read of a tensor's value by the host (what would wait for a GPU).

On a GPU, `.item()`, `.tolist()`, `bool(t)`, `.cpu()`, `nonzero` and data-dependent shapes block
the host until the device has caught up, so a hot loop that does any of them cannot run ahead of
the GPU or be captured as a CUDA graph. On the CPU nothing waits, but the same calls can be
counted: `HostReads` sees every tensor function call (a torch function mode) and every aten op
(a dispatch mode), so a call that reads a value is counted whichever way it is spelled.

`AllocatedBytes` sums the bytes of every new tensor the code makes (views excluded), with the
attention kernel counted by its output only (its internal buffers belong to the kernel, which on
a GPU does not materialise the scores). Both work on any device, `meta` included: a model built
on the meta device is measured at its real shape without computing anything.

Tests and benchmarks use them; nothing in the generation path does.
"""
from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# tensor functions that hand a value (or a data-dependent shape) to the host
READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
         "nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "__array__"}
# aten ops that do the same, whatever Python call led to them
READ_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default",
            "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default"}


def _where() -> str:
    """The innermost project frame of the current stack (file:line function)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/memflow/" in frame.filename or "/pipeline/" in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}" \
                   f":{frame.lineno} {frame.name}"
    return "outside the project"


class _Functions(TorchFunctionMode):
    def __init__(self, seen: Counter):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = (name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1])
                         and args[1].dtype == torch.bool)
        if name in READS or boolean_index:
            self.seen[f"{name} at {_where()}"] += 1
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, seen: Counter):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in READ_OPS:
            self.seen[f"{func} at {_where()}"] += 1
        return func(*args, **(kwargs or {}))


class _Probe:
    """Enters its torch modes in order and leaves them in reverse."""

    _modes: tuple

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class HostReads(_Probe):
    """`with HostReads() as reads: ...` then `reads.seen`: where each host read happened, and
    how often (a function call and the aten op under it both count)."""

    def __init__(self):
        self.seen: Counter = Counter()
        self._modes = (_Functions(self.seen), _Ops(self.seen))

    @property
    def total(self) -> int:
        return sum(self.seen.values())


class _Allocations(TorchDispatchMode):
    def __init__(self, owner: "AllocatedBytes"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.owner._inside_attention == 0 and not _is_view(func):
            self.owner._count(out, str(func))
        return out


class _AttentionOutputs(TorchFunctionMode):
    def __init__(self, owner: "AllocatedBytes"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.owner._inside_attention += 1
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.owner._inside_attention -= 1
        self.owner._count(out, "attention output")
        return out


def _is_view(func) -> bool:
    schema = func._schema
    return any(r.alias_info is not None for r in schema.returns) or func.is_view


class AllocatedBytes(_Probe):
    """`with AllocatedBytes() as alloc: ...` then `alloc.total` (bytes of new tensors) and
    `alloc.by_op` (bytes per aten op, largest first)."""

    def __init__(self):
        self.by_op: Counter = Counter()
        self._inside_attention = 0
        self._modes = (_AttentionOutputs(self), _Allocations(self))

    def _count(self, out, name: str) -> None:
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                self.by_op[name] += t.numel() * t.element_size()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())
