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
    compute_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> WanDiT:
    """Shard `model` in place across the default process group and return it.

    `compute_dtype` (e.g. bf16): mixed precision, i.e. the weights are gathered and used in that
    dtype while the sharded master weights, their gradients and the gradient reduction stay in
    float32 (the reference's policy, TRAINING.md §2.2). None computes in the weights' dtype.
    """
    kwargs: dict = {"reshard_after_forward": reshard_after_forward}
    if compute_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=compute_dtype, reduce_dtype=torch.float32
        )
    for module in model.modules():
        if isinstance(module, model.no_split_modules):
            fully_shard(module, **kwargs)
            register_fsdp_forward_method(module, "text_kv")
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "text_kv")
    return model
