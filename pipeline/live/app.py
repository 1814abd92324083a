"""The live server's FastAPI app: the page, the WebSocket, downloads (docs/live.md).

`create_app(session_factory, settings)` builds it; `serve.py` runs it under uvicorn and tests run
it under FastAPI's TestClient. The factory is called once (at startup, or at the first client
without a lifespan) and its session is reused by every client in turn.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from memflow.errors import InputError

from .downloads import DownloadStore
from .hub import Client, DeviceHub
from .outbox import Close, Frame, Outbox
from .protocol import (
    CLOSE_FORBIDDEN_ORIGIN,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHORIZED,
    FRAME_HEADER,
    PROTOCOL_VERSION,
    Ack,
    Command,
    Hello,
    Ping,
    ProtocolError,
    RateLimit,
    Start,
    decode_text,
    error_frame,
    parse_message,
    type_of,
)
from .settings import ServerSettings, host_of
from .uploads import KINDS as UPLOAD_KINDS
from .uploads import UploadStore

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parents[1] / "web"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token may be in the page's URL
    "Cache-Control": "no-store",
}


def create_app(session_factory: Callable[[], Any], settings: ServerSettings | None = None) -> FastAPI:
    """The server for one device: one session built by `session_factory`, shared in turn."""
    settings = settings or ServerSettings()
    settings.check()
    downloads = DownloadStore(settings.max_saved)
    uploads = UploadStore(settings.max_uploads)
    hub = DeviceHub(session_factory, settings, downloads, uploads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(hub.session)  # load the models before the first client
        yield
        await hub.shutdown()
        downloads.close()

    app = FastAPI(title="MemFlow live", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.hub, app.state.downloads, app.state.settings = hub, downloads, settings
    if settings.allowed_hosts is not None:
        app.add_middleware(AllowedHosts, allowed=settings.allowed_hosts)

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.get("/", include_in_schema=False)(lambda: FileResponse(WEB / "index.html"))
    app.get("/healthz", include_in_schema=False)(lambda: {"ok": True})

    @app.get("/download/{name}")
    async def download(name: str, token: str | None = None):
        if not token_ok(settings, token):
            return JSONResponse({"error": "token required"}, status_code=403)
        path = downloads.lookup(name)
        try:  # opened here: a save deleted meanwhile (its client's stream ended) is still sent
            handle = open(path, "rb") if path is not None else None
        except FileNotFoundError:
            handle = None
        if handle is None:
            return JSONResponse({"error": "no such file"}, status_code=404)
        return StreamingResponse(
            _blocks(handle), media_type=MEDIA_TYPES[path.suffix],
            headers={"Content-Length": str(os.fstat(handle.fileno()).st_size),
                     "Content-Disposition": f'attachment; filename="memflow_live{path.suffix}"'})

    @app.post("/upload")
    async def upload(request: Request, kind: str = "", token: str | None = None):
        """A start image or clip as the request's bytes (never a path); its id for `start`."""
        if not token_ok(settings, token):
            return JSONResponse({"error": "token required"}, status_code=403)
        if kind not in UPLOAD_KINDS:
            return JSONResponse({"error": f"kind must be one of {', '.join(UPLOAD_KINDS)}"},
                                status_code=400)
        data = bytearray()
        async for block in request.stream():
            data += block
            if len(data) > settings.max_upload_bytes:
                return JSONResponse({"error": f"the file is over {settings.max_upload_bytes} "
                                              "bytes"}, status_code=413)
        if not data:
            return JSONResponse({"error": "the upload is empty"}, status_code=400)
        return {"id": uploads.put(kind, bytes(data)), "kind": kind, "bytes": len(data)}

    @app.websocket("/ws")
    async def live(ws: WebSocket):
        await serve_client(ws, hub, settings)

    return app


class AllowedHosts:
    """Serve only requests whose Host header names one of `allowed` (the DNS-rebinding guard:
    a site whose name is made to resolve to 127.0.0.1 sends its own name). Unlike Starlette's
    TrustedHostMiddleware it reads IPv6 hosts (`[::1]:8000`) correctly."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_of(host).lower() not in self.allowed:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": CLOSE_POLICY})
                    return
                await PlainTextResponse("invalid host header", status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


MEDIA_TYPES = {".mp4": "video/mp4", ".json": "application/json"}


def _blocks(handle, size: int = 1 << 20):
    """An open file's bytes in blocks, then closed."""
    with handle:
        while block := handle.read(size):
            yield block


