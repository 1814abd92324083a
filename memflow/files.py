"""Writing a file so that it is either the old one or the complete new one.

Every file the project writes in one go (checkpoints, logs, reports, timelines) goes through
`atomic_write`: a crash, a kill or a full disk mid-write leaves the previous file, never a
truncated one that a later run would misread. (A video is encoded while it is generated, so
`utils.video_writer.Mp4Writer` renames its partial file itself when done; a checkpoint folder is
published whole, `trainer.checkpoint_files`.)
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import InputError

PathLike = str | os.PathLike[str]


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file in `path`'s folder (made if missing), then rename it
    to `path`; the rename is atomic on one filesystem. The temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """`atomic_write` of `text` in UTF-8."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def reading(path: PathLike, what: str) -> Iterator[None]:
    """Around a read of `path`: the OS's refusal becomes one `InputError` naming `what` (e.g.
    "config file") and the path: not found, a directory, or the OS's reason."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{what} is a directory: {path}") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror}") from None
