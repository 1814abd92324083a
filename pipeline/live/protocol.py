"""The live WebSocket protocol: client messages parsed into typed commands, error frames, close
codes, the binary frame header and the per-connection rate limit (docs/live.md, "Protocol").

Client -> server messages are JSON objects in text messages with a `type`; anything else (binary
messages, invalid UTF-8, invalid JSON, unknown types, bad fields) raises `ProtocolError` with a
stable `code`, which the server sends back as ``{"type": "error", "code": ..., "message": ...}``.
"""
from __future__ import annotations

import json
import math
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from config.schema import SEED_RANGE
from memflow.prompt_blend import BLENDS, prompt_weights
from utils.prompts import prompt_problem

from .settings import ServerSettings

PROTOCOL_VERSION = 1

# Close codes (RFC 6455 ones, and 44xx for this application).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008      # message flood
CLOSE_TOO_BIG = 1009     # a message over max_message_bytes
CLOSE_TRY_LATER = 1013   # the queue or the unauthenticated connections are full
CLOSE_UNAUTHORIZED = 4401  # missing or wrong access token
CLOSE_FORBIDDEN_ORIGIN = 4403  # a page of another origin tried to connect
CLOSE_HOLD_EXPIRED = 4408  # the holder's time with the device ended while others waited

MAX_TRANSITION_CHUNKS = 64  # a prompt transition spreads over at most this many chunks

# A binary message to the client: this header, then one JPEG image.
FRAME_HEADER = struct.Struct(">II")  # pixel frame index, chunk index (big-endian uint32)


class ProtocolError(ValueError):
    """A client message the server refuses; `fatal` ones close the connection."""

    def __init__(self, code: str, message: str, fatal: bool = False):
        super().__init__(message)
        self.code = code
        self.fatal = fatal

    def frame(self) -> dict[str, Any]:
        return error_frame(self.code, str(self), self.fatal)


def error_frame(code: str, message: str, fatal: bool = False) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "fatal": fatal}


@dataclass(frozen=True)
class Hello:
    token: str | None


@dataclass(frozen=True)
class Start:
    prompt: str | tuple[tuple[str, float], ...]  # a text, or a weighted prompt
    seed: int | None
    upload: str | None = None  # the id of an uploaded start file (pipeline/live/uploads.py)
    kind: str | None = None  # "image" or "video": what the upload is
    data: bytes | None = field(default=None, repr=False)  # its bytes, once taken from the store


@dataclass(frozen=True)
class SetPrompt:
    prompt: str | tuple[tuple[str, float], ...]  # a text, or a weighted prompt
    transition_chunks: int = 0  # 0: at once (with recache); N: the conditioning moves over N chunks
    blend: str = "linear"


@dataclass(frozen=True)
class Controls:
    """Runtime controls, each optional: the denoising steps from the next chunk (values of the
    config's list; `all_steps`: back to the whole list), the next chunk's seed, the memory
    view on or off."""
    steps: tuple[int, ...] | None = None
    all_steps: bool = False
    seed: int | None = None
    memory_view: bool | None = None


@dataclass(frozen=True)
class PlannedSwitch:
    frame: int   # pixel frame (seconds are converted with the video's fps)
    prompt: str


@dataclass(frozen=True)
class Plan:
    switches: tuple[PlannedSwitch, ...]


@dataclass(frozen=True)
class Ack:
    frames: int  # frames received so far (cumulative)


@dataclass(frozen=True)
class Ping:
    t: float | None


@dataclass(frozen=True)
class Simple:
    """A message without fields: stop, resume, reset, save."""
    type: str


Command = Hello | Start | SetPrompt | Plan | Controls | Ack | Ping | Simple
SIMPLE_TYPES = ("stop", "resume", "reset", "save")
CLIENT_TYPES = ("hello", "start", "prompt", "plan", "controls", "ack", "ping") + SIMPLE_TYPES


def type_of(command: Command) -> str:
    """The wire `type` of a parsed command."""
    if isinstance(command, Simple):
        return command.type
    return {Hello: "hello", Start: "start", SetPrompt: "prompt", Plan: "plan",
            Controls: "controls", Ack: "ack", Ping: "ping"}[type(command)]


def decode_text(data: bytes | str) -> str:
    """The text of a client message; binary messages are refused (clients send JSON text)."""
    if isinstance(data, str):
        return data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("not_utf8", "binary message that is not UTF-8 text; send JSON "
                            "objects as text messages") from None
    raise ProtocolError("binary_message", "binary messages are not accepted; send JSON "
                        "objects as text messages")


