"""Generation speed per memory mode, side by side, from one run.

For every mode (no memory, frame sink only, NAM, NAM+SMA) one video is streamed with the real
pipeline's chunk stepper (`ChunkStepper.rollout`: denoising calls, then the commit call), each
chunk decoded by the streaming VAE and written to an MP4 as it is produced. Reported per mode:

* time per block (DiT only: the denoising calls + the commit call), steady state: the median
  (and min/max) over the blocks after the warm-up;
* DiT-only FPS as the paper defines it: 12 video frames / time per 3-latent-frame block;
* end-to-end FPS: the same block plus streaming VAE decode and MP4 writing;
* first-block latency (to the first chunk's latents and to its first written frames);
* the overhead of each mode against frame-sink-only (time ratio - 1, and the FPS ratio);
* the achieved TFLOP/s against the analytic FLOP count (see flops.py).

Examples:
    python benchmarks/bench_generation.py --preset tiny
    python benchmarks/bench_generation.py --preset wan1.3b --device cuda --dtype bf16
    python benchmarks/bench_generation.py --preset wan1.3b --layers 1 --frames 15 \
        --warmup-blocks 4 --fast-fill --vae none      # CPU: one layer, extrapolated to 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402
from timed_video import make_decoder, run_video, sampling_config  # noqa: E402

from memflow.vae import VAE_STRIDE  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    g = p.add_argument_group("measurement")
    g.add_argument("--warmup-blocks", type=int, default=8,
                   help="blocks excluded from the steady-state figures (window full after 4 "
                   "blocks, bank full after 7 with record interval 3)")
    g.add_argument("--repeats", type=int, default=1,
                   help="videos per mode; modes are interleaved (A B C D A B C D ...) so slow "
                   "drifts of the machine hit every mode alike")
    g.add_argument("--fast-fill", action="store_true",
                   help="warm-up blocks run one denoising step instead of all (fills the cache "
                   "and bank sooner; for very slow runs such as wan1.3b on CPU)")
    g.add_argument("--vae", choices=("auto", "tiny", "wan", "none"), default="auto",
                   help="streaming decoder for the end-to-end figures (auto: wan for wan1.3b, "
                   "else tiny)")
    g.add_argument("--e2e-repeats", type=int, default=1,
                   help="decode + MP4 videos per mode (at most --repeats)")
    g.add_argument("--e2e-frames", type=int, default=None,
                   help="latent frames of the decode + MP4 videos (default: the preset's; "
                   "tiny 36, since its CPU VAE decode is slow)")
    g.add_argument("--video-dir", default=None, help="keep the MP4s here (default: a temp dir)")
    g.add_argument("--progress", action="store_true", help="print every block")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    preset, device, dtype = C.resolve(args)
    modes = C.parse_modes(args.modes)
    cfg = C.run_config(preset, args)
    start_load = "%.2f %.2f %.2f" % __import__("os").getloadavg()
    fpb = args.frames_per_block
    num_blocks = args.frames // fpb
    args.e2e_frames = args.e2e_frames or preset.e2e_frames
    if min(num_blocks, args.e2e_frames // fpb) <= args.warmup_blocks:
        raise SystemExit(f"{num_blocks} blocks leave nothing after {args.warmup_blocks} warm-up "
                         "blocks; raise --frames")

    model = C.build_model(cfg, device, dtype, args.seed)
    context = C.prompt_embeds(preset, device, dtype)
    decoder, decoder_note = make_decoder(args.vae, preset, device, dtype)
    print(f"preset {preset.name}: {preset.note}; running {cfg.num_layers} layer(s), "
          f"{args.frames} latent frames = {num_blocks} blocks, {dtype}, {device}; "
          f"decoder: {decoder_note}", file=sys.stderr)

    # One throwaway short video first: lazy initialisation (allocator, kernels, RoPE tables,
    # ffmpeg start-up) must not land in the first mode's first-block latency.
    warm_args = argparse.Namespace(**{**vars(args), "frames": (1 if args.fast_fill else 2) * fpb})
    run_video(model, preset, modes[0], warm_args, context, device, dtype, decoder=decoder,
              fast_fill_blocks=1 if args.fast_fill else 0, seed=args.seed,
              video_dir=args.video_dir)

    videos: dict[str, list] = {m.key: [] for m in modes}  # DiT-only pass
    e2e: dict[str, list] = {m.key: [] for m in modes}  # decode + MP4 pass
    e2e_args = argparse.Namespace(**{**vars(args), "frames": args.e2e_frames})
    for r in range(args.repeats):
        for mode in modes:
            print(f"repeat {r + 1}/{args.repeats}: {mode.label} (DiT only)", file=sys.stderr,
                  flush=True)
            videos[mode.key].append(run_video(
                model, preset, mode, args, context, device, dtype, decoder=None,
                fast_fill_blocks=args.warmup_blocks if args.fast_fill else 0,
                time_layer_blocks=args.layers is not None, seed=args.seed + r,
                progress=args.progress))
            if decoder is not None and r < args.e2e_repeats:
                print(f"repeat {r + 1}/{args.repeats}: {mode.label} (decode + MP4)",
                      file=sys.stderr, flush=True)
                e2e[mode.key].append(run_video(
                    model, preset, mode, e2e_args, context, device, dtype, decoder=decoder,
                    fast_fill_blocks=args.warmup_blocks if args.fast_fill else 0,
                    seed=args.seed + r, video_dir=args.video_dir, progress=args.progress))

    info = C.machine_info(device)
    report = render(args, preset, cfg, modes, videos, e2e, decoder_note, info, start_load)

    def dump(runs):
        return {k: [{"blocks": [b.__dict__ for b in v.blocks],
                     **{k2: v2 for k2, v2 in v.__dict__.items() if k2 != "blocks"}} for v in vs]
                for k, vs in runs.items()}

    C.emit(report, args, {"machine": info, "args": vars(args), "dit_only": dump(videos),
                          "end_to_end": dump(e2e)})


def steady(videos, warmup: int):
    return [b for v in videos for b in v.blocks[warmup:]]


def min_median_max(s: dict, fmt) -> str:
    """A summary as "min / **median** / max", the median in bold (the figure to read)."""
    return f"{fmt(s['min'])} / **{fmt(s['median'])}** / {fmt(s['max'])}"


def dit_figures(mode, runs, warm: int, pixel_per_block: int) -> tuple[list[str], dict, float]:
    """A mode's row of the DiT-only table, with the summary of its steady block times and the
    median analytic FLOPs of a block (the extrapolated table reuses both)."""
    blocks = steady(runs, warm)
    dit = C.summary([b.dit_s for b in blocks])
    den = C.summary([b.denoise_s for b in blocks])
    com = C.summary([b.commit_s for b in blocks])
    flops = statistics.median([b.flops for b in blocks])
    keys = sorted({(b.key_frames_denoise, b.key_frames_commit) for b in blocks})
    first_lat = C.summary([v.first_latents_s for v in runs])
    # one median per video shows whether the repeats agree
    per_video = [statistics.median([b.dit_s for b in v.blocks[warm:]]) for v in runs]
    peak = max(b.mem_peak for v in runs for b in v.blocks)
    row = [
        mode.label, ", ".join(f"{d}/{c}" for d, c in keys),
        min_median_max(dit, C.fmt_ms),
        f"{C.fmt_ms(den['median'])} + {C.fmt_ms(com['median'])}",
        f"{pixel_per_block / dit['median']:.2f}",
        C.fmt_s(first_lat["median"]),
        f"{flops / 1e12:.4g}",
        f"{flops / dit['median'] / 1e12:.3g}",
        f"{C.mib(peak)} / {C.mib(runs[0].state_bytes)}",
        f"{dit['n']}" + (f" ({len(per_video)} videos; medians "
                         f"{' / '.join(C.fmt_ms(x) for x in per_video)})"
                         if len(per_video) > 1 else ""),
    ]
    return row, dit, flops


def extrapolated_figures(mode, blocks, flops: float, pixel_per_block: int, full_layers: int,
                         run_layers: int) -> tuple[list[str], dict]:
    """A mode's row of the all-layers table under --layers: time outside the DiT layers as
    measured, time inside them scaled by full_layers / run_layers (the per-layer work is
    the same in every layer), with the summary of those block times."""
    s = C.summary([b.dit_s - b.layers_s + b.layers_s * full_layers / run_layers
                   for b in blocks])
    row = [mode.label, min_median_max(s, C.fmt_s), f"{pixel_per_block / s['median']:.4f}",
           f"{flops * full_layers / run_layers / 1e12:.4g}"]
    return row, s


def e2e_figures(mode, runs, warm: int, pixel_per_block: int) -> tuple[list[str], dict]:
    """A mode's row of the end-to-end table (DiT + decode + MP4 write of every block), with
    the summary of its steady block times."""
    eb = steady(runs, warm)
    tot = C.summary([b.e2e_s for b in eb])
    row = [
        mode.label,
        min_median_max(tot, C.fmt_ms),
        C.fmt_ms(statistics.median(b.dit_s for b in eb)),
        C.fmt_ms(statistics.median(b.decode_s for b in eb)),
        C.fmt_ms(statistics.median(b.write_s for b in eb)),
        f"{pixel_per_block / tot['median']:.2f}",
        C.fmt_s(statistics.median(v.first_pixels_s for v in runs)),
        C.fmt_s(statistics.median(v.total_s for v in runs)),
        str(sum(b.pixel_frames for b in runs[0].blocks)),
        str(tot["n"]),
    ]
    return row, tot


def ratio_rows(modes, block_s: dict[str, float], e2e_s: dict[str, float]) -> list[list[str]]:
    """Every mode against frame-sink-only, from the median block times (DiT-only, and end to
    end where measured); none when the baseline mode was not run."""
    if C.BASELINE_MODE not in block_s:
        return []
    rows = []
    for mode in modes:
        r = block_s[mode.key] / block_s[C.BASELINE_MODE]
        row = [mode.label, f"{r:.3f}", f"{(r - 1) * 100:+.1f}%", f"{1 / r:.3f}"]
        if e2e_s:
            re_ = e2e_s[mode.key] / e2e_s[C.BASELINE_MODE]
            row.append(f"{(re_ - 1) * 100:+.1f}%")
        rows.append(row)
    return rows


def report_intro(args, preset, cfg, info, start_load, decoder_note, extrap: bool,
                 measured_e2e: bool) -> list[str]:
    """The report's title and the bullet list that says what was run and how it was timed."""
    fpb, warm = args.frames_per_block, args.warmup_blocks
    full_layers = preset.dit.num_layers
    steps = len(sampling_config(args).denoising_step_list)
    return [
        f"### bench_generation: preset `{preset.name}`"
        + (f" ({cfg.num_layers} of {full_layers} layers run)" if extrap else "")
        + f", {info['device']}, {dtype_name(args)}",
        "",
        C.machine_md(info, start_load),
        f"- model: {preset.note}" + (f"; **only {cfg.num_layers} layer(s) run**" if extrap else ""),
        f"- video: {args.frames} latent frames = {args.frames // fpb} blocks of {fpb}; {steps} "
        f"denoising calls + 1 commit call per block; window {args.local_attn_size} frames; "
        f"behaviour `{args.behaviour}` (record interval {args.record_interval}, SMA top-k "
        f"{args.sma_top_k}); {args.repeats} DiT-only video(s) per mode, modes interleaved",
        f"- steady state = blocks {warm}.. of each video (the first {warm} are warm-up)"
        + (" ; warm-up blocks ran 1 denoising step (--fast-fill)" if args.fast_fill else ""),
        (f"- end to end: {min(args.e2e_repeats, args.repeats)} separate video(s) per mode "
         f"({args.e2e_frames} latent "
         f"frames), every chunk decoded by {decoder_note} and written with "
         "utils.video_writer.Mp4Writer (libx264 in an ffmpeg subprocess)")
        if measured_e2e else f"- end to end: not measured ({decoder_note})",
    ]


