"""umT5-XXL text encoder (Wan2.1's T5) as a thin adapter over transformers' `UMT5EncoderModel`.

Wan ships the encoder as `models_t5_umt5-xxl-enc-bf16.pth`, a plain state dict in its own key
layout, next to the HF tokenizer folder `google/umt5-xxl`. This module maps those keys onto
`UMT5EncoderModel` (and back, so tests can write files in the original format) and reproduces the
reference's prompt handling (spec §5.7): clean-up, 512-token padding, padding rows set to zero.

Numerics. transformers' UMT5 block is the same network as Wan's T5 (pre-norm RMS norms computed in
fp32, unscaled logits, a relative position bias per layer with 32 bidirectional buckets up to
distance 128, gated tanh-GELU FFN, final norm). Its default `sdpa` kernel is not bit-compatible in
bf16, though (it never rounds the logits to bf16; on a tiny model a quarter of the outputs move by
up to 0.05), and `eager` leaves the fp32 softmax to the kernel. We therefore register one attention
function, `wan_t5_attention`, that spells out the reference's rounding (logits + bias in the model
dtype, softmax in fp32, cast back). Because a custom attention implementation gets no
mask from transformers' mask factory, the padding mask is always passed as a ready 4D additive mask.
"""
from __future__ import annotations

import html
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    UMT5Config,
    UMT5EncoderModel,
)

from .checkpoint import WAN_T5_CHECKPOINT, WAN_T5_TOKENIZER, check_state_fits, load_torch_file  # noqa: F401 (re-exported)

TEXT_LEN = 512
WAN_T5_ATTENTION = "memflow_wan_t5"


# --------------------------------------------------------------------------------------------
# Attention with the reference's rounding
# --------------------------------------------------------------------------------------------
def wan_t5_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 attention as Wan computes it: q·kᵀ + bias (+ mask) in the model dtype, softmax in fp32.

    Shapes follow transformers' attention interface: q, k, v are [B, heads, L, d]; the output is
    [B, L, heads, d]. T5 folds the scale into its weights, so `scaling` must be 1.
    """
    if scaling not in (None, 1.0):
        raise ValueError(f"{WAN_T5_ATTENTION}: T5 attention is unscaled, got scaling={scaling}")
    scores = torch.matmul(query, key.transpose(-1, -2))
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores.float(), dim=-1).type_as(scores)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(WAN_T5_ATTENTION, wan_t5_attention)


# --------------------------------------------------------------------------------------------
# Config and model construction
# --------------------------------------------------------------------------------------------
def umt5_encoder_config(
    vocab_size: int = 256384,
    d_model: int = 4096,
    d_ff: int = 10240,
    num_heads: int = 64,
    d_kv: int = 64,
    num_layers: int = 24,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> UMT5Config:
    """A `UMT5Config` for Wan's text encoder; the defaults are umT5-XXL (the Wan folder has no config)."""
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff,
        num_heads=num_heads,
        d_kv=d_kv,
        num_layers=num_layers,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        attn_implementation=WAN_T5_ATTENTION,
    )


def new_umt5_encoder(config: UMT5Config) -> UMT5EncoderModel:
    """An encoder with the Wan attention and a single token-embedding module (no duplicate copy)."""
    encoder = UMT5EncoderModel(config)
    encoder.set_input_embeddings(encoder.shared)
    encoder.set_attn_implementation(WAN_T5_ATTENTION)
    return encoder


# --------------------------------------------------------------------------------------------
# Checkpoint key mapping (Wan <-> transformers)
# --------------------------------------------------------------------------------------------
# Per block. Wan's FFN is fc2(fc1(x) * gelu(gate(x))); transformers' is wo(gelu(wi_0 x) * wi_1 x),
# so the GELU branch gate.0 is wi_0 and the linear branch fc1 is wi_1.
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEYS_INV = {hf: wan for wan, hf in _BLOCK_KEYS.items()}
_WAN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def wan_to_hf_t5_key(key: str) -> str | None:
    """transformers name of a Wan umT5 key, or None if the key is not part of the encoder."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = _WAN_BLOCK.fullmatch(key)
    if m and m.group(2) in _BLOCK_KEYS:
        return f"encoder.block.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}"
    return None


def hf_to_wan_t5_key(key: str) -> str | None:
    """Wan name of a transformers UMT5 encoder key, or None if it has no Wan counterpart."""
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = _HF_BLOCK.fullmatch(key)
    if m and m.group(2) in _BLOCK_KEYS_INV:
        return f"blocks.{m.group(1)}.{_BLOCK_KEYS_INV[m.group(2)]}"
    return None


def from_wan_t5_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename a Wan umT5 encoder state dict to transformers' UMT5EncoderModel names.

    The token embedding is emitted under both `shared.weight` and `encoder.embed_tokens.weight`
    (one tensor), as `UMT5EncoderModel.state_dict()` lists both.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        hf_key = wan_to_hf_t5_key(key)
        if hf_key is None:
            raise ValueError(f"{source}: unexpected key {key!r} (not a Wan umT5 encoder key)")
        out[hf_key] = value
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def _check_state_dict(state: Mapping[str, torch.Tensor], config: UMT5Config, source: str) -> None:
    """Raise one clear line (file + first offending key in Wan naming) if `state` does not fit `config`."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in new_umt5_encoder(config).state_dict().items()}
    check_state_fits(
        state, expected, source, model=f"a {config.num_layers}-layer encoder",
        config="text-encoder config", shown_name=hf_to_wan_t5_key,
    )


