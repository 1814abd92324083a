"""The memory bank: Narrative Adaptive Memory (NAM) and Sparse Memory Activation (SMA).

The bank holds up to `slots` past latent frames per layer (RoPE'd keys and raw values, one frame
of tokens per slot). Its life cycle per chunk (spec §3):

1. **stage** (inside the committing clean re-run of chunk n): when the record policy says so, the
   chunk's first latent frame becomes the pending *prototype* and the count of opened slots
   becomes n // record_interval + 1.
2. **refresh** (before any layer runs, on the first denoising call of the next chunk, on a
   recache and, in compat mode, on the commit of a chunk whose denoising exited at step 0): the
   prototype is written into the next free slot; once every slot is used, `nam_select` keeps the
   `slots - 1` stored frames that the chunk's prompt finds most relevant and the prototype is
   appended.
3. **read** (every self-attention call): the used slots sit between the sink and the local
   window; with SMA on, `sma_select` keeps only the top-k sink/bank frames per head.

The stream drives the bank through its memory source (`BankSource` in memflow/memory_sources.py:
stage on commit, refresh before a call, read per layer).

Invariants: only `refresh` changes the bank's K/V; only `stage` changes the prototype and the
opened count; denoising calls only read. Nothing is changed in place: each slot is its own
tensor, and a refresh replaces the slot list (copy on write), so the frames an earlier call
attended keep their values for the backward pass of a training rollout.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from .config import MemoryOptions

RefreshAction = Literal["insert", "compress"]


def nam_scores(
    text_keys: torch.Tensor,
    frame_keys: torch.Tensor,
    frame_len: int,
    text_mask: torch.Tensor | None,
    options: MemoryOptions,
) -> torch.Tensor:
    """Relevance of each stored frame to the prompt, [B, num_frames].

    text_keys: [B, T, H, D], the cross-attention key projections of the prompt (they act as
    queries, as in the reference); frame_keys: [B, num_frames * frame_len, H, D].

    "mean_qk" (reference): mean over text positions (padding included), heads and frame tokens of
    q.k / sqrt(D), no softmax. "softmax_masked": for each real text token and head, softmax over
    all stored tokens, then the attention mass each frame receives, averaged.
    """
    b, length, h, d = frame_keys.shape
    if options.score_in_fp32:
        text_keys, frame_keys = text_keys.float(), frame_keys.float()
    q = text_keys.permute(0, 2, 1, 3).reshape(b * h, -1, d)
    k = frame_keys.permute(0, 2, 1, 3).reshape(b * h, length, d)
    logits = torch.bmm(q, k.transpose(1, 2)) * (d**-0.5)  # [B*H, T, L]
    if options.bank_score == "mean_qk":
        per_token = logits.mean(dim=1).view(b, h, length).mean(dim=1)
        return per_token.view(b, -1, frame_len).mean(dim=2)
    probs = logits.float().softmax(dim=-1).view(b, h, -1, length)
    if text_mask is None:
        text_mask = torch.ones(b, probs.shape[2], dtype=torch.bool, device=probs.device)
    weights = text_mask.to(probs.dtype)[:, None, :, None]
    count = text_mask.sum(dim=1).clamp(min=1).to(probs.dtype)
    per_token = (probs * weights).sum(dim=2).mean(dim=1) / count[:, None]
    return per_token.view(b, -1, frame_len).sum(dim=2)


def nam_select(scores: torch.Tensor, keep: int, order: str = "score_desc") -> torch.Tensor:
    """Indices [B, keep] of the frames to keep: the top `keep` by score, in descending score
    order (reference) or in temporal/slot order."""
    keep = min(keep, scores.shape[1])
    idx = torch.topk(scores, k=keep, dim=1).indices
    if order == "temporal":
        idx = idx.sort(dim=1).values
    return idx


def sma_select(
    q: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor, frame_len: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse Memory Activation: keep, per head, the `top_k` memory frames most relevant to the
    query chunk (spec §4).

    q: [B, Lq, H, D] RoPE'd queries of the chunk; mem_k/mem_v: [B, F*frame_len, H, D], the sink
    and bank frames. Descriptors are token means (one per head for the whole query chunk, one per
    memory frame); relevance is their inner product. The kept frames stay in temporal order.
    Returns K/V of shape [B, k*frame_len, H, D] whose frames may differ per head.
    """
    b, length, h, d = mem_k.shape
    frames = length // frame_len
    k_sel = min(top_k, frames)
    if k_sel == frames:
        return mem_k, mem_v
    phi_q = q.mean(dim=1).unsqueeze(2)  # [B, H, 1, D]
    k_frames = mem_k.view(b, frames, frame_len, h, d)
    phi_k = k_frames.mean(dim=2).permute(0, 2, 1, 3)  # [B, H, F, D]
    relevance = torch.matmul(phi_q, phi_k.transpose(-2, -1)).squeeze(2)  # [B, H, F]
    idx = torch.topk(relevance, k=k_sel, dim=-1).indices.sort(dim=-1).values  # [B, H, k]
    gather_idx = idx[..., None, None].expand(-1, -1, -1, frame_len, d)

    def pick(x: torch.Tensor) -> torch.Tensor:
        per_head = x.view(b, frames, frame_len, h, d).permute(0, 3, 1, 2, 4)
        chosen = torch.gather(per_head, 2, gather_idx)  # [B, H, k, frame_len, D]
        return chosen.reshape(b, h, k_sel * frame_len, d).permute(0, 2, 1, 3)

    return pick(mem_k), pick(mem_v)


