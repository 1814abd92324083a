"""The live server's limits and recoveries (FakeSession under FastAPI's TestClient): acks free of
the rate limit, an answer to every refused message, parse errors that never raise, one save at a
time with downloads per client, the hold/idle limits, the queue and unauthenticated caps, a
reload taking its stream back, the Host check on IPv6, and what `switch_chunks` counts."""
from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from live_helpers import (  # noqa: E402,F401
    CLOSED,
    PATIENCE_S,
    FakeSession,
    assert_released,
    fake_app,
    of_type,
    receive_until,
    wait_until,
)
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from memflow.errors import InputError  # noqa: E402
from pipeline.live import ServerSettings, create_app  # noqa: E402
from pipeline.live.downloads import PREFIX, DownloadStore, remove_orphans  # noqa: E402
from pipeline.live.outbox import Close, Frame, Outbox  # noqa: E402
from pipeline.live.settings import loopback_host_names  # noqa: E402


def test_acks_of_new_frames_do_not_count_against_the_rate_limit(fake_app):
    """One ack per frame, far past the message rate: the save that follows is still applied."""
    app, _ = fake_app(session=FakeSession(delay_s=0.01), messages_per_second=1, message_burst=4)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        ws.send_json({"type": "start", "prompt": "a cat"})
        frames: list[bytes] = []
        while len(frames) < 40:  # 40 acks, one per frame
            receive_until(ws, of_type("chunk"), frames=frames)
        ws.send_json({"type": "save"})
        saved = receive_until(ws, of_type("saved"), frames=frames)
        assert saved["frames"] > 0


def test_every_refused_message_is_answered_with_its_type(fake_app):
    app, _ = fake_app(messages_per_second=0.001, message_burst=3)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        for t in range(3):
            ws.send_json({"type": "ping", "t": t})
        ws.send_json({"type": "save"})
        ws.send_json({"type": "stop"})
        first = receive_until(ws, of_type("error", code="rate_limited"))
        second = receive_until(ws, of_type("error", code="rate_limited"))
        assert "`save`" in first["message"] and "`stop`" in second["message"]


@pytest.mark.parametrize("token", [None, "a-token-of-20-chars!"])
def test_a_huge_json_integer_is_an_error_message_not_a_traceback(fake_app, token):
    app, _ = fake_app(token=token)
    huge = '{"type": "ack", "frames": ' + "9" * 5000 + "}"
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        if token is not None:  # before the token: refused as unauthorized, cleanly
            ws.send_text(huge)
            assert receive_until(ws, of_type("error"))["code"] == "unauthorized"
            with pytest.raises(WebSocketDisconnect) as closed:
                receive_until(ws, CLOSED)
            assert closed.value.code == 4401
            return
        receive_until(ws, of_type("status", state="idle"))
        ws.send_text(huge)
        assert receive_until(ws, of_type("error"))["code"] == "bad_json"
        ws.send_json({"type": "ping", "t": 2})
        assert receive_until(ws, of_type("pong"))["t"] == 2


# -- the outbox ends its sender whatever is queued -------------------------------------------------
def drain(outbox: Outbox) -> list:
    """Everything `get` returns until it says the end (None), with a deadline."""
    async def run():
        items = []
        while (item := await asyncio.wait_for(outbox.get(), PATIENCE_S)) is not None:
            items.append(item)
        return items
    return asyncio.run(run())


def outbox_with_frames_held_back() -> Outbox:
    """An outbox whose ack window (2) is full: 2 frames sent, none acknowledged, 3 waiting."""
    async def fill():
        outbox = Outbox(asyncio.get_running_loop(), max_frames=10, max_messages=10, window=2)
        for i in range(5):
            outbox.put_frame(Frame(b"%d" % i))
        outbox.put_message({"type": "status"})
        assert isinstance(await outbox.get(), Frame) and isinstance(await outbox.get(), Frame)
        assert await outbox.get() == {"type": "status"}
        outbox.put_message({"type": "error"})
        return outbox
    return asyncio.run(fill())


