"""Analytic FLOP count of streaming generation, and what it implies for speed.

Counts multiply-adds as 2 FLOPs in the matrix products only (projections, attention scores and
values, FFN, patch embedding, head); softmax, norms, RoPE, modulation and other elementwise work
are excluded. Prints, for a preset:

* the per-layer formula and the FLOPs of one DiT call at each memory mode's steady-state key
  length;
* the FLOPs of one block (4 denoising calls + 1 commit call);
* the upper bound on FPS at a given sustained throughput (default 800 TFLOP/s, the issue's H100
  figure), and the throughput the paper's reported FPS implies;
* the speed ratios between modes that the FLOP count alone predicts, next to the paper's.

    python benchmarks/flops.py --preset wan1.3b
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

from memflow.vae import VAE_STRIDE  # noqa: E402

# MemFlow paper, one H100, DiT only (FPS = 12 frames / time per block).
PAPER_FPS = {"none9": 23.5, "none": 23.5, "sink": 20.3, "nam": 17.6, "nam_sma": 18.7}


def steady_key_frames(mode: C.Mode, window: int, fpb: int, top_k: int) -> int:
    """Keys (in frames) a steady-state call attends: sink + bank (or SMA's top-k of them) +
    the window after the sink (current chunk included)."""
    window = mode.local_attn or window
    if mode.sink == 0:
        return window  # the bank is ignored without a sink
    memory = mode.sink + mode.bank
    if mode.sma:
        memory = min(memory, top_k)
    return memory + (window - mode.sink)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(C.PRESETS), default="wan1.3b")
    p.add_argument("--tflops", type=float, default=C.H100_TFLOPS,
                   help="sustained TFLOP/s for the speed bound (default 800: one H100, bf16)")
    p.add_argument("--steps", type=int, default=4, help="denoising calls per block")
    p.add_argument("--frames-per-block", type=int, default=3)
    p.add_argument("--local-attn-size", type=int, default=12)
    p.add_argument("--sma-top-k", type=int, default=3)
    p.add_argument("--modes", default="none9,none,sink,nam,nam_sma")
    p.add_argument("--append", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    print(report(args))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + report(args))


def report(args) -> str:
    preset = C.PRESETS[args.preset]
    cfg = preset.dit
    fpb = args.frames_per_block
    frame_len = cfg.tokens_per_frame(*preset.latent_hw)
    lq = fpb * frame_len
    modes = C.parse_modes(args.modes)
    video_frames = VAE_STRIDE[0] * fpb
    d, f, T, L = cfg.dim, cfg.ffn_dim, cfg.text_len, cfg.num_layers
    big = C.block_flops(cfg, frame_len, fpb, args.steps, 12, 12) > 1e12
    unit, scale = ("TFLOP", 1e12) if big else ("GFLOP", 1e9)
    lines = [
        f"### FLOP count: preset `{preset.name}`",
        "",
        f"{preset.note}. Lq = {fpb} frames x {frame_len} tokens = {lq} query tokens per call, "
        f"T = {T} text tokens, d = {d}, f = {f}, {L} layers.",
        "",
        "Per layer and DiT call, with Lk keys (sink + bank + window, current chunk included):",
        "",
        C.table(["part", "FLOPs", f"at Lk = 12 frames = {12 * frame_len} tokens"], [
            ["self-attn q, k, v, o projections", "8 Lq d^2",
             f"{8 * lq * d * d / 1e9:,.1f} G"],
            ["self-attn scores + values", "4 Lq Lk d", f"{4 * lq * 12 * frame_len * d / 1e9:,.1f} G"],
            ["cross-attn q, o projections", "4 Lq d^2", f"{4 * lq * d * d / 1e9:,.1f} G"],
            ["cross-attn over text", "4 Lq T d", f"{4 * lq * T * d / 1e9:,.1f} G"],
            ["FFN", "4 Lq d f", f"{4 * lq * d * f / 1e9:,.1f} G"],
        ]),
        "",
        "Once per call: patch embedding + head (2 Lq (16 + 16) 4 d) and the time embedding; once "
        f"per prompt: text embedding and every layer's text K/V "
        f"({C.prompt_flops(cfg) / scale:.3f} {unit}). One NAM compression (prompt keys against the "
        f"bank's frames, all layers): {C.nam_refresh_flops(cfg, 3, frame_len) / scale:.3f} {unit}.",
        "",
    ]
    rows = []
    per_block = {}
    for mode in modes:
        kf = steady_key_frames(mode, args.local_attn_size, fpb, args.sma_top_k)
        parts = C.call_flops(cfg, lq, kf * frame_len, fpb)
        call = sum(parts.values())
        block = C.block_flops(cfg, frame_len, fpb, args.steps, kf, kf)
        per_block[mode.key] = block
        rows.append([
            mode.label, kf, f"{C.linear_flops(parts) / scale:.2f}",
            f"{C.attention_flops(parts) / scale:.2f}", f"{call / scale:.2f}",
            f"{block / scale:.1f}",
            f"{video_frames / (block / (args.tflops * 1e12)):.1f}",
        ])
    lines += [
        f"Per DiT call and per block ({args.steps} denoising calls + 1 commit call) at the steady "
        f"state of each mode; FPS bound = {video_frames} frames / (block FLOPs / "
        f"{args.tflops:g} TFLOP/s):",
        "",
        C.table(["mode", "keys (frames)", f"linear {unit}/call", f"attention {unit}/call",
                 f"{unit}/call", f"{unit}/block", f"FPS bound at {args.tflops:g} TFLOP/s"], rows),
    ]
    if preset.name == "wan1.3b":
        base = per_block.get("sink")
        paper_rows = []
        for mode in modes:
            if mode.key not in PAPER_FPS:
                continue
            fps = PAPER_FPS[mode.key]
            implied = per_block[mode.key] * fps / video_frames / 1e12
            pred = f"{base / per_block[mode.key]:.3f}" if base else "-"
            paper = f"{fps / PAPER_FPS['sink']:.3f}"
            paper_rows.append([mode.label, f"{fps}", f"{implied:.0f}",
                               f"{implied / args.tflops * 100:.0f}%", pred, paper])
        lines += [
            "",
            "Against the paper's H100 figures (DiT only): the throughput each reported FPS implies "
            "under this count, and the FPS ratio to frame-sink-only that the FLOP count alone "
            "predicts next to the paper's:",
            "",
            C.table(["mode", "paper FPS", "implied TFLOP/s", f"of {args.tflops:g}",
                     "predicted FPS / sink-only", "paper FPS / sink-only"], paper_rows),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
