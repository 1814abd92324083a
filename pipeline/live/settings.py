"""Server limits and exposure rules of the live server, in one frozen object.

Every limit the server enforces (prompt length, message size and rate, buffer sizes) lives here
so that tests can build a server with small limits and the docs can name one place.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from memflow.errors import InputError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MIN_TOKEN_CHARS = 16  # `openssl rand -hex 16` gives 32; a word such as "password" is refused


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None          # required from every client when set (query or hello)
    allow_no_token: bool = False      # expose on a non-loopback host without a token anyway
    # Host headers accepted (DNS-rebinding guard); None accepts any. serve.py sets loopback
    # names for a loopback bind.
    allowed_hosts: tuple[str, ...] | None = None
    max_prompt_chars: int = 1000
    max_prompt_bytes: int = 4000      # UTF-8 bytes; umT5 reads at most 512 tokens anyway
    max_message_bytes: int = 65536    # a larger client message closes the socket (1009)
    max_plan_entries: int = 64
    messages_per_second: float = 20.0  # token bucket per connection
    message_burst: int = 40            # bucket size; this many refused in a row closes (1008)
    queue_frames: int = 24            # frames waiting per client; older ones are dropped
    ack_window: int = 16              # frames sent but not yet acknowledged by the client
    max_queued_messages: int = 64     # JSON messages waiting per client
    jpeg_quality: int = 85
    thumbnail_side: int = 160       # memory-readout thumbnails: longest side at most this
    auth_timeout_s: float = 10.0      # time to send the hello with the token
    max_unauthenticated: int = 8      # connections still owing their token; more are closed
    max_waiting: int = 16             # clients queued for the device; more are turned away
    max_saved: int = 8                # saved MP4s kept per client; its older ones are deleted
    max_upload_bytes: int = 16 << 20  # a start image or clip (POST /upload) at most this big
    max_uploads: int = 8              # uploads kept until a start takes them; older ones go
    # While others wait, a holder keeps the device at most `max_hold_s` in all and at most
    # `max_idle_s` without generating (0: no limit); alone it keeps it as long as it likes.
    max_hold_s: float = 1800.0
    max_idle_s: float = 300.0
    # A holder that disconnects keeps its stream this long: reconnecting with its resume token
    # (a reload) takes it back; the queue waits meanwhile (0: the stream ends with the connection).
    resume_grace_s: float = 30.0
    shutdown_timeout_s: float = 10.0  # at shutdown, the longest wait for a chunk in progress

    def check(self) -> None:
        """Raise InputError for limits that cannot work or an exposure without a token."""
        for name in ("max_prompt_chars", "max_prompt_bytes", "max_message_bytes", "queue_frames",
                     "ack_window", "max_queued_messages", "message_burst", "max_saved",
                     "max_upload_bytes", "max_uploads",
                     "max_unauthenticated", "max_waiting"):
            if getattr(self, name) < 1:
                raise InputError(f"server setting `{name}` must be >= 1; got {getattr(self, name)}")
        for name in ("max_hold_s", "max_idle_s", "resume_grace_s", "shutdown_timeout_s"):
            if not getattr(self, name) >= 0:
                raise InputError(f"server setting `{name}` must be >= 0; got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be in 0..65535 (0: any free port); got {self.port}")
        if self.messages_per_second <= 0:
            raise InputError("server setting `messages_per_second` must be > 0")
        if not 1 <= self.jpeg_quality <= 95:
            raise InputError(f"`jpeg_quality` must be in 1..95; got {self.jpeg_quality}")
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise InputError(f"the access token must have at least {MIN_TOKEN_CHARS} characters "
                             "(e.g. `openssl rand -hex 16`)")
        if not is_loopback(self.host) and self.token is None and not self.allow_no_token:
            raise InputError(
                f"--host {self.host} exposes the server beyond this machine: set an access token "
                "(--token or MEMFLOW_LIVE_TOKEN), or pass --allow-no-token to expose it open")


def loopback_host_names(host: str) -> tuple[str, ...]:
    """The Host header names a loopback server answers to (the DNS-rebinding guard): the
    loopback names, and `host` itself (bracketed when it is an IPv6 address)."""
    bare = host.strip("[]")
    own = f"[{bare}]" if ":" in bare else bare
    return tuple(dict.fromkeys(("127.0.0.1", "localhost", "[::1]", own)))


def host_of(header: str) -> str:
    """The host name of a Host header without its port: `[::1]:8000` -> `[::1]`."""
    if header.startswith("["):
        end = header.find("]")
        return header[:end + 1] if end > 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
