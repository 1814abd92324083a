"""Bytes allocated per steady chunk, dynamic stream (per-layer concatenation, copy on roll)
against the static arena (`compile: true`), at a preset's real shape.

The model is built on the `meta` device, so the real Wan2.1-1.3B shape at 832x480 is measured in
seconds without computing anything: `utils.probes.AllocatedBytes` sums every new tensor of one
steady chunk (4 denoising calls and the commit, past the warm-up), attention counted by its
output only. Usage: python benchmarks/bench_alloc.py [--preset wan1.3b] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402

from memflow.chunk_loop import ChunkStepper  # noqa: E402
from memflow.config import MemoryOptions, SamplingConfig, StreamConfig  # noqa: E402
from memflow.model import WanDiT  # noqa: E402
from memflow.noise import SeededNoise  # noqa: E402
from memflow.stream import Stream  # noqa: E402
from utils.probes import AllocatedBytes  # noqa: E402

STEPS = SamplingConfig(denoising_step_list=(1000, 750, 500, 250))


def steady_chunk(model: WanDiT, preset: C.Preset, mode: C.Mode, static: bool,
                 dtype: torch.dtype) -> AllocatedBytes:
    stream_cfg = StreamConfig(local_attn_size=12, sink_size=mode.sink, bank_size=mode.bank,
                              record_interval=1, sma=mode.sma, sma_top_k=3,
                              memory=MemoryOptions.clean(), static_shapes=static)
    stepper = ChunkStepper(model, stream_cfg, STEPS)
    context = torch.zeros(1, 100, preset.dit.text_dim, device="meta", dtype=dtype)
    stream = Stream(stepper, context, SeededNoise(0, dtype=dtype, order="per_chunk"),
                    latent_hw=preset.latent_hw, num_frames=60)
    with torch.no_grad():
        for _ in range(6):  # the window rolls, the bank fills and compresses
            stream.next_chunk()
        with AllocatedBytes() as alloc:
            stream.next_chunk()
    return alloc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(C.PRESETS), default="wan1.3b")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--modes", default="sink,nam,nam_sma")
    args = p.parse_args()
    preset, dtype = C.PRESETS[args.preset], getattr(torch, args.dtype)
    with torch.device("meta"):
        model = WanDiT(preset.dit).eval().to(dtype)
    model.set_rope_precision("float32")
    rows = []
    for mode in C.parse_modes(args.modes):
        before = steady_chunk(model, preset, mode, static=False, dtype=dtype)
        after = steady_chunk(model, preset, mode, static=True, dtype=dtype)
        cat = before.by_op.get("aten.cat.default", 0)
        rows.append([mode.label, f"{before.total / 1e9:.1f}", f"{cat / 1e9:.1f}",
                     f"{after.total / 1e9:.1f}", f"{after.by_op.get('aten.cat.default', 0) / 1e9:.2f}",
                     f"{(before.total - after.total) / 1e9:.1f}"])
    print(f"## bench_alloc: preset `{preset.name}`, {args.dtype}, one steady chunk "
          f"(4 steps + commit), meta device\n")
    print(f"- command: `{C.command_line()}`\n")
    print(C.table(["memory", "dynamic: GB allocated", "of which torch.cat", "static: GB allocated",
                   "of which torch.cat", "saved GB"], rows))


if __name__ == "__main__":
    main()
