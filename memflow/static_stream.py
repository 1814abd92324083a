"""The static stream state: fixed shapes, in-place writes, no host reads (`compile: true`).

`StreamState` (memflow/streaming.py) gives each call exactly the tensors it attends, so its key
length grows through the warm-up, its cache rolls by copying, and every layer of every call
concatenates sink, bank and window into a new tensor. That is the reference's arithmetic, bit for
bit, but a compiler sees a new shape at every chunk of the warm-up and a GPU waits for
allocations. `StaticStreamState` keeps the same stream (the same frames attended, the same bank
policy, the same positions) in one preallocated *arena* per layer:

    [ sink (S frames) | bank (M slots) | selection (K) | window ring (R frames) | scratch (1) ]

* A call writes its new K/V in place (`index_copy_`) into the slots of its frames: sink frame f
  at slot f, a later frame f at ring slot (f - S) mod R (R = local_attn_size - S, exactly the
  window frames a call attends, so a chunk's frames overwrite the frames it no longer attends).
  Frames that are not written (a recache's protected sink, frames older than the window, a
  recache's padding) go to the scratch frame, which is never attended.
* Attention reads one slice of the arena (scratch excluded) with a boolean key mask of fixed
  length: the frames a call of `StreamState` would attend are exactly the valid ones (slots not
  yet filled are masked), so the two states agree up to the order of the keys (floating-point
  round-off). Once every key of the slice is valid (the steady state, known on the host) a call
  passes no mask, so a flash kernel can take it; masked and dense calls are two graph variants.
* SMA (`sma_top_k` < S + M) writes each head's top-k sink/bank frames into the selection slots
  and attention reads [selection | window]; invalid candidates score -inf.
* The bank (`StaticBank`) is the same policy as `MemoryBank`, stored in the arena's bank slots.
* Positions: absolute keys are stored rotated (as in `StreamState`). Relative keys are stored
  un-rotated and the attended slice is rotated per call by each frame's place in the context (the
  one allocation that grows with the context here: a rotated copy of the keys).
* Every call has one of two shapes: a chunk, or a recache padded to the attention window (its
  padding frames are computed and discarded; the SMA query mean counts only real frames), each
  masked or dense: at most four compiled graphs.

Everything a call varies by (write slots, masks, phases) is a small tensor made from host-side
counters, never read back from the device, so a compiled block (`WanDiT.compile_blocks`) sees the
same shapes from the first chunk to the last: no recompilation, no host synchronisation.

Limits: inference only (no `state_dict`, no gradient through the arena) and the `standard`
memory layout with a rolling window; `StreamConfig.check_static` says so in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import AttentionKernel, attention
from .config import DiTConfig, StreamConfig
from .memory_bank import MemoryBank, nam_scores, nam_select
from .memory_sources import BankSource
from .rope import apply_rope
from .stream_call import StreamCall
from .streaming import StreamState, StreamStateBase


@dataclass(frozen=True)
class ArenaLayout:
    """Frame slots of one layer's arena, in order: sink, bank, selection, ring, scratch."""

    sink: int
    bank: int
    selection: int
    ring: int

    @property
    def bank_start(self) -> int:
        return self.sink

    @property
    def candidates(self) -> int:
        """Sink and bank frames: what SMA chooses among."""
        return self.sink + self.bank

    @property
    def ring_start(self) -> int:
        return self.candidates + self.selection

    @property
    def scratch(self) -> int:
        return self.ring_start + self.ring

    @property
    def frames(self) -> int:
        return self.scratch + 1

    @property
    def read_start(self) -> int:
        """First slot attention reads: past the candidates when SMA selects among them."""
        return self.candidates if self.selection else 0

    @property
    def read_end(self) -> int:
        """Slot past the last one attention reads: the scratch frame is never read."""
        return self.scratch


