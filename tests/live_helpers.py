"""Shared by the live server's tests: `FakeSession` (the Session API's shape, small frames made
at once) and waits that always end: each has a deadline and fails naming what it waited for."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import anyio
import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect

from pipeline.live import ServerSettings, create_app
from pipeline.session import SessionLimitReached, TimelineEntry


# -- a stand-in with the Session API's shape, for protocol tests ----------------------------------
@dataclass
class _Chunk:
    index: int
    latent_start: int
    pixel_start: int
    frames: np.ndarray
    prompt: str
    switched: bool
    request: object = None
    generate_s: float = 0.001
    decode_s: float = 0.001


@dataclass
class _Memory:
    sink: list = field(default_factory=list)
    bank: list = field(default_factory=list)
    window: list = field(default_factory=list)


class FakeSession:
    """Frames of 16x24 pixels, 4 per chunk, made at once; `limit` chunks then the limit."""

    fps = 16.0

    def __init__(self, limit: int = 10**6, delay_s: float = 0.0):
        self.limit, self.delay_s = limit, delay_s
        self.chunks_made = 0  # over the session's life, across resets
        self.reset()

    def reset(self):
        self.prompt = self.seed = None
        self._next = None  # (prompt, request) asked for the next chunk
        self.index = 0
        self.timeline = []

    @property
    def chunks(self):
        return self.index

    @property
    def frames_generated(self):
        return 4 * self.index

    @property
    def pending_prompt(self):
        wish = self._next
        return None if wish is None or wish[0] == self.prompt else wish[0]

    def start(self, prompt, seed=None):
        self.reset()
        self.prompt, self.seed = prompt, seed
        self.timeline = [TimelineEntry(0, 0, prompt)]

    def set_prompt(self, prompt, request=None, transition_chunks=0, blend="linear"):
        self._next = (prompt, request, transition_chunks, blend)

    def next_chunk(self):
        if self.index >= self.limit:
            raise SessionLimitReached(f"{self.limit} chunks")
        time.sleep(self.delay_s)
        wish, self._next = self._next, None
        switched = wish is not None and wish[0] != self.prompt
        request = wish[1] if switched else None
        if switched:
            self.prompt = wish[0]
            self.timeline.append(TimelineEntry(3 * self.index, 4 * self.index, self.prompt,
                                               wish[2], wish[3]))
        frames = np.full((4, 16, 24, 3), (self.index * 40) % 256, dtype=np.uint8)
        chunk = _Chunk(self.index, 3 * self.index, 4 * self.index, frames, self.prompt, switched,
                       request)
        self.index += 1
        self.chunks_made += 1
        return chunk

    def memory(self):
        return _Memory(sink=[0, 1, 2] if self.index else [], bank=[3] if self.index > 1 else [])

    def thumbnail(self, latent_frame, max_side=None):
        return np.zeros((16, 24, 3), dtype=np.uint8)

    def prepare_save(self, path):
        path, timeline = Path(path), [e.__dict__ for e in self.timeline]

        def write():
            path.write_bytes(b"fake mp4")
            sidecar = path.with_suffix(".json")
            sidecar.write_text(json.dumps(timeline))
            return path, sidecar

        return SimpleNamespace(write=write, video_frames=4 * self.index)


# -- helpers ------------------------------------------------------------------------------------
PATIENCE_S = 300.0  # every wait ends on its condition; this only fails a stuck one, loudly


async def _receive_within(stream, seconds: float):
    with anyio.fail_after(seconds):
        return await stream.receive()


def receive(ws, seconds: float):
    """The next message from the server, or TimeoutError after `seconds`. (The TestClient's own
    `receive` has no deadline; this is the same call on its portal, with one.)"""
    return ws.portal.call(_receive_within, ws._send_rx, seconds)


class Expect:
    """A predicate over JSON messages that can say what it waits for."""

    def __init__(self, test, what: str):
        self.test, self.what = test, what

    def __call__(self, message: dict) -> bool:
        return bool(self.test(message))

    def __repr__(self) -> str:
        return self.what


def receive_until(ws, predicate, frames: list | None = None, ack: bool = True,
                  patience_s: float = PATIENCE_S):
    """Read messages until a JSON one satisfies `predicate`; binary frames go to `frames` and are
    acknowledged (cumulatively) so the server's ack window keeps frames coming. Fails after
    `patience_s`, naming what it waited for and the last messages it got."""
    deadline = time.monotonic() + patience_s
    seen: list[str] = []
    while True:
        left = deadline - time.monotonic()
        try:
            message = receive(ws, max(left, 0.001))
        except TimeoutError:
            raise AssertionError(f"waited {patience_s:.0f} s for {predicate!r}; the last "
                                 f"messages were: {seen[-8:]}") from None
        if message.get("type") == "websocket.close":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
        if message.get("bytes") is not None:
            seen.append(f"<frame {len(message['bytes'])} bytes>")
            if frames is not None:
                frames.append(message["bytes"])
            if ack and frames is not None:
                ws.send_json({"type": "ack", "frames": len(frames)})
            continue
        obj = json.loads(message["text"])
        seen.append(message["text"][:200])
        if predicate(obj):
            return obj


CLOSED = Expect(lambda m: False, "the connection to close")


def of_type(kind, **fields) -> Expect:
    return Expect(lambda m: m.get("type") == kind and all(m.get(k) == v for k, v in fields.items()),
                  f"a {kind!r} message with {fields}")


def wait_until(condition, what: str = "", timeout_s: float = PATIENCE_S) -> None:
    """Wait for `condition()` (a state reached in another thread), polling."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what or condition}"
        time.sleep(0.01)


def assert_released(app) -> None:
    """Nothing leaks once every client has left: no holder, nobody queued, no worker thread."""
    hub = app.state.hub
    wait_until(lambda: hub.owner is None and hub.reserved is None and not hub.waiting and not any(
        t.name == "memflow-live-generation" for t in threading.enumerate()),
        "the device to be released and every generation thread to end")


def settings(**kw) -> ServerSettings:
    """Server settings for a test: a holder's stream ends with its connection unless the test
    asks for a resume grace period."""
    return ServerSettings(**{"resume_grace_s": 0.0, **kw})


@pytest.fixture
def fake_app():
    """`make(session=None, **settings)`: an app around a FakeSession (or `session`)."""
    def make(session=None, **kw):
        session = session or FakeSession()
        return create_app(lambda: session, settings(**kw)), session
    return make
