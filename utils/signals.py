"""SIGTERM as an exception, so that it cleans up like Ctrl-C does.

Schedulers, `timeout` and torchrun stop a job with SIGTERM, whose default action ends the
process at once: an MP4 being written stays behind as a hidden ``.….partial.mp4``. Raised as
`Terminated` instead, the signal unwinds the stack through every ``with Mp4Writer(...)`` block
(which deletes its partial file) and the entry point exits with 128 + 15 = 143, the status a
shell reports for a process killed by SIGTERM.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that ``except Exception``
    handlers on the way up do not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_received: int | None = None


def _raise_terminated(signum: int, _frame: object) -> None:
    global _received
    _received = signum
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated(signum)


def check_terminated() -> None:
    """Raise `Terminated` if SIGTERM arrived inside `sigterm_raises`, also when the exception the
    handler raised was swallowed on the way (C extensions that poll for signals may clear it).
    Long loops call this between their steps."""
    if _received is not None:
        raise Terminated(_received)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread."""
    global _received
    _received = None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _received = None