def token_ok(settings: ServerSettings, given: str | None) -> bool:
    if settings.token is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), settings.token.encode())


def origin_ok(ws: WebSocket) -> bool:
    """A browser page may only connect from the server's own origin (a page of another site
    could otherwise drive this server through the user's browser). Non-browser clients send
    no Origin."""
    origin = ws.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == ws.headers.get("host")


async def serve_client(ws: WebSocket, hub: DeviceHub, settings: ServerSettings) -> None:
    """One connection: authenticate, queue for the device, then read commands until it ends."""
    await ws.accept()
    outbox = Outbox(asyncio.get_running_loop(), settings.queue_frames,
                    settings.max_queued_messages, settings.ack_window)
    client = Client(outbox)
    sender = asyncio.create_task(send_loop(ws, client, hub))
    joined = False
    try:
        if not origin_ok(ws):
            refuse(outbox, "forbidden_origin", "pages of another origin may not connect",
                   CLOSE_FORBIDDEN_ORIGIN)
        elif await authenticate(ws, hub, settings, outbox):
            joined = await enter(ws, client, hub, settings)
            if joined:
                await receive_loop(ws, client, hub, settings)
    finally:
        if not outbox.closed:
            outbox.abandon()  # the client went away: nothing queued is worth sending
        try:
            if joined:
                # Leaving stops (or reserves) the worker and hands the device on; that must
                # finish even if this handler is cancelled (server shutdown, a test client).
                await asyncio.shield(asyncio.ensure_future(hub.leave(client)))
            await sender
        finally:
            sender.cancel()  # a cancelled handler takes its sender with it


async def enter(ws: WebSocket, client: Client, hub: DeviceHub, settings: ServerSettings) -> bool:
    """Greet the client, then give it the device (or its kept stream back) or a place in the
    queue; False when the queue is full (the connection is closed)."""
    outbox = client.outbox
    resume = ws.query_params.get("resume")
    outbox.put_message(hello_message(hub, settings, client))
    result = await hub.join(client, resume)
    if result == "full":
        refuse(outbox, "queue_full", f"{settings.max_waiting} clients are already waiting for "
               "this device; try again later", CLOSE_TRY_LATER)
        return False
    if resume and result != "resumed":
        outbox.put_message(error_frame("resume_expired", "the stream of that resume token is "
                                       "gone (it waited its grace period, or ended); start anew"))
    outbox.put_message({"type": "session", "resume_token": client.resume_token,
                        "resumed": result == "resumed"})
    return True


def refuse(outbox: Outbox, code: str, message: str, close_code: int) -> None:
    outbox.put_message(error_frame(code, message, fatal=True))
    outbox.close(close_code, message[:120])


def hello_message(hub: DeviceHub, settings: ServerSettings, client: Client) -> dict[str, Any]:
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "fps": hub.fps,
            "frame_header_bytes": FRAME_HEADER.size, "resume_grace_s": settings.resume_grace_s,
            "limits": {"max_prompt_chars": settings.max_prompt_chars,
                       "max_prompt_bytes": settings.max_prompt_bytes,
                       "max_message_bytes": settings.max_message_bytes,
                       "messages_per_second": settings.messages_per_second,
                       "message_burst": settings.message_burst,
                       "queue_frames": settings.queue_frames, "ack_window": settings.ack_window,
                       "max_plan_entries": settings.max_plan_entries,
                       "max_saved": settings.max_saved, "max_hold_s": settings.max_hold_s,
                       "max_idle_s": settings.max_idle_s, "max_waiting": settings.max_waiting}}


async def authenticate(ws: WebSocket, hub: DeviceHub, settings: ServerSettings,
                       outbox: Outbox) -> bool:
    """With a token set, the client gives it as `?token=` or in a first `hello` message; at most
    `max_unauthenticated` connections may be waiting to give it."""
    if settings.token is None:
        return True
    given = ws.query_params.get("token")
    if given is None:
        if hub.unauthenticated >= settings.max_unauthenticated:
            refuse(outbox, "too_many_connections", "too many connections are waiting to give "
                   "their token; try again later", CLOSE_TRY_LATER)
            return False
        hub.unauthenticated += 1
        try:
            given = await first_hello_token(ws, settings)
        finally:
            hub.unauthenticated -= 1
        if given is None and outbox.closed:
            return False
    if token_ok(settings, given):
        return True
    refuse(outbox, "unauthorized", "this server needs its access token: connect with "
           "?token=... or send {\"type\": \"hello\", \"token\": ...} first", CLOSE_UNAUTHORIZED)
    return False


