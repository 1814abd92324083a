"""Where the time of a block goes: linear layers, attention kernels, cache/bank maintenance,
RoPE, the rest of the DiT, VAE decode and MP4 writing; and the achieved TFLOP/s of each
against the analytic FLOP count.

The library is not modified: this process wraps, for its own run only, the functions the
streaming DiT calls (`memflow.streaming.attention`, `memflow.model.attention`,
`CallContext.layer`, `ChunkAttention.__call__`, `StreamState.finish`, `KVCache` / `MemoryBank`
methods, `sma_select`, `apply_rope`) and hooks every `nn.Linear`. Regions are timed with CUDA
events on CUDA (no extra synchronisation inside a block) and with `perf_counter` on CPU.
Instrumentation costs a little; the absolute block times of bench_generation.py are the
reference, this script gives the shares.

Categories (they do not overlap):
* linear: every nn.Linear (q/k/v/o projections, cross-attention q/o, FFN, embeddings, head);
* self-attention kernel: the attention call over [sink | bank | window];
* cross-attention kernel: the attention call over the 512 text tokens;
* cache/bank maintenance: the rest of the streaming self-attention: per layer, reading its
  context (`CallContext.layer`: what each memory source gives: sink and window views from the
  cache, the bank slots) and, in `ChunkAttention.__call__`, concatenating the sources' pieces and
  the SMA frame selection; after the layers, the commit (`StreamState.finish`: the prototype and
  writing the committed K/V);
  plus the bank refresh (NAM insertion/compression) before the layers;
* RoPE: rotating q and k (complex float64, as the reference);
* other DiT: norms, modulation, GELU, residuals, patch embedding, time embedding, unpatchify,
  the scheduler's x0/re-noise arithmetic and Python overhead (block time minus the above);
* VAE decode and MP4 write (when --vae is not none).

    python benchmarks/bench_breakdown.py --preset tiny --threads 1
    python benchmarks/bench_breakdown.py --preset wan1.3b --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch.nn as nn  # noqa: E402
from timed_video import make_decoder, run_video  # noqa: E402

CATEGORIES = ("linear", "self_attn_kernel", "cross_attn_kernel", "maintenance", "rope", "other")
LABELS = {
    "linear": "linear layers",
    "self_attn_kernel": "self-attention kernel",
    "cross_attn_kernel": "cross-attention kernel",
    "maintenance": "cache/bank maintenance",
    "rope": "RoPE",
    "other": "other DiT (norms, modulation, embeddings, scheduler, Python)",
    "decode": "VAE decode (streaming)",
    "write": "MP4 write",
}


class Instrument:
    """Installs timing wrappers into the memflow modules; `remove()` restores them."""

    def __init__(self, model, timer: C.RegionTimer):
        import memflow.kv_cache as kvm
        import memflow.memory_bank as mbm
        import memflow.model as mm
        import memflow.streaming as sm

        self.timer = timer
        self._restore = []
        self._handles = []
        self.parts: dict[str, float] = {}

        def wrap(owner, name, region):
            original = getattr(owner, name)

            def timed(*a, **k):
                timer.start(region)
                try:
                    return original(*a, **k)
                finally:
                    timer.stop(region)

            setattr(owner, name, timed)
            self._restore.append((owner, name, original))

        wrap(sm, "attention", "self_attn_kernel")
        wrap(mm, "attention", "cross_attn_kernel")
        # the streaming self-attention, in three places: the per-layer context read (cache
        # views + bank slots), the attention call itself, the commit after the layers
        wrap(sm.CallContext, "layer", "layer_context")
        wrap(sm.ChunkAttention, "__call__", "attend_total")  # instance calls use the class's
        wrap(sm.StreamState, "finish", "finish_total")
        wrap(sm, "sma_select", "sma_select")
        wrap(mbm.MemoryBank, "refresh", "bank_refresh")
        wrap(mbm.MemoryBank, "read", "bank_read")
        wrap(mbm.MemoryBank, "stage_layer", "bank_stage")
        wrap(kvm.KVCache, "sink_context", "kv_gather")
        wrap(kvm.KVCache, "window_context", "kv_gather")
        wrap(kvm.KVCache, "commit_layer", "kv_commit")
        wrap(mm, "apply_rope", "rope")
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_pre_hook(
                    lambda *_: timer.start("linear", key=1)))
                self._handles.append(module.register_forward_hook(
                    lambda *_: timer.stop("linear", key=1)))

    def remove(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        for h in self._handles:
            h.remove()


def split(block, regions: dict[str, float]) -> dict[str, float]:
    """Non-overlapping categories of one block from the raw regions (seconds)."""
    streaming = (regions.get("layer_context", 0.0) + regions.get("attend_total", 0.0)
                 + regions.get("finish_total", 0.0))
    self_k = regions.get("self_attn_kernel", 0.0)
    out = {
        "linear": regions.get("linear", 0.0),
        "self_attn_kernel": self_k,
        "cross_attn_kernel": regions.get("cross_attn_kernel", 0.0),
        "maintenance": streaming - self_k + regions.get("bank_refresh", 0.0),
        "rope": regions.get("rope", 0.0),
    }
    out["other"] = block.dit_s - sum(out.values())
    out["decode"] = block.decode_s
    out["write"] = block.write_s
    for k in ("sma_select", "bank_refresh", "kv_gather", "kv_commit", "bank_read", "bank_stage"):
        out["sub_" + k] = regions.get(k, 0.0)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, default_modes="sink,nam,nam_sma")
    g = p.add_argument_group("measurement")
    g.add_argument("--warmup-blocks", type=int, default=8)
    g.add_argument("--vae", choices=("auto", "tiny", "wan", "none"), default="auto")
    g.add_argument("--torch-profile", type=int, default=0, metavar="N",
                   help="also print torch.profiler's top N ops of one steady block")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.frames is None:  # default: the warm-up blocks and 4 steady ones
        args.frames = (args.warmup_blocks + 4) * args.frames_per_block
    preset, device, dtype = C.resolve(args)
    modes = C.parse_modes(args.modes)
    cfg = C.run_config(preset, args)
    start_load = "%.2f %.2f %.2f" % __import__("os").getloadavg()
    model = C.build_model(cfg, device, dtype, args.seed)
    context = C.prompt_embeds(preset, device, dtype)
    decoder, decoder_note = make_decoder(args.vae, preset, device, dtype)
    fpb = args.frames_per_block
    warm_args = argparse.Namespace(**{**vars(args), "frames": 2 * fpb})
    run_video(model, preset, modes[0], warm_args, context, device, dtype, decoder=decoder)

    results = {}
    for mode in modes:
        print(f"{mode.label}", file=sys.stderr, flush=True)
        timer = C.RegionTimer(device)
        inst = Instrument(model, timer)
        per_block: list[dict[str, float]] = []
        try:
            video = run_video(model, preset, mode, args, context, device, dtype,
                              decoder=decoder, seed=args.seed,
                              block_hook=lambda b: per_block.append(split(b, timer.collect())))
        finally:
            inst.remove()
        results[mode.key] = (video, per_block)

    profile_md = ""
    if args.torch_profile:
        profile_md = torch_profile(model, preset, modes[-1], args, context, device, dtype)
    info = C.machine_info(device)
    report = render(args, preset, cfg, modes, results, decoder_note, info, start_load)
    C.emit(report + profile_md, args, {
        "machine": info, "args": vars(args),
        "blocks": {k: [dict(b.__dict__, **parts) for b, parts in zip(v.blocks, pb)]
                   for k, (v, pb) in results.items()}})


def torch_profile(model, preset, mode, args, context, device, dtype) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    holder = {}
    prof = profile(activities=activities)
    target = args.warmup_blocks

    def block_hook(block):
        if block.index == target - 1:
            prof.__enter__()
            holder["on"] = True
        elif block.index == target and holder.get("on"):
            prof.__exit__(None, None, None)
            holder["on"] = False

    short = argparse.Namespace(**{**vars(args), "frames": (target + 1) * args.frames_per_block})
    run_video(model, preset, mode, short, context, device, dtype, block_hook=block_hook)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.torch_profile)
    return (f"\ntorch.profiler, one steady block of {mode.label} (block {target}):\n\n```\n"
            f"{table}\n```\n")


def render(args, preset, cfg, modes, results, decoder_note, info, start_load) -> str:
    fpb = args.frames_per_block
    w = args.warmup_blocks
    frame_len = cfg.tokens_per_frame(*preset.latent_hw)
    lq = fpb * frame_len
    steps = len(str(args.steps).split(","))
    has_vae = any(v.blocks[0].pixel_frames for v, _ in results.values())
    cats = list(CATEGORIES) + (["decode", "write"] if has_vae else [])
    header = ["category"]
    for m in modes:
        header += [f"{m.key}: ms/block", f"{m.key}: share", f"{m.key}: TFLOP/s"]
    rows = []
    med: dict[str, dict[str, float]] = {}
    flops: dict[str, dict[str, float]] = {}
    totals = {}
    for m in modes:
        video, parts = results[m.key]
        steady_parts = parts[w:]
        steady_blocks = video.blocks[w:]
        med[m.key] = {k: statistics.median(p[k] for p in steady_parts) for k in steady_parts[0]}
        totals[m.key] = statistics.median(b.e2e_s for b in steady_blocks)
        b = steady_blocks[0]
        den = C.call_flops(cfg, lq, b.key_frames_denoise * frame_len, fpb)
        com = C.call_flops(cfg, lq, b.key_frames_commit * frame_len, fpb)
        both = {k: steps * den[k] + com[k] for k in den}
        flops[m.key] = {
            "linear": C.linear_flops(both),
            "self_attn_kernel": both["self_attn"],
            "cross_attn_kernel": both["cross_attn"],
        }
    for cat in cats:
        row = [LABELS[cat]]
        for m in modes:
            t = med[m.key][cat]
            fl = flops[m.key].get(cat)
            row += [C.fmt_ms(t), f"{t / totals[m.key] * 100:.1f}%",
                    f"{fl / t / 1e12:.3g}" if fl and t > 0 else "-"]
        rows.append(row)
    total_row = ["**block total**"]
    dit_row = ["DiT total (analytic FLOPs / DiT time)"]
    for m in modes:
        video, _ = results[m.key]
        dit = statistics.median(b.dit_s for b in video.blocks[w:])
        fl = statistics.median(b.flops for b in video.blocks[w:])
        total_row += [f"**{C.fmt_ms(totals[m.key])}**", "100%", ""]
        dit_row += [C.fmt_ms(dit), f"{dit / totals[m.key] * 100:.1f}%", f"{fl / dit / 1e12:.3g}"]
    rows += [dit_row, total_row]
    sub_rows = []
    for key, label in (("sub_kv_gather", "KV cache read (sink + window gather)"),
                       ("sub_kv_commit", "KV cache write (commit call only)"),
                       ("sub_bank_read", "bank read"), ("sub_bank_stage", "prototype staging"),
                       ("sub_sma_select", "SMA frame selection"),
                       ("sub_bank_refresh", "NAM bank refresh (insert / compress)")):
        row = [label]
        for m in modes:
            row.append(C.fmt_ms(med[m.key][key]))
        sub_rows.append(row)
    refresh_max = {m.key: max(p["sub_bank_refresh"] for p in results[m.key][1][w:]) for m in modes}
    out = [
        f"### bench_breakdown: preset `{preset.name}`, {info['device']}",
        "",
        C.machine_md(info, start_load),
        f"- model: {preset.note}" + (f"; only {cfg.num_layers} layer(s) run" if args.layers else ""),
        f"- {args.frames} latent frames per mode, medians over blocks {w}.. (steady state); "
        f"behaviour `{args.behaviour}`; decoder: {decoder_note if has_vae else 'none'}",
        "- TFLOP/s = analytic FLOPs of the category (flops.py) / its measured time",
        "",
        C.table(header, rows),
        "",
        "Inside cache/bank maintenance (ms per block, median; the refresh compresses only every "
        f"{args.record_interval}rd block in `clean` behaviour, so its median can be 0; max over "
        "the steady blocks: " + ", ".join(f"{k} {C.fmt_ms(v)} ms" for k, v in refresh_max.items())
        + "):",
        "",
        C.table(["part"] + [m.key for m in modes], sub_rows),
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
