"""Per-GPU memory budget of stage-1 training at the released setting (arithmetic, no run).

Counts what each GPU holds when the generator (1.3B), critic (1.3B) and teacher (14B) are
sharded with FSDP2 over `--gpus` GPUs (TRAINING.md §2.2-§2.3) and the umT5-XXL text encoder is
replicated in bf16: fp32 master weights, fp32 gradients and two fp32 AdamW moments for the
trainable networks, fp32 weights for the frozen teacher, and the bf16 activations of one micro-step: the rollout's KV cache, bank and
text cache, the block inputs that activation checkpointing keeps, and the largest transient
(one unsharded block plus its working set). Parameter counts come from the model classes built
on the meta device, so they are exact.

    python benchmarks/train_memory.py --gpus 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from memflow.config import DiTConfig  # noqa: E402
from memflow.model import WanDiT  # noqa: E402
from memflow.text_encoder import new_umt5_encoder, umt5_encoder_config  # noqa: E402

WAN_14B = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
GiB = 2**30


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="GPUs the networks are sharded over")
    p.add_argument("--frames", type=int, default=21, help="latent frames per rollout")
    p.add_argument("--frame-len", type=int, default=DiTConfig().tokens_per_frame(60, 104))
    p.add_argument("--fpb", type=int, default=3)
    p.add_argument("--bank", type=int, default=3)
    args = p.parse_args(argv)
    with torch.device("meta"):
        gen, teacher = WanDiT(DiTConfig()), WanDiT(WAN_14B)
        t5 = new_umt5_encoder(umt5_encoder_config())
    n_gen, n_teacher, n_t5 = count(gen), count(teacher), count(t5)
    cfg, g = DiTConfig(), args.gpus
    bf16, fp32 = 2, 4
    tokens = args.frames * args.frame_len
    chunk_tokens = args.fpb * args.frame_len
    rows = [
        ("generator: fp32 weights + grads + 2 AdamW moments", 4 * fp32 * n_gen / g),
        ("critic: fp32 weights + grads + 2 AdamW moments", 4 * fp32 * n_gen / g),
        ("teacher (14B): fp32 weights, frozen", fp32 * n_teacher / g),
        ("umT5-XXL: bf16 weights, frozen, replicated (0 with text_encoder_cpu_offload)",
         bf16 * n_t5),
        ("KV cache of the rollout (bf16, all frames, K and V, 30 layers)",
         2 * bf16 * tokens * cfg.dim * cfg.num_layers),
        ("memory bank + staged prototype (bf16)",
         2 * bf16 * (args.bank + 1) * args.frame_len * cfg.dim * cfg.num_layers),
        ("text caches (bf16, 512 tokens, 30 layers)", 2 * bf16 * 512 * cfg.dim * cfg.num_layers),
        ("generator block inputs kept by checkpointing (one grad call per chunk)",
         bf16 * tokens * cfg.dim * cfg.num_layers),
        ("critic block inputs kept by checkpointing (21-frame forward)",
         bf16 * tokens * cfg.dim * cfg.num_layers),
        ("largest transient: one unsharded 14B block (bf16) + its FFN hidden over 21 frames",
         bf16 * count(teacher.blocks[0]) + bf16 * tokens * WAN_14B.ffn_dim),
        ("recomputed generator block in backward (q/k/v/o, FFN hidden, one chunk)",
         bf16 * chunk_tokens * (4 * cfg.dim + cfg.ffn_dim) * 3),
    ]
    total = sum(b for _, b in rows)
    print(f"Stage-1 training memory per GPU, {g} GPUs (FSDP full sharding), rollout of "
          f"{args.frames} latent frames x {args.frame_len} tokens, batch 1 per GPU.")
    print(f"Parameters: generator/critic {n_gen / 1e9:.3f} B, teacher {n_teacher / 1e9:.2f} B, "
          f"umT5-XXL encoder {n_t5 / 1e9:.2f} B.\n")
    print("| item | GiB per GPU |\n|---|---|")
    for name, b in rows:
        print(f"| {name} | {b / GiB:.2f} |")
    print(f"| **total** (allocator fragmentation and CUDA context not included) | **{total / GiB:.1f}** |")


if __name__ == "__main__":
    main()