async def first_hello_token(ws: WebSocket, settings: ServerSettings) -> str | None:
    """The token of the connection's first message, if it is a `hello` with one."""
    try:
        message = await asyncio.wait_for(ws.receive(), settings.auth_timeout_s)
    except TimeoutError:
        return None
    if message.get("type") == "websocket.disconnect":
        return None
    try:
        hello = parse_message(decode_text(message.get("text") or message.get("bytes") or ""),
                              settings, 16.0)
    except ProtocolError:
        return None
    return hello.token if isinstance(hello, Hello) else None


async def receive_loop(ws: WebSocket, client: Client, hub: DeviceHub,
                       settings: ServerSettings) -> None:
    """Read and apply the client's messages. Every message counts against the rate limit except
    an `ack` of new frames (there can be no more of those than frames sent); a message the limit
    refuses is answered with a `rate_limited` error naming it, and a client that goes on past
    `message_burst` refusals in a row is closed (1008)."""
    limit = RateLimit(settings.messages_per_second, settings.message_burst)
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        data = data if data is not None else message.get("bytes") or b""
        size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
        if size > settings.max_message_bytes:
            refuse(client.outbox, "message_too_big", f"a message of {size} bytes; at most "
                   f"{settings.max_message_bytes} are accepted", CLOSE_TOO_BIG)
            return
        try:
            command = parse_message(decode_text(data), settings, hub.fps)
        except ProtocolError as e:
            command = e
        if isinstance(command, Ack) and new_frames_acked(command, client.outbox):
            continue
        if not limit.allow():
            if limit.refused >= settings.message_burst:
                refuse(client.outbox, "flood", "too many messages: closing", CLOSE_POLICY)
                return
            client.outbox.put_message(rate_limited(command, settings))
            continue
        try:
            if isinstance(command, ProtocolError):
                raise command
            handle(command, client, hub)
        except ProtocolError as e:
            client.outbox.put_message(e.frame())


def new_frames_acked(ack: Ack, outbox: Outbox) -> bool:
    """Apply an ack that acknowledges new frames (True); a repeat or a bad one is a message like
    any other (False)."""
    try:
        return outbox.ack(ack.frames) > 0
    except ValueError:
        return False


def rate_limited(command: Command | ProtocolError, settings: ServerSettings) -> dict[str, Any]:
    kind = "invalid" if isinstance(command, ProtocolError) else type_of(command)
    return error_frame("rate_limited", f"more than {settings.messages_per_second:g} messages per "
                       f"second: this `{kind}` message was not applied; slow down or the "
                       "connection closes")


def handle(command: Command, client: Client, hub: DeviceHub) -> None:
    if isinstance(command, Ack):
        try:
            client.outbox.ack(command.frames)
        except ValueError as e:
            raise ProtocolError("bad_field", str(e)) from None
    elif isinstance(command, Ping):
        client.outbox.put_message({"type": "pong", "t": command.t, "server_time": time.time()})
    elif isinstance(command, Start) and command.upload is not None:
        data = hub.uploads.take(command.upload, command.kind)
        if data is None:
            raise ProtocolError("bad_field", f"no uploaded {command.kind} {command.upload}: upload "
                                "it first (POST /upload), each upload starts one video")
        hub.submit(client, replace(command, data=data))
    elif not isinstance(command, Hello):  # a later hello changes nothing
        hub.submit(client, command)


async def send_loop(ws: WebSocket, client: Client, hub: DeviceHub) -> None:
    """Send the client's outbox until it is closed; a send to a gone client just ends it."""
    outbox = client.outbox
    try:
        while (item := await outbox.get()) is not None:
            if isinstance(item, Frame):
                await ws.send_bytes(item.data)
            elif isinstance(item, Close):
                await ws.close(item.code, item.reason)
                return
            else:
                if item.get("type") == "status":
                    item = {**item, "frames_sent": outbox.sent, "frames_dropped": outbox.dropped,
                            "waiting": len(hub.waiting)}
                await ws.send_text(json.dumps(item))
    except Exception as e:  # the client went away mid-send
        log.debug("client %d: send ended: %r", client.id, e)
        outbox.abandon()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (IPv6 for an address with a colon) and listening;
    a port in use or an address not of this machine is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock
