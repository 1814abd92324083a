"""One generation per device: the client that holds the session, and the queue of the others.

The hub lives on the event loop (no locks needed for its own fields). The first client gets the
device and a `GenerationWorker` thread; later clients wait in FIFO order and are told their
position ("busy: N ahead of you") whenever it changes. When the holder leaves, its worker is
stopped and joined (off the event loop), the session is reset by the next holder's worker, and
the next client in line gets the device.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from typing import Any, Callable

from .downloads import DownloadStore
from .outbox import Outbox
from .protocol import Command, error_frame
from .settings import ServerSettings
from .worker import GenerationWorker

_ids = itertools.count(1)


class Client:
    """One WebSocket connection: its outbox and, while it holds the device, its worker."""

    def __init__(self, outbox: Outbox):
        self.id = next(_ids)
        self.outbox = outbox
        self.worker: GenerationWorker | None = None


class DeviceHub:
    def __init__(self, session_factory: Callable[[], Any], settings: ServerSettings,
                 downloads: DownloadStore):
        self._factory = session_factory
        self._session = None
        self._build_lock = threading.Lock()
        self.settings = settings
        self.downloads = downloads
        self.owner: Client | None = None
        self.waiting: deque[Client] = deque()

    def session(self) -> Any:
        """The one session of this device, built on first use (thread-safe, built once)."""
        with self._build_lock:
            if self._session is None:
                self._session = self._factory()
            return self._session

    @property
    def fps(self) -> float:
        return float(getattr(self._session, "fps", 16) or 16)

    async def join(self, client: Client) -> None:
        if self.owner is None:
            self._grant(client)
        else:
            self.waiting.append(client)
            self._post_positions()

    async def leave(self, client: Client) -> None:
        if client is self.owner:
            worker, client.worker = client.worker, None
            worker.stop()
            await asyncio.to_thread(worker.join)
            self.owner = None
            if self.waiting:
                self._grant(self.waiting.popleft())
        elif client in self.waiting:
            self.waiting.remove(client)
        self._post_positions()

    def submit(self, client: Client, command: Command) -> None:
        """Hand a generation command to the holder's worker; others are told they wait."""
        if client is not self.owner:
            position = self.waiting.index(client) + 1 if client in self.waiting else 0
            client.outbox.put_message(error_frame(
                "busy", f"the device is busy: you are number {position} of "
                f"{len(self.waiting)} in the queue; you get it when the clients ahead leave"))
            return
        client.worker.submit(command)

    async def shutdown(self) -> None:
        """Stop the holder's worker (the server is stopping)."""
        self.waiting.clear()
        owner, self.owner = self.owner, None
        if owner is not None and owner.worker is not None:
            owner.worker.stop()
            await asyncio.to_thread(owner.worker.join)

    def _grant(self, client: Client) -> None:
        self.owner = client
        client.worker = GenerationWorker(self.session, client.outbox, self.settings,
                                         self.downloads)
        client.worker.start()

    def _post_positions(self) -> None:
        for position, client in enumerate(self.waiting, start=1):
            client.outbox.put_message({
                "type": "status", "state": "queued", "position": position,
                "queue": len(self.waiting),
                "message": f"busy: another client is generating; you are number {position} of "
                f"{len(self.waiting)} in the queue"})
