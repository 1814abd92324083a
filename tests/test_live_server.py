"""The live server (pipeline/live) through FastAPI's TestClient: the WebSocket protocol with the
real tiny session, one generation per device with a queue, bad messages, the access token,
downloads by id only, and a slow client that drops frames instead of stalling generation.

Protocol-only tests (queue, bad messages, flood, token, slow client) use `FakeSession`, which
has the Session API's shape and makes small frames instantly, so they run in milliseconds; the
happy path and the downloads use the real tiny Session.
"""
from __future__ import annotations

import gc
import io
import json
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from live_helpers import (  # noqa: E402,F401
    CLOSED,
    FakeSession,
    assert_released,
    fake_app,
    of_type,
    receive_until,
    settings,
    wait_until,
)
from PIL import Image  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from pipeline.live import create_app  # noqa: E402
from pipeline.live.protocol import FRAME_HEADER  # noqa: E402
from pipeline.session import Session  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_interactive.yaml"


# -- protocol with the fake session ------------------------------------------------------------
def test_hello_then_idle_status(fake_app):
    app, _ = fake_app()
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        hello = receive_until(ws, of_type("hello"))
        assert hello["fps"] == 16.0 and hello["frame_header_bytes"] == FRAME_HEADER.size
        status = receive_until(ws, of_type("status", state="idle"))
        assert status["frames_dropped"] == 0


def test_bad_messages_get_error_frames_and_the_connection_stays(fake_app):
    app, _ = fake_app(max_prompt_chars=50, max_prompt_bytes=60)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        cases = [
            (lambda: ws.send_text("{not json"), "bad_json"),
            (lambda: ws.send_text("[1, 2]"), "bad_message"),
            (lambda: ws.send_json({"type": "explode"}), "unknown_type"),
            (lambda: ws.send_json({"type": "start", "prompt": "x" * 51}), "prompt_too_long"),
            # 20 characters, 80 bytes of UTF-8: over the byte limit only
            (lambda: ws.send_json({"type": "start", "prompt": "\U0001F600" * 20}), "prompt_too_long"),
            (lambda: ws.send_json({"type": "start", "prompt": "   "}), "bad_field"),
            (lambda: ws.send_json({"type": "start", "prompt": "a", "seed": -1}), "bad_field"),
            (lambda: ws.send_json({"type": "start", "prompt": "a", "seed": True}), "bad_field"),
            (lambda: ws.send_bytes(b"\xff\xfe\x00garbage"), "not_utf8"),
            (lambda: ws.send_bytes(b'{"type": "ping"}'), "binary_message"),
            (lambda: ws.send_json({"type": "ack", "frames": 5}), "bad_field"),  # none sent yet
            (lambda: ws.send_json({"type": "prompt", "prompt": "a dog"}), "not_started"),
            (lambda: ws.send_json({"type": "prompt", "prompt": "a", "transition_chunks": -1}),
             "bad_field"),
            (lambda: ws.send_json({"type": "prompt", "prompt": "a", "transition_chunks": 65}),
             "bad_field"),
            (lambda: ws.send_json({"type": "prompt", "prompt": "a", "blend": "cubic"}),
             "bad_field"),
            (lambda: ws.send_json({"type": "plan", "switches": [{"prompt": "a"}]}), "bad_field"),
        ]
        for send, code in cases:
            send()
            error = receive_until(ws, of_type("error"))
            assert error["code"] == code, (code, error)
            assert error["message"] and error["fatal"] is False
        ws.send_json({"type": "ping", "t": 1.5})
        assert receive_until(ws, of_type("pong"))["t"] == 1.5  # still connected and answering


def test_oversize_message_closes_with_1009(fake_app):
    app, _ = fake_app(max_message_bytes=1000)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status"))
        ws.send_text(json.dumps({"type": "prompt", "prompt": "x" * 2000}))
        assert receive_until(ws, of_type("error"))["code"] == "message_too_big"
        with pytest.raises(WebSocketDisconnect) as closed:
            receive_until(ws, CLOSED)
        assert closed.value.code == 1009