class StaticBank(MemoryBank):
    """`MemoryBank`'s policy with its slots in the arena (views [B, M*frame_len, H, D] per
    layer) and preallocated prototype buffers: insert and compress write in place."""

    def __init__(self, slots_k: list[torch.Tensor], slots_v: list[torch.Tensor], **kwargs):
        self._arena_k, self._arena_v = slots_k, slots_v
        super().__init__(num_layers=len(slots_k), **kwargs)

    def _reset_storage(self) -> None:
        for view in (*self._arena_k, *self._arena_v):
            view.zero_()
        self.proto_k = [torch.zeros_like(k[:, : self.frame_len]) for k in self._arena_k]
        self.proto_v = [torch.zeros_like(v[:, : self.frame_len]) for v in self._arena_v]

    def read(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        fl, used = self.frame_len, self.used_slots
        return ([self._arena_k[layer][:, i * fl : (i + 1) * fl] for i in range(used)],
                [self._arena_v[layer][:, i * fl : (i + 1) * fl] for i in range(used)])

    def stage_layer(self, layer: int, k_frame: torch.Tensor, v_frame: torch.Tensor) -> None:
        self.proto_k[layer].copy_(k_frame)
        self.proto_v[layer].copy_(v_frame)

    def _insert_layer(self, layer: int, slot: int) -> None:
        fl = self.frame_len
        self._arena_k[layer][:, slot * fl : (slot + 1) * fl].copy_(self.proto_k[layer])
        self._arena_v[layer][:, slot * fl : (slot + 1) * fl].copy_(self.proto_v[layer])

    def _compress_layer(self, layer: int, text_keys: torch.Tensor,
                        text_mask: torch.Tensor | None) -> torch.Tensor:
        slots_k, slots_v = self._arena_k[layer], self._arena_v[layer]
        b, _, h, d = slots_k.shape
        fl, keep = self.frame_len, self.slots - 1
        scores = nam_scores(text_keys, slots_k, fl, text_mask, self.options)
        idx = nam_select(scores, keep, self.options.keep_order)  # [B, keep]
        gather_idx = idx.view(b, keep, 1, 1, 1).expand(-1, -1, fl, h, d)
        for slots, proto in ((slots_k, self.proto_k[layer]), (slots_v, self.proto_v[layer])):
            frames = slots.view(b, self.slots, fl, h, d)
            kept = torch.gather(frames, 1, gather_idx)
            frames[:, :keep].copy_(kept)
            frames[:, keep].copy_(proto)
        return idx


@dataclass(frozen=True, eq=False)
class CallTensors:
    """What one call varies by, as device tensors shared by its layers.

    `write`: arena token of each of the call's tokens [Lq]; `key_mask`: attended arena tokens
    of the read slice [Lk] (None: all of them); `candidate_mask` [S + M] frames SMA may choose; `query_weight`
    [Lq]: 1/n on the call's real tokens (the SMA query mean); `query_phases` / `key_phases`:
    relative positions only (None: absolute, the model rotated q and k)."""

    write: torch.Tensor
    key_mask: torch.Tensor | None
    candidate_mask: torch.Tensor
    query_weight: torch.Tensor
    query_phases: torch.Tensor | None = None
    key_phases: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class StaticAttention:
    """Self-attention of one layer of one call on the arena: write the call's K/V, select memory
    (SMA), attend the arena slice under the key mask. Only tensors and per-stream constants, so
    a compiled block traces it without a guard that changes between calls."""

    k_arena: torch.Tensor  # [B, T*frame_len, H, D]
    v_arena: torch.Tensor
    call: CallTensors
    layout: ArenaLayout
    frame_len: int
    kernel: AttentionKernel | None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c, lay, fl = self.call, self.layout, self.frame_len
        self.k_arena.index_copy_(1, c.write, k)
        self.v_arena.index_copy_(1, c.write, v)
        keys, values = self.k_arena, self.v_arena
        if c.key_phases is not None:  # relative: the stored keys are placed for this call
            q = apply_rope(q, c.query_phases)
            keys = apply_rope(keys, c.key_phases)
        mask = None if c.key_mask is None else c.key_mask.view(1, 1, 1, -1)
        if lay.selection:
            mask = self._select(q, keys, values, mask)
        start, end = lay.read_start * fl, lay.read_end * fl
        return attention(q, keys[:, start:end], values[:, start:end], mask, kernel=self.kernel)

    def _select(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor | None:
        """SMA: each head's top-k candidate frames into the selection slots (spec §4: the
        query chunk's token mean against each frame's key mean); returns the key mask with the
        selection's validity per head [B, H, 1, Lk] (None on a dense call: every candidate, so
        every chosen frame, is valid)."""
        lay, fl = self.layout, self.frame_len
        b, _, h, d = keys.shape
        n, top = lay.candidates, lay.selection
        phi_q = torch.einsum("blhd,l->bhd", q, self.call.query_weight.to(q.dtype))
        phi_k = keys[:, : n * fl].reshape(b, n, fl, h, d).mean(dim=2)  # [B, F, H, D]
        relevance = torch.einsum("bhd,bfhd->bhf", phi_q, phi_k).float()
        relevance = relevance.masked_fill(~self.call.candidate_mask, float("-inf"))
        idx = torch.topk(relevance, k=top, dim=-1).indices.sort(dim=-1).values  # [B, H, K]
        gather_idx = idx[..., None, None].expand(-1, -1, -1, fl, d)
        for arena in (keys, values):
            per_head = arena[:, : n * fl].reshape(b, n, fl, h, d).permute(0, 3, 1, 2, 4)
            chosen = torch.gather(per_head, 2, gather_idx)  # [B, H, K, fl, D]
            sel = arena[:, n * fl : (n + top) * fl].view(b, top, fl, h, d)
            sel.copy_(chosen.permute(0, 2, 3, 1, 4))
        if mask is None:
            return None
        chosen_valid = self.call.candidate_mask.expand(b, h, n).gather(2, idx)  # [B, H, K]
        sel_mask = chosen_valid[..., None].expand(-1, -1, -1, fl).reshape(b, h, 1, top * fl)
        rest = mask[..., top * fl :].expand(b, h, 1, -1)
        return torch.cat([sel_mask, rest], dim=-1)


@dataclass
class _CallPlan:
    """Host-side plan of one call, in frames: where each of its frames is written (arena slot)
    and which arena frames it attends, with each attended frame's place (relative positions)."""

    write_slots: list[int]
    valid: list[bool]  # per arena frame
    dense: bool  # every frame attention reads is valid: the call needs no key mask
    key_place: list[int]  # per arena frame: its slot in the attended context (relative)
    query_place: list[int]  # per call frame
    real_frames: int
    commits: bool
    first_frame: int
    end: int


class StaticStreamState(StreamStateBase):
    """`StreamState`'s interface (begin/finish, refresh_memory, text cache, bank) on a static
    arena; see the module docstring. Built by `ChunkStepper.new_state` when the stream config
    asks for `static_shapes`."""

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
        debug: bool = False,
        track_frames: bool = False,
    ):
        stream_config.check_static()
        super().__init__(model_config, stream_config, latent_height, latent_width, num_frames,
                         debug, track_frames)
        cfg, fl = stream_config, self.frame_len
        self.window = cfg.local_attn_size
        self.bank_read = cfg.sink_size > 0 or not cfg.memory.bank_requires_sink
        candidates = cfg.sink_size + cfg.bank_size
        selection = cfg.sma_top_k if cfg.sma and cfg.sma_top_k < candidates else 0
        self.layout = ArenaLayout(cfg.sink_size, cfg.bank_size, selection,
                                  cfg.local_attn_size - cfg.sink_size)
        shape = (batch_size, self.layout.frames * fl, model_config.num_heads,
                 model_config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.device = torch.device(device)
        if self.device.type == "cuda":  # fixed addresses: a captured CUDA graph replays on them
            for arena in (*self.k, *self.v):
                torch._dynamo.mark_static_address(arena)
        bank_slice = slice(self.layout.bank_start * fl, self.layout.candidates * fl)
        self.bank = StaticBank(
            [k[:, bank_slice] for k in self.k], [v[:, bank_slice] for v in self.v],
            slots=cfg.bank_size, frame_len=fl, record_interval=cfg.record_interval,
            options=cfg.memory, track_frames=track_frames)
        self._use_sources([BankSource(self.bank, attended=self.bank_read)])
        self.end = 0  # frames committed

    def call_frames(self, call: StreamCall, num_frames: int) -> int:
        """Frames the DiT call carries: a recache is padded to the attention window, so every
        call is a chunk or a window (two shapes)."""
        if call.recache:
            if num_frames > self.window:
                raise ValueError(f"a static stream re-encodes at most the attention window "
                                 f"({self.window} frames), got {num_frames}")
            return self.window
        return num_frames

    def clear_cache_values(self) -> None:
        """Zero the sink and window (not the bank): the reference's switch without a global
        sink (compat only)."""
        fl, lay = self.frame_len, self.layout
        for arena in (*self.k, *self.v):
            arena[:, : lay.sink * fl].zero_()
            arena[:, lay.ring_start * fl :].zero_()

    def cache_frames(self) -> tuple[list[int], list[int]]:
        """(sink frames, window frames) held now."""
        sink = min(self.layout.sink, self.end)
        lo = max(sink, self.end - self.layout.ring)
        return list(range(sink)), list(range(lo, self.end))

    def begin(self, call: StreamCall, num_frames: int) -> "StaticCallContext":
        plan = self._plan(call, num_frames)
        if self.debug is not None:  # frames attended: SMA's choice in place of its candidates
            candidates = sum(plan.valid[: self.layout.candidates])
            chosen = min(candidates, self.layout.selection) if self.layout.selection else candidates
            self.debug.key_frames.append(sum(plan.valid) - candidates + chosen)
        return StaticCallContext(self, call, plan)

    def finish(self, ctx: "StaticCallContext") -> None:
        """After every layer wrote its K/V: stage the bank prototype (the chunk's first frame,
        now in its slot) and move the end of the stream."""
        plan = ctx.plan
        if not plan.commits:
            return
        if ctx.call.record_memory:
            fl = self.frame_len
            slot = plan.write_slots[0]
            for layer in range(self.num_layers):
                self.bank.stage_layer(layer, self.k[layer][:, slot * fl : (slot + 1) * fl],
                                      self.v[layer][:, slot * fl : (slot + 1) * fl])
            chunk_index = plan.end // self.frames_per_block - 1
            self.bank.finish_stage(chunk_index, plan.first_frame)
        self.end = plan.end

    def state_dict(self) -> dict:
        raise NotImplementedError("a static stream state is not saved (inference only)")

    # -- planning, on the host ---------------------------------------------------------------------
    def _slot(self, frame: int) -> int:
        lay = self.layout
        if frame < lay.sink:
            return frame
        return lay.ring_start + (frame - lay.sink) % lay.ring if lay.ring else lay.scratch

    def _plan(self, call: StreamCall, num_frames: int) -> _CallPlan:
        lay, s = self.layout, call.start_frame
        end = s + num_frames
        recompute = end <= self.end and (s > 0 or (call.protect_sink and self.end > 0))
        if call.recache and not recompute and s > 0:
            raise ValueError("a recache call must cover frames that are already committed")
        if not recompute and s != self.end and not call.recache:  # (a recache from frame 0
            # without sink protection rewrites the sink: the reference's, spec K3)
            raise ValueError(f"a static stream continues at frame {self.end}, not {s}")
        new_end = max(self.end, end)
        window_lo = max(lay.sink, new_end - lay.ring)
        padded = self.call_frames(call, num_frames)
        write = []
        for j in range(padded):
            f = s + j
            if j >= num_frames or (f < lay.sink and recompute) or (lay.sink <= f < window_lo):
                write.append(lay.scratch)
            else:
                write.append(self._slot(f))
        valid = [False] * lay.frames
        place = [0] * lay.frames
        for f in range(lay.sink):
            valid[f], place[f] = True, f
        used = self.bank.used_slots if self.bank_read else 0
        for i in range(used):
            valid[lay.bank_start + i], place[lay.bank_start + i] = True, lay.sink + i
        first_window_place = lay.sink + used
        for f in range(window_lo, new_end):
            slot = self._slot(f)
            valid[slot], place[slot] = True, first_window_place + f - window_lo
        own = {j: place[slot] for j, slot in enumerate(write) if slot != lay.scratch}
        first = min(own, default=0)
        base = own.get(first, first_window_place + new_end - window_lo) - first
        query_place = [own.get(j, base + j) for j in range(padded)]
        # with SMA the selection slots are as valid as the candidates they are chosen from
        read = valid[: lay.candidates] + valid[lay.ring_start : lay.read_end] if lay.selection \
            else valid[lay.read_start : lay.read_end]
        dense = all(read)
        return _CallPlan(write, valid, dense, place, query_place, num_frames,
                         commits=call.commit and not recompute, first_frame=s, end=end)

    def call_tensors(self, plan: _CallPlan, phases: Callable[[int, int], torch.Tensor] | None
                     ) -> CallTensors:
        """The plan as device tensors (host to device copies only)."""
        fl, lay, dev = self.frame_len, self.layout, self.device
        offsets = torch.arange(fl, device=dev)

        def tokens(frames: list[int]) -> torch.Tensor:
            return (torch.tensor(frames, device=dev)[:, None] * fl + offsets).reshape(-1)

        def per_token(values: list) -> torch.Tensor:
            return torch.tensor(values, device=dev).repeat_interleave(fl)

        key_mask = None if plan.dense else per_token(plan.valid[lay.read_start : lay.read_end])
        weights = [1.0 / plan.real_frames / fl] * plan.real_frames
        query_weight = per_token(weights + [0.0] * (len(plan.write_slots) - plan.real_frames))
        candidates = torch.tensor(plan.valid[: lay.candidates], device=dev)
        query_phases = key_phases = None
        if phases is not None:
            places = max(max(plan.key_place), max(plan.query_place)) + 1
            table = phases(0, places)
            query_phases = table.index_select(0, tokens(plan.query_place))
            key_phases = table.index_select(0, tokens(plan.key_place))
        return CallTensors(tokens(plan.write_slots), key_mask, candidates, query_weight.float(),
                           query_phases, key_phases)


@dataclass(eq=False)
class StaticCallContext:
    """One call on a `StaticStreamState`: the model's `LayerAttention` (memflow/model.py)."""

    state: StaticStreamState
    call: StreamCall
    plan: _CallPlan
    _tensors: CallTensors | None = field(default=None, repr=False)

    @property
    def start_frame(self) -> int:
        return self.call.start_frame

    @property
    def places_frames(self) -> bool:
        return self.state.config.positions == "relative"

    @property
    def graph_variant(self) -> str:
        """A masked call (warm-up) and a dense one (steady state) trace different graphs."""
        return "dense" if self.plan.dense else "masked"

    def layer(self, index: int, kernel: AttentionKernel | None = None,
              phases: Callable[[int, int], torch.Tensor] | None = None) -> StaticAttention:
        if self._tensors is None:
            self._tensors = self.state.call_tensors(self.plan, phases)
        return StaticAttention(self.state.k[index], self.state.v[index], self._tensors,
                               self.state.layout, self.state.frame_len, kernel)


# either state: what the chunk loop and a stream drive
AnyStreamState = StreamState | StaticStreamState