def test_an_abandoned_outbox_ends_its_sender_with_frames_held_back():
    outbox = outbox_with_frames_held_back()
    outbox.abandon()
    outbox._loop = asyncio.new_event_loop()  # the filling loop has ended; wake-ups go nowhere
    assert drain(outbox) == []
    outbox._loop.close()


def test_a_closed_outbox_sends_its_messages_and_close_not_its_held_frames():
    outbox = outbox_with_frames_held_back()
    outbox.close(1012, "bye")
    outbox._loop = asyncio.new_event_loop()
    items = drain(outbox)
    outbox._loop.close()
    assert items == [{"type": "error"}, Close(1012, "bye")]


# -- saves and downloads -----------------------------------------------------------------------------
class GatedSaveSession(FakeSession):
    """A session whose saves wait for `release` before they are written."""

    def __init__(self):
        super().__init__(delay_s=0.01)
        self.release = threading.Event()

    def prepare_save(self, path):
        pending = super().prepare_save(path)
        write = pending.write

        def gated():
            assert self.release.wait(PATIENCE_S), "the test never released the save"
            return write()
        pending.write = gated
        return pending


def test_one_save_at_a_time_per_client(fake_app):
    session = GatedSaveSession()
    app, _ = fake_app(session=session)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        ws.send_json({"type": "start", "prompt": "a cat"})
        receive_until(ws, of_type("chunk"), frames=[])
        try:
            ws.send_json({"type": "save"})
            ws.send_json({"type": "save"})
            assert receive_until(ws, of_type("error"), frames=[])["code"] == "save_in_progress"
        finally:
            session.release.set()
        receive_until(ws, of_type("saved"), frames=[])
        assert app.state.downloads.count() == 1  # the refused save left no folder behind
        assert len(list(app.state.downloads.root.iterdir())) == 1


def test_downloads_are_kept_per_client(tmp_path):
    store = DownloadStore(max_saved=2, root=tmp_path)

    def save(owner: str) -> str:
        file_id, mp4 = store.reserve(owner)
        mp4.write_bytes(b"mp4")
        mp4.with_suffix(".json").write_text("{}")
        store.keep(owner, file_id, mp4, mp4.with_suffix(".json"))
        return file_id

    a = [save("a") for _ in range(3)]
    b = save("b")
    assert store.lookup(f"{a[0]}.mp4") is None  # a's oldest made room for a's newest
    assert all(store.lookup(f"{i}.mp4") for i in (*a[1:], b))
    a.extend(save("a") for _ in range(5))  # a client saving again and again cannot evict b
    assert store.lookup(f"{b}.mp4") is not None and store.count("a") == 2
    store.forget("a")
    assert store.count() == 1 and store.lookup(f"{b}.json") is not None
    store.close()
    assert not store.root.exists()