def test_flood_gets_an_error_frame_then_a_policy_close(fake_app):
    app, session = fake_app(messages_per_second=5, message_burst=10)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        for i in range(40):
            ws.send_json({"type": "ping", "t": i})
        seen = []
        with pytest.raises(WebSocketDisconnect) as closed:
            receive_until(ws, lambda m: seen.append(m) and False)
        assert closed.value.code == 1008
        errors = [m for m in seen if m["type"] == "error"]
        assert errors[-1]["code"] == "flood"
        assert errors[:-1] and all(e["code"] == "rate_limited" and "`ping`" in e["message"]
                                   for e in errors[:-1])  # each refused message is answered
        pongs = [m for m in seen if m["type"] == "pong"]
        assert 10 <= len(pongs) < 20  # the burst passed, the rest was refused
        assert_released(app)  # the flooder's worker was stopped and the device released


def test_token_required_when_set(fake_app):
    app, _ = fake_app(token="s3cret-token-0123")
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:  # no token: the first message must give it
            ws.send_json({"type": "start", "prompt": "a cat"})
            error = receive_until(ws, of_type("error"))
            assert error["code"] == "unauthorized" and error["fatal"]
            with pytest.raises(WebSocketDisconnect) as closed:
                receive_until(ws, CLOSED)
            assert closed.value.code == 4401
        with client.websocket_connect("/ws?token=wrong-token") as ws:
            assert receive_until(ws, of_type("error"))["code"] == "unauthorized"
        with client.websocket_connect("/ws?token=s3cret-token-0123") as ws:
            receive_until(ws, of_type("status", state="idle"))
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "hello", "token": "s3cret-token-0123"})
            receive_until(ws, of_type("status", state="idle"))
        assert client.get("/download/" + "0" * 32 + ".mp4").status_code == 403
        assert client.get("/download/" + "0" * 32 + ".mp4?token=s3cret-token-0123").status_code == 404


def test_foreign_origin_refused(fake_app):
    app, _ = fake_app()
    with TestClient(app) as client:
        with client.websocket_connect("/ws", headers={"origin": "http://evil.example"}) as ws:
            assert receive_until(ws, of_type("error"))["code"] == "forbidden_origin"
            with pytest.raises(WebSocketDisconnect) as closed:
                receive_until(ws, CLOSED)
            assert closed.value.code == 4403


def test_second_client_waits_busy_then_gets_the_device(fake_app):
    app, session = fake_app(session=FakeSession(delay_s=0.01))
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as first:
            receive_until(first, of_type("status", state="idle"))
            first.send_json({"type": "start", "prompt": "a cat", "seed": 1})
            receive_until(first, of_type("chunk"), frames=[])
            with client.websocket_connect("/ws") as second:
                queued = receive_until(second, of_type("status", state="queued"))
                assert queued["position"] == 1 and queued["queue"] == 1
                assert "busy" in queued["message"]
                second.send_json({"type": "start", "prompt": "a dog"})
                busy = receive_until(second, of_type("error"))
                assert busy["code"] == "busy" and "number 1 of 1" in busy["message"]
                first.close()
                receive_until(second, of_type("status", state="idle"))  # it has the device now
                second.send_json({"type": "start", "prompt": "a dog"})
                chunk = receive_until(second, of_type("chunk"), frames=[])
                assert chunk["prompt"] == "a dog" and chunk["index"] == 0
        assert_released(app)


def test_slow_client_drops_frames_and_generation_goes_on(fake_app):
    """A client that reads nothing while many chunks are made: the server keeps at most
    `queue_frames` frames for it, drops the rest (counted), and generation does not wait."""
    app, session = fake_app(queue_frames=6, ack_window=4)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            receive_until(ws, of_type("status", state="idle"))
            ws.send_json({"type": "start", "prompt": "a cat"})
            wait_until(lambda: session.chunks_made >= 30)  # 120 frames, the client reads nothing
            outbox = app.state.hub.owner.outbox
            assert outbox.peak_frames <= 6 and outbox.frames_waiting <= 6
            assert outbox.sent == 4  # the ack window: no ack came, so only 4 frames left
            ws.send_json({"type": "stop"})
            status = receive_until(ws, lambda m: m.get("type") == "status"
                                   and m.get("state") == "stopped")
            assert status["frames_dropped"] >= 120 - 6 - 4
            assert status["frames_dropped"] == outbox.dropped
            freed = weakref.ref(outbox)
            del outbox
        assert_released(app)
        # the client's queue goes with it (once its handler's last steps ran on the loop)
        wait_until(lambda: gc.collect() >= 0 and freed() is None, "the client's outbox to be freed")


