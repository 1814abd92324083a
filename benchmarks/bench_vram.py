"""Peak device memory of a generation with the text encoder resident on the device and with it
offloaded to the CPU (`memflow.text_encoder.TextEncoder(offload=True)`).

One process, two phases, same DiT and VAE:
1. offloaded: the umT5 weights live on the CPU and visit the device only while the prompt is
   encoded; then a video is generated (every chunk decoded by the streaming VAE);
2. resident: the umT5 weights are moved to the device and stay there; encode and generate again.

Reported per phase: the peak while encoding the prompt and the peak while generating, as CUDA
allocator figures (max allocated and max reserved), next to the sizes of the weights and of the
KV cache and bank. All weights are random (`--preset wan1.3b`: the real umT5-XXL, 1.3B DiT and
Wan2.1 VAE shapes); memory does not depend on their values.

On CPU the script runs (tiny shapes are the useful check) but reports process RSS, which is not
a VRAM figure.

    python benchmarks/bench_vram.py --preset wan1.3b --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402
from timed_video import make_decoder, run_video  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, default_modes="nam_sma")
    p.set_defaults(frames=36)
    p.add_argument("--vae", choices=("auto", "tiny", "wan", "none"), default="auto")
    return p.parse_args(argv)


def build_text_encoder(preset: C.Preset, device: torch.device, dtype: torch.dtype,
                       offload: bool):
    """A random-weight TextEncoder whose output width is the DiT's text_dim (umT5-XXL for
    wan1.3b). Weights are created in `dtype` directly (no fp32 copy of 5.7B parameters)."""
    from memflow.text_encoder import TextEncoder, new_umt5_encoder, umt5_encoder_config
    from memflow.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    if preset.dit.text_dim == 4096:
        config = umt5_encoder_config()  # umT5-XXL: 24 layers, d_model 4096, d_ff 10240
    else:
        width = preset.dit.text_dim
        config = umt5_encoder_config(vocab_size=len(tokenizer), d_model=width, d_ff=2 * width,
                                     num_heads=4, d_kv=width // 4, num_layers=2)
    with torch.device("meta"):
        encoder = new_umt5_encoder(config)
    encoder = encoder.to(dtype).to_empty(device="cpu" if offload else device)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.02)
    return TextEncoder(encoder, tokenizer, text_len=preset.dit.text_len, dtype=dtype,
                       device=device, offload=offload)


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main(argv=None) -> None:
    args = parse_args(argv)
    preset, device, dtype = C.resolve(args)
    mode = C.parse_modes(args.modes)[0]
    cfg = C.run_config(preset, args)
    start_load = "%.2f %.2f %.2f" % __import__("os").getloadavg()
    probe = C.MemoryProbe(device)
    model = C.build_model(cfg, device, dtype, args.seed)
    decoder, decoder_note = make_decoder(args.vae, preset, device, dtype)
    encoder = build_text_encoder(preset, device, dtype, offload=True)
    prompt = ["A drone shot of a mountain lake at sunrise, mist over the water."]

    phases = []
    for name in ("offloaded", "resident"):
        if name == "resident":
            encoder.offload = False
            encoder.encoder.to(device)
        gc.collect()
        if probe.cuda:
            torch.cuda.empty_cache()
        before = probe.current()
        probe.reset_peak()
        context = encoder.encode(prompt)
        enc_peak, enc_res = probe.peak(), probe.reserved_peak()
        probe.reset_peak()
        video = run_video(model, preset, mode, args, context, device, dtype, decoder=decoder,
                          seed=args.seed)
        gen_peak = max(b.mem_peak for b in video.blocks)
        gen_res = probe.reserved_peak()
        phases.append([name, C.gib(before), C.gib(enc_peak), C.gib(enc_res), C.gib(gen_peak),
                       C.gib(gen_res), C.gib(max(enc_peak, gen_peak))])
        state_bytes = video.state_bytes
        del context

    info = C.machine_info(device)
    kind = "GiB (CUDA)" if probe.cuda else "GiB (process RSS: not VRAM)"
    out = [
        f"### bench_vram: preset `{preset.name}`, {info['device']}, {args.dtype or 'default dtype'}",
        "",
        C.machine_md(info, start_load),
        f"- model: {preset.note}; mode {mode.label}; {args.frames} latent frames; decoder: "
        f"{decoder_note}",
        f"- weights: DiT {C.gib(param_bytes(model))} GiB, text encoder "
        f"{C.gib(param_bytes(encoder.encoder))} GiB, VAE "
        f"{C.gib(param_bytes(decoder.vae) if decoder else 0)} GiB; KV cache + bank buffers "
        f"{C.gib(state_bytes)} GiB",
        "",
        C.table(["text encoder", f"in use before encoding {kind}", f"peak while encoding {kind}",
                 "reserved peak while encoding", f"peak while generating {kind}",
                 "reserved peak while generating", "overall peak"], phases),
    ]
    C.emit("\n".join(out) + "\n", args, {"machine": info, "phases": phases})


if __name__ == "__main__":
    main()