def load_wan_t5_state_dict(path: str | Path, config: UMT5Config | None = None) -> dict[str, torch.Tensor]:
    """Read Wan's `models_t5_umt5-xxl-enc-bf16.pth` and return it under transformers' names.

    With `config`, also check every key and shape against it, so a wrong file fails with one line
    naming the file and the first bad key instead of a stack trace from `load_state_dict`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: umT5 checkpoint not found (Wan's {WAN_T5_CHECKPOINT})")
    state = from_wan_t5_state_dict(load_torch_file(path, "umT5 checkpoint", mmap=True), str(path))
    if config is not None:
        _check_state_dict(state, config, str(path))
    return state


# --------------------------------------------------------------------------------------------
# Tokenizer and prompt clean-up
# --------------------------------------------------------------------------------------------
def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' clean-up: ftfy, html-unescape twice, strip, collapse whitespace runs.

    `regex` (not `re`) is used for `\\s`, as in the reference: the two disagree on a few control
    characters such as U+001C.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # either one makes a usable umT5 tokenizer


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer from a local folder (Wan's `google/umt5-xxl`); never touches the hub."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: umT5 tokenizer folder not found (Wan's {WAN_T5_TOKENIZER})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would blame a missing sentencepiece package instead
        raise FileNotFoundError(
            f"{folder}: umT5 tokenizer folder has none of {', '.join(TOKENIZER_FILES)} "
            f"(copy Wan's {WAN_T5_TOKENIZER} folder)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # sentencepiece, tokenizers and transformers raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: cannot load the umT5 tokenizer ({first})") from None


# --------------------------------------------------------------------------------------------
# The encoder wrapper
# --------------------------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """Prompts -> umT5 embeddings [B, text_len, d_model] with padding rows exactly zero (spec §5.7).

    `device` is where encoding runs. With `offload=True` the weights live on the CPU and visit
    `device` only for the duration of `encode`, so the 11 GB encoder need not share a 24 GB card
    with the DiT for the whole run.
    """

    def __init__(
        self,
        encoder: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        text_len: int = TEXT_LEN,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        offload: bool = False,
    ) -> None:
        super().__init__()
        encoder.set_attn_implementation(WAN_T5_ATTENTION)
        self.encoder = encoder.eval().requires_grad_(False).to(dtype=dtype)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.dtype = dtype
        self.execution_device = torch.device(device)
        self.offload = offload
        self.encoder.to("cpu" if offload else self.execution_device)

    @classmethod
    def from_wan_checkpoint(
        cls,
        checkpoint: str | Path,
        tokenizer: str | Path | PreTrainedTokenizerBase,
        config: UMT5Config | None = None,
        **kwargs,
    ) -> "TextEncoder":
        """Load Wan's umT5 `.pth` (original key layout); `config` defaults to umT5-XXL."""
        config = config or umt5_encoder_config()
        state = load_wan_t5_state_dict(checkpoint, config)
        with torch.device("meta"):
            encoder = new_umt5_encoder(config)
        encoder.load_state_dict(state, strict=True, assign=True)
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = load_tokenizer(tokenizer)
        return cls(encoder, tokenizer, **kwargs)

    @classmethod
    def from_wan_folder(cls, folder: str | Path, **kwargs) -> "TextEncoder":
        """Load from a Wan2.1 model folder holding the `.pth` and `google/umt5-xxl/`."""
        folder = Path(folder)
        return cls.from_wan_checkpoint(folder / WAN_T5_CHECKPOINT, folder / WAN_T5_TOKENIZER, **kwargs)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, `</s>`-terminated ids padded to `text_len` and their mask, both [B, text_len].

        Prompts longer than `text_len` tokens are truncated (keeping `</s>`), with a warning,
        since the lost tail silently changes the video otherwise.
        """
        if isinstance(prompts, str):
            raise TypeError("TextEncoder expects a list of prompts, got a single string")
        texts = [clean_prompt(p) for p in prompts]
        full = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > self.text_len:
                warnings.warn(
                    f"prompt {i} has {len(ids)} tokens; truncated to text_len={self.text_len}", stacklevel=3
                )
        batch = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, text_len, d_model] embeddings in `dtype` on `device`; rows at/after each prompt's length are 0."""
        ids, mask = self.tokenize(prompts)
        device = self.execution_device
        ids, mask = ids.to(device), mask.to(device)
        # Additive mask: padded keys get the dtype minimum, as the reference's masked_fill does.
        bias = torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=self.dtype, device=device)
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(self.dtype).min)
        if self.offload:
            self.encoder.to(device)
        try:
            out = self.encoder(input_ids=ids, attention_mask=bias).last_hidden_state
        finally:
            if self.offload:
                self.encoder.to("cpu")
        lengths = mask.sum(dim=1)
        padding = torch.arange(mask.shape[1], device=device)[None, :] >= lengths[:, None]
        return out.masked_fill(padding[..., None], 0.0)
