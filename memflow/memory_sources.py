"""Memory sources: what the self-attention of a streaming call attends, as an ordered list.

The keys (and values) of a streaming DiT call are the concatenation, in list order, of what each
source of its `StreamState` gives for that layer. The standard list is the reference's key order
(spec §2.3): the frame sink, the memory bank's used slots, the local window. A source:

* `read(layer, plan)`: its K/V pieces for one layer of one call (a `Segment`), or None when it
  contributes nothing to this call. Called once per layer per call, so it only slices views;
* `refresh(text)`: maintenance before a call that refreshes memory (the bank inserts its
  prototype or compresses, scored with the prompt's text keys); returns what it did;
* `wants_record(chunk)`: whether the commit of that chunk should be recorded (the call's
  `record_memory`: the bank stages a prototype every `record_interval` chunks);
* `on_commit(commit)`: what it does when a chunk is committed (the bank stages the chunk's
  first frame as its prototype). It runs after every layer and before the KV cache is written,
  so a source still sees what the commit will evict;
* `held_frames()`: which latent frames it holds, per layer (for readouts; None for the views of
  the KV cache, whose frames the cache itself says), `frames_held` and `capacity_frames`: how
  many frames per layer it holds now and at most, beyond the KV cache (for benchmarks);
* `state_dict()` / `load_state_dict()`: its state, for resuming a training sequence.

A source that declares itself `selectable` lets Sparse Memory Activation choose among its frames
(the sink and the bank); the others (the window) are always attended whole.

The KV cache itself is not a source: it is the stream's buffer of committed frames, which gives
every call its plan (positions, eviction) and is written by every committing call. The sink and
the window are two views of it.

A memory policy is a *layout*: a function of the `StreamState` that returns its sources in key
order. Layouts are registered by name (`register_memory_layout`) and chosen by the stream's
`StreamConfig.memory_layout` (config key `model_kwargs.memory_layout`); `standard` is the
reference's. A new policy (an EMA memory, a retrieved sink, ...) is its source classes and one
`register_memory_layout` line; nothing else changes, and a state without a bank works.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Protocol, Sequence

import torch

from .config import StreamConfig
from .kv_cache import CachePlan, CacheRead, KVCache
from .memory_bank import MemoryBank
from .stream_call import StreamCall
from .text_cache import TextCache


@dataclass(frozen=True, slots=True)
class Segment:
    """One source's part of one layer's keys in one call: committed pieces `k`/`v`
    ([B, tokens, H, D] each), then the call's own new tokens `new` (a slice of them; None: none),
    then committed pieces `k_tail`/`v_tail`. `selectable`: SMA may choose among its frames."""

    k: Sequence[torch.Tensor]
    v: Sequence[torch.Tensor]
    new: slice | None = None
    k_tail: Sequence[torch.Tensor] = ()
    v_tail: Sequence[torch.Tensor] = ()
    selectable: bool = False

    @classmethod
    def of(cls, read: CacheRead, selectable: bool = False) -> "Segment":
        return cls(read.k, read.v, read.new, read.k_tail, read.v_tail, selectable)

    def pieces(self, k_new: torch.Tensor, v_new: torch.Tensor) -> list[Piece]:
        """This segment's K/V pieces in key order; the call's own tokens (from `k_new`, `v_new`)
        carry the slice of the call they are."""
        new = [Piece(k_new[:, self.new], v_new[:, self.new], self.new)] if self.new is not None else []
        return ([Piece(k, v) for k, v in zip(self.k, self.v)] + new
                + [Piece(k, v) for k, v in zip(self.k_tail, self.v_tail)])


class Piece(NamedTuple):
    """Consecutive keys and values [B, tokens, H, D] of a segment; `new`: which of the call's
    own tokens they are (None: committed ones)."""

    k: torch.Tensor
    v: torch.Tensor
    new: slice | None = None


@dataclass(frozen=True)
class Commit:
    """A committing call, as the sources see it after every layer ran: the call, its cache plan
    and each layer's new K/V ([B, tokens, H, D], detached)."""

    call: StreamCall
    plan: CachePlan
    new_kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]]
    frame_len: int
    frames_per_block: int


class MemorySource:
    """One part of the attended context. Every hook but `read` defaults to doing nothing."""

    name: ClassVar[str]  # its key in the stream's state_dict; unique in a state's list
    selectable: ClassVar[bool] = False

    def read(self, layer: int, plan: CachePlan) -> Segment | None:
        raise NotImplementedError

    def refresh(self, text: TextCache) -> str | None:
        """Maintenance before a call that refreshes memory; returns what it did (None: nothing)."""
        return None

    def wants_record(self, chunk: int) -> bool:
        """Whether the commit of chunk `chunk` should record memory (`StreamCall.record_memory`)."""
        return False

    def on_commit(self, commit: Commit) -> None:
        return None

    def held_frames(self) -> list[list[int]] | None:
        """The latent frames it holds, per layer in slot order (None: not its own to say)."""
        return None

    @property
    def frames_held(self) -> int:
        """Frames per layer it holds now, beyond the KV cache."""
        return 0

    @property
    def capacity_frames(self) -> int:
        """Frames per layer it can hold at most, beyond the KV cache (memory budgets)."""
        return 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:
        return None


class SinkSource(MemorySource):
    """The first frames of the video, kept for the whole stream (a view of the KV cache)."""

    name = "sink"
    selectable = True

    def __init__(self, kv: KVCache):
        self.kv = kv

    def read(self, layer: int, plan: CachePlan) -> Segment:
        return Segment.of(self.kv.sink_context(layer, plan), selectable=True)


