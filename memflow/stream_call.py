"""What one DiT call of a stream may do to its state (see memflow/streaming.py).

Its own module because the stream state and its memory sources both read it: the state decides by
it what `finish` commits, a source whether a commit records memory.
"""
from __future__ import annotations

from dataclasses import dataclass


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
    def commit_chunk(
        cls, start_frame: int, record_memory: bool, refresh_memory: bool = False
    ) -> "StreamCall":
        return cls(start_frame, commit=True, refresh_memory=refresh_memory,
                   record_memory=record_memory)

    @classmethod
    def recache_frames(
        cls, start_frame: int, refresh_memory: bool = True, protect_sink: bool = False
    ) -> "StreamCall":
        return cls(
            start_frame, commit=True, refresh_memory=refresh_memory, recache=True,
            protect_sink=protect_sink,
        )
