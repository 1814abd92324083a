"""One generation per device: the client that holds the session, and the queue of the others.

The hub lives on the event loop (no locks needed for its own fields). The first client gets the
device and a `GenerationWorker` thread; later clients wait in FIFO order (at most
`max_waiting`) and are told their position ("busy: N ahead of you") whenever it changes.

The device is held by one of two things at a time: the connected `owner`, or a `Reservation`
for a holder that disconnected, whose stream waits `resume_grace_s` for the same client (its
resume token) to come back. When a holder's time ends (it leaves for good, its reservation
expires, or it exceeds `max_hold_s` / `max_idle_s` while others wait) its worker is stopped and
joined off the event loop, with a deadline, and only then does the next client get the device:
two workers never share the session.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .downloads import DownloadStore
from .outbox import Outbox
from .protocol import CLOSE_HOLD_EXPIRED, Command, error_frame
from .settings import ServerSettings
from .uploads import UploadStore
from .worker import GenerationWorker

log = logging.getLogger(__name__)

_ids = itertools.count(1)
WATCH_INTERVAL_S = 1.0  # how often the hold and idle limits are checked


class Client:
    """One WebSocket connection: its outbox, its resume token and, while it holds the device,
    its worker."""

    def __init__(self, outbox: Outbox):
        self.id = next(_ids)
        self.outbox = outbox
        self.resume_token = secrets.token_urlsafe(24)
        self.worker: GenerationWorker | None = None


@dataclass
class Reservation:
    """A disconnected holder's stream, kept for it until `timer` fires."""

    token: str
    worker: GenerationWorker
    timer: asyncio.TimerHandle | None = None


