"""The rolling self-attention KV cache with a frame sink (spec §2).

Layout of one layer's buffer (capacity `cap` tokens, `sink` tokens at the front)::

    [ sink (first chunk, never moves) | window ... (oldest -> newest) | unused ]
    0                                 sink                            fill   cap

Invariants
* Keys are stored already rotated with the RoPE of their absolute frame; values are raw.
* `end` (G, tokens) is the absolute end of everything committed; `fill` (E, tokens) is how much
  of the buffer is used. fill <= cap, and both are the same for every layer.
* Only `commit` writes. A denoising call builds its keys from `plan` + `gather` without touching
  the buffers, so the several denoising steps of a chunk all see the same history.
* When a new chunk does not fit, the oldest window frames are evicted (the window shifts left by
  the overflow); the sink region [0, sink) is never evicted.
* A call that covers already committed frames (a recompute, e.g. the recache after a prompt
  switch) may rewrite window slots but never moves `end`/`fill`, and it protects the sink unless
  it starts at frame 0 (reference behaviour, spec §2.6).
"""
from __future__ import annotations

from dataclasses import dataclass

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


class KVCache:
    """Per-layer K/V buffers [layers, B, cap, H, D] with a sink and a rolling window."""

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
        shape = (num_layers, batch_size, capacity, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.sink = sink_tokens
        self.max_attention = max_attention_tokens
        self.rolling = rolling
        self.end = 0  # G
        self.fill = 0  # E

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.end = 0
        self.fill = 0

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
            evict = num_new + self.fill - self.capacity
            keep = self.fill - evict - self.sink
            new_fill = self.fill + grow - evict
        else:
            evict, keep = 0, 0
            new_fill = self.fill + grow
        if new_fill > self.capacity or new_fill < num_new:
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

    def _read_old(self, buf: torch.Tensor, plan: CachePlan, lo: int, hi: int) -> list[torch.Tensor]:
        """Buffer positions [lo, hi) as they read after the plan's eviction shift."""
        pieces = []
        shifted_lo, shifted_hi = self.sink, self.sink + plan.keep
        cuts = sorted({lo, hi} | {c for c in (shifted_lo, shifted_hi) if lo < c < hi})
        for a, b in zip(cuts[:-1], cuts[1:]):
            offset = plan.evict if plan.rolls and shifted_lo <= a < shifted_hi else 0
            pieces.append(buf[:, a + offset : b + offset])
        return pieces

    def _read(
        self, buf: torch.Tensor, plan: CachePlan, new: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        """Positions [lo, hi) of the buffer as it will be after committing `plan` with `new`."""
        pieces: list[torch.Tensor] = []
        ws, we = plan.write_start, plan.new_fill
        old_hi = min(hi, ws)
        if lo < old_hi:
            pieces += self._read_old(buf, plan, lo, old_hi)
        if max(lo, ws) < min(hi, we):
            a, b = max(lo, ws), min(hi, we)
            offset = ws - plan.skip  # buffer position of new token 0
            pieces.append(new[:, a - offset : b - offset])
        if max(lo, we) < hi:
            pieces += self._read_old(buf, plan, max(lo, we), hi)
        if not pieces:
            return new[:, :0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def sink_and_window(
        self, layer: int, plan: CachePlan, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the sink and of the attended window for this call, without writing.

        Returns ((sink_k, sink_v), (window_k, window_v)), each [B, tokens, H, D].
        """
        k, v = self.k[layer], self.v[layer]
        if self.sink > 0 and self.max_attention - self.sink <= 0:
            lo, hi = plan.new_fill, plan.new_fill  # only the sink is attended (spec Q10)
        else:
            lo, hi = plan.window_start, plan.new_fill
        sink = (self._read(k, plan, k_new, 0, self.sink), self._read(v, plan, v_new, 0, self.sink))
        window = (self._read(k, plan, k_new, lo, hi), self._read(v, plan, v_new, lo, hi))
        return sink, window

    def commit_layer(
        self, layer: int, plan: CachePlan, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> None:
        """Apply the plan's eviction and write to one layer's buffers."""
        for buf, new in ((self.k[layer], k_new), (self.v[layer], v_new)):
            if plan.rolls:
                src = slice(self.sink + plan.evict, self.sink + plan.evict + plan.keep)
                buf[:, self.sink : self.sink + plan.keep] = buf[:, src].clone()
            buf[:, plan.write_start : plan.new_fill] = new[:, plan.skip :]

    def advance(self, plan: CachePlan) -> None:
        """Move the end/fill pointers after every layer committed (not for a recompute)."""
        if not plan.recompute:
            self.end = plan.end
            self.fill = plan.new_fill