class WindowSource(MemorySource):
    """The newest frames, the call's own included (a view of the KV cache)."""

    name = "window"

    def __init__(self, kv: KVCache):
        self.kv = kv

    def read(self, layer: int, plan: CachePlan) -> Segment:
        return Segment.of(self.kv.window_context(layer, plan))


class BankSource(MemorySource):
    """The memory bank (NAM, spec §3): its used slots between the sink and the window.

    `attended` False keeps the bank maintained but never read: the reference's "no bank without a
    sink" (spec Q10, MemoryOptions.bank_requires_sink)."""

    name = "bank"
    selectable = True

    def __init__(self, bank: MemoryBank, attended: bool = True):
        self.bank = bank
        self.attended = attended

    def read(self, layer: int, plan: CachePlan) -> Segment | None:
        if not self.attended:
            return None
        k, v = self.bank.read(layer)
        return Segment(k, v, selectable=True) if k else None

    def refresh(self, text: TextCache) -> str | None:
        return self.bank.refresh(text.keys, text.mask)

    def wants_record(self, chunk: int) -> bool:
        return self.bank.wants_prototype(chunk)

    def held_frames(self) -> list[list[int]] | None:
        """Needs the state's `track_frames` (it costs a host sync per compression)."""
        return [[f for f in frames if f is not None] for frames in self.bank.slot_frames]

    @property
    def frames_held(self) -> int:
        return self.bank.used_slots

    @property
    def capacity_frames(self) -> int:
        return self.bank.slots + (1 if self.bank.slots else 0)  # the slots and the prototype

    def on_commit(self, commit: Commit) -> None:
        """Stage the committed chunk's first frame as the prototype (spec §3.2), when the call
        records memory; never on a recompute (a recache)."""
        plan, frame_len = commit.plan, commit.frame_len
        if not commit.call.record_memory or plan.recompute:
            return
        lo, hi = plan.skip, plan.skip + frame_len
        for layer, (k, v) in commit.new_kv.items():
            self.bank.stage_layer(layer, k[:, lo:hi], v[:, lo:hi])
        chunk_index = (plan.end // frame_len) // commit.frames_per_block - 1
        self.bank.finish_stage(chunk_index, (plan.start + plan.skip) // frame_len)

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:
        self.bank.load_state_dict(state, device)


class SourceHost(Protocol):
    """What a layout reads of the stream state it builds sources for (a `StreamState`)."""

    config: StreamConfig
    kv: KVCache
    num_layers: int
    frame_len: int
    track_frames: bool


SourceLayout = Callable[[SourceHost], Sequence[MemorySource]]


@dataclass(frozen=True)
class _Layout:
    build: SourceLayout | str  # a function, or "module:function" imported when first used
    positions: tuple[str, ...]  # the position policies it works with
    options: tuple[str, ...]  # the names of its `memory_options`


_LAYOUTS: dict[str, _Layout] = {}


def register_memory_layout(name: str, layout: SourceLayout | str, *,
                           positions: Sequence[str] = ("absolute", "relative"),
                           options: Sequence[str] = ()) -> None:
    """Make `layout` (state -> its sources in key order; or "module:function", imported when a
    stream first uses it) available as `model_kwargs.memory_layout: <name>`. `positions`: the
    position policies it works with; `options`: the names it reads from
    `StreamConfig.memory_options` (its defaults are its own)."""
    _LAYOUTS[name] = _Layout(layout, tuple(positions), tuple(options))


def memory_layouts() -> tuple[str, ...]:
    return tuple(_LAYOUTS)


def check_memory_layout(name: str, positions: str, options: Mapping[str, Any]) -> None:
    """ValueError unless layout `name` is registered, works with `positions` and reads every
    option of `options` (a config's, checked before anything is built)."""
    if name not in _LAYOUTS:
        raise ValueError(f"unknown memory layout {name!r}; registered: {', '.join(_LAYOUTS)}")
    entry = _LAYOUTS[name]
    if positions not in entry.positions:
        raise ValueError(f"memory layout {name!r} needs positions: {' or '.join(entry.positions)}")
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        known = ", ".join(entry.options) or "none"
        raise ValueError(f"memory layout {name!r} has no option {unknown[0]!r} (its options: {known})")


def memory_layout(name: str) -> SourceLayout:
    if name not in _LAYOUTS:
        raise ValueError(f"unknown memory layout {name!r}; registered: {', '.join(_LAYOUTS)}")
    build = _LAYOUTS[name].build
    if isinstance(build, str):
        module, _, function = build.partition(":")
        build = getattr(importlib.import_module(module), function)
    return build


def new_bank(state: SourceHost) -> MemoryBank:
    """A memory bank sized by the state's stream config (NAM, spec §3)."""
    cfg = state.config
    return MemoryBank(num_layers=state.num_layers, slots=cfg.bank_size, frame_len=state.frame_len,
                      record_interval=cfg.record_interval, options=cfg.memory,
                      track_frames=state.track_frames)


def standard_sources(state: SourceHost) -> list[MemorySource]:
    """The reference's context in its key order (spec §2.3): sink, bank, window."""
    sink = state.kv.sink > 0
    bank_read = sink or not state.config.memory.bank_requires_sink
    sources: list[MemorySource] = [SinkSource(state.kv)] if sink else []
    return sources + [BankSource(new_bank(state), attended=bank_read), WindowSource(state.kv)]


register_memory_layout("standard", standard_sources)
register_memory_layout("ema", "memflow.ema_memory:ema_sources", positions=("relative",),
                       options=("ema_rates",))
register_memory_layout("nam_ema", "memflow.ema_memory:nam_ema_sources", positions=("relative",),
                       options=("ema_rates",))
