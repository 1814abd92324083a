"""What the server sends one client: a bounded, thread-safe outgoing queue, and the JPEG encoder.

The generation thread puts frames and JSON messages in; the client's sender coroutine takes them
out. Generation never waits for a client: when `max_frames` frames are already waiting, the
oldest one is dropped (and counted), so a slow client sees the newest video with gaps, and the
memory held for it is bounded by the queue size whatever its speed. Messages that describe the
current state (`status`, `memory`, `timeline`) replace a queued message of the same type, so
they never pile up either; other messages are capped at `max_messages` (oldest dropped).

Frames leave only while the client has acknowledged all but `window` of the frames sent to it
(`ack`), which bounds what sits in socket buffers (and so the latency) as well.

An outbox ends in one of two ways, and either way its sender finishes at once: `close` (the
server ends the connection: queued frames are dropped, queued messages and the close frame are
sent) or `abandon` (the client is gone: everything queued is dropped). Frames held back by the
ack window must never keep a sender waiting for a client that will not acknowledge them.
"""
from __future__ import annotations

import asyncio
import io
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .protocol import FRAME_HEADER

COALESCED = ("status", "memory", "timeline")


@dataclass
class Frame:
    data: bytes  # header + JPEG


@dataclass
class Close:
    code: int
    reason: str


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """One uint8 [H, W, 3] frame as JPEG bytes (4:2:0, like browsers' own encoders)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def frame_message(rgb: np.ndarray, pixel_frame: int, chunk: int, quality: int) -> Frame:
    return Frame(FRAME_HEADER.pack(pixel_frame, chunk) + encode_jpeg(rgb, quality))


class Outbox:
    """Bounded queue from any thread to the client's sender coroutine on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_frames: int, max_messages: int,
                 window: int):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: deque[Frame | dict | Close] = deque()
        self._ready = asyncio.Event()
        self.max_frames, self.max_messages, self.window = max_frames, max_messages, window
        self.frames_waiting = 0
        self.messages_waiting = 0
        self.peak_frames = 0     # most frames ever waiting at once (<= max_frames)
        self.dropped = 0         # frames dropped because the client was too slow
        self.sent = 0            # frames handed to the socket
        self.acked = 0           # frames the client said it has received
        self.closed = False

    # -- producers (any thread) -------------------------------------------------------------
    def put_frame(self, frame: Frame) -> None:
        with self._lock:
            if self.closed:
                return
            if self.frames_waiting >= self.max_frames:
                self._drop_oldest(Frame)
                self.dropped += 1
            self._items.append(frame)
            self.frames_waiting += 1
            self.peak_frames = max(self.peak_frames, self.frames_waiting)
        self._wake()

    def put_message(self, msg: dict[str, Any]) -> None:
        with self._lock:
            if self.closed:
                return
            if msg.get("type") in COALESCED:
                for i, item in enumerate(self._items):
                    if isinstance(item, dict) and item.get("type") == msg["type"]:
                        self._items[i] = msg
                        break
                else:
                    self._append_message(msg)
            else:
                self._append_message(msg)
        self._wake()

    def close(self, code: int | None = None, reason: str = "") -> None:
        """No more items: queued frames are dropped, queued messages are still sent, then the
        connection closes with `code` if given."""
        with self._lock:
            if self.closed:
                return
            self._drop_all(Frame)
            if code is not None:
                self._items.append(Close(code, reason))
            self.closed = True
        self._wake()

    def abandon(self) -> None:
        """The client is gone: drop everything queued; the sender ends at its next `get`."""
        with self._lock:
            self._items.clear()
            self.frames_waiting = self.messages_waiting = 0
            self.closed = True
        self._wake()

    # -- consumer (the event loop) ----------------------------------------------------------
    def ack(self, frames: int) -> int:
        """Record a cumulative acknowledgement; the number of frames it newly acknowledges (0 for
        a repeat). ValueError if it claims frames never sent."""
        if frames > self.sent:
            raise ValueError(f"ack of {frames} frames; only {self.sent} were sent")
        new = max(0, frames - self.acked)
        if new:
            self.acked = frames
            self._wake()
        return new

    async def get(self) -> Frame | dict | Close | None:
        """The next item to send (frames only while the ack window has room); None at the end."""
        while True:
            with self._lock:
                item = self._pop()
                if item is not None:
                    return item
                if self.closed and not self._items:
                    return None
                self._ready.clear()
            await self._ready.wait()

    # -- internals (lock held) ----------------------------------------------------------------
    def _append_message(self, msg: dict) -> None:
        if self.messages_waiting >= self.max_messages:
            self._drop_oldest(dict)
        self._items.append(msg)
        self.messages_waiting += 1

    def _drop_all(self, kind: type) -> None:
        kept = deque(item for item in self._items if not isinstance(item, kind))
        self._items = kept
        if kind is Frame:
            self.frames_waiting = 0

    def _drop_oldest(self, kind: type) -> None:
        for i, item in enumerate(self._items):
            if isinstance(item, kind):
                del self._items[i]
                if kind is Frame:
                    self.frames_waiting -= 1
                else:
                    self.messages_waiting -= 1
                return

    def _pop(self) -> Frame | dict | Close | None:
        may_send_frame = self.sent - self.acked < self.window
        for i, item in enumerate(self._items):
            if isinstance(item, Frame):
                if not may_send_frame:
                    continue
                self.frames_waiting -= 1
                self.sent += 1
            elif isinstance(item, dict):
                self.messages_waiting -= 1
            del self._items[i]
            return item
        return None

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop has stopped: nobody is waiting any more
            pass
