"""The rolling self-attention KV cache with a frame sink (spec §2).

Layout of one layer's buffer (capacity `cap` tokens, `sink` tokens at the front)::

    [ sink (first chunk, never moves) | window ... (oldest -> newest) | unused ]
    0                                 sink                            fill   cap

Invariants
* Keys are stored already rotated with the RoPE of their absolute frame; values are raw.
* `end` (G, tokens) is the absolute end of everything committed; `fill` (E, tokens) is how much
  of the buffer is used. fill <= cap, and both are the same for every layer.
* Only `commit` writes. A denoising call reads its context (`sink_context`, `window_context`)
  as views of the buffers without touching them, so the several denoising steps of a chunk all
  see the same history.
* Positions below `fill` are never written in place. A commit that only appends (writes at or
  past `fill`, no eviction) writes into the free tail; one that evicts or rewrites committed
  positions (a roll, a recache) replaces the layer's buffer by a new tensor (copy on write).
  So the context views an earlier call attended (which a saved graph or an activation
  checkpoint recomputation reads again in backward) keep their values. Training sizes the
  capacity to cover a whole rollout (`capacity` > attention window) so nothing is ever copied.
* When a new chunk does not fit, the window frames it will not attend are evicted (the window
  shifts left); the sink region [0, sink) is never evicted. With capacity = attention window
  (inference) that is exactly the overflow; a larger training buffer is compacted to the
  attended frames, so it is copied once per (capacity - window) tokens, not on every chunk.
* A call that covers already committed frames (a recompute, e.g. the recache after a prompt
  switch) may rewrite window slots but never moves `end`/`fill`, and it protects the sink unless
  it starts at frame 0 (reference behaviour, spec §2.6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch


@dataclass(frozen=True)
class CachePlan:
    """Where one model call's new tokens go, computed once and shared by all layers."""

    start: int  # absolute token offset of the call's first token (cs)
    num_new: int  # tokens in the call
    evict: int  # tokens evicted from the front of the window (X); 0 when not rolling
    keep: int  # window tokens kept and shifted left by `evict` (R)
    new_fill: int  # buffer fill after the call (E')
    write_start: int  # first buffer position written (ws)
    skip: int  # leading new tokens not written (sink protection during a recompute)
    recompute: bool
    window_start: int  # first window position attended (a)

    @property
    def end(self) -> int:
        return self.start + self.num_new

    @property
    def rolls(self) -> bool:
        return self.evict > 0

    @property
    def new_offset(self) -> int:
        """Buffer position of the call's new token 0 (its first `skip` tokens are not written)."""
        return self.write_start - self.skip


class CacheRead(NamedTuple):
    """What one call attends of one region of the cache (sink or window), in key order:
    committed pieces `k`/`v` ([B, tokens, H, D] views), then the call's own new tokens that sit
    in the region (`new`, a slice of the call's tokens), then committed pieces `k_tail`/`v_tail`."""

    k: Sequence[torch.Tensor]
    v: Sequence[torch.Tensor]
    new: slice
    k_tail: Sequence[torch.Tensor] = ()
    v_tail: Sequence[torch.Tensor] = ()


