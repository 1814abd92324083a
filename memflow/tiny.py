"""Tiny random stand-ins for the pretrained components, built in memory in well under a second.

Tests and the no-download "tiny" preset use them: same code paths and module structure as the real
models (umT5 encoder + sentencepiece tokenizer, Wan2.1 VAE), only narrow. Every builder takes a
`seed` and leaves the global torch RNG as it found it. `build_tiny_generator` reads a config's
`tiny:` section, so inference and training build the same tiny DiT from the same keys.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import sentencepiece as spm
import torch
from diffusers import AutoencoderKLWan
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config

from .config import DiTConfig
from .model import WanDiT
from .text_encoder import TEXT_LEN, TextEncoder, new_umt5_encoder, umt5_encoder_config
from .vae import WanVAE, wan_vae_config

TINY_TEXT_LEN = 64  # prompt tokens of the tiny models (the real umT5 keeps 512)

# A few video prompts to train the tiny sentencepiece model on.
_SENTENCES = (
    "A cat sitting on a red chair in the warm afternoon sun.",
    "The quick brown fox jumps over the lazy dog near the river.",
    "A drone shot of a mountain lake at sunrise, mist over the water.",
    "Two people walking along the beach while waves crash on the rocks.",
    "Close-up of a hummingbird drinking nectar from a purple flower.",
    "A city street at night with neon lights, rain and reflections.",
    "An astronaut floating slowly inside a space station, Earth in the window.",
    "A chef chops vegetables quickly in a busy restaurant kitchen.",
)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def build_tiny_tokenizer(save_dir: str | Path | None = None, vocab_size: int = 96) -> PreTrainedTokenizerBase:
    """A T5-style unigram tokenizer (pad 0, `</s>` 1, `<unk>` 2) trained on a few sentences.

    It is written as `spiece.model` + `tokenizer_config.json` to `save_dir` (a temporary folder if
    None) and read back with `AutoTokenizer`, i.e. exactly the way the real umT5 folder is loaded.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )

    def write_and_load(folder: Path) -> PreTrainedTokenizerBase:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spiece.model").write_bytes(model.getvalue())
        config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": TEXT_LEN}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    if save_dir is not None:
        return write_and_load(Path(save_dir))
    with tempfile.TemporaryDirectory() as tmp:
        return write_and_load(Path(tmp))


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------
def tiny_t5_config(vocab_size: int) -> UMT5Config:
    """umT5 structure (gated GELU, per-layer 32-bucket bias, max distance 128) at width 32, 2 layers."""
    return umt5_encoder_config(vocab_size=vocab_size, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2)


def build_tiny_text_encoder(
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    seed: int = 0,
    text_len: int = TEXT_LEN,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> TextEncoder:
    """A random tiny `TextEncoder`. Norm weights and position biases are randomised too (they start
    at 1 and near 0), so tests notice a swapped norm or a missing bias."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        encoder = new_umt5_encoder(tiny_t5_config(len(tokenizer)))
        for name, param in encoder.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("relative_attention_bias.weight"):
                param.normal_(0.0, 1.0)
    return TextEncoder(encoder, tokenizer, text_len=text_len, dtype=dtype, **kwargs)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
def tiny_vae_config() -> dict[str, Any]:
    """Wan2.1 VAE structure (dim_mult [1, 2, 4, 4], 2 res blocks, 16 latent channels) at base dim 8."""
    return wan_vae_config(base_dim=8)


def build_tiny_vae(*, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: Any) -> WanVAE:
    """A random tiny `WanVAE`; RMS-norm gains are randomised too (they start at 1)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = AutoencoderKLWan(**tiny_vae_config())
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    return WanVAE(model, dtype=dtype, **kwargs)


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------
def build_tiny_dit(config: DiTConfig | None = None, *, seed: int = 0) -> WanDiT:
    """A random tiny `WanDiT` (default: width 32, 2 heads, 2 layers) in fp32 eval mode.

    PyTorch's default init leaves no parameter at zero (unlike Wan's zero-initialised head), so
    every path of the network shows in the output.
    """
    config = config or DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32,
                                 text_len=TINY_TEXT_LEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanDiT(config).eval()


def tiny_text_len(tiny: Mapping[str, Any]) -> int:
    """The prompt length in tokens of a `tiny:` config section: its `text_len`, else
    `TINY_TEXT_LEN`; the tiny DiT and the tiny text encoder of a section both take it."""
    return int(tiny.get("text_len", TINY_TEXT_LEN))


def tiny_rope_frames(tiny: Mapping[str, Any]) -> int:
    """The RoPE table in latent frames of a `tiny:` section's DiT: its `rope_max_frames`, else
    Wan2.1's (`DiTConfig.rope_max_frames`, 1024)."""
    return int(tiny.get("rope_max_frames", DiTConfig.rope_max_frames))


def tiny_seed(tiny: Mapping[str, Any]) -> int:
    """The seed of every random tiny component of a `tiny:` section (default 0)."""
    return int(tiny.get("seed", 0))


def build_tiny_generator(tiny: Mapping[str, Any]) -> WanDiT:
    """The random tiny DiT of a `tiny:` config section (DiT shape fields and `seed`), fp32 on
    the CPU, trainable (eval mode, as `build_tiny_dit` leaves it). Its text_dim defaults to the
    tiny T5's width, so no encoder is needed."""
    shape = {k: v for k, v in tiny.items() if k != "seed"}
    text_dim = tiny_t5_config(len(build_tiny_tokenizer())).d_model
    dit_cfg = DiTConfig.from_dict({"text_dim": text_dim, **shape, "text_len": tiny_text_len(tiny)})
    return build_tiny_dit(dit_cfg, seed=tiny_seed(tiny))
