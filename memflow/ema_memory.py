"""EMA memory (after MemRoPE): what leaves the attention window is folded into running averages.

Every frame that the window stops attending is folded, per layer, into running averages of its
un-rotated keys and values, one per rate (default 0.01 and 0.1: a long and a short memory),
m <- (1 - rate) m + rate frame, starting from the first frame folded. A call attends the
averages as one frame each, between the sink (and the bank) and the window; with relative
positions (the only ones it works with) they sit at fixed slots, so the memory keeps its place
however long the stream.

A frame is folded when a committing call first does not attend it (it is still in the KV
buffer then: evicted by this very commit at inference, later in a training buffer larger than
the window), so inference and training fold the same frames at the same chunks. The averages
are new tensors at every fold, never changed in place (a saved graph reads the old ones).

Layouts: `ema` (sink, EMA, window) and `nam_ema` (sink, bank, EMA, window); option
`model_kwargs.memory_options.ema_rates`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .kv_cache import CachePlan, KVCache
from .memory_sources import (
    Commit,
    MemorySource,
    Segment,
    SinkSource,
    SourceHost,
    WindowSource,
    standard_sources,
)

DEFAULT_RATES = (0.01, 0.1)


class EmaSource(MemorySource):
    """Running averages of the frames that left the window, one frame per rate per layer."""

    name = "ema"

    def __init__(self, kv: KVCache, frame_len: int, rates: Sequence[float] = DEFAULT_RATES):
        if not rates or any(not 0 < r <= 1 for r in rates):
            raise ValueError(f"ema_rates must be rates in (0, 1], got {list(rates)}")
        self.kv, self.frame_len = kv, frame_len
        self.rates = tuple(float(r) for r in rates)
        self.k: list[list[torch.Tensor] | None] = [None] * kv.num_layers
        self.v: list[list[torch.Tensor] | None] = [None] * kv.num_layers
        self.folded_to = kv.sink  # absolute token: everything before it is folded (or the sink)

    def read(self, layer: int, plan: CachePlan) -> Segment | None:
        if self.k[layer] is None:
            return None
        return Segment(self.k[layer], self.v[layer])

    def on_commit(self, commit: Commit) -> None:
        """Fold the frames this committing call no longer attends, from the KV buffer as it is
        before the commit writes."""
        plan, kv, fl = commit.plan, self.kv, self.frame_len
        if plan.recompute:
            return
        window_first = plan.end - (plan.new_fill - plan.window_start)  # absolute token
        buffer_offset = kv.end - kv.fill  # absolute token of window buffer position p: p + offset
        for start in range(self.folded_to, window_first, fl):
            lo = start - buffer_offset
            for layer in range(kv.num_layers):
                self._fold(layer, kv.k[layer][:, lo:lo + fl], kv.v[layer][:, lo:lo + fl])
        self.folded_to = max(self.folded_to, window_first)

    def _fold(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = k.detach(), v.detach()
        if self.k[layer] is None:
            self.k[layer] = [k.clone() for _ in self.rates]
            self.v[layer] = [v.clone() for _ in self.rates]
            return
        self.k[layer] = [torch.lerp(m, k, r) for m, r in zip(self.k[layer], self.rates)]
        self.v[layer] = [torch.lerp(m, v, r) for m, r in zip(self.v[layer], self.rates)]

    @property
    def frames_held(self) -> int:
        return 0 if self.k[0] is None else len(self.rates)

    @property
    def capacity_frames(self) -> int:
        return len(self.rates)

    def state_dict(self) -> dict:
        return {"k": list(self.k), "v": list(self.v), "folded_to": self.folded_to}

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:
        def put(frames: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if frames is None else [t.to(device, copy=True) for t in frames]

        self.k = [put(f) for f in state["k"]]
        self.v = [put(f) for f in state["v"]]
        self.folded_to = int(state["folded_to"])


def _ema(state: SourceHost) -> EmaSource:
    rates = state.config.memory_options.get("ema_rates", DEFAULT_RATES)
    return EmaSource(state.kv, state.frame_len, rates)


def ema_sources(state: SourceHost) -> list[MemorySource]:
    """Sink, EMA memory, window."""
    sink: list[MemorySource] = [SinkSource(state.kv)] if state.kv.sink > 0 else []
    return [*sink, _ema(state), WindowSource(state.kv)]


def nam_ema_sources(state: SourceHost) -> list[MemorySource]:
    """Sink, bank (NAM), EMA memory, window."""
    *memory, window = standard_sources(state)
    return [*memory, _ema(state), window]
