"""LoRA on the DiT through peft, and the MemFlow `lora.pt` format (TRAINING.md §6).

The adapter goes on every nn.Linear inside each transformer block (self_attn.{q,k,v,o},
cross_attn.{q,k,v,o}, ffn.0, ffn.2), nothing else. It is injected in place with
`peft.inject_adapter_in_model` rather than wrapped with `get_peft_model`: the model stays a
`WanDiT` (its `forward`, `embed_text`, ... are called directly by the streaming code), only the
adapted linears become peft layers, and parameter names become
`blocks.0.self_attn.q.base_layer.weight` + `blocks.0.self_attn.q.lora_A.default.weight`. This
also lets FSDP2 shard the blocks exactly as without LoRA.

`lora.pt` (written by training) is `{"generator_lora": sd, "critic_lora": sd, "step": n}` whose sd
carries `get_peft_model`'s names without the adapter name:
`base_model.model.blocks.0.self_attn.q.lora_A.weight`. Loading normalises the prefixes either
way (`base_model.model.`, `_fsdp_wrapped_module.`, adapter name `default`), so files written from a
PeftModel, an FSDP-wrapped model or this module all load. Rank and alpha are not in the file; they
come from the config's `adapter:` section.

The reference keeps LoRA unmerged (y = base(x) + B(A(x)) * alpha / r, all in bf16, the addition
after the base matmul). Merging W + scale * B @ A changes bf16 rounding, so compat mode keeps the
adapter unmerged; `merge_lora` is for clean mode and for exporting a standalone base checkpoint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer

from .checkpoint import (
    FSDP_PART,
    CheckpointError,
    LoadResult,
    Mismatch,
    PathLike,
    _listed,
    _require_file,
    read_checkpoint,
)

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)
_BLOCK_MODULE = re.compile(r"blocks\.\d+\.(.+)")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters. `target_modules` are module names relative to a block
    (`blocks.N.<name>`); the default is every linear in the block, as in the reference."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = BLOCK_LINEARS

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _block_linears(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the nn.Linear modules `blocks.N.<target>`; every target must match."""
    names, matched = [], set()
    for name, module in model.named_modules():
        m = _BLOCK_MODULE.fullmatch(name)
        if m and m.group(1) in targets and isinstance(module, nn.Linear):
            names.append(name)
            matched.add(m.group(1))
    unmatched = [t for t in targets if t not in matched]
    if unmatched:
        raise ValueError(f"LoRA target(s) {unmatched} match no nn.Linear inside the blocks")
    return names


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers in place and return the same model.

    peft's initialisation: A Kaiming-uniform, B zero, so the output is unchanged until weights
    are loaded or trained. peft also freezes every non-LoRA parameter.
    """
    if hasattr(model, "peft_config"):
        raise ValueError("the model already has a LoRA adapter")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_block_linears(model, settings.target_modules),
        bias="none",
    )
    return inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def normalize_lora_key(key: str) -> str:
    """Any saved form of a LoRA key -> `blocks.0.self_attn.q.lora_A.weight`."""
    key = key.replace(FSDP_PART, "").removeprefix(PEFT_PREFIX)
    return re.sub(rf"\.(lora_[AB])\.{ADAPTER}\.", r".\1.", key)


def _adapter_tensors(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """{normalised key: (peft's key for this model, tensor)} of the model's adapter."""
    if not hasattr(model, "peft_config"):
        raise ValueError("the model has no LoRA adapter (call add_lora first)")
    peft_state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {normalize_lora_key(k): (k, v) for k, v in peft_state.items()}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the reference's `lora.pt` names
    (`base_model.model.blocks.0.self_attn.q.lora_A.weight`)."""
    return {PEFT_PREFIX + k: v.detach().cpu() for k, (_, v) in _adapter_tensors(model).items()}


def _rank_hint(model: nn.Module, found: Mapping[str, torch.Tensor]) -> str:
    config = model.peft_config[ADAPTER]
    ranks = sorted({v.shape[0] for k, v in found.items() if ".lora_A." in k and v.dim() == 2})
    if not ranks or ranks == [config.r]:
        return ""
    return (
        f"LoRA rank mismatch: the adapter config has rank {config.r} (alpha {config.lora_alpha}), "
        f"the file holds rank {', '.join(map(str, ranks))}; set adapter.rank to match the file"
    )


def load_lora_checkpoint(model: nn.Module, path: PathLike, *, trust: bool = False) -> LoadResult:
    """Load a `lora.pt` into a model prepared by `add_lora`, strictly.

    Uses the file's `generator_lora` entry when present, else the whole file as the LoRA state
    dict. Missing or unexpected adapter keys and wrong shapes (e.g. a different rank) raise
    CheckpointError naming the file, the first keys and the expected vs found rank and shapes.
    """
    path = _require_file(path)
    data = read_checkpoint(path, trust=trust)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a LoRA state dict ({type(data).__name__})")
    if "generator_lora" not in data and "generator" in data:
        raise CheckpointError(f"{path} is a base checkpoint (it has 'generator', not "
                              "'generator_lora'): give it as generator_ckpt, not lora_ckpt")
    entry = "generator_lora" if "generator_lora" in data else None
    source = f"{path} (entry '{entry}')" if entry else str(path)
    state = data[entry] if entry else data
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} is not a state dict (found {type(state).__name__})")

    found: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise CheckpointError(f"{source}: entry {key!r} is not a tensor")
        name = normalize_lora_key(key)
        if name in found:
            raise CheckpointError(f"{source}: several keys normalise to {name} (e.g. {key})")
        found[name] = value

    expected = _adapter_tensors(model)
    mismatch = Mismatch.between({k: v for k, (_, v) in expected.items()}, found)
    if mismatch:
        raise CheckpointError(mismatch.describe(source, _rank_hint(model, found)))
    result = set_peft_model_state_dict(
        model, {expected[k][0]: v for k, v in found.items()}, adapter_name=ADAPTER
    )
    if result.unexpected_keys:  # peft renamed keys differently from get_peft_model_state_dict
        raise CheckpointError(f"{source}: peft did not place {_listed(result.unexpected_keys)}")
    step = data.get("step") if entry else None
    return LoadResult(path, entry, step=step if isinstance(step, int) else None)


def apply_lora(model: nn.Module, settings: LoraSettings, lora_ckpt: PathLike | None = None,
               *, trust: bool = False) -> nn.Module:
    """Add the adapter (peft freezes the base weights) and load `lora_ckpt` when given: how
    inference and stage-2 training both put a trained LoRA on the generator. `trust`: see
    `memflow.checkpoint.read_checkpoint`."""
    model = add_lora(model, settings)
    if lora_ckpt is not None:
        load_lora_checkpoint(model, lora_ckpt, trust=trust)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold W <- W + (alpha/r) * B @ A (computed in float32, rounded once to W's dtype) into each
    adapted linear, put the plain linear back and drop the adapter, in place.

    The result has the original Wan parameter names again, so it can be saved as a base
    checkpoint. It is mathematically the unmerged model but rounds differently in bf16, so
    compat mode keeps LoRA unmerged. Parameters stay frozen as peft left them.
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("the model has no LoRA adapter to merge")
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        weight = base.weight.float()
        adapters = [] if module.disable_adapters else module.active_adapters
        for adapter in adapters:
            if adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
                weight = weight + module.scaling[adapter] * (b @ a)
        base.weight.copy_(weight)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
    del model.peft_config
    return model
