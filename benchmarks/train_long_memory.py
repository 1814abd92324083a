"""Per-GPU memory of stage-2 training at the released setting, computed from the shapes.

    python benchmarks/train_long_memory.py                 # 8 GPUs, configs/train_long.yaml
    python benchmarks/train_long_memory.py --gpus 16 --rank 64

Nothing is allocated: the networks are built on the meta device (so the parameter counts are
the real ones, LoRA included) and the streaming state is sized from the config the way
`StreamState` sizes it. The model is this project's implementation: FSDP2 full sharding of the
fp32 master weights over the GPUs of a node (bf16 compute), the umT5 encoder replicated in bf16
on every GPU (`text_encoder_cpu_offload: true` moves it to the host), the VAE replicated in bf16,
KV cache / bank / activations in bf16, gradient checkpointing on. Activations are the saved
block inputs of the checkpointed calls; the transient peak of one recomputed or no-grad block is
added once. The table goes to stdout (and, with --write, into docs/benchmarks.md's section).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
BF16, FP32 = 2, 4


@dataclass
class Line:
    what: str
    bytes: float
    note: str


def _count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def estimate(config_path: Path, gpus: int, rank: int | None) -> tuple[list[Line], dict[str, int]]:
    import sys

    sys.path.insert(0, str(REPO))
    from transformers import UMT5Config, UMT5EncoderModel

    from memflow.config import DiTConfig
    from memflow.lora import LoraSettings, add_lora
    from memflow.model import WanDiT
    from trainer.config import TrainSettings, load_train_config

    cfg = load_train_config(config_path, [f"adapter.rank={rank}", f"adapter.alpha={rank}"] if rank else [])
    s = TrainSettings.from_config(cfg, check_files=False)
    lora = s.lora or LoraSettings(rank=256, alpha=256)
    small = DiTConfig()  # Wan2.1-T2V-1.3B
    teacher_cfg = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)  # Wan2.1-T2V-14B
    with torch.device("meta"):
        generator, critic, teacher = WanDiT(small), WanDiT(small), WanDiT(teacher_cfg)
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240,
                                         num_layers=24, num_heads=64,
                                         feed_forward_proj="gated-gelu"))
        base = _count(generator)
        add_lora(generator, lora)
        add_lora(critic, lora)
    counts = {
        "generator": base, "teacher": _count(teacher), "text_encoder": _count(t5),
        "lora_per_model": _count(generator, trainable_only=True),
    }
    trainable = counts["lora_per_model"] * (2 if s.lora_on_critic else 1)
    if not s.lora_on_critic:
        trainable += base

    h, w = s.latent_hw
    frame = small.tokens_per_frame(h, w)
    layers, dim = small.num_layers, small.dim
    kv_per_frame = frame * layers * 2 * dim * BF16  # K and V of every layer
    stream = s.stream
    window = s.streaming.window_frames
    capacity = stream.local_attn_size + window
    block = s.frames_per_block * frame
    blocks_with_grad = window // s.frames_per_block
    text_kv = small.text_len * layers * 2 * dim * BF16
    teacher_tokens = window * frame

    lines = [
        Line("generator weights (fp32, sharded)", base * FP32 / gpus, f"{base / 1e9:.3f} B params"),
        Line("critic weights (fp32, sharded)", base * FP32 / gpus, "Wan2.1-T2V-1.3B"),
        Line("teacher weights (fp32, sharded)", counts["teacher"] * FP32 / gpus,
             f"{counts['teacher'] / 1e9:.2f} B params, frozen"),
        Line("umT5 encoder (bf16, replicated)", counts["text_encoder"] * BF16,
             f"{counts['text_encoder'] / 1e9:.2f} B params; 0 with text_encoder_cpu_offload"),
        Line("LoRA params + grads + AdamW (fp32, sharded)", trainable * FP32 * 4 / gpus,
             f"{trainable / 1e6:.1f} M trainable (rank {lora.rank})"),
        Line("KV cache, local_attn_size + window frames (bf16)", capacity * kv_per_frame,
             f"{capacity} frames x {frame} tokens x {layers} layers"),
        Line("KV cache copy alive across a compaction", capacity * kv_per_frame,
             "at most one per generator window"),
        Line("memory bank + prototype + text cache (bf16)",
             (stream.bank_size + 1) * kv_per_frame + text_kv, f"{stream.bank_size} slots"),
        Line("checkpointed generator exit calls (bf16)",
             blocks_with_grad * (block * dim * BF16 * layers + text_kv),
             f"{blocks_with_grad} chunks of {block} tokens, block inputs + text K/V"),
        Line("checkpointed critic forward on a window (bf16)",
             teacher_tokens * dim * BF16 * layers, f"{teacher_tokens} tokens"),
        Line("transient: one unsharded teacher block + its activations",
             counts["teacher"] / teacher_cfg.num_layers * BF16 * 2
             + teacher_tokens * (4 * teacher_cfg.dim + teacher_cfg.ffn_dim) * BF16,
             "all-gathered block (x2 with prefetch), FFN activations; flash/efficient attention"),
    ]
    counts["trainable"] = trainable
    return lines, counts


def render(lines: list[Line], counts: dict[str, int], gpus: int) -> str:
    out = [f"| per GPU ({gpus} GPUs) | GiB | |", "|---|---:|---|"]
    for line in lines:
        out.append(f"| {line.what} | {line.bytes / GIB:.2f} | {line.note} |")
    total = sum(line.bytes for line in lines)
    out.append(f"| **total (estimate)** | **{total / GIB:.1f}** | |")
    out.append("")
    out.append(f"Trainable parameters: {counts['trainable']:,} "
               f"({counts['lora_per_model']:,} per adapted model).")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", type=Path, default=REPO / "configs" / "train_long.yaml")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the config's)")
    args = parser.parse_args()
    lines, counts = estimate(args.config_path, args.gpus, args.rank)
    print(render(lines, counts, args.gpus))


if __name__ == "__main__":
    main()
