"""FSDP2 (`fully_shard`) wrapping of a Wan DiT for training.

Every `DiTBlock` is its own unit (its weights are gathered just for its forward and freed
after), then the root module takes the rest (patch/text/time embeddings, head). Methods that
use weights outside `forward` are registered so that they gather them too: `WanDiT.text_kv`
(the streaming text cache) and `DiTBlock.text_kv`. Works with NCCL on GPUs and with Gloo on CPU.
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from .model import WanDiT


def shard_model(
    model: WanDiT,
    mixed_precision: bool = False,
    reshard_after_forward: bool = True,
) -> WanDiT:
    """Shard `model` in place across the default process group and return it.

    `mixed_precision`: compute in bf16 with float32 master weights and float32 gradient
    reduction (the reference's policy, TRAINING.md §2.2); off on CPU.
    """
    kwargs: dict = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for module in model.modules():
        if isinstance(module, model.no_split_modules):
            fully_shard(module, **kwargs)
            register_fsdp_forward_method(module, "text_kv")
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "text_kv")
    return model
