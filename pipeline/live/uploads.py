"""Start images and clips the page uploads before Start (docs/live.md, "Starting from an image").

The server never reads a path a client names: a file reaches it only as the bytes of a
`POST /upload?kind=image|video` request, at most `max_upload_bytes`. The store keeps the newest
`max_uploads` under random ids; a `start` message names one (`"image": id` or `"video": id`),
which takes it out of the store.
"""
from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from typing import Literal

UploadKind = Literal["image", "video"]
KINDS: tuple[str, ...] = ("image", "video")


class UploadStore:
    """Uploaded start files by id (thread-safe); the oldest go when more than `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[UploadKind, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, kind: UploadKind, data: bytes) -> str:
        upload_id = secrets.token_hex(16)
        with self._lock:
            self._items[upload_id] = (kind, data)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return upload_id

    def take(self, upload_id: str, kind: UploadKind) -> bytes | None:
        """The bytes of upload `upload_id` if it is a `kind` (then it leaves the store)."""
        with self._lock:
            item = self._items.get(upload_id)
            if item is None or item[0] != kind:
                return None
            del self._items[upload_id]
            return item[1]
