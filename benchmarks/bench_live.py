"""Live server benchmark: what a WebSocket client gets against `Session.next_chunk()` itself.

    python benchmarks/bench_live.py                       # tiny preset on the CPU
    python benchmarks/bench_live.py --append docs/benchmarks.md
    python benchmarks/bench_live.py --config_path configs/interactive_inference.yaml  # a GPU

One process, one session, one run: first `--chunks` chunks straight from `next_chunk()`, then
the same number through the real server (uvicorn on a loopback port, in a thread) to a client
that acknowledges frames like the page does. Reported: frames per second at steady state (both,
and their ratio), time to first frame, prompt-switch latency (prompt sent -> first frame under
it received, in chunks generated under the old prompt and in ms), bytes per frame; and the
encode time and size of JPEG against WebP frames at the tiny and the 480x832 size, for random
and smooth content (the transport choice, docs/benchmarks.md "Live server").
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.common as C  # noqa: E402
from pipeline.live.protocol import FRAME_HEADER  # noqa: E402

PROMPTS = ("a red fox runs through fresh snow", "the fox jumps into a frozen lake",
           "sunset over snowy mountains")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/tiny_interactive.yaml")
    p.add_argument("--chunks", type=int, default=8, help="chunks per phase (>= 8)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2,
                   help="direct and served phases alternate this many times (a shared machine's "
                   "load drifts; the medians over rounds are compared)")
    p.add_argument("--codec-repeats", type=int, default=10)
    p.add_argument("--append", default=None, metavar="MD")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = p.parse_args(argv)
    if args.chunks < 8:
        p.error("--chunks must be >= 8 (switches are sent after chunks 1, 3 and 5)")
    return args


# -- direct ---------------------------------------------------------------------------------------
def run_direct(session, chunks: int, seed: int) -> dict:
    """`next_chunk()` in a loop: per-chunk end times and frame counts."""
    began = time.perf_counter()
    session.start(PROMPTS[0], seed=seed)
    ends, frames, busy = [], [], []
    for _ in range(chunks):
        result = session.next_chunk()
        ends.append(time.perf_counter())
        frames.append(len(result.frames))
        busy.append(result.generate_s + result.decode_s)
    sample = result.frames[0]
    session.reset()
    return {"first_frame_s": ends[0] - began, "fps": steady_fps(ends, frames),
            "chunk_fps": sum(frames[1:]) / sum(busy[1:]), "sample": sample,
            "chunk_s": statistics.median(b - a for a, b in zip(ends, ends[1:]))}


def steady_fps(ends: list[float], frames: list[int]) -> float:
    """Frames of chunks 1.. over the time from the end of chunk 0 to the end of the last."""
    return sum(frames[1:]) / (ends[-1] - ends[0])


# -- through the server -----------------------------------------------------------------------
@dataclass
class ClientLog:
    chunk_prompt: dict[int, str] = field(default_factory=dict)
    chunk_server: dict[int, dict] = field(default_factory=dict)
    chunk_last_frame: dict[int, float] = field(default_factory=dict)
    chunk_first_frame: dict[int, float] = field(default_factory=dict)
    frames: int = 0
    frame_bytes: list[int] = field(default_factory=list)
    switches: list[dict] = field(default_factory=list)  # {prompt, sent, after_chunk, delay_s}
    plan: dict[int, tuple[str, float]] = field(default_factory=dict)  # after chunk: prompt, delay
    scheduled: list[dict] = field(default_factory=list)
    dropped: int = 0


def start_server(session):
    import uvicorn

    from pipeline.live import ServerSettings, create_app, listening_socket

    sock = listening_socket("127.0.0.1", 0)
    app = create_app(lambda: session, ServerSettings())
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, sock.getsockname()[1]


def run_served(session, chunks: int, seed: int, chunk_s: float) -> tuple[dict, ClientLog]:
    """The same chunks through the server. Switches: right after chunk 1's message arrives (the
    best case: before the next chunk starts), and half a chunk after chunks 3 and 5 (a switch
    typed while a chunk is being made: that chunk still finishes under the old prompt)."""
    from websockets.sync.client import connect

    server, thread, port = start_server(session)
    log = ClientLog(plan={1: (PROMPTS[1], 0.0), 3: (PROMPTS[2], chunk_s / 2),
                          5: (PROMPTS[0], chunk_s / 2)})
    try:
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
            wait_for(ws, log, lambda m: m.get("type") == "status" and m.get("state") == "idle")
            began = time.perf_counter()
            ws.send(json.dumps({"type": "start", "prompt": PROMPTS[0], "seed": seed}))
            done = lambda m: m.get("type") == "chunk" and m["index"] == chunks - 1  # noqa: E731
            wait_for(ws, log, done)
            wait_for(ws, log, lambda m: False, until_frames=sum(
                c["frames"] for c in log.chunk_server.values()))
            ws.send(json.dumps({"type": "stop"}))
            wait_for(ws, log, lambda m: m.get("type") == "status" and m.get("state") == "stopped")
    finally:
        server.should_exit = True
        thread.join()
    ends = [log.chunk_last_frame[i] for i in range(chunks)]
    frames = [log.chunk_server[i]["frames"] for i in range(chunks)]
    busy = [log.chunk_server[i]["generate_s"] + log.chunk_server[i]["decode_s"] for i in range(chunks)]
    return {"first_frame_s": log.chunk_first_frame[0] - began, "fps": steady_fps(ends, frames),
            "chunk_fps": sum(frames[1:]) / sum(busy[1:])}, log


def wait_for(ws, log: ClientLog, predicate, until_frames=None) -> None:
    """Read messages (acking frames every 4, like the page) until `predicate` holds for a JSON
    message or `until_frames` frames have arrived; send the planned switches on the way."""
    while until_frames is None or log.frames < until_frames:
        send_due_switches(ws, log)
        wake = min((s["at"] for s in log.scheduled), default=None)
        try:
            message = ws.recv(timeout=600 if wake is None else max(0.0, wake - time.perf_counter()))
        except TimeoutError:
            continue
        now = time.perf_counter()
        if isinstance(message, bytes):
            _, chunk = FRAME_HEADER.unpack_from(message)
            log.frames += 1
            log.frame_bytes.append(len(message) - FRAME_HEADER.size)
            log.chunk_first_frame.setdefault(chunk, now)
            log.chunk_last_frame[chunk] = now
            if log.frames % 4 == 0:
                ws.send(json.dumps({"type": "ack", "frames": log.frames}))
            continue
        msg = json.loads(message)
        if msg["type"] == "chunk":
            log.chunk_prompt[msg["index"]] = msg["prompt"]
            log.chunk_server[msg["index"]] = msg
            if msg["index"] in log.plan:
                prompt, delay = log.plan.pop(msg["index"])
                log.scheduled.append({"prompt": prompt, "at": now + delay, "delay_s": delay,
                                      "after_chunk": msg["index"]})
        elif msg["type"] == "status":
            log.dropped = msg.get("frames_dropped", log.dropped)
        if predicate(msg):
            return


def send_due_switches(ws, log: ClientLog) -> None:
    for s in [s for s in log.scheduled if s["at"] <= time.perf_counter()]:
        ws.send(json.dumps({"type": "prompt", "prompt": s["prompt"]}))
        log.scheduled.remove(s)
        log.switches.append({**s, "sent": time.perf_counter()})


def switch_rows(log: ClientLog) -> list[dict]:
    """Per switch: chunks generated under the old prompt after it was sent, and the time from
    sending to the first frame under the new prompt."""
    rows = []
    for s in log.switches:
        under = min(i for i, p in log.chunk_prompt.items() if i > s["after_chunk"] and p == s["prompt"])
        rows.append({"after_chunk": s["after_chunk"], "delay_s": s["delay_s"], "switched_at_chunk": under,
                     "old_chunks": under - s["after_chunk"] - 1,
                     "ms": (log.chunk_first_frame[under] - s["sent"]) * 1000,
                     "server_ms": log.chunk_server[under].get("switch_latency_ms")})
    return rows


# -- codecs ----------------------------------------------------------------------------------------
def test_frames(height: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (height + width)], -1)
    return {"random": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "smooth": smooth.astype(np.uint8)}


def codec_rows(sample: np.ndarray, repeats: int) -> list[list]:
    from PIL import Image

    cases = [("tiny session frame", sample)]
    for h, w in [(sample.shape[0], sample.shape[1]), (480, 832)]:
        cases += [(f"{name} {h}x{w}", frame) for name, frame in test_frames(h, w).items()]
    rows = []
    for label, frame in cases:
        image = Image.fromarray(frame)
        for codec, kwargs in [("JPEG q85", {"format": "JPEG", "quality": 85}),
                              ("WebP q80 m0", {"format": "WEBP", "quality": 80, "method": 0}),
                              ("WebP q80 m4", {"format": "WEBP", "quality": 80, "method": 4})]:
            times = []
            for _ in range(repeats):
                out = io.BytesIO()
                t = time.perf_counter()
                image.save(out, **kwargs)
                times.append(time.perf_counter() - t)
            data = out.getvalue()
            decode = []
            for _ in range(repeats):
                t = time.perf_counter()
                Image.open(io.BytesIO(data)).load()
                decode.append(time.perf_counter() - t)
            rows.append([label, codec, C.fmt_ms(statistics.median(times)),
                         C.fmt_ms(statistics.median(decode)), f"{len(data):,}"])
    return rows


# -- report ----------------------------------------------------------------------------------------
def phase_table(directs: list[dict], serveds: list[dict]) -> str:
    """Per round: the wall-clock rate of each phase, and the rate of the same chunks' own
    `next_chunk()` work (generate + decode), so a phase is also compared with itself."""
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    each = lambda runs, key, f: " / ".join(f(r[key]) for r in runs)  # noqa: E731
    two = lambda v: f"{v:.2f}"  # noqa: E731
    ratio = lambda runs: " / ".join(f"{r['fps'] / r['chunk_fps']:.3f}" for r in runs)  # noqa: E731
    return C.table(["", "`next_chunk()` loop (direct)", "WebSocket client", "client / direct (medians)"], [
        ["frames per second received (wall clock), each round", each(directs, "fps", two),
         each(serveds, "fps", two), f"{med(serveds, 'fps') / med(directs, 'fps'):.3f}"],
        ["frames per second of those chunks' `next_chunk()` (generate + decode)",
         each(directs, "chunk_fps", two), each(serveds, "chunk_fps", two), ""],
        ["wall / `next_chunk()` rate, same chunks", ratio(directs), ratio(serveds), ""],
        ["time to first frame, s (each round)", each(directs, "first_frame_s", C.fmt_s),
         each(serveds, "first_frame_s", C.fmt_s),
         f"{med(serveds, 'first_frame_s') / med(directs, 'first_frame_s'):.3f}"]])


def report(args, info, load, session, directs, serveds, logs, codecs) -> str:
    frame_bytes = [b for log in logs for b in log.frame_bytes]
    mean_bytes = statistics.mean(frame_bytes)
    fps = statistics.median(r["fps"] for r in serveds)
    rows = [r for log in logs for r in switch_rows(log)]
    return "\n".join([
        f"### bench_live: `{args.config_path}` ({session.height}x{session.width}, "
        f"{session.frames_per_chunk} latent frames per chunk), {info['device']}", "",
        C.machine_md(info, load),
        f"- {args.rounds} rounds of {args.chunks} chunks direct, then {args.chunks} through the "
        f"server; seed {args.seed}; steady state = chunks 1..{args.chunks - 1}", "",
        phase_table(directs, serveds), "",
        f"Bytes per frame (JPEG q85 + {FRAME_HEADER.size}-byte header): mean {mean_bytes:,.0f} "
        f"(min {min(frame_bytes):,}, max {max(frame_bytes):,}) over {len(frame_bytes)} frames, "
        f"{mean_bytes * 8 * fps / 1000:,.0f} kbit/s at the delivered rate; frames dropped: "
        f"{sum(log.dropped for log in logs)}.", "",
        "Prompt switches (sent a delay after a chunk's message arrived):", "",
        C.table(["sent after chunk", "delay (ms)", "first chunk under it",
                 "chunks generated under the old prompt", "sent -> first frame received (ms)",
                 "server: received -> chunk ready (ms)"],
                [[r["after_chunk"], C.fmt_ms(r["delay_s"]), r["switched_at_chunk"], r["old_chunks"],
                  C.fmt_ms(r["ms"] / 1000), C.fmt_ms((r["server_ms"] or float("nan")) / 1000)]
                 for r in rows]), "",
        f"Frame codecs (Pillow, one core; medians of {args.codec_repeats} encodes and decodes):", "",
        C.table(["frame", "codec", "encode ms", "decode ms", "bytes"], codecs)])


def main(argv=None) -> None:
    args = parse_args(argv)
    from pipeline.session import Session

    load = "%.2f %.2f %.2f" % os.getloadavg()
    session = Session.from_config(args.config_path, args.overrides)
    directs, serveds, logs = [], [], []
    for _ in range(args.rounds):
        directs.append(run_direct(session, args.chunks, args.seed))
        served, log = run_served(session, args.chunks, args.seed, directs[-1]["chunk_s"])
        serveds.append(served)
        logs.append(log)
    codecs = codec_rows(directs[0]["sample"], args.codec_repeats)
    info = C.machine_info(session.components.generator.device)
    text = report(args, info, load, session, directs, serveds, logs, codecs)
    records = {"direct": [{k: v for k, v in d.items() if k != "sample"} for d in directs],
               "served": serveds, "switches": [switch_rows(log) for log in logs],
               "frame_bytes": [log.frame_bytes for log in logs]}
    C.emit(text, args, records)


if __name__ == "__main__":
    main()
