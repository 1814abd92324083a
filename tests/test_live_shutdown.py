"""serve.py as users run it (uvicorn in a subprocess, the tiny preset): a client that reads a few
chunks without acknowledging any frame and then vanishes must not keep the server from stopping.
SIGTERM then ends it with status 143, its download folder removed and no asyncio warnings about
writing to a dead socket."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

websockets_sync = pytest.importorskip("websockets.sync.client")

REPO = Path(__file__).resolve().parents[1]
PATIENCE_S = 300.0  # model loading and chunks on a busy machine; every wait ends on its condition


def start_server(tmp: Path) -> tuple[subprocess.Popen, str, list[str]]:
    command = [sys.executable, "serve.py", "--config_path", "configs/tiny_interactive.yaml",
               "--port", "0", "height=48", "width=64", "cpu_threads=1"]
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "open http" in line:
                found.set()
    threading.Thread(target=read, daemon=True).start()
    if not found.wait(PATIENCE_S):
        proc.kill()
        raise AssertionError(f"serve.py printed no URL in {PATIENCE_S:.0f} s: {''.join(lines)}")
    url = next(l for l in lines if "open http" in l).split("open ", 1)[1].strip()
    return proc, url.replace("http://", "ws://").rstrip("/") + "/ws", lines


def read_chunks_without_acks(url: str, chunks: int) -> None:
    """Start a video, read `chunks` chunk messages, never acknowledge a frame, then drop the
    connection without a closing handshake."""
    ws = websockets_sync.connect(url, open_timeout=PATIENCE_S)
    ws.send(json.dumps({"type": "start", "prompt": "a cat", "seed": 1}))
    seen = 0
    deadline = time.monotonic() + PATIENCE_S
    while seen < chunks:
        message = ws.recv(timeout=max(1.0, deadline - time.monotonic()))
        if isinstance(message, str) and json.loads(message).get("type") == "chunk":
            seen += 1
    ws.socket.close()  # abrupt: the tab died


def test_sigterm_after_a_client_vanished_without_acks(tmp_path):
    proc, url, lines = start_server(tmp_path)
    try:
        read_chunks_without_acks(url, chunks=3)
        time.sleep(0.5)  # not a wait for a condition: lets the server notice the dead socket
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            status = proc.wait(timeout=PATIENCE_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve.py still running {PATIENCE_S:.0f} s after SIGTERM: "
                                 f"{''.join(lines)[-2000:]}") from None
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=PATIENCE_S)
    output = "".join(lines)
    assert status == -signal.SIGTERM, output  # the shell reports 143
    assert not list(tmp_path.glob("memflow-live-*")), "the download folder outlived the server"
    assert "socket.send() raised" not in output, output
    assert "Traceback" not in output, output
    print(f"\nserve.py exited {took:.1f} s after SIGTERM")
