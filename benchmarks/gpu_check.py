"""Everything worth knowing about a GPU in one run: `bash benchmarks/gpu_check.sh`.

On a machine with one NVIDIA GPU and nothing else (no downloads: random weights at the real
Wan2.1-1.3B shape, 832x480, bf16) it prints one markdown table: for each memory mode (sink, NAM,
NAM+SMA), each execution (eager: the default dynamic stream; compiled: the fixed-shape stream with
compiled blocks; graphs: the same replayed as CUDA graphs) and each attention backend installed,
the DiT-only and end-to-end (with the streaming VAE decode) frames per second, the first chunk's
latency on a warm model, the compile time and the peak VRAM; then how far CUDA is from the CPU on
the `small` preset in float32 (the same stream on both devices).

`--dry-run` runs the same code on the CPU at the tiny preset in seconds (rows that need CUDA are
listed as skipped): CI runs it, so the script is known to work before a GPU is ever lent.
`--budget-s` stops starting new rows once spent (default 420 s: the whole check stays under 8
minutes); rows not run are listed.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from common import (  # noqa: E402
    MODES,
    PRESETS,
    build_model,
    machine_info,
    machine_md,
    mib,
    prompt_embeds,
    sync,
    table,
)
from timed_video import make_decoder  # noqa: E402

from memflow.attention import BACKENDS  # noqa: E402
from memflow.chunk_loop import ChunkStepper  # noqa: E402
from memflow.config import MemoryOptions, SamplingConfig, StreamConfig  # noqa: E402
from memflow.noise import SeededNoise  # noqa: E402
from memflow.stream import Stream  # noqa: E402

EXECUTIONS = ("eager", "compiled", "graphs")
STEPS = SamplingConfig(denoising_step_list=(1000, 750, 500, 250))
VIDEO_FRAMES_PER_LATENT = 4


@dataclass
class Row:
    mode: str
    execution: str
    backend: str
    dit_fps: float | None = None
    e2e_fps: float | None = None
    first_chunk_s: float | None = None
    compile_s: float | None = None
    peak_bytes: int | None = None
    note: str = ""

    def cells(self) -> list[str]:
        def num(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        return [self.mode, self.execution, self.backend, num(self.dit_fps, ".1f"),
                num(self.e2e_fps, ".1f"), num(self.first_chunk_s and self.first_chunk_s * 1e3, ".0f"),
                num(self.compile_s, ".1f"), mib(self.peak_bytes) if self.peak_bytes else "-",
                self.note]


HEADER = ["memory", "execution", "attention", "DiT FPS", "end-to-end FPS", "first chunk (ms)",
          "compile (s)", "peak VRAM", "note"]


def stream_config(mode_key: str, static: bool) -> StreamConfig:
    mode = MODES[mode_key]
    return StreamConfig(local_attn_size=12, sink_size=mode.sink, bank_size=mode.bank,
                        record_interval=1, sma=mode.sma, sma_top_k=3,
                        memory=MemoryOptions.clean(), static_shapes=static)


def installed_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """SDPA and every flash backend that is installed and takes this device's calls."""
    q = torch.zeros(1, 8, 2, 64, device=device, dtype=dtype)
    return ["sdpa"] + [name for name, b in BACKENDS.items()
                       if name != "sdpa" and b.available() and b.supports(q, q, q, None)]


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.preset = PRESETS[args.preset or ("tiny" if args.dry_run else "wan1.3b")]
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.started = time.perf_counter()
        vae = args.vae or ("tiny" if args.dry_run else "wan")
        decoder, self.decoder_label = make_decoder(vae, self.preset, self.device, self.dtype)
        self.decoder = decoder

    def spent(self) -> float:
        return time.perf_counter() - self.started

    def _stepper(self, mode: str, execution: str, backend: str) -> tuple[ChunkStepper, float]:
        torch._dynamo.reset()
        model = build_model(self.preset.dit, self.device, self.dtype)
        model.set_attention_backend(backend)
        model.set_rope_precision("float32")
        if execution != "eager":
            model.compile_blocks(fullgraph=True,
                                 mode="reduce-overhead" if execution == "graphs" else None)
        stepper = ChunkStepper(model, stream_config(mode, static=execution != "eager"), STEPS)
        compile_s = 0.0
        if execution != "eager":  # compile on a throwaway stream, as a server does at start-up:
            # long enough to fill the window and the bank, so the steady (dense) graph is built
            t0 = time.perf_counter()
            self._chunks(stepper, self.args.warmup_chunks)
            compile_s = time.perf_counter() - t0
        return stepper, compile_s

    def _chunks(self, stepper: ChunkStepper, n: int, decode: bool = False,
                on_chunk: Callable[[int], None] | None = None) -> None:
        context = prompt_embeds(self.preset, self.device, self.dtype)
        stream = Stream(stepper, context, SeededNoise(0, dtype=self.dtype, order="per_chunk"),
                        latent_hw=self.preset.latent_hw, num_frames=3 * n)
        if self.decoder is not None:
            self.decoder.reset()
        with torch.no_grad():
            for i in range(n):
                x0 = stream.next_chunk()
                if decode and self.decoder is not None:
                    self.decoder.decode(x0)
                if on_chunk is not None:
                    on_chunk(i)

    def row(self, mode: str, execution: str, backend: str) -> Row:
        row = Row(mode, execution, backend)
        if execution == "graphs" and self.device.type != "cuda":
            row.note = "skipped: CUDA graphs need CUDA"
            return row
        if self.spent() > self.args.budget_s:
            row.note = "skipped: time budget spent"
            return row
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stepper, compile_s = self._stepper(mode, execution, backend)
        row.compile_s = compile_s if execution != "eager" else None
        n = self.args.chunks
        fpb = stepper.frames_per_block
        marks: list[float] = []
        sync(self.device)
        t0 = time.perf_counter()

        def mark(_: int) -> None:
            sync(self.device)
            marks.append(time.perf_counter())

        self._chunks(stepper, n, on_chunk=mark)
        row.first_chunk_s = marks[0] - t0
        steady = (marks[-1] - marks[0]) / (n - 1)  # past the first chunk (warm-up)
        row.dit_fps = fpb * VIDEO_FRAMES_PER_LATENT / steady
        if self.decoder is not None:
            sync(self.device)
            t1 = time.perf_counter()
            self._chunks(stepper, n, decode=True)
            sync(self.device)
            row.e2e_fps = n * fpb * VIDEO_FRAMES_PER_LATENT / (time.perf_counter() - t1)
        if self.device.type == "cuda":
            row.peak_bytes = torch.cuda.max_memory_allocated()
        return row

    def agreement(self) -> str:
        """The same `small` stream in float32 on the CPU and on this device."""
        preset = PRESETS["small"]
        videos = []
        for device in (torch.device("cpu"), self.device):
            model = build_model(preset.dit, device, torch.float32)
            stepper = ChunkStepper(model, stream_config("nam_sma", static=False), STEPS)
            context = prompt_embeds(preset, device, torch.float32)
            with torch.no_grad():
                videos.append(stepper.rollout(context, 9, preset.latent_hw,
                                              SeededNoise(0, dtype=torch.float32)).cpu())
        diff = (videos[0] - videos[1]).abs()
        return (f"CUDA vs CPU, `small` preset, float32, NAM+SMA, 9 latent frames: max |diff| "
                f"{diff.max().item():.2e}, mean {diff.mean().item():.2e} "
                f"(video max {videos[0].abs().max().item():.2f})"
                + (" - dry run: both on the CPU" if self.device.type == "cpu" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny preset on the CPU: checks the script, measures nothing")
    parser.add_argument("--chunks", type=int, default=None,
                        help="chunks per measurement (default 8 on a GPU, 3 in a dry run)")
    parser.add_argument("--modes", default="sink,nam,nam_sma")
    parser.add_argument("--executions", default=",".join(EXECUTIONS))
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--warmup-chunks", type=int, default=6,
                        help="chunks of the throwaway stream that compiles a row's graphs "
                             "(the window of 12 frames and the bank fill in 5)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="default wan1.3b on a GPU, tiny in a dry run")
    parser.add_argument("--vae", choices=("tiny", "wan", "none"), default=None,
                        help="end-to-end decoder (default wan on a GPU, tiny in a dry run)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run with --dry-run to check the script on a CPU")
    args.chunks = args.chunks or (3 if args.dry_run else 8)
    if args.chunks < 2:
        raise SystemExit("error: --chunks must be at least 2 (the first is the warm-up)")
    check = Check(args)
    backends = installed_backends(check.device, check.dtype)
    rows = [check.row(mode, execution, backend)
            for mode in args.modes.split(",") for execution in args.executions.split(",")
            for backend in backends]
    info = machine_info(check.device)
    print(f"# gpu_check: preset `{check.preset.name}`, {check.device.type}, "
          f"{str(check.dtype).removeprefix('torch.')}, {args.chunks} chunks per row\n")
    print(machine_md(info))
    print(f"decoder: {check.decoder_label}\n")
    print(table(HEADER, [row.cells() for row in rows]))
    print()
    print(check.agreement())
    print(f"\ntotal {check.spent():.0f} s")


if __name__ == "__main__":
    main()