class KVCache:
    """Per-layer K/V buffers ([B, cap, H, D] each) with a sink and a rolling window.

    `capacity` is the buffer size and `max_attention` the attention window (sink included);
    inference uses one for both, a training rollout a capacity that holds the whole rollout.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        capacity: int,
        sink_tokens: int,
        max_attention_tokens: int,
        num_heads: int,
        head_dim: int,
        rolling: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if sink_tokens > capacity:
            raise ValueError(f"sink ({sink_tokens} tokens) exceeds cache capacity ({capacity})")
        self._shape = (batch_size, capacity, num_heads, head_dim)
        self._dtype, self._device = dtype, device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.num_layers = num_layers
        self.capacity = capacity
        self.sink = sink_tokens
        self.max_attention = max_attention_tokens
        self.rolling = rolling
        self.reset()

    def _zeros(self) -> list[torch.Tensor]:
        return [
            torch.zeros(self._shape, dtype=self._dtype, device=self._device)
            for _ in range(self.num_layers)
        ]

    def reset(self) -> None:
        """Empty the cache (new buffers, so nothing read earlier changes)."""
        self.clear_values()
        self.end = 0  # G
        self.fill = 0  # E

    def clear_values(self) -> None:
        """Zero every K/V but keep the pointers: the reference's prompt switch without a global
        sink (spec K2, compat only)."""
        self.k, self.v = self._zeros(), self._zeros()

    def plan(self, start: int, num_new: int, protect_sink_at_start: bool = False) -> CachePlan:
        """Decide eviction and write positions for a call covering tokens [start, start+num_new).

        A call over committed tokens is a recompute when it starts past 0; the reference does not
        treat a call starting at token 0 as one, so it rewrites the sink (spec K3) unless
        `protect_sink_at_start`.
        """
        end = start + num_new
        recompute = end <= self.end and (start > 0 or (protect_sink_at_start and self.end > 0))
        grow = end - self.end
        if self.rolling and end > self.end and num_new + self.fill > self.capacity:
            # evict everything the call will not attend (at least what makes room): with a
            # buffer larger than the window (stage-2 training) the roll, a copy, then happens
            # once per (capacity - window) tokens instead of on every chunk
            attended = max(0, min(self.fill - self.sink, self.max_attention - self.sink - num_new))
            evict = max(num_new + self.fill - self.capacity, self.fill - self.sink - attended)
            keep = self.fill - evict - self.sink
            new_fill = self.fill + grow - evict
        else:
            evict, keep = 0, 0
            new_fill = self.fill + grow
        # a recompute may cover more frames than the buffer still holds (the reference's
        # 21-frame training recache after a compacting roll): its leading tokens, outside every
        # later attention window, are computed and not written
        if new_fill > self.capacity or (new_fill < num_new and not recompute):
            raise ValueError(
                f"call of {num_new} tokens at {start} does not fit the cache "
                f"(fill {self.fill}, end {self.end}, capacity {self.capacity})"
            )
        local_start = new_fill - num_new
        write_start = max(local_start, self.sink) if recompute else local_start
        if self.sink > 0:
            window_start = max(self.sink, new_fill - (self.max_attention - self.sink))
        else:
            window_start = max(0, new_fill - self.max_attention)
        return CachePlan(
            start=start,
            num_new=num_new,
            evict=evict,
            keep=keep,
            new_fill=new_fill,
            write_start=write_start,
            skip=write_start - local_start,
            recompute=recompute,
            window_start=window_start,
        )

    def sink_context(self, layer: int, plan: CachePlan) -> CacheRead:
        """The attended sink of one layer for a call, as views of the buffers:
        [committed sink | the call's new tokens in the sink | sink tail]. The tail is non-empty
        only while the sink is not yet filled (it then reads zeros, as the reference)."""
        k, v = self.k[layer], self.v[layer]
        ws, we = plan.write_start, plan.new_fill
        sink_hi = min(self.sink, ws)
        tail_lo = min(self.sink, max(we, sink_hi))
        off = plan.new_offset
        new = slice(max(0, ws) - off, max(ws, min(self.sink, we)) - off)
        read = self._read_old
        return CacheRead(
            read(k, plan, 0, sink_hi), read(v, plan, 0, sink_hi), new,
            read(k, plan, tail_lo, self.sink), read(v, plan, tail_lo, self.sink),
        )

    def window_context(self, layer: int, plan: CachePlan) -> CacheRead:
        """The attended window of one layer for a call, as views of the buffers:
        [committed window frames | the call's new tokens in the window] (oldest first)."""
        k, v = self.k[layer], self.v[layer]
        ws, we = plan.write_start, plan.new_fill
        lo, hi = self._window_range(plan)
        win_hi = max(lo, min(hi, ws))
        off = plan.new_offset
        new = slice(max(lo, ws) - off, max(max(lo, ws), min(hi, we)) - off)
        read = self._read_old
        return CacheRead(read(k, plan, lo, win_hi), read(v, plan, lo, win_hi), new)

    def _window_range(self, plan: CachePlan) -> tuple[int, int]:
        if self.sink > 0 and self.max_attention - self.sink <= 0:
            return plan.new_fill, plan.new_fill  # only the sink is attended (spec Q10)
        return plan.window_start, plan.new_fill

    def _read_old(self, buf: torch.Tensor, plan: CachePlan, lo: int, hi: int) -> list[torch.Tensor]:
        """Buffer positions [lo, hi) as they read after the plan's eviction shift."""
        if lo >= hi:
            return []
        pieces = []
        shifted_lo, shifted_hi = self.sink, self.sink + plan.keep
        cuts = sorted({lo, hi} | {c for c in (shifted_lo, shifted_hi) if lo < c < hi})
        for a, b in zip(cuts[:-1], cuts[1:]):
            offset = plan.evict if plan.rolls and shifted_lo <= a < shifted_hi else 0
            pieces.append(buf[:, a + offset : b + offset])
        return pieces

    def commit_layer(
        self, layer: int, plan: CachePlan, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> None:
        """Apply the plan's eviction and write to one layer (in place only into the free tail)."""
        appends = not plan.rolls and plan.write_start >= self.fill
        for bufs, new in ((self.k, k_new), (self.v, v_new)):
            buf, new = bufs[layer], new[:, plan.skip :].detach()
            if appends:
                buf[:, plan.write_start : plan.new_fill] = new
                continue
            pieces = self._read_old(buf, plan, 0, plan.write_start) + [new]
            if plan.new_fill < self.capacity:
                pieces.append(buf[:, plan.new_fill :])
            bufs[layer] = torch.cat(pieces, dim=1)

    def state_dict(self) -> dict:
        """What a later call can still read: the sink and the newest `max_attention - sink`
        window tokens, stored contiguously, and the pointers. Older window tokens are never
        attended again (a roll would evict them), so a resumed training sequence continues bit
        for bit from this, with a smaller `fill` (its rolls come later; what each call attends
        is the same)."""
        sink = min(self.sink, self.fill)
        tail = max(0, min(self.fill - sink, self.max_attention - self.sink))
        keep = list(range(sink)) + list(range(self.fill - tail, self.fill))
        index = torch.tensor(keep, dtype=torch.long, device=self.k[0].device if self.k else "cpu")
        return {
            "k": [k.index_select(1, index) for k in self.k],
            "v": [v.index_select(1, index) for v in self.v],
            "end": self.end,
            "fill": len(keep),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` into fresh buffers of this cache's shape."""
        fill = int(state["fill"])
        if fill > self.capacity or len(state["k"]) != self.num_layers:
            raise ValueError(
                f"saved KV cache ({len(state['k'])} layers, fill {fill}) does not fit this one "
                f"({self.num_layers} layers, capacity {self.capacity})"
            )
        self.clear_values()
        for bufs, saved in ((self.k, state["k"]), (self.v, state["v"])):
            for buf, part in zip(bufs, saved):
                buf[:, :fill] = part.to(buf.device, buf.dtype)
        self.end, self.fill = int(state["end"]), fill

    def advance(self, plan: CachePlan) -> None:
        """Move the end/fill pointers after every layer committed (not for a recompute)."""
        if not plan.recompute:
            self.end = plan.end
            self.fill = plan.new_fill