class MemoryBank:
    """Per-layer lists of slot frames ([B, frame_len, H, D] each) plus the staged prototype.

    `opened` counts slots opened so far (the reference's W / frame_len); it grows past `slots`
    once the bank is saturated, after which refreshes compress instead of inserting. With
    `track_frames`, `slot_frames[layer]` and `prototype_frame` record which absolute latent frame
    each slot holds (batch element 0), for readouts (the live memory view) and tests. A
    compression's choice stays on the device until `slot_frames` is read: that readout pays one
    host sync for every compression since the last, and generation pays none.
    """

    def __init__(
        self,
        num_layers: int,
        slots: int,
        frame_len: int,
        record_interval: int,
        options: MemoryOptions,
        track_frames: bool = False,
    ):
        self.num_layers = num_layers
        self.slots = slots
        self.frame_len = frame_len
        self.record_interval = record_interval
        self.options = options
        self.track_frames = track_frames
        self.reset()

    @property
    def used_slots(self) -> int:
        return min(self.opened, self.slots)

    def reset(self) -> None:
        self._reset_storage()
        self.opened, self.fresh, self.prototype_frame = 0, False, None
        self._slot_frames: list[list[int | None]] = [[] for _ in range(self.num_layers)]
        # compressions not yet read back: (kept slots [layers, B, keep] on the device, the
        # prototype frame appended after them)
        self._unread: list[tuple[torch.Tensor, int | None]] = []
        self._last_selection: list[list[list[int]]] | None = None

    @property
    def slot_frames(self) -> list[list[int | None]]:
        """Per layer, the latent frame each slot holds (needs `track_frames`); reading it brings
        the compressions' choices to the host (one transfer for all of them)."""
        self._read_back()
        return self._slot_frames

    @property
    def last_selection(self) -> list[list[list[int]]] | None:
        """The last compression's kept slots, [layer][batch][kept slot] (with `track_frames`)."""
        self._read_back()
        return self._last_selection

    def _reset_storage(self) -> None:
        self.k: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self.v: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self.proto_k: list[torch.Tensor | None] = [None] * self.num_layers
        self.proto_v: list[torch.Tensor | None] = [None] * self.num_layers

    def _read_back(self) -> None:
        if not self._unread:
            return
        chosen = torch.stack([idx for idx, _ in self._unread]).cpu().tolist()
        for per_layer, (_, prototype) in zip(chosen, self._unread):
            for layer, per_batch in enumerate(per_layer):
                old = self._slot_frames[layer]
                self._slot_frames[layer] = [old[i] for i in per_batch[0]] + [prototype]
            self._last_selection = per_layer
        self._unread = []

    def state_dict(self) -> dict:
        """Slots, staged prototype and counters (plain containers of tensors), for resuming a
        training sequence."""
        return {
            "k": [list(slots) for slots in self.k], "v": [list(slots) for slots in self.v],
            "proto_k": list(self.proto_k), "proto_v": list(self.proto_v),
            "opened": self.opened, "fresh": self.fresh, "prototype_frame": self.prototype_frame,
            "slot_frames": [list(frames) for frames in self.slot_frames],
        }

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        def put(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device or t.device, copy=True)

        if len(state["k"]) != self.num_layers:
            raise ValueError(f"saved bank has {len(state['k'])} layers, this one {self.num_layers}")
        self.k = [[put(t) for t in slots] for slots in state["k"]]
        self.v = [[put(t) for t in slots] for slots in state["v"]]
        self.proto_k = [put(t) for t in state["proto_k"]]
        self.proto_v = [put(t) for t in state["proto_v"]]
        self.opened, self.fresh = int(state["opened"]), bool(state["fresh"])
        self.prototype_frame = state["prototype_frame"]
        self._slot_frames = [list(frames) for frames in state["slot_frames"]]
        self._unread = []

    def wants_prototype(self, chunk_index: int) -> bool:
        """Whether the commit of this chunk stages a prototype (the record policy, spec Q1)."""
        if self.slots == 0:
            return False
        if self.options.record_policy == "every_chunk":
            return True
        return chunk_index % self.record_interval == 0

    def stage_layer(self, layer: int, k_frame: torch.Tensor, v_frame: torch.Tensor) -> None:
        """Store one layer's prototype (the first frame of the chunk just committed)."""
        self.proto_k[layer] = k_frame.detach().clone()
        self.proto_v[layer] = v_frame.detach().clone()

    def finish_stage(self, chunk_index: int, frame_index: int) -> None:
        """After all layers staged: open the slot this chunk's interval maps to."""
        self.opened = chunk_index // self.record_interval + 1
        self.fresh = True
        self.prototype_frame = frame_index

    def read(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The used slots of one layer, in slot order (lists of [B, frame_len, H, D])."""
        return list(self.k[layer]), list(self.v[layer])

    def refresh(
        self,
        text_keys: Callable[[int], torch.Tensor],
        text_mask: torch.Tensor | None = None,
    ) -> RefreshAction | None:
        """Insert the prototype into the next slot, or compress when the bank is full; returns
        which of the two it did (None: nothing).

        `text_keys(layer)` gives that layer's prompt key projections [B, T, H, D] (all zeros when
        the text cache is empty, which is what the reference scores with right after a switch).
        Without `reinsert_stale_prototype`, nothing happens unless a new prototype was staged
        since the last refresh.
        """
        if self.opened < 1 or self.slots == 0:
            return None
        if not self.fresh and not self.options.reinsert_stale_prototype:
            return None
        action: RefreshAction = "insert" if self.opened <= self.slots else "compress"
        if action == "insert":
            slot = self.opened - 1
            for layer in range(self.num_layers):
                self._insert_layer(layer, slot)
                if self.track_frames:  # (no compression is unread: inserts come first)
                    self._slot_frames[layer] = _put(self._slot_frames[layer], slot,
                                                    self.prototype_frame)
        else:
            chosen = [
                self._compress_layer(layer, text_keys(layer), text_mask)
                for layer in range(self.num_layers)
            ]
            if self.track_frames:
                self._unread.append((torch.stack(chosen), self.prototype_frame))
        self.fresh = False
        return action

    def _insert_layer(self, layer: int, slot: int) -> None:
        """Put the prototype into `slot` of one layer (a new slot list: copy on write)."""
        self.k[layer] = _put(self.k[layer], slot, self.proto_k[layer])
        self.v[layer] = _put(self.v[layer], slot, self.proto_v[layer])

    def _compress_layer(
        self, layer: int, text_keys: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Keep the `slots - 1` stored frames the prompt scores highest, then the prototype."""
        stored_k = torch.stack(self.k[layer], dim=1)  # [B, slots, frame_len, H, D]
        scores = nam_scores(text_keys, stored_k.flatten(1, 2), self.frame_len, text_mask, self.options)
        idx = nam_select(scores, self.slots - 1, self.options.keep_order)  # [B, keep]
        b, keep = idx.shape
        gather_idx = idx.view(b, keep, 1, 1, 1).expand(-1, -1, *stored_k.shape[2:])
        for bufs, protos, stored in (
            (self.k, self.proto_k, stored_k),
            (self.v, self.proto_v, None),
        ):
            if stored is None:
                stored = torch.stack(bufs[layer], dim=1)
            kept = torch.gather(stored, 1, gather_idx)
            bufs[layer] = list(kept.unbind(1)) + [protos[layer]]
        return idx


def _put(items: list, index: int, value) -> list:
    """A copy of `items` with `items[index] = value`; slots never written before read as zeros
    (as the reference's zero-initialised buffers do)."""
    out = list(items)
    while len(out) <= index:
        out.append(torch.zeros_like(value) if isinstance(value, torch.Tensor) else None)
    out[index] = value
    return out
