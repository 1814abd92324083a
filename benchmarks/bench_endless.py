"""Endless streams: time per chunk and process memory over a very long stream, by position policy.

Streams one video per memory mode with `positions: relative` (default 14,400 latent frames: one
hour at 16 fps) chunk by chunk through the real `Stream`, DiT only, and reports the median time
per chunk of the last tenth over the first tenth (flat: <= 1.05), corrected for the machine's
drift by a young reference stream timed in between, and the process memory at the end of the
first and the last tenth. `positions: absolute` runs the same up to its end, the RoPE
table. Then the cost of the per-call re-rotation: relative against absolute on another preset,
chunks interleaved in one run (a shared machine's load hits both alike).

    python benchmarks/bench_endless.py --preset tiny --threads 1
    python benchmarks/bench_endless.py --frames 1200 --rotation-chunks 10   # a quick look
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402

from memflow.chunk_loop import ChunkStepper  # noqa: E402
from memflow.config import SamplingConfig, StreamConfig  # noqa: E402
from memflow.noise import SeededNoise  # noqa: E402
from memflow.stream import Stream  # noqa: E402

ENDLESS_MODES = {  # name: (label, sink, bank, sma, memory layout)
    "sink": ("frame sink only", 3, 0, False, "standard"),
    "nam": ("NAM (sink + bank)", 3, 3, False, "standard"),
    "nam_sma": ("NAM + SMA", 3, 3, True, "standard"),
    "ema": ("EMA memory (sink + 2 averages)", 3, 0, False, "ema"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(C.PRESETS), default="tiny")
    p.add_argument("--frames", type=int, default=14_400, help="latent frames per relative stream")
    p.add_argument("--modes", default=",".join(ENDLESS_MODES))
    p.add_argument("--steps", default="1000,750,500,250", help="denoising step list")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rotation-preset", choices=sorted(C.PRESETS), default="small")
    p.add_argument("--rotation-chunks", type=int, default=20,
                   help="steady chunks per policy in the re-rotation comparison")
    p.add_argument("--append", default=None, metavar="MD")
    p.add_argument("--json", default=None, metavar="PATH")
    return p.parse_args(argv)


def _stepper(preset: C.Preset, mode: str, positions: str, steps: tuple[int, ...]) -> ChunkStepper:
    _, sink, bank, sma, layout = ENDLESS_MODES[mode]
    stream = StreamConfig(local_attn_size=12, sink_size=sink, bank_size=bank, sma=sma,
                          positions=positions, memory_layout=layout)
    model = C.build_model(preset.dit, torch.device("cpu"), torch.float32)
    return ChunkStepper(model, stream, SamplingConfig(denoising_step_list=steps))


def _stream(stepper: ChunkStepper, preset: C.Preset) -> Stream:
    ctx = C.prompt_embeds(preset, torch.device("cpu"), torch.float32)
    noise = SeededNoise(0, dtype=torch.float32, order="per_chunk")
    return Stream(stepper, ctx, noise, latent_hw=preset.latent_hw, num_frames=12)


REFERENCE_EVERY = 10  # a reference chunk after every 10th chunk of the long stream
REFERENCE_SPAN = (8, 30)  # the reference stream's chunks that count (steady), then it restarts


@torch.no_grad()
def run_stream(preset: C.Preset, mode: str, positions: str, frames: int,
               steps: tuple[int, ...]) -> dict:
    """Time every chunk of one long stream and, interleaved, chunks of a young reference stream
    of the same mode (restarted before it ages): the long stream's time relative to the
    reference in the same tenth cancels what the machine's speed does over the run (a shared
    host drifts by tens of percent over minutes). RSS is sampled at the end of every tenth."""
    stepper = _stepper(preset, mode, positions, steps)
    stream, reference = _stream(stepper, preset), _stream(stepper, preset)
    chunks = frames // stepper.frames_per_block
    tenth = max(1, chunks // 10)
    times, ref_times, rss = [], [[] for _ in range(10)], []
    for n in range(chunks):
        began = time.perf_counter()
        stream.next_chunk()
        times.append(time.perf_counter() - began)
        if n % REFERENCE_EVERY == 0:
            if reference.chunk >= REFERENCE_SPAN[1]:
                reference = _stream(stepper, preset)
            while reference.chunk < REFERENCE_SPAN[0]:  # warm-up, not timed
                reference.next_chunk()
            began = time.perf_counter()
            reference.next_chunk()
            ref_times[min(n // tenth, 9)].append(time.perf_counter() - began)
        if (n + 1) % tenth == 0:
            rss.append(C.rss_bytes())
    first, last = times[:tenth], times[-tenth:]
    raw = statistics.median(last) / statistics.median(first)
    drift = statistics.median(ref_times[-1]) / statistics.median(ref_times[0])
    return {"mode": mode, "positions": positions, "frames": frames, "chunks": chunks,
            "first_ms": statistics.median(first) * 1e3, "last_ms": statistics.median(last) * 1e3,
            "raw_ratio": raw, "machine_drift": drift, "ratio": raw / drift,
            "rss_first": rss[0], "rss_last": rss[-1]}


@torch.no_grad()
def rotation_cost(preset: C.Preset, chunks: int, steps: tuple[int, ...]) -> dict:
    """Relative against absolute, NAM + SMA, chunks interleaved once both windows are full."""
    streams = {p: _stream(_stepper(preset, "nam_sma", p, steps), preset)
               for p in ("absolute", "relative")}
    warmup = 6  # window and bank full
    times = {p: [] for p in streams}
    for n in range(warmup + chunks):
        for positions, stream in streams.items():
            began = time.perf_counter()
            stream.next_chunk()
            if n >= warmup:
                times[positions].append(time.perf_counter() - began)
    absolute, relative = (statistics.median(times[p]) for p in ("absolute", "relative"))
    return {"preset": preset.name, "chunks": chunks, "absolute_ms": absolute * 1e3,
            "relative_ms": relative * 1e3, "ratio": relative / absolute}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = C.PRESETS[args.preset]
    steps = tuple(int(s) for s in args.steps.split(","))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows, records = [], []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ENDLESS_MODES:
            raise SystemExit(f"unknown mode {mode!r}; known: {', '.join(ENDLESS_MODES)}")
        runs = [("relative", args.frames)]
        if ENDLESS_MODES[mode][4] == "standard":  # absolute runs to its end, the RoPE table
            runs.append(("absolute", preset.dit.rope_max_frames // 3 * 3))
        for positions, frames in runs:
            r = run_stream(preset, mode, positions, frames, steps)
            records.append(r)
            rows.append([ENDLESS_MODES[mode][0], positions, f"{frames:,}", f"{r['first_ms']:.1f}",
                         f"{r['last_ms']:.1f}", f"{r['raw_ratio']:.3f}",
                         f"{r['machine_drift']:.3f}", f"**{r['ratio']:.3f}**",
                         C.mib(r["rss_first"]), C.mib(r["rss_last"])])
            print(rows[-1], file=sys.stderr, flush=True)
    rot = rotation_cost(C.PRESETS[args.rotation_preset], args.rotation_chunks, steps)
    records.append(rot)
    info = C.machine_info(torch.device("cpu"))
    report = "\n".join([
        f"### bench_endless: `{preset.name}` preset, one stream per row, DiT only, cpu",
        "",
        C.machine_md(info, load),
        f"- preset: {preset.note}; chunks of 3 latent frames, `local_attn_size` 12, steps {list(steps)}",
        "",
        C.table(["memory", "positions", "latent frames", "first tenth ms/chunk (median)",
                 "last tenth ms/chunk (median)", "last / first", "reference stream last / "
                 "first (machine drift)", "last / first, drift removed", "RSS MiB after first "
                 "tenth", "RSS MiB after last tenth"], rows),
        "",
        f"Re-rotation cost (`{rot['preset']}` preset, NAM + SMA, {rot['chunks']} steady chunks "
        f"each, interleaved): absolute {rot['absolute_ms']:.1f} ms/chunk, relative "
        f"{rot['relative_ms']:.1f} ms/chunk, ratio {rot['ratio']:.3f}.",
    ])
    C.emit(report, args, records)


if __name__ == "__main__":
    main()