def parse_message(text: str, settings: ServerSettings, fps: float) -> Command:
    """Parse one client text message into a command, or raise ProtocolError."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: also an integer of 4300+ digits
        raise ProtocolError("bad_json", f"invalid JSON: {getattr(e, 'msg', e)!s:.200}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "a message must be a JSON object with a `type`")
    kind = obj.get("type")
    if kind not in CLIENT_TYPES:
        shown = kind if isinstance(kind, str) and len(kind) <= 40 else type(kind).__name__
        raise ProtocolError("unknown_type", f"unknown message type {shown!r}; known types: "
                            + ", ".join(CLIENT_TYPES))
    if kind in SIMPLE_TYPES:
        return Simple(kind)
    if kind == "hello":
        token = obj.get("token")
        return Hello(token if isinstance(token, str) else None)
    if kind == "start":
        return Start(_weighted_or_text(obj, settings), _seed(obj), *_upload(obj))
    if kind == "prompt":
        chunks = 0 if obj.get("transition_chunks") is None else \
            _int(obj, "transition_chunks", 0, MAX_TRANSITION_CHUNKS)
        blend = obj.get("blend", "linear")
        if blend not in BLENDS:
            raise ProtocolError("bad_field", f"`blend` must be one of {', '.join(BLENDS)}; got "
                                f"{blend!r:.40}")
        return SetPrompt(_weighted_or_text(obj, settings), chunks, blend)
    if kind == "plan":
        return Plan(_plan(obj, settings, fps))
    if kind == "controls":
        return _controls(obj)
    if kind == "ack":
        return Ack(_int(obj, "frames", 0, 2**32 - 1))
    t = obj.get("t")
    return Ping(float(t) if _is_number(t) else None)


def _weighted_or_text(obj: dict, settings: ServerSettings) -> str | tuple[tuple[str, float], ...]:
    """`prompt`: a text, or a weighted prompt, a list of [text, weight] pairs (at most 8)."""
    value = obj.get("prompt")
    if not isinstance(value, list):
        return _prompt(obj, settings)
    if not 0 < len(value) <= 8 or not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise ProtocolError("bad_field", "a weighted `prompt` is a list of 1 to 8 [text, weight] "
                            "pairs")
    texts = [_prompt({"prompt": text}, settings) for text, _ in value]
    try:
        weights = prompt_weights([weight for _, weight in value])
    except ValueError as e:
        raise ProtocolError("bad_field", f"a weighted `prompt`: {e}") from None
    return tuple(zip(texts, weights))


def _prompt(obj: dict, settings: ServerSettings, key: str = "prompt") -> str:
    text = obj.get(key)
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError("bad_field", f"`{key}` must be a non-empty string")
    if len(text) > settings.max_prompt_chars:
        raise ProtocolError("prompt_too_long", f"the prompt has {len(text)} characters; at most "
                            f"{settings.max_prompt_chars} are accepted")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > settings.max_prompt_bytes:
        raise ProtocolError("prompt_too_long", f"the prompt is {size} bytes of UTF-8; at most "
                            f"{settings.max_prompt_bytes} are accepted")
    problem = prompt_problem(text)
    if problem is not None:
        raise ProtocolError("bad_field", f"the prompt {problem}")
    return text.strip()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(obj: dict, key: str, low: int, high: int) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise ProtocolError("bad_field", f"`{key}` must be an integer in {low}..{high}; got {v!r:.40}")
    return v


def _upload(obj: dict) -> tuple[str | None, str | None]:
    """A start's `image` or `video`: the id `POST /upload` returned (never a path)."""
    given = [k for k in ("image", "video") if obj.get(k) is not None]
    if not given:
        return None, None
    if len(given) > 1:
        raise ProtocolError("bad_field", "start from an `image` or a `video`, not both")
    upload = obj[given[0]]
    if not isinstance(upload, str) or not re.fullmatch(r"[0-9a-f]{32}", upload):
        raise ProtocolError("bad_field", f"`{given[0]}` must be the id an upload returned "
                            "(POST /upload), not a path or anything else")
    return upload, given[0]


def _controls(obj: dict) -> Controls:
    steps, all_steps = None, False
    if "steps" in obj:
        value = obj["steps"]
        if value is None:
            all_steps = True
        elif (not isinstance(value, list) or not value or len(value) > 64
              or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ProtocolError("bad_field", "`steps` must be a non-empty list of step values "
                                "(of the config's denoising_step_list) or null for all")
        else:
            steps = tuple(value)
    memory = obj.get("memory_view")
    if memory is not None and not isinstance(memory, bool):
        raise ProtocolError("bad_field", "`memory_view` must be true or false")
    return Controls(steps, all_steps, _seed(obj), memory)


def _seed(obj: dict) -> int | None:
    if obj.get("seed") is None:
        return None
    return _int(obj, "seed", SEED_RANGE["minimum"], SEED_RANGE["maximum"])  # as config seeds


def _plan(obj: dict, settings: ServerSettings, fps: float) -> tuple[PlannedSwitch, ...]:
    """Planned switches at pixel-frame (`frame`) or second (`second`) marks, sorted by frame."""
    entries = obj.get("switches")
    if not isinstance(entries, list):
        raise ProtocolError("bad_field", "`switches` must be a list of {frame|second, prompt}")
    if len(entries) > settings.max_plan_entries:
        raise ProtocolError("bad_field", f"at most {settings.max_plan_entries} planned switches; "
                            f"got {len(entries)}")
    plan = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ProtocolError("bad_field", f"switches[{i}] must be an object")
        if _is_number(entry.get("second")) and entry["second"] >= 0 and "frame" not in entry:
            frame = round(entry["second"] * fps)
        elif "frame" in entry:
            frame = _int(entry, "frame", 0, 2**31 - 1)
        else:
            raise ProtocolError("bad_field", f"switches[{i}] needs `frame` (an integer >= 0) "
                                "or `second` (a number >= 0)")
        plan.append(PlannedSwitch(frame, _prompt(entry, settings)))
    return tuple(sorted(plan, key=lambda s: s.frame))


class RateLimit:
    """Token bucket of `burst` messages refilled at `rate` per second. `refused` counts the
    messages refused in a row: a client that goes on sending past a refusal is flooding."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()
        self.refused = 0

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused = 0
            return True
        self.refused += 1
        return False
