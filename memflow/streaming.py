"""Per-video streaming state: KV cache, memory bank and text (cross-attention) cache.

A stepper (memflow/chunk_loop.py) creates one `StreamState` per video. For every DiT call it opens
a `CallContext` with `begin(call)`, hands the context to the model, and closes it with
`finish(ctx)`. The model only reads: the context fixes, at call time, every tensor the call's
self-attention attends to (what the state's memory sources give: sink, bank slots, window; see
memflow/memory_sources.py) and collects the call's new K/V; all writes (the sources' commit
hooks, such as the bank prototype, then the KV commit) happen in `finish`, after the model has
run. The call says what `finish` may do:

* `StreamCall.denoise(frame)`: read only.
* `StreamCall.commit_chunk(frame, record_memory)`: the clean re-run of a finished chunk. Its K/V
  go into the cache and, with `record_memory`, its first frame is staged as the bank prototype
  (after the call; a `refresh_memory` of the same call runs before it, on the bank as it was).
* `StreamCall.recache_frames(frame)`: re-encode already generated frames (after a prompt switch).
  It rewrites window slots and never moves the cache pointers.

Memory refreshes (`refresh_memory`: the bank's insert/compress) and the text cache are driven by
the stepper too, before the call, so the model never decides stream policy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .attention import AttentionKernel, attention
from .config import DiTConfig, StreamConfig
from .kv_cache import CachePlan, KVCache
from .memory_bank import sma_select
from .memory_sources import Commit, MemorySource, Piece, Segment, SourceLayout, memory_layout
from .rope import apply_rope
from .stream_call import StreamCall
from .text_cache import TextCache


@dataclass
class StreamDebug:
    """What tests and benchmarks may ask a state to record (off by default: not on the hot
    path). `key_frames`: attended key length in frames of every call, in call order;
    `memory_refreshes`: every memory refresh, with the call it ran before and what each source
    did, by name (the bank's "insert" / "compress"; a source that did nothing is absent)."""

    key_frames: list[int] = field(default_factory=list)
    memory_refreshes: list[tuple[StreamCall, dict[str, str]]] = field(default_factory=list)

    @property
    def last_key_frames(self) -> int:
        return self.key_frames[-1] if self.key_frames else 0


class StreamStateBase:
    """What every stream state shares: the geometry, the text cache, the debug record, the exit
    step and the memory sources (their refresh before a call, their wish to record a commit,
    lookup by name). `StreamState` stores the context as exactly what each call attends;
    `StaticStreamState` (memflow/static_stream.py) in fixed-shape buffers.

    `track_frames`: sources record which latent frames they hold, for readouts (the bank's
    compression choices are read back to the host when a readout asks, never by generation).

    `exit_step` is the last denoising step run on the chunk in flight (set by the stepper's
    denoise, cleared by its commit): the reference's commit inherits that step's bank-refresh
    flag (MemoryOptions.commit_refreshes_after_step0_exit). Never saved: it is None between
    chunks.

    `prefix_frames`: latent frames committed before chunk 0 (a start image or video); chunk n
    covers frames prefix_frames + n * num_frame_per_block onwards.
    """

    sources: tuple[MemorySource, ...]

    def __init__(self, model_config: DiTConfig, stream_config: StreamConfig, latent_height: int,
                 latent_width: int, num_frames: int, debug: bool, track_frames: bool):
        self.config = stream_config
        self.num_layers = model_config.num_layers
        self.track_frames = track_frames
        self.frame_len = model_config.tokens_per_frame(latent_height, latent_width)
        self.frames_per_block = stream_config.num_frame_per_block
        self.num_frames = num_frames
        self.text = TextCache(model_config.num_layers)
        self.debug = StreamDebug() if debug else None
        self.exit_step: int | None = None
        self.prefix_frames = 0  # frames committed before chunk 0 (ChunkStepper.commit_prefix)

    def _use_sources(self, sources: Sequence[MemorySource]) -> None:
        names = [source.name for source in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"memory source names must be unique, got {names}")
        self.sources = tuple(sources)

    def refresh_memory(self, call: StreamCall) -> None:
        """Memory maintenance before `call` (the bank inserts its prototype or compresses, spec
        §3.4), scored with whatever the text cache holds."""
        actions = {}
        for source in self.sources:
            action = source.refresh(self.text)
            if action is not None:
                actions[source.name] = action
        if self.debug is not None:
            self.debug.memory_refreshes.append((call, actions))

    def wants_record(self, chunk: int) -> bool:
        """Whether some source wants the commit of chunk `chunk` recorded."""
        return any(source.wants_record(chunk) for source in self.sources)

    def source(self, name: str) -> MemorySource | None:
        """The source of that name, or None (a layout without it)."""
        return next((s for s in self.sources if s.name == name), None)

    def call_frames(self, call: StreamCall, num_frames: int) -> int:
        """Frames the DiT call carries: its own (a static state pads some)."""
        return num_frames


class StreamState(StreamStateBase):
    """Everything a streaming video carries between DiT calls, sized from the configs.

    Geometry: `frame_len` tokens per latent frame (from the latent size and patch size), chunks
    of `num_frame_per_block` frames, attention over at most `local_attn_size` frames including a
    sink of `sink_size` frames, and a bank of `bank_size` one-frame slots (not counted in the
    window). `cache_frames` is the KV buffer size: by default the window itself (a rolling
    cache); a training rollout passes its length so that nothing is evicted or copied during it
    (the reference's min(local_attn_size + slice_last_frames, num_training_frames)).

    `sources` is the layout of the attended context in key order (default: the layout that
    `stream_config.memory_layout` names, `standard`: sink, bank, window; memflow/memory_sources.py).
    `track_frames`: sources record which latent frames they hold (for readouts; see
    `StreamStateBase`).
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
        cache_frames: int | None = None,
        debug: bool = False,
        track_frames: bool = False,
        sources: SourceLayout | None = None,
    ):
        super().__init__(model_config, stream_config, latent_height, latent_width, num_frames,
                         debug, track_frames)
        window = num_frames if stream_config.local_attn_size == -1 else stream_config.local_attn_size
        capacity = max(window, cache_frames or 0)
        self.kv = KVCache(
            num_layers=model_config.num_layers,
            batch_size=batch_size,
            capacity=capacity * self.frame_len,
            sink_tokens=stream_config.sink_size * self.frame_len,
            max_attention_tokens=window * self.frame_len,
            num_heads=model_config.num_heads,
            head_dim=model_config.head_dim,
            rolling=stream_config.local_attn_size != -1,
            dtype=dtype,
            device=device,
        )
        layout = sources or memory_layout(stream_config.memory_layout)
        self._use_sources(layout(self))

    def state_dict(self) -> dict:
        """Cache, memory sources (the bank) and text cache as plain containers of tensors
        (`torch.save`-able with weights_only loading): a training sequence in flight survives a
        checkpoint with it."""
        return {"kv": self.kv.state_dict(), "text": self.text.state_dict(),
                "sources": {source.name: source.state_dict() for source in self.sources},
                "prefix_frames": self.prefix_frames}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` into a state built with the same configs, sizes and sources."""
        saved, names = list(state["sources"]), [source.name for source in self.sources]
        if saved != names:
            raise ValueError(f"saved stream has memory sources {saved}, this one {names}")
        device = self.kv.k[0].device if self.kv.k else "cpu"
        self.kv.load_state_dict(state["kv"])
        for source in self.sources:
            source.load_state_dict(state["sources"][source.name], device)
        self.text.load_state_dict(state["text"], device)
        self.prefix_frames = int(state.get("prefix_frames", 0))  # absent: saved before prefixes

    def clear_cache_values(self) -> None:
        """Zero the cached K/V, keeping the pointers: the reference's prompt switch without a
        global sink (spec K2, compat only)."""
        self.kv.clear_values()

    def cache_frames(self) -> tuple[list[int], list[int]]:
        """(sink frames, window frames) the KV cache holds now: the sink, then the newest
        window frames."""
        fl, kv = self.frame_len, self.kv
        end, fill, sink = kv.end // fl, kv.fill // fl, kv.sink // fl
        in_sink = min(sink, fill)
        return list(range(in_sink)), list(range(end - (fill - in_sink), end))

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
        """Apply the call's writes after every layer has run: the sources' commit hooks (the
        bank prototype), then the K/V commit."""
        if self.debug is not None and ctx.key_tokens is not None:
            self.debug.key_frames.append(ctx.key_tokens // self.frame_len)
        if not ctx.call.commit:
            return
        if len(ctx.new_kv) != self.kv.num_layers:
            raise RuntimeError("a committing call finished before every layer ran")
        plan = ctx.plan
        commit = Commit(ctx.call, plan, ctx.new_kv, self.frame_len, self.frames_per_block)
        for source in self.sources:
            source.on_commit(commit)
        for layer, (k, v) in sorted(ctx.new_kv.items()):
            self.kv.commit_layer(layer, plan, k, v)
        self.kv.advance(plan)


class CallContext:
    """One DiT call's fixed view of the state: the cache plan and, per layer, the attention
    over the context as it stands now (`layer(i)`)."""

    def __init__(self, state: StreamState, call: StreamCall, plan: CachePlan):
        self.state = state
        self.call = call
        self.plan = plan
        self.new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key_tokens: int | None = None
        cfg = state.config
        self.sma_top_k = cfg.sma_top_k if cfg.sma else None

    @property
    def start_frame(self) -> int:
        return self.call.start_frame

    @property
    def places_frames(self) -> bool:
        """Whether this call lays out positions itself (`positions: relative`)."""
        return self.state.config.positions == "relative"

    @property
    def graph_variant(self) -> None:
        """One variant: compiled blocks run this state's attention eagerly."""
        return None

    def layer(self, index: int, kernel: AttentionKernel | None = None,
              phases: Callable[[int, int], torch.Tensor] | None = None) -> "ChunkAttention":
        """Layer `index`'s self-attention over the context, computed by `kernel` (the model's);
        `phases`: the call's RoPE by frame index, given when it places frames itself."""
        segments = []
        for source in self.state.sources:
            segment = source.read(index, self.plan)
            if segment is not None:
                segments.append(segment)
        return ChunkAttention(
            tuple(segments), self.sma_top_k, self.state.frame_len, context=self, index=index,
            kernel=kernel, phases=phases,
        )

    def record(self, layer: int, k: torch.Tensor, v: torch.Tensor, key_tokens: int) -> None:
        if layer == 0:
            self.key_tokens = key_tokens
        if self.call.commit:
            self.new_kv[layer] = (k.detach(), v.detach())


@dataclass(frozen=True, eq=False)
class ChunkAttention:
    """Self-attention of one layer of one streaming call (spec §2.3): the call's queries attend
    the concatenation of the sources' segments, in order ([sink | bank | window] by default),
    where the sink and window mix committed K/V (fixed here, at call time) with the call's own
    new K/V. With SMA (`sma_top_k`), the frames of the selectable segments (sink and bank) are
    first narrowed to the top k per head (spec §4), in the place of the first of them.

    Positions (`phases`): None, absolute: queries and keys arrive rotated by their frames' places
    in the video, and committed keys were stored so. Given (`positions: relative`): everything
    arrives and is stored un-rotated, and each call lays the attended frames out compactly in key
    order: frame slot i is the i-th attended frame (SMA's candidates all count, so the window's
    slots do not depend on the selection), and each query takes the slot of its own key (a query
    whose key is not attended, the protected sink of a recache, the slot its frame would have).
    Before the cache rolls, slot and frame index coincide and the two modes give the same numbers.

    The committed tensors are never changed in place afterwards (copy-on-write cache and bank),
    so an activation checkpoint that re-runs this attention in backward sees exactly what the
    forward saw."""

    segments: tuple[Segment, ...]
    sma_top_k: int | None
    frame_len: int
    context: CallContext
    index: int
    kernel: AttentionKernel | None = None
    phases: Callable[[int, int], torch.Tensor] | None = None

    @torch.compiler.disable  # slices by host numbers: a compiled block calls it eagerly
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        before: list[Piece] = []  # in key order: what precedes the SMA candidates, ...
        candidates: list[Piece] = []
        after: list[Piece] = []  # ... and what follows them
        for segment in self.segments:
            pieces = segment.pieces(k, v)
            if self.sma_top_k is not None and segment.selectable:
                candidates += pieces
            elif candidates:
                after += pieces
            else:
                before += pieces
        if self.phases is not None:
            q, before, candidates, after = self._placed(q, before, candidates, after)
        keys = [p.k for p in before]
        values = [p.v for p in before]
        if candidates:
            sel_k, sel_v = sma_select(
                q, torch.cat([p.k for p in candidates], dim=1),
                torch.cat([p.v for p in candidates], dim=1), self.frame_len, self.sma_top_k,
            )
            keys.append(sel_k)
            values.append(sel_v)
        keys += [p.k for p in after]
        values += [p.v for p in after]
        all_k, all_v = torch.cat(keys, dim=1), torch.cat(values, dim=1)
        self.context.record(self.index, k, v, all_k.shape[1])
        return attention(q, all_k, all_v, kernel=self.kernel)

    def _placed(self, q: torch.Tensor, *groups: list[Piece]) -> tuple:
        """Relative positions: each piece's keys rotated by their slots, in key order, and the
        queries by the slots of their own keys."""
        fl = self.frame_len
        slot, placed, own = 0, [], {}  # own: the call's frame -> its slot
        for group in groups:
            rotated = []
            for piece in group:
                frames = piece.k.shape[1] // fl
                if frames == 0:
                    rotated.append(piece)
                    continue
                if piece.new is not None:
                    own.update({piece.new.start // fl + j: slot + j for j in range(frames)})
                rotated.append(piece._replace(k=apply_rope(piece.k, self.phases(slot, frames))))
                slot += frames
            placed.append(rotated)
        q_frames = q.shape[1] // fl
        first = min(own, default=0)
        base = own.get(first, slot) - first  # a frame without a key sits where its run would
        slots = [own.get(j, base + j) for j in range(q_frames)]
        runs: list[list[int]] = []  # [first slot, frames]: consecutive slots, one phases call
        for s_j in slots:
            if runs and s_j == runs[-1][0] + runs[-1][1]:
                runs[-1][1] += 1
            else:
                runs.append([s_j, 1])
        q_phases = torch.cat([self.phases(start, n) for start, n in runs])
        return (apply_rope(q, q_phases), *placed)
