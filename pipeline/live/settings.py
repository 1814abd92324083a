"""Server limits and exposure rules of the live server, in one frozen object.

Every limit the server enforces (prompt length, message size and rate, buffer sizes) lives here
so that tests can build a server with small limits and the docs can name one place.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from utils.errors import InputError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


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
    max_saved: int = 8                # saved MP4s kept; older ones are deleted

    def check(self) -> None:
        """Raise InputError for limits that cannot work or an exposure without a token."""
        for name in ("max_prompt_chars", "max_prompt_bytes", "max_message_bytes", "queue_frames",
                     "ack_window", "max_queued_messages", "message_burst", "max_saved"):
            if getattr(self, name) < 1:
                raise InputError(f"server setting `{name}` must be >= 1; got {getattr(self, name)}")
        if self.messages_per_second <= 0:
            raise InputError("server setting `messages_per_second` must be > 0")
        if not 1 <= self.jpeg_quality <= 95:
            raise InputError(f"`jpeg_quality` must be in 1..95; got {self.jpeg_quality}")
        if self.token is not None and len(self.token) < 8:
            raise InputError("the access token must have at least 8 characters")
        if not is_loopback(self.host) and self.token is None and not self.allow_no_token:
            raise InputError(
                f"--host {self.host} exposes the server beyond this machine: set an access token "
                "(--token or MEMFLOW_LIVE_TOKEN), or pass --allow-no-token to expose it open")


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