def dit_table(rows, mem_kind: str) -> list[str]:
    return ["", "DiT only (denoising calls + commit call; no decode in the loop):", "",
            C.table(["mode", "keys (frames) denoise/commit",
                     "time/block ms min / **median** / max",
                     "denoise + commit ms (median)", "DiT FPS (12 frames / median block)",
                     "first-block latency to latents s", "TFLOP/block (analytic)",
                     "achieved TFLOP/s", f"peak {mem_kind} / KV+bank buffers MiB",
                     "blocks timed"], rows)]


def extrapolated_table(rows, full_layers: int, run_layers: int) -> list[str]:
    return ["", f"Extrapolated to all {full_layers} layers: time outside the DiT blocks as "
            f"measured + time inside them x {full_layers}/{run_layers}. "
            "**Extrapolated, not measured.**", "",
            C.table(["mode", "time/block s min / **median** / max", "DiT FPS",
                     f"TFLOP/block ({full_layers} layers)"], rows)]


def e2e_table(rows) -> list[str]:
    return ["", "End to end (DiT + streaming VAE decode + MP4 write of every block):", "",
            C.table(["mode", "time/block ms min / **median** / max", "DiT ms (median)",
                     "decode ms (median)", "write ms (median)", "end-to-end FPS",
                     "first-block latency to written frames s",
                     "whole video s (incl. ffmpeg flush)", "frames written",
                     "blocks timed"], rows)]


