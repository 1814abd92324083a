"""What a prompt change costs the chunk it lands on: a hard switch (text cache rebuilt and the
window re-encoded: the recache, one DiT call over the window) against a transition chunk (only
the text cache rebuilt for the blended conditioning) and a plain chunk, DiT only.

    python benchmarks/bench_transitions.py [--preset tiny] [--repeats 5]

Each row is the median over `--repeats` streams of the chunk's wall time, all measured side by
side in one run; ratios are against the plain chunk.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402

from memflow.chunk_loop import ChunkStepper  # noqa: E402
from memflow.config import MemoryOptions, SamplingConfig, StreamConfig  # noqa: E402
from memflow.noise import SeededNoise  # noqa: E402
from memflow.prompt_blend import Transition  # noqa: E402
from memflow.stream import Stream  # noqa: E402


def chunk_seconds(stepper: ChunkStepper, preset: C.Preset, change: Transition | None,
                  device: torch.device, dtype: torch.dtype) -> float:
    """Wall time of chunk 6 of a stream, with `change` asked for right before it."""
    a = C.prompt_embeds(preset, device, dtype, seed=1)
    b = C.prompt_embeds(preset, device, dtype, seed=2)
    stream = Stream(stepper, a, SeededNoise(0, dtype=dtype, device=device, order="per_chunk"),
                    latent_hw=preset.latent_hw, num_frames=60)
    with torch.no_grad():
        for _ in range(6):
            stream.next_chunk()
        if change is not None:
            stream.set_prompt(b, "b", transition=change)
        C.sync(device)
        t0 = time.perf_counter()
        stream.next_chunk()
        C.sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(C.PRESETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    preset, device = C.PRESETS[args.preset], torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = C.build_model(preset.dit, device, dtype)
    stream_cfg = StreamConfig(local_attn_size=12, sink_size=3, bank_size=3, record_interval=1,
                              memory=MemoryOptions.clean())
    stepper = ChunkStepper(model, stream_cfg, SamplingConfig(denoising_step_list=(1000, 750, 500, 250)))
    cases = {"plain chunk": None, "hard switch (recache)": Transition(0),
             "transition chunk (4 chunks, slerp)": Transition(4, "slerp")}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for name, change in cases.items():
            times[name].append(chunk_seconds(stepper, preset, change, device, dtype))
    base = statistics.median(times["plain chunk"])
    rows = [[name, C.fmt_ms(statistics.median(t)), f"{statistics.median(t) / base:.2f}"]
            for name, t in times.items()]
    print(f"## bench_transitions: preset `{preset.name}`, {device.type}, {args.repeats} repeats\n")
    print(f"- command: `{C.command_line()}`\n")
    print(C.table(["chunk", "median time (ms)", "vs plain"], rows))


if __name__ == "__main__":
    main()
