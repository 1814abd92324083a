"""Cost per block and memory against block index, up to long videos.

Streams one long video per mode (default 240 latent frames = 80 blocks) with the real pipeline
and records, for every block: DiT time, attended key length, memory after the block and peak
memory (CUDA: allocator peak during that block; CPU: process RSS and its high-water mark).
The claim under test: once the window (and bank) are full, time per block is flat and memory
is bounded; only the whole-video latent tensors (initial noise and output, a few MB per 100
frames) grow with the length.

    python benchmarks/bench_scaling.py --preset tiny --threads 1
    python benchmarks/bench_scaling.py --preset small --modes nam_sma --threads 1
    python benchmarks/bench_scaling.py --preset wan1.3b --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402
from timed_video import make_decoder, run_video  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, default_modes="sink,nam_sma")
    p.set_defaults(frames=240)
    g = p.add_argument_group("measurement")
    g.add_argument("--warmup-blocks", type=int, default=8,
                   help="blocks before the steady-state fit (window and bank filling)")
    g.add_argument("--rows", default="0,1,2,3,4,5,6,7,8,9,10,15,20,30,40,50,60,70,79",
                   help="block indices shown in the table (all are in --json)")
    g.add_argument("--vae", choices=("auto", "tiny", "wan", "none"), default="none",
                   help="also decode + write every block (default: DiT only)")
    g.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def slope(xs, ys) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def main(argv=None) -> None:
    args = parse_args(argv)
    preset, device, dtype = C.resolve(args)
    modes = C.parse_modes(args.modes)
    cfg = C.run_config(preset, args)
    start_load = "%.2f %.2f %.2f" % __import__("os").getloadavg()
    fpb = args.frames_per_block
    if args.frames // fpb <= args.warmup_blocks:
        raise SystemExit(f"{args.frames // fpb} blocks leave nothing after {args.warmup_blocks} "
                         "warm-up blocks; raise --frames or lower --warmup-blocks")
    model = C.build_model(cfg, device, dtype, args.seed)
    context = C.prompt_embeds(preset, device, dtype)
    decoder, decoder_note = make_decoder(args.vae, preset, device, dtype)
    warm_args = argparse.Namespace(**{**vars(args), "frames": 2 * fpb})
    run_video(model, preset, modes[0], warm_args, context, device, dtype, decoder=decoder)
    videos = {}
    for mode in modes:
        print(f"{mode.label}: {args.frames} latent frames", file=sys.stderr, flush=True)
        videos[mode.key] = run_video(model, preset, mode, args, context, device, dtype,
                                     decoder=decoder, seed=args.seed, progress=args.progress)
    info = C.machine_info(device)
    report = render(args, preset, cfg, modes, videos, decoder_note, info, start_load)
    C.emit(report, args, {"machine": info, "args": vars(args),
                          "videos": {k: [b.__dict__ for b in v.blocks] for k, v in videos.items()}})


def render(args, preset, cfg, modes, videos, decoder_note, info, start_load) -> str:
    probe = C.MemoryProbe(torch.device(args.device))
    cuda = probe.cuda
    n_blocks = args.frames // args.frames_per_block
    shown = [int(r) for r in args.rows.split(",") if int(r) < n_blocks]
    if n_blocks - 1 not in shown:
        shown.append(n_blocks - 1)
    timing = "time/block ms" + (" (DiT + decode + write)" if decoder_note and args.vae != "none"
                                else " (DiT)")
    header = ["block", "latent frames done"]
    for m in modes:
        header += [f"{m.key}: keys", f"{m.key}: {timing}",
                   f"{m.key}: {'allocated' if cuda else 'RSS'} MiB",
                   f"{m.key}: {'peak in block' if cuda else 'RSS high water'} MiB"]
    rows = []
    for i in shown:
        row = [i, (i + 1) * args.frames_per_block]
        for m in modes:
            b = videos[m.key].blocks[i]
            row += [b.key_frames_denoise, C.fmt_ms(b.e2e_s), C.mib(b.mem_current),
                    C.mib(b.mem_peak)]
        rows.append(row)

    w = args.warmup_blocks
    summary_rows = []
    for m in modes:
        blocks = videos[m.key].blocks
        steady = blocks[w:]
        times = [b.e2e_s for b in steady]
        first10, last10 = times[:10], times[-10:]
        s = slope([b.index for b in steady], times)
        med = statistics.median(times)
        mem_w = blocks[w].mem_current
        mem_end = blocks[-1].mem_current
        peak = max(b.mem_peak for b in blocks)
        summary_rows.append([
            m.label,
            f"{C.fmt_ms(statistics.median(first10))} / {C.fmt_ms(statistics.median(last10))}",
            f"{statistics.median(last10) / statistics.median(first10):.3f}",
            f"{s * 1000 * 10:+.2f} ms ({s * 10 / med * 100:+.2f}%)",
            f"{C.fmt_ms(min(times))} / {C.fmt_ms(med)} / {C.fmt_ms(max(times))}",
            f"{C.mib(mem_w)} -> {C.mib(mem_end)} ({(mem_end - mem_w) / 2**20:+.1f})",
            C.mib(peak),
            f"{C.mib(videos[m.key].state_bytes)} + {C.mib(videos[m.key].video_bytes)}",
        ])
    out = [
        f"### bench_scaling: preset `{preset.name}`, {args.frames} latent frames "
        f"({n_blocks} blocks), {info['device']}",
        "",
        C.machine_md(info, start_load),
        f"- model: {preset.note}" + (f"; only {cfg.num_layers} layer(s) run" if args.layers else ""),
        f"- window {args.local_attn_size} frames, behaviour `{args.behaviour}`, "
        f"{len(str(args.steps).split(','))} denoising calls + 1 commit per block; "
        + (f"every block decoded ({decoder_note}) and written" if args.vae != "none"
           else "DiT only"),
        f"- memory: {probe.kind}" + ("" if cuda else " (the high-water mark covers the whole "
                                     "process, model building included, and never goes down)"),
        "",
        f"Summary over the steady state (blocks {w}..{n_blocks - 1}):",
        "",
        C.table(["mode", "median time/block ms: first 10 / last 10 steady blocks",
                 "last / first", "fitted drift per 10 blocks", "min / median / max ms",
                 f"{'allocated' if cuda else 'RSS'} MiB after block {w} -> last",
                 f"peak MiB", "KV+bank buffers + whole-video latents MiB"], summary_rows),
        "",
        "Per block (selected indices; every block is in --json):",
        "",
        C.table(header, rows),
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
