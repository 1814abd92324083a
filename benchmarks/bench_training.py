"""Memory and time of one training rollout (forward + backward), with block-level activation
checkpointing on and off, side by side.

The rollout is the self-forcing one of stage 1 (TRAINING.md §3.2): every chunk is denoised up to
one exit step whose call carries gradients, then committed without; the KV cache holds the whole
rollout (`cache_frames` = frames, attention window `--local-attn-size`); a loss on all latents is
back-propagated, after a one-chunk warm-up rollout. Each setting runs in a fresh child process so
that its peak memory is its own:
on CUDA the allocator's peak over the rollout, on CPU the process RSS high-water mark minus the
RSS just before the rollout (model, inputs and imports excluded).

    python benchmarks/bench_training.py --preset small --threads 1
    python benchmarks/bench_training.py --preset wan1.3b --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, default_modes="nam")
    p.set_defaults(frames=21)
    p.add_argument("--exit-step", type=int, default=3, help="exit step of every chunk (0-3)")
    p.add_argument("--child", choices=("on", "off"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_child(args) -> dict:
    """One rollout + backward in this process; returns its figures."""
    from memflow.chunk_loop import ChunkStepper
    from memflow.config import SamplingConfig
    from memflow.noise import SeededNoise

    preset, device, dtype = C.resolve(args)
    mode = C.parse_modes(args.modes)[0]
    model = C.build_model(C.run_config(preset, args), device, dtype).train().requires_grad_(True)
    model.gradient_checkpointing = args.child == "on"
    steps = tuple(int(s) for s in str(args.steps).split(","))
    stepper = ChunkStepper(model, C.stream_config(mode, args), SamplingConfig(denoising_step_list=steps))
    context = C.prompt_embeds(preset, device, dtype)

    def rollout(frames: int) -> torch.Tensor:
        noise = SeededNoise(args.seed, dtype=dtype, device=device, context_noise=True)
        state = stepper.new_state(1, preset.latent_hw, frames, cache_frames=frames)
        return stepper.rollout(context, frames, preset.latent_hw, noise, exit_step=args.exit_step,
                               grad=True, state=state)

    # one chunk first: the first checkpointed call pays a one-off set-up of ~2 s on CPU
    rollout(args.frames_per_block).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    probe = C.MemoryProbe(device)
    C.sync(device)
    before = probe.current()
    probe.reset_peak()
    t0 = C.now(device)
    out = rollout(args.frames)
    t1 = C.now(device)
    out.float().square().mean().backward()
    t2 = C.now(device)
    return {"checkpointing": args.child, "before": before, "peak": probe.peak(),
            "forward_s": t1 - t0, "backward_s": t2 - t1, "probe": probe.kind}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    preset, device, dtype = C.resolve(args)
    info = C.machine_info(device)
    start_load = info["load"]
    argv = sys.argv[1:] if argv is None else list(argv)
    results = []
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, *argv, "--child", setting]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    info = C.machine_info(device)
    mode = C.parse_modes(args.modes)[0]
    rows = []
    for r in results:
        rows.append([r["checkpointing"], C.mib(r["peak"] - r["before"]), C.mib(r["peak"]),
                     C.fmt_s(r["forward_s"]), C.fmt_s(r["backward_s"])])
    off, on = results
    ratio = (on["peak"] - on["before"]) / max(1, off["peak"] - off["before"])
    chunks = args.frames // args.frames_per_block
    report = "\n".join([
        f"#### bench_training: preset `{preset.name}`, {device}, {str(dtype).replace('torch.', '')}",
        "",
        C.machine_md(info, start_load),
        f"- preset: {preset.note}" + (f"; {args.layers} layer(s) run" if args.layers else ""),
        f"- rollout: {args.frames} latent frames = {chunks} chunks, mode `{mode.key}` "
        f"({mode.label}), window {args.local_attn_size} frames, KV cache holding the whole "
        f"rollout, exit step {args.exit_step} on every chunk, loss on all latents",
        f"- memory: {off['probe']}; 'rollout peak' is the peak minus the figure just before",
        "",
        C.table(["checkpointing", "rollout peak MiB", "process peak MiB", "forward s",
                 "backward s"], rows),
        "",
        f"Checkpointing on / off, rollout peak: {ratio:.2f}x.",
    ])
    C.emit(report, args, results)


if __name__ == "__main__":
    main()
