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
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .downloads import DownloadStore
from .hub import Client, DeviceHub
from .outbox import Close, Frame, Outbox
from .protocol import (CLOSE_FORBIDDEN_ORIGIN, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_UNAUTHORIZED,
                       FRAME_HEADER, PROTOCOL_VERSION, Ack, Hello, Ping, ProtocolError, RateLimit,
                       decode_text, error_frame, parse_message)
from .settings import ServerSettings

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parents[1] / "web"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token may be in the page's URL
    "Cache-Control": "no-store",
}


def create_app(session_factory: Callable[[], Any], settings: ServerSettings | None = None) -> FastAPI:
    """The server for one device: one session built by `session_factory`, shared in turn."""
    settings = settings or ServerSettings()
    settings.check()
    downloads = DownloadStore(settings.max_saved)
    hub = DeviceHub(session_factory, settings, downloads)

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
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))

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
        if path is None:
            return JSONResponse({"error": "no such file"}, status_code=404)
        return FileResponse(path, filename=f"memflow_live{path.suffix}")

    @app.websocket("/ws")
    async def live(ws: WebSocket):
        await serve_client(ws, hub, settings)

    return app


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
        elif await authenticate(ws, settings, outbox):
            outbox.put_message(hello_message(hub, settings))
            await hub.join(client)
            joined = True
            await receive_loop(ws, client, hub, settings)
    finally:
        outbox.close()
        if joined:
            # Leaving stops and joins the worker, then hands the device on; that must finish
            # even if this handler is cancelled (server shutdown, a test client closing).
            await asyncio.shield(asyncio.ensure_future(hub.leave(client)))
        await sender


def refuse(outbox: Outbox, code: str, message: str, close_code: int) -> None:
    outbox.put_message(error_frame(code, message, fatal=True))
    outbox.close(close_code, message[:120])


def hello_message(hub: DeviceHub, settings: ServerSettings) -> dict[str, Any]:
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "fps": hub.fps,
            "frame_header_bytes": FRAME_HEADER.size,
            "limits": {"max_prompt_chars": settings.max_prompt_chars,
                       "max_prompt_bytes": settings.max_prompt_bytes,
                       "max_message_bytes": settings.max_message_bytes,
                       "messages_per_second": settings.messages_per_second,
                       "message_burst": settings.message_burst,
                       "queue_frames": settings.queue_frames, "ack_window": settings.ack_window,
                       "max_plan_entries": settings.max_plan_entries}}


async def authenticate(ws: WebSocket, settings: ServerSettings, outbox: Outbox) -> bool:
    """With a token set, the client gives it as `?token=` or in a first `hello` message."""
    if settings.token is None:
        return True
    given = ws.query_params.get("token")
    if given is None:
        try:
            message = await asyncio.wait_for(ws.receive(), settings.auth_timeout_s)
        except TimeoutError:
            message = {}
        if message.get("type") == "websocket.disconnect":
            return False
        try:
            hello = parse_message(decode_text(message.get("text") or message.get("bytes") or ""),
                                  settings, 16.0)
        except ProtocolError:
            hello = None
        given = hello.token if isinstance(hello, Hello) else None
    if token_ok(settings, given):
        return True
    refuse(outbox, "unauthorized", "this server needs its access token: connect with "
           "?token=... or send {\"type\": \"hello\", \"token\": ...} first", CLOSE_UNAUTHORIZED)
    return False


async def receive_loop(ws: WebSocket, client: Client, hub: DeviceHub,
                       settings: ServerSettings) -> None:
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
        if not limit.allow():
            if limit.refused >= settings.message_burst:
                refuse(client.outbox, "flood", "too many messages: closing", CLOSE_POLICY)
                return
            if limit.refused == 1:
                client.outbox.put_message(error_frame(
                    "rate_limited", f"more than {settings.messages_per_second:g} messages per "
                    "second: messages are being ignored; slow down or the connection closes"))
            continue
        try:
            handle(parse_message(decode_text(data), settings, hub.fps), client, hub)
        except ProtocolError as e:
            client.outbox.put_message(e.frame())


def handle(command, client: Client, hub: DeviceHub) -> None:
    if isinstance(command, Ack):
        if not client.outbox.ack(command.frames):
            raise ProtocolError("bad_field", f"ack of {command.frames} frames; only "
                                f"{client.outbox.sent} were sent")
    elif isinstance(command, Ping):
        client.outbox.put_message({"type": "pong", "t": command.t, "server_time": time.time()})
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
        outbox.close()