def ratio_table(rows, extrap: bool, with_e2e: bool) -> list[str]:
    hdr = ["mode", "time/block / sink-only", "overhead", "FPS relative to sink-only"]
    if with_e2e:
        hdr.append("end-to-end overhead")
    label = "extrapolated to all layers" if extrap else "measured"
    return ["", f"Against frame-sink-only (median block times, {label}):", "",
            C.table(hdr, rows)]


def render(args, preset, cfg, modes, videos, e2e, decoder_note, info, start_load) -> str:
    """The markdown report of a run: what was run, then the DiT-only table, the all-layers
    extrapolation (under --layers), the end-to-end table (when decoded) and the overhead of
    each mode against frame-sink-only."""
    pixel_per_block = VAE_STRIDE[0] * args.frames_per_block  # 12 frames per 3-frame block
    full_layers = preset.dit.num_layers
    extrap = args.layers is not None and args.layers < full_layers
    warm = args.warmup_blocks
    rows, extra_rows, e2e_rows = [], [], []
    block_s: dict[str, float] = {}  # median block time per mode (extrapolated under --layers)
    e2e_s: dict[str, float] = {}
    for mode in modes:
        row, dit, flops = dit_figures(mode, videos[mode.key], warm, pixel_per_block)
        rows.append(row)
        block_s[mode.key] = dit["median"]
        if extrap:
            row, ext = extrapolated_figures(mode, steady(videos[mode.key], warm), flops,
                                            pixel_per_block, full_layers, cfg.num_layers)
            extra_rows.append(row)
            block_s[mode.key] = ext["median"]
        if e2e[mode.key]:
            row, tot = e2e_figures(mode, e2e[mode.key], warm, pixel_per_block)
            e2e_rows.append(row)
            e2e_s[mode.key] = tot["median"]
    ratios = ratio_rows(modes, block_s, e2e_s)
    out = report_intro(args, preset, cfg, info, start_load, decoder_note, extrap, bool(e2e_rows))
    out += dit_table(rows, C.MemoryProbe(torch.device(args.device)).kind)
    if extrap:
        out += extrapolated_table(extra_rows, full_layers, cfg.num_layers)
    if e2e_rows:
        out += e2e_table(e2e_rows)
    if ratios:
        out += ratio_table(ratios, extrap, bool(e2e_rows))
    return "\n".join(out) + "\n"


def dtype_name(args) -> str:
    return args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")


if __name__ == "__main__":
    main()