def test_session_limit_reported(fake_app):
    app, _ = fake_app(session=FakeSession(limit=2))
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        ws.send_json({"type": "start", "prompt": "a cat"})
        status = receive_until(ws, of_type("status", state="limit"), frames=[])
        assert "session limit" in status["message"] and status["chunks"] == 2
        ws.send_json({"type": "resume"})
        assert receive_until(ws, of_type("error"))["code"] == "at_limit"


class SlowSaveSession(FakeSession):
    """A session whose save is stuck in the encoder until `release` is set."""

    def __init__(self):
        super().__init__(delay_s=0.01)
        self.writing, self.release = threading.Event(), threading.Event()
        self.chunks_at_write = None

    def prepare_save(self, path):
        pending = super().prepare_save(path)

        def write():
            self.chunks_at_write = self.chunks_made
            self.writing.set()
            self.release.wait()
            return pending.write()

        return SimpleNamespace(write=write, video_frames=pending.video_frames)


def test_a_slow_save_does_not_stop_generation(fake_app):
    """The worker hands the encoding to a thread of its own: chunks keep coming while a save is
    being written, and `saved` then reports the frames of the boundary it was asked at."""
    session = SlowSaveSession()
    app, _ = fake_app(session=session)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        ws.send_json({"type": "start", "prompt": "a cat"})
        receive_until(ws, of_type("chunk"), frames=[])
        ws.send_json({"type": "stop"})
        stopped = receive_until(ws, of_type("status", state="stopped"), frames=[])
        try:
            ws.send_json({"type": "save"})
            ws.send_json({"type": "resume"})
            wait_until(session.writing.is_set)
            # a save on the generation thread would hold every chunk back until it is released
            wait_until(lambda: session.chunks_made >= session.chunks_at_write + 3, timeout_s=300)
        finally:
            session.release.set()
        saved = receive_until(ws, of_type("saved"), frames=[])
        assert saved["frames"] == 4 * stopped["chunks"]
        assert client.get(saved["mp4"]).content == b"fake mp4"


def test_download_takes_an_id_never_a_path(fake_app, tmp_path):
    app, _ = fake_app()
    with TestClient(app) as client:
        for name in ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2fserve.py",
                     "0" * 32 + ".mp4", "0" * 32 + ".py", "/etc/passwd", "README.md"]:
            response = client.get("/download/" + name)
            assert response.status_code == 404, name
            assert b"root:" not in response.content
        with client.websocket_connect("/ws") as ws:
            receive_until(ws, of_type("status", state="idle"))
            ws.send_json({"type": "save"})
            assert receive_until(ws, of_type("error"))["code"] == "nothing_to_save"
            ws.send_json({"type": "start", "prompt": "a cat"})
            receive_until(ws, of_type("chunk"), frames=[])
            ws.send_json({"type": "save"})
            saved = receive_until(ws, of_type("saved"), frames=[])
            assert client.get(saved["mp4"]).content == b"fake mp4"
            assert client.get(saved["timeline"]).json()[0]["prompt"] == "a cat"
        # the client left and its stream ended: its saves went with it
        wait_until(lambda: app.state.downloads.count() == 0, "the client's saves to be deleted")
        assert client.get(saved["mp4"]).status_code == 404
        folder = app.state.downloads.root
        assert folder.is_dir()
    assert not folder.exists()  # removed when the server stops


# -- the real tiny session ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_session():
    """The tiny preset at a small frame size (its VAE decode dominates on a CPU)."""
    import torch

    threads = torch.get_num_threads()
    session = Session.from_config(TINY_CONFIG, ["height=48", "width=64"])
    torch.set_num_threads(threads)  # from_config sets the process's thread count; restore it
    return session


def decode_frame(data: bytes) -> tuple[int, int, np.ndarray, str]:
    index, chunk = FRAME_HEADER.unpack_from(data)
    image = Image.open(io.BytesIO(data[FRAME_HEADER.size:]))
    return index, chunk, np.asarray(image.convert("RGB")), image.format