class DeviceHub:
    def __init__(self, session_factory: Callable[[], Any], settings: ServerSettings,
                 downloads: DownloadStore, uploads: UploadStore):
        self._factory = session_factory
        self._session = None
        self._build_lock = threading.Lock()
        self.settings = settings
        self.downloads = downloads
        self.uploads = uploads  # start files the page sent; a `start` takes its own
        self.owner: Client | None = None
        self.reserved: Reservation | None = None
        self.waiting: deque[Client] = deque()
        self.unauthenticated = 0  # connections that still owe their token
        self._handing_over = False  # a holder's worker is being joined
        self._watchdog: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # timers' tasks, held until they finish

    def session(self) -> Any:
        """The one session of this device, built on first use (thread-safe, built once)."""
        with self._build_lock:
            if self._session is None:
                self._session = self._factory()
            return self._session

    @property
    def fps(self) -> float:
        return float(getattr(self._session, "fps", 16) or 16)

    @property
    def busy(self) -> bool:
        return self.owner is not None or self.reserved is not None or self._handing_over

    # -- clients arriving and leaving --------------------------------------------------------------
    async def join(self, client: Client, resume: str | None = None) -> str:
        """Give `client` the device, its reserved stream back, or a place in the queue:
        "granted", "resumed", "queued", or "full" (the queue is full; nothing changed)."""
        self._start_watchdog()
        reserved = self.reserved
        if resume and reserved is not None and hmac.compare_digest(resume.encode(),
                                                                   reserved.token.encode()):
            self._take_back(client, reserved)
            return "resumed"
        if not self.busy:
            self._grant(client)
            return "granted"
        if len(self.waiting) >= self.settings.max_waiting:
            return "full"
        self.waiting.append(client)
        self._post_positions()
        return "queued"

    async def leave(self, client: Client) -> None:
        """The connection ended: a holder's stream is reserved for it (or ended), a waiting
        client leaves the queue."""
        if client is self.owner:
            worker, client.worker = client.worker, None
            self.owner = None
            if self.settings.resume_grace_s > 0 and worker.has_video:
                self._reserve(client.resume_token, worker)
            else:
                await self._hand_over(worker, client.resume_token)
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
        """Stop the holder's (or the reserved) worker: the server is stopping. Waits at most
        `shutdown_timeout_s` for a chunk in progress."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.waiting.clear()
        workers = [c.worker for c in (self.owner,) if c is not None and c.worker is not None]
        if self.reserved is not None:
            workers.append(self.reserved.worker)
            if self.reserved.timer is not None:
                self.reserved.timer.cancel()
        self.owner = self.reserved = None
        for worker in workers:
            worker.stop()
            await self._join(worker)

    # -- internals -------------------------------------------------------------------------------
    def _grant(self, client: Client) -> None:
        self.owner = client
        client.worker = GenerationWorker(self.session, client.outbox, self.settings,
                                         self.downloads, owner_key=client.resume_token)
        client.worker.start()

    def _take_back(self, client: Client, reserved: Reservation) -> None:
        if reserved.timer is not None:
            reserved.timer.cancel()
        self.reserved = None
        client.resume_token = reserved.token
        client.worker = reserved.worker
        self.owner = client
        client.worker.attach(client.outbox)

    def _reserve(self, token: str, worker: GenerationWorker) -> None:
        worker.detach(self.settings.resume_grace_s)
        reservation = Reservation(token, worker)
        loop = asyncio.get_running_loop()
        reservation.timer = loop.call_later(self.settings.resume_grace_s,
                                            lambda: self._spawn(self._expire(reservation)))
        self.reserved = reservation

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, reservation: Reservation) -> None:
        if self.reserved is not reservation:
            return  # taken back, or the server stopped
        self.reserved = None
        await self._hand_over(reservation.worker, reservation.token)

    async def _hand_over(self, worker: GenerationWorker, owner_key: str) -> None:
        """End a holder's stream for good, then give the device to the next in line."""
        self._handing_over = True
        try:
            worker.stop()
            await self._join(worker)
            self.downloads.forget(owner_key)
        finally:
            self._handing_over = False
        if self.waiting and not self.busy:
            self._grant(self.waiting.popleft())
        self._post_positions()

    async def _join(self, worker: GenerationWorker) -> None:
        await asyncio.to_thread(worker.join, self.settings.shutdown_timeout_s)
        if worker.is_alive():
            log.warning("the generation thread did not finish its chunk within %.0f s; "
                        "going on without it", self.settings.shutdown_timeout_s)

    def _start_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """While others wait, end a holder's turn past `max_hold_s` or `max_idle_s`. (It holds
        no client between checks: a client that left must not outlive its connection.)"""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            await self._check_turn()

    async def _check_turn(self) -> None:
        owner = self.owner
        if owner is None or not self.waiting or owner.worker is None:
            return
        why = self._overstay(owner.worker)
        if why is not None:
            await self._expel(owner, why)

    def _overstay(self, worker: GenerationWorker) -> str | None:
        s = self.settings
        if s.max_hold_s and worker.held_s() > s.max_hold_s:
            return f"you held the device for {s.max_hold_s:g} s while others waited"
        if s.max_idle_s and worker.idle_s() > s.max_idle_s:
            return f"you did not generate for {s.max_idle_s:g} s while others waited"
        return None

    async def _expel(self, owner: Client, why: str) -> None:
        message = f"{why}; your turn has ended (save before the limit next time)"
        owner.outbox.put_message(error_frame("hold_expired", message, fatal=True))
        owner.outbox.close(CLOSE_HOLD_EXPIRED, "your turn with the device ended")
        worker, owner.worker = owner.worker, None
        self.owner = None
        await self._hand_over(worker, owner.resume_token)

    def time_left_s(self) -> float | None:
        """At most how long the device stays taken while someone waits (None: no limit)."""
        s = self.settings
        if self.reserved is not None:
            return s.resume_grace_s
        worker = self.owner.worker if self.owner is not None else None
        if worker is None:
            return 0.0
        limits = []
        if s.max_hold_s:
            limits.append(s.max_hold_s - worker.held_s())
        if s.max_idle_s and worker.idle_s() > 0:
            limits.append(s.max_idle_s - worker.idle_s())
        return max(0.0, min(limits)) if limits else None

    def _post_positions(self) -> None:
        left = self.time_left_s() if self.waiting else None
        for position, client in enumerate(self.waiting, start=1):
            client.outbox.put_message({
                "type": "status", "state": "queued", "position": position,
                "queue": len(self.waiting), "max_hold_s": self.settings.max_hold_s,
                "max_idle_s": self.settings.max_idle_s, "holder_time_left_s": left,
                "message": f"busy: another client is generating; you are number {position} of "
                f"{len(self.waiting)} in the queue" + (
                    f" (the current turn ends within {left:.0f} s)" if left is not None else "")})
