"""Files the live server lets clients download: only what a session saved, named by random ids.

A session's save writes into a folder this server created (a fresh temporary directory); a client asks
for ``/download/<id>.mp4`` or ``/download/<id>.json`` and the id is looked up in this store, so
no client-supplied text ever becomes part of a path. At most `max_saved` saves are kept; the
oldest is deleted when a new one arrives, and the folder is removed when the server stops.
"""
from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

_NAME = re.compile(r"([0-9a-f]{32})\.(mp4|json)")


class DownloadStore:
    def __init__(self, max_saved: int, root: Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="memflow-live-", dir=root))
        self.max_saved = max_saved
        self._saved: OrderedDict[str, dict[str, Path]] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self) -> tuple[str, Path]:
        """A new id and the .mp4 path a save writes to (in a folder of its own)."""
        file_id = secrets.token_hex(16)
        folder = self.root / file_id
        folder.mkdir()
        return file_id, folder / "memflow_live.mp4"

    def keep(self, file_id: str, mp4: Path, timeline: Path) -> None:
        """Offer a finished save for download; the oldest beyond `max_saved` is deleted."""
        with self._lock:
            self._saved[file_id] = {"mp4": Path(mp4), "json": Path(timeline)}
            while len(self._saved) > self.max_saved:
                old, _ = self._saved.popitem(last=False)
                shutil.rmtree(self.root / old, ignore_errors=True)

    def lookup(self, name: str) -> Path | None:
        """The file for ``<id>.mp4`` / ``<id>.json``, or None for anything else."""
        match = _NAME.fullmatch(name)
        if match is None:
            return None
        with self._lock:
            files = self._saved.get(match.group(1))
        path = files and files[match.group(2)]
        return path if path is not None and path.is_file() else None

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