def test_stream_switch_and_download_with_the_tiny_session(tiny_session):
    from memflow.vae import video_frames

    s = tiny_session
    app = create_app(lambda: s, settings())
    frames: list[bytes] = []
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            assert receive_until(ws, of_type("hello"))["fps"] == s.fps
            receive_until(ws, of_type("status", state="idle"))
            ws.send_json({"type": "start", "prompt": "a cat on a chair", "seed": 3})
            first = receive_until(ws, of_type("chunk"), frames=frames)
            assert (first["index"], first["latent_start"], first["prompt"]) == (0, 0, "a cat on a chair")
            ws.send_json({"type": "prompt", "prompt": "a dog in the park", "transition_chunks": 2,
                          "blend": "slerp"})
            switched = receive_until(ws, lambda m: m.get("type") == "chunk"
                                     and m["prompt"] == "a dog in the park", frames=frames)
            # at the next chunk boundary: at most the chunk in progress finished under the old prompt
            assert switched["switched"] and switched["switch_chunks"] in (0, 1)
            assert switched["index"] - first["index"] >= switched["switch_chunks"]
            assert switched["latent_start"] == s.frames_per_chunk * switched["index"]
            assert switched["pixel_start"] == video_frames(switched["latent_start"])
            timeline = receive_until(ws, lambda m: m.get("type") == "timeline"
                                     and len(m["switches"]) == 2, frames=frames)
            assert timeline["switches"][1] == {"latent_frame": switched["latent_start"],
                                               "pixel_frame": switched["pixel_start"],
                                               "prompt": "a dog in the park",
                                               "transition_chunks": 2, "blend": "slerp"}
            memory = receive_until(ws, of_type("memory"), frames=frames)
            assert {int(f) for f in memory["thumbs"]} == set(memory["sink"]) | set(memory["bank"])
            assert memory["sink"]
            ws.send_json({"type": "stop"})
            receive_until(ws, of_type("status", state="stopped"), frames=frames)
            ws.send_json({"type": "save"})
            saved = receive_until(ws, of_type("saved"), frames=frames)

            decoded = [decode_frame(f) for f in frames]
            assert [d[0] for d in decoded] == list(range(len(decoded)))  # in order, none dropped
            assert all(d[3] == "JPEG" and d[2].shape == (s.height, s.width, 3) for d in decoded)
            # each JPEG is its frame: closer to the session's own frame than to another one
            for latent in (0, switched["latent_start"]):
                own = s.thumbnail(latent).astype(float)
                got = decoded[video_frames(latent)][2].astype(float)
                other = decoded[video_frames(latent) + 5][2].astype(float)
                assert np.abs(got - own).mean() < 0.5 * np.abs(other - own).mean()
            mp4 = client.get(saved["mp4"])
            assert mp4.status_code == 200 and mp4.content[4:8] == b"ftyp"
            sidecar = client.get(saved["timeline"]).json()
            assert [e["prompt"] for e in sidecar["timeline"]] == ["a cat on a chair", "a dog in the park"]
            assert sidecar["interactive_jsonl"]["switch_frame_indices"] == [switched["latent_start"]]
            assert sidecar["interactive_jsonl"]["transition_chunks"] == [2]
        assert_released(app)


# -- the page and the command line ------------------------------------------------------------------
def test_page_and_assets_are_served_with_security_headers(fake_app):
    app, _ = fake_app()
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and '<canvas id="video"' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["referrer-policy"] == "no-referrer"
        for asset in ("/static/app.js", "/static/style.css"):
            assert client.get(asset).status_code == 200
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from another site