def test_folders_of_killed_servers_are_removed_by_the_next(tmp_path):
    dead = tmp_path / f"{PREFIX}999999999-abc"  # no such process
    alive = tmp_path / f"{PREFIX}{os.getpid()}-abc"
    other = tmp_path / "unrelated"
    for folder in (dead, alive, other):
        folder.mkdir()
    remove_orphans(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()


# -- the device's queue --------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["max_idle_s", "max_hold_s"])
def test_a_holder_past_its_time_gives_way_to_the_queue(fake_app, limit):
    app, _ = fake_app(**{limit: 0.5})
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as first:
            receive_until(first, of_type("status", state="idle"))
            with client.websocket_connect("/ws") as second:
                queued = receive_until(second, of_type("status", state="queued"))
                assert queued[limit] == 0.5
                expired = receive_until(first, of_type("error"))
                assert expired["code"] == "hold_expired" and expired["fatal"]
                with pytest.raises(WebSocketDisconnect) as closed:
                    receive_until(first, CLOSED)
                assert closed.value.code == 4408
                receive_until(second, of_type("status", state="idle"))  # its turn
        assert_released(app)


def test_a_full_queue_turns_clients_away(fake_app):
    app, _ = fake_app(max_waiting=1)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as holder, client.websocket_connect("/ws") as queued:
            receive_until(holder, of_type("status", state="idle"))
            receive_until(queued, of_type("status", state="queued"))
            with client.websocket_connect("/ws") as third:
                assert receive_until(third, of_type("error"))["code"] == "queue_full"
                with pytest.raises(WebSocketDisconnect) as closed:
                    receive_until(third, CLOSED)
                assert closed.value.code == 1013
        assert_released(app)


def test_unauthenticated_connections_are_capped(fake_app):
    app, _ = fake_app(token="a-token-of-20-chars!", max_unauthenticated=1,
                      auth_timeout_s=PATIENCE_S)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as silent:  # owes its token, sends nothing
            wait_until(lambda: app.state.hub.unauthenticated == 1, "the first to be waiting")
            with client.websocket_connect("/ws") as second:
                assert receive_until(second, of_type("error"))["code"] == "too_many_connections"
                with pytest.raises(WebSocketDisconnect) as closed:
                    receive_until(second, CLOSED)
                assert closed.value.code == 1013
            silent.send_json({"type": "hello", "token": "a-token-of-20-chars!"})
            receive_until(silent, of_type("status", state="idle"))
        assert app.state.hub.unauthenticated == 0


# -- a reload takes its stream back ------------------------------------------------------------------
def test_a_reconnecting_client_takes_its_stream_back(fake_app):
    app, session = fake_app(session=FakeSession(delay_s=0.01), resume_grace_s=PATIENCE_S)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            token = receive_until(ws, of_type("session"))["resume_token"]
            ws.send_json({"type": "start", "prompt": "a cat", "seed": 4})
            before = receive_until(ws, of_type("chunk"), frames=[])
        with client.websocket_connect("/ws") as other:  # meanwhile the stream is kept for it
            receive_until(other, of_type("status", state="queued"))
        with client.websocket_connect(f"/ws?resume={token}") as ws:
            assert receive_until(ws, of_type("session"))["resumed"] is True
            status = receive_until(ws, of_type("status", state="stopped"))
            assert status["seed"] == 4 and status["chunks"] > before["index"]
            ws.send_json({"type": "resume"})
            after = receive_until(ws, of_type("chunk"), frames=[])
            assert after["index"] > before["index"] and after["prompt"] == "a cat"
            ws.send_json({"type": "save"})
            receive_until(ws, of_type("saved"), frames=[])
        with client.websocket_connect("/ws?resume=not-the-token") as ws:
            assert receive_until(ws, of_type("error"))["code"] == "resume_expired"


def test_a_kept_stream_ends_after_its_grace_period(fake_app):
    app, _ = fake_app(resume_grace_s=0.5)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            token = receive_until(ws, of_type("session"))["resume_token"]
            ws.send_json({"type": "start", "prompt": "a cat"})
            receive_until(ws, of_type("chunk"), frames=[])
        with client.websocket_connect("/ws") as other:
            receive_until(other, of_type("status", state="idle"))  # the grace ran out
        with client.websocket_connect(f"/ws?resume={token}") as ws:
            assert receive_until(ws, of_type("error"))["code"] == "resume_expired"
        assert_released(app)


# -- switch_chunks counts the chunk in progress -------------------------------------------------------
class SteppedSession(FakeSession):
    """A session whose chunks are made one at a time, when the test allows one (`allow`)."""

    def __init__(self):
        super().__init__()
        self._permits = threading.Semaphore(0)
        self.in_chunk = threading.Event()

    def allow(self, chunks: int = 1) -> None:
        for _ in range(chunks):
            self._permits.release()

    def next_chunk(self):
        self.in_chunk.set()
        assert self._permits.acquire(timeout=PATIENCE_S), "the test never allowed this chunk"
        self.in_chunk.clear()
        return super().next_chunk()


def test_switch_chunks_counts_the_chunk_in_progress(fake_app):
    session = SteppedSession()
    app, _ = fake_app(session=session)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        ws.send_json({"type": "start", "prompt": "a cat"})
        session.allow()
        receive_until(ws, of_type("chunk", index=0), frames=[])
        wait_until(session.in_chunk.is_set, "chunk 1 to be in progress")
        ws.send_json({"type": "prompt", "prompt": "a dog"})
        ws.send_json({"type": "ping", "t": 1})
        receive_until(ws, of_type("pong"), frames=[])  # the server has the prompt
        session.allow(2)
        switched = receive_until(ws, of_type("chunk", prompt="a dog"), frames=[])
        assert switched["index"] == 2 and switched["switch_chunks"] == 1  # chunk 1 was under way

        ws.send_json({"type": "stop"})
        session.allow()  # the chunk in progress finishes, then it stops
        receive_until(ws, of_type("status", state="stopped"), frames=[])
        ws.send_json({"type": "prompt", "prompt": "a bird"})
        ws.send_json({"type": "resume"})
        session.allow()
        switched = receive_until(ws, of_type("chunk", prompt="a bird"), frames=[])
        assert switched["switch_chunks"] == 0  # nothing was under way while stopped
        ws.send_json({"type": "stop"})
        session.allow(2)


# -- exposure --------------------------------------------------------------------------------------------
def test_an_ipv6_loopback_server_checks_the_host_header(fake_app):
    app, _ = fake_app(host="::1", allowed_hosts=loopback_host_names("::1"))
    with TestClient(app, base_url="http://[::1]:8000") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
        assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400
        assert client.get("/healthz", headers={"host": "evil.example:8000"}).status_code == 400
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/ws", headers={"host": "evil.example"}) as ws:
                receive_until(ws, of_type("hello"))


def test_serve_py_guards_ipv6_loopback_and_refuses_weak_tokens():
    import serve

    for host in ("::1", "[::1]", "127.0.0.1", "localhost"):
        settings = serve.server_settings(serve.parse_args(["--config_path", "x", "--host", host]))
        assert settings.allowed_hosts is not None and "evil.example" not in settings.allowed_hosts
    with pytest.raises(InputError, match="at least 16 characters"):
        ServerSettings(token="password").check()


def test_pages_forbid_base_and_form_targets(fake_app):
    app, _ = fake_app()
    with TestClient(app) as client:
        policy = client.get("/").headers["content-security-policy"]
        assert "base-uri 'none'" in policy and "form-action 'none'" in policy


def test_a_generation_worker_is_really_joined():
    """`join` must wait for the generation thread: a worker method named like one of Thread's
    internals (`_stop` was one) made it return at once, so the next client's worker could
    share the session with a running one."""
    from pipeline.live.protocol import Start
    from pipeline.live.worker import GenerationWorker

    assert not {name for name in vars(GenerationWorker) if not name.startswith("__")} - {"run"} & set(
        dir(threading.Thread))

    async def run() -> GenerationWorker:
        session = FakeSession(delay_s=0.01)
        outbox = Outbox(asyncio.get_running_loop(), 6, 64, 4)
        worker = GenerationWorker(lambda: session, outbox, ServerSettings(),
                                  DownloadStore(1, root=None), owner_key="k")
        worker.start()
        worker.submit(Start("a cat", None))
        wait_until(lambda: session.chunks_made > 2, "chunks to be generated")
        worker.stop()
        worker.join(PATIENCE_S)
        return worker

    worker = asyncio.run(run())
    assert not worker.is_alive()
    worker.downloads.close()


def test_a_download_survives_its_save_being_deleted_meanwhile(fake_app, monkeypatch):
    """A client's saves are deleted when its stream ends, maybe while one is being downloaded:
    the file is opened before the response starts, so the download completes (no 500)."""
    from pipeline.live import app as live_app

    blocks = live_app._blocks

    def deleted_then_sent(handle, size=1 << 20):
        Path(handle.name).unlink()  # gone from the folder once the response has its handle
        yield from blocks(handle, size)

    monkeypatch.setattr(live_app, "_blocks", deleted_then_sent)
    app, _ = fake_app()
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        ws.send_json({"type": "start", "prompt": "a cat"})
        receive_until(ws, of_type("chunk"), frames=[])
        ws.send_json({"type": "save"})
        saved = receive_until(ws, of_type("saved"), frames=[])
        response = client.get(saved["mp4"])
        assert response.status_code == 200 and response.content == b"fake mp4"
        assert response.headers["content-type"] == "video/mp4"
        assert client.get(saved["mp4"]).status_code == 404  # and now it is gone
