"""Files the live server lets clients download: only what a session saved, named by random ids.

A session's save writes into a folder this server created (a fresh temporary directory); a client asks
for ``/download/<id>.mp4`` or ``/download/<id>.json`` and the id is looked up in this store, so
no client-supplied text ever becomes part of a path. Saves belong to the client that made them
(its resume token): each keeps its `max_saved` newest, so no client can evict another's, and a
client's saves are deleted when its stream ends for good. The folder is removed when the server
stops; folders left by a server that was killed (SIGKILL) are removed by the next one.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

_NAME = re.compile(r"([0-9a-f]{32})\.(mp4|json)")
PREFIX = "memflow-live-"


class DownloadStore:
    def __init__(self, max_saved: int, root: Path | None = None):
        remove_orphans(Path(root or tempfile.gettempdir()))
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        self.max_saved = max_saved
        self._saved: OrderedDict[str, dict[str, Path]] = OrderedDict()
        self._owner_of: dict[str, str] = {}
        self._lock = threading.Lock()

    def reserve(self, owner: str) -> tuple[str, Path]:
        """A new id and the .mp4 path a save of `owner` writes to (in a folder of its own)."""
        file_id = secrets.token_hex(16)
        folder = self.root / file_id
        folder.mkdir()
        with self._lock:
            self._owner_of[file_id] = owner
        return file_id, folder / "memflow_live.mp4"

    def keep(self, owner: str, file_id: str, mp4: Path, timeline: Path) -> None:
        """Offer a finished save for download; the owner's oldest beyond `max_saved` is deleted."""
        with self._lock:
            self._saved[file_id] = {"mp4": Path(mp4), "json": Path(timeline)}
            mine = [i for i in self._saved if self._owner_of.get(i) == owner]
            for old in mine[:max(0, len(mine) - self.max_saved)]:
                self._delete(old)

    def discard(self, file_id: str) -> None:
        """Drop a reserved or kept save (a save that failed)."""
        with self._lock:
            self._delete(file_id)

    def forget(self, owner: str) -> None:
        """Delete every save of `owner` (its stream has ended for good)."""
        with self._lock:
            for file_id in [i for i, o in self._owner_of.items() if o == owner]:
                self._delete(file_id)

    def lookup(self, name: str) -> Path | None:
        """The file for ``<id>.mp4`` / ``<id>.json``, or None for anything else."""
        match = _NAME.fullmatch(name)
        if match is None:
            return None
        with self._lock:
            files = self._saved.get(match.group(1))
        path = files and files[match.group(2)]
        return path if path is not None and path.is_file() else None

    def count(self, owner: str | None = None) -> int:
        """Saves kept (of `owner`, or of everyone)."""
        with self._lock:
            return sum(1 for i in self._saved if owner is None or self._owner_of.get(i) == owner)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _delete(self, file_id: str) -> None:  # lock held
        self._saved.pop(file_id, None)
        self._owner_of.pop(file_id, None)
        shutil.rmtree(self.root / file_id, ignore_errors=True)


def remove_orphans(parent: Path) -> None:
    """Remove the download folders of live servers that no longer run (killed with SIGKILL):
    each folder's name carries its server's process id."""
    for folder in parent.glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