def run_cli(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_cli_refuses_bad_input_with_one_error_line():
    import sys

    exposed = run_cli(sys.executable, "serve.py", "--config_path", str(TINY_CONFIG), "--host", "0.0.0.0")
    assert exposed.returncode == 2 and "error: --host 0.0.0.0 exposes" in exposed.stderr
    short = run_cli(sys.executable, "serve.py", "--config_path", str(TINY_CONFIG), "--token", "abc")
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    missing = run_cli("bash", "serve.sh", "--config_path", "configs/none.yaml")
    assert missing.returncode == 2 and "error: config file not found" in missing.stderr
    gpus = run_cli("bash", "serve.sh", env={"NUM_GPUS": "2"})
    assert gpus.returncode == 2 and "one process on one device" in gpus.stderr


def _png_bytes() -> bytes:
    image = np.zeros((30, 40, 3), np.uint8)
    image[:, :20] = (200, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_start_from_an_uploaded_image(tiny_session):
    """The page's way: POST the image's bytes, then `start` names the upload; the video opens
    with the image's frame (frame 0, before chunk 0) and chunk 0 follows it."""
    app = create_app(lambda: tiny_session, settings())
    frames: list[bytes] = []
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        up = client.post("/upload?kind=image", content=_png_bytes())
        assert up.status_code == 200 and up.json()["kind"] == "image"
        ws.send_json({"type": "start", "prompt": "a cat", "seed": 3, "image": up.json()["id"]})
        first = receive_until(ws, of_type("chunk"), frames=frames)
        assert (first["index"], first["pixel_start"]) == (0, 1)
        receive_until(ws, lambda m: len(frames) > first["frames"], frames=frames)
        assert decode_frame(frames[0])[:2] == (0, 0)  # the image's frame, sent first
        ws.send_json({"type": "start", "prompt": "a cat", "image": up.json()["id"]})
        error = receive_until(ws, of_type("error"), frames=frames)  # an upload starts one video
        assert error["code"] == "bad_field" and "upload it first" in error["message"]
        bad = client.post("/upload?kind=image", content=b"not an image").json()["id"]
        ws.send_json({"type": "start", "prompt": "a cat", "image": bad})
        error = receive_until(ws, of_type("error"), frames=frames)
        assert error["code"] == "bad_upload" and "is not an image" in error["message"]
    assert_released(app)


def test_uploads_are_bytes_with_a_size_limit_never_a_path(fake_app):
    token = "secret-0123456789"
    app, _ = fake_app(max_upload_bytes=1000, token=token)
    with TestClient(app) as client:
        def upload(query: str, data: bytes) -> int:
            return client.post(f"/upload?{query}", content=data).status_code

        assert upload(f"kind=image&token={token}", b"x" * 1001) == 413
        assert upload("kind=image", b"x") == 403
        assert upload(f"kind=script&token={token}", b"x") == 400
        assert upload(f"kind=video&token={token}", b"") == 400
        assert upload(f"kind=video&token={token}", b"x" * 1000) == 200
        with client.websocket_connect("/ws?token=secret-0123456789") as ws:
            receive_until(ws, of_type("status", state="idle"))
            for field in ({"image": "/etc/passwd"}, {"video": "../clip.mp4"},
                          {"image": "0" * 32, "video": "0" * 32}):
                ws.send_json({"type": "start", "prompt": "a", **field})
                error = receive_until(ws, of_type("error"))
                assert error["code"] == "bad_field", error


def test_runtime_controls_through_the_server(tiny_session):
    """`controls`: fewer steps and a seed apply from the next chunk (the status shows the
    steps), the memory view can be switched off; bad values are error frames."""
    s = tiny_session
    listed = list(s.settings.sampling.denoising_step_list)
    app = create_app(lambda: s, settings())
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        ws.send_json({"type": "controls", "steps": listed[:1]})
        assert receive_until(ws, of_type("error"))["code"] == "not_started"
        ws.send_json({"type": "start", "prompt": "a cat", "seed": 3})
        receive_until(ws, of_type("chunk"))
        ws.send_json({"type": "controls", "steps": listed[:1], "seed": 9, "memory_view": False})
        receive_until(ws, lambda m: m.get("type") == "status" and m.get("steps") == listed[:1])
        assert s.memory_view_enabled is False
        for bad in ({"steps": [123]}, {"steps": "all"}, {"memory_view": "yes"}):
            ws.send_json({"type": "controls", **bad})
            assert receive_until(ws, of_type("error"))["code"] == "bad_field", bad
        ws.send_json({"type": "controls", "steps": None, "memory_view": True})
        receive_until(ws, lambda m: m.get("type") == "status" and m.get("steps") == listed)
        ws.send_json({"type": "stop"})
        receive_until(ws, of_type("status", state="stopped"))
    assert_released(app)


def test_a_weighted_prompt_through_the_server(tiny_session):
    """`prompt` as [text, weight] pairs (the page's "a storm:2 | lightning:1"): the chunk under
    it is named by its parts and weights; bad weights are error frames."""
    app = create_app(lambda: tiny_session, settings())
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        receive_until(ws, of_type("status", state="idle"))
        ws.send_json({"type": "start", "prompt": [["a storm", 2], ["lightning", 1]], "seed": 3})
        first = receive_until(ws, of_type("chunk"))
        assert first["prompt"] == "a storm:2 | lightning:1"
        for bad in ([["a", -1]], [["a", 0]], [["a"]], [], [["", 1]]):
            ws.send_json({"type": "prompt", "prompt": bad})
            assert receive_until(ws, of_type("error"))["code"] == "bad_field", bad
        ws.send_json({"type": "stop"})
        receive_until(ws, of_type("status", state="stopped"))
    assert_released(app)
