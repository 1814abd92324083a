"""Per-video streaming state: KV cache, memory bank and text (cross-attention) cache.

A pipeline creates one `StreamState` per video and passes it with a `StreamCall` to every DiT
call. The call says what the DiT may do to the state:

* `StreamCall.denoise(frame, refresh_memory)`: read only. With `refresh_memory` (the first
  denoising step of a chunk) the bank is refreshed before any layer runs.
* `StreamCall.commit(frame, record_memory)`: the clean re-run of a finished chunk. It writes the
  chunk's K/V into the cache and, with `record_memory`, stages its first frame as the bank's
  prototype.
* `StreamCall.recache(frame)`: re-encode already generated frames (after a prompt switch). It
  refreshes the bank, rewrites window slots and never moves the cache pointers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention import attention
from .config import DiTConfig, StreamConfig
from .kv_cache import CachePlan, KVCache
from .memory_bank import MemoryBank, sma_select


@dataclass(frozen=True)
class StreamCall:
    """What one DiT call over frames [start_frame, start_frame + F) may do to the state."""

    start_frame: int
    commit: bool = False
    refresh_memory: bool = False
    record_memory: bool = False
    recache: bool = False
    protect_sink: bool = False  # recache from frame 0 keeps the sink (fixes spec K3)

    @classmethod
    def denoise(cls, start_frame: int, refresh_memory: bool = False) -> "StreamCall":
        return cls(start_frame, refresh_memory=refresh_memory)

    @classmethod
    def commit_chunk(cls, start_frame: int, record_memory: bool) -> "StreamCall":
        return cls(start_frame, commit=True, record_memory=record_memory)

    @classmethod
    def recache_frames(
        cls, start_frame: int, refresh_memory: bool = True, protect_sink: bool = False
    ) -> "StreamCall":
        return cls(
            start_frame, commit=True, refresh_memory=refresh_memory, recache=True,
            protect_sink=protect_sink,
        )


class TextCache:
    """Per-layer cross-attention K/V of the current prompt ([B, T, H, D] each).

    Empty after `reset()` (a prompt switch). While empty, `keys(layer)` reads as zeros, which is
    what the reference's bank refresh sees right after a switch.
    """

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.mask: torch.Tensor | None = None  # [B, T] True on real (non-padding) text tokens
        self._zeros: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        return all(k is not None for k in self.k)

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)
        self.mask = None

    def set_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer], self.v[layer] = k, v
        if self._zeros is None or self._zeros.shape != k.shape:
            self._zeros = torch.zeros_like(k)

    def keys(self, layer: int) -> torch.Tensor:
        k = self.k[layer]
        if k is not None:
            return k
        if self._zeros is None:
            raise RuntimeError("text cache was never built; run a DiT call with the prompt first")
        return self._zeros


class StreamState:
    """Everything a streaming video carries between DiT calls, sized from the configs.

    Geometry: `frame_len` tokens per latent frame (from the latent size and patch size), chunks
    of `num_frame_per_block` frames, a KV cache of `local_attn_size` frames including a sink of
    `sink_size` frames, and a bank of `bank_size` one-frame slots (not counted in the window).
    """

    def __init__(
        self,
        model_config: DiTConfig,
        stream_config: StreamConfig,
        batch_size: int,
        latent_height: int,
        latent_width: int,
        num_frames: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.config = stream_config
        self.frame_len = model_config.tokens_per_frame(latent_height, latent_width)
        self.frames_per_block = stream_config.num_frame_per_block
        self.num_frames = num_frames
        if stream_config.local_attn_size == -1:
            capacity_frames, rolling = num_frames, False
            max_attention_frames = num_frames
        else:
            capacity_frames, rolling = stream_config.local_attn_size, True
            max_attention_frames = stream_config.local_attn_size
        heads, head_dim = model_config.num_heads, model_config.head_dim
        self.kv = KVCache(
            num_layers=model_config.num_layers,
            batch_size=batch_size,
            capacity=capacity_frames * self.frame_len,
            sink_tokens=stream_config.sink_size * self.frame_len,
            max_attention_tokens=max_attention_frames * self.frame_len,
            num_heads=heads,
            head_dim=head_dim,
            rolling=rolling,
            dtype=dtype,
            device=device,
        )
        self.bank = MemoryBank(
            num_layers=model_config.num_layers,
            batch_size=batch_size,
            slots=stream_config.bank_size,
            frame_len=self.frame_len,
            num_heads=heads,
            head_dim=head_dim,
            record_interval=stream_config.record_interval,
            options=stream_config.memory,
            dtype=dtype,
            device=device,
        )
        self.text = TextCache(model_config.num_layers)
        self.last_key_frames: int = 0  # attended key length of the last call, in frames (tests)

    def begin(self, call: StreamCall, num_frames: int) -> "CallContext":
        plan = self.kv.plan(
            call.start_frame * self.frame_len,
            num_frames * self.frame_len,
            protect_sink_at_start=call.protect_sink,
        )
        if call.recache and not plan.recompute and plan.start > 0:
            raise ValueError("a recache call must cover frames that are already committed")
        return CallContext(self, call, plan)

    def finish(self, ctx: "CallContext") -> None:
        """Advance the pointers and the bank after every layer has run."""
        if not ctx.call.commit:
            return
        self.kv.advance(ctx.plan)
        if ctx.records and not ctx.plan.recompute:
            end_frame = ctx.plan.end // self.frame_len
            chunk_index = end_frame // self.frames_per_block - 1
            first_written = (ctx.plan.start + ctx.plan.skip) // self.frame_len
            self.bank.finish_stage(chunk_index, first_written)


class CallContext:
    """One DiT call's view of the state: the cache plan and the per-layer attention."""

    def __init__(self, state: StreamState, call: StreamCall, plan: CachePlan):
        self.state = state
        self.call = call
        self.plan = plan
        self.records = call.commit and call.record_memory

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention of the call's tokens over [sink | bank | window] (spec §2.3), then the
        commit of this layer's K/V when the call commits."""
        state, plan = self.state, self.plan
        cache, bank = state.kv, state.bank
        (sink_k, sink_v), (win_k, win_v) = cache.sink_and_window(layer, plan, k, v)
        if cache.sink > 0:
            bank_k, bank_v = bank.read(layer)
            mem_k = torch.cat([sink_k, bank_k], dim=1)
            mem_v = torch.cat([sink_v, bank_v], dim=1)
            if state.config.sma:
                mem_k, mem_v = sma_select(q, mem_k, mem_v, state.frame_len, state.config.sma_top_k)
            keys, values = torch.cat([mem_k, win_k], dim=1), torch.cat([mem_v, win_v], dim=1)
        else:
            keys, values = win_k, win_v  # the reference ignores the bank without a sink (Q10)
        if layer == 0:
            state.last_key_frames = keys.shape[1] // state.frame_len
        out = attention(q, keys, values)
        if self.call.commit:
            cache.commit_layer(layer, plan, k, v)
            if self.records:
                lo, hi = plan.skip, plan.skip + state.frame_len
                bank.stage_layer(layer, k[:, lo:hi], v[:, lo:hi])
        return out

    def text_kv(
        self, layer: int, build: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's cross-attention K/V, built from the prompt on first use."""
        text = self.state.text
        if text.k[layer] is None:
            text.set_layer(layer, *build())
        return text.k[layer], text.v[layer]  # type: ignore[return-value]
