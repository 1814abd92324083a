"""The current prompt's cross-attention K/V, per layer, kept between the calls of a stream.

Its own module because the stream state fills it and the memory sources read it (the bank scores
its frames against the prompt's keys).
"""
from __future__ import annotations

import torch


class TextCache:
    """Per-layer cross-attention K/V of the current prompt ([B, T, H, D] each), without graph.

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

    def fill(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        for layer, (k, v) in enumerate(kv):
            self.k[layer], self.v[layer] = k.detach(), v.detach()
        self._zeros = torch.zeros_like(self.k[0])
        self.mask = mask

    def state_dict(self) -> dict:
        return {"k": list(self.k), "v": list(self.v), "mask": self.mask, "zeros": self._zeros}

    def load_state_dict(self, state: dict, device: torch.device | str) -> None:
        def put(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, copy=True)

        self.k = [put(t) for t in state["k"]]
        self.v = [put(t) for t in state["v"]]
        self.mask, self._zeros = put(state["mask"]), put(state["zeros"])

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.complete:
            raise RuntimeError("text cache is empty; build it from the prompt first")
        return list(zip(self.k, self.v))  # type: ignore[arg-type]

    def keys(self, layer: int) -> torch.Tensor:
        k = self.k[layer]
        if k is not None:
            return k
        if self._zeros is None:
            raise RuntimeError("text cache was never built; build it from the prompt first")
        return self._zeros
