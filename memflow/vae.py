"""Wan2.1 video VAE as a thin adapter over diffusers' `AutoencoderKLWan` (spec §7).

What this adds to diffusers:
* loading Wan's original `Wan2.1_VAE.pth` offline (diffusers' own converter renames the keys) and
  the inverse renaming, so tests can write files in the original layout;
* the latent normalisation of the DiT (z = (mu - mean) / std), with the reference's bf16 rounding;
* pixel I/O as [B, T, 3, H, W] in [0, 1], the layout the pipelines use;
* a `StreamingDecoder` that decodes consecutive latent chunks while carrying the causal conv caches,
  so the concatenated chunks equal one whole-video decode.

Numerics. In bf16 diffusers' `WanRMS_norm` normalises in fp32 and rounds once, while the reference
normalises in bf16 (about a quarter of the elements differ by one bf16 ulp). With `compat=True`
(the default) the norms are switched to the reference's rounding; in fp32 both are identical.
diffusers upsamples with 'nearest-exact' where the reference uses 'nearest'; at a factor of exactly
2 the two pick the same source pixels, so nothing needs patching there.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from .checkpoint import (
    WAN_VAE_CHECKPOINT,  # noqa: F401 (re-exported)
    check_state_fits,
    load_torch_file,
)

# §7.1: a latent normalised for the DiT satisfies z = (mu - mean) / std, per channel.
WAN_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Wan2.1's VAE (§7.2) in `AutoencoderKLWan` terms.
VAE_STRIDE = (4, 8, 8)  # the Wan VAE's compression in time, height and width


def video_frames(latent_frames: int) -> int:
    """Video frames decoded from the first `latent_frames` latent frames (also: the first video
    frame of latent frame `latent_frames`): the first latent frame is one video frame, every
    later one `VAE_STRIDE[0]` (4)."""
    return 0 if latent_frames <= 0 else 1 + VAE_STRIDE[0] * (latent_frames - 1)


def latent_frames_within(frames: int) -> int:
    """The latent frames whose video frames all lie within the first `frames` video frames."""
    return 0 if frames <= 0 else 1 + (frames - 1) // VAE_STRIDE[0]


WAN21_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=list(WAN_LATENT_MEAN),
    latents_std=list(WAN_LATENT_STD),
)


def wan_vae_config(**overrides: Any) -> dict[str, Any]:
    """Wan2.1 VAE config for `AutoencoderKLWan`, with optional overrides (tiny test models)."""
    return {**WAN21_VAE_CONFIG, **overrides}


# --------------------------------------------------------------------------------------------
# Checkpoint key mapping
# --------------------------------------------------------------------------------------------
# diffusers' `convert_wan_vae_to_diffusers` maps Wan -> diffusers but has no inverse. Each rule
# below undoes one of its renamings. Like that converter, this assumes the Wan2.1 layout: four
# stages of 2 residual blocks, so the decoder's flat `upsamples.N` list holds, per stage, three
# residual blocks and then one resampler (N = 4 * stage + index).
_RESIDUAL_INV = (
    ("norm1.gamma", "residual.0.gamma"),
    ("conv1.", "residual.2."),
    ("norm2.gamma", "residual.3.gamma"),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)
_PREFIX_INV = (
    ("quant_conv.", "conv1."),
    ("post_quant_conv.", "conv2."),
    ("encoder.conv_in.", "encoder.conv1."),
    ("decoder.conv_in.", "decoder.conv1."),
    ("encoder.norm_out.", "encoder.head.0."),
    ("decoder.norm_out.", "decoder.head.0."),
    ("encoder.conv_out.", "encoder.head.2."),
    ("decoder.conv_out.", "decoder.head.2."),
)


def _replace_prefix(name: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _residual_to_wan(rest: str) -> str:
    # resample.1.* and time_conv.* carry the same names in both layouts.
    return _replace_prefix(rest, _RESIDUAL_INV) or rest


def diffusers_to_wan_vae_key(key: str) -> str:
    """Wan2.1 original name of an `AutoencoderKLWan` (Wan2.1 layout) state-dict key."""
    if (wan := _replace_prefix(key, _PREFIX_INV)) is not None:
        return wan
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_residual_to_wan(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{_residual_to_wan(m[2])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_residual_to_wan(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise ValueError(f"state dict: key {key!r} has no Wan2.1 VAE counterpart")


def load_wan_vae_state_dict(
    path: str | Path, config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Read Wan's `Wan2.1_VAE.pth` and return it under `AutoencoderKLWan` names.

    The keys and shapes are checked against `config` (default: Wan2.1) so a wrong file fails with
    one line naming the file and the first bad key (in the original naming).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VAE checkpoint not found (Wan's {WAN_VAE_CHECKPOINT})")
    state = convert_wan_vae_to_diffusers(load_torch_file(path, "VAE checkpoint", mmap=True))
    config = wan_vae_config(**(config or {}))
    with torch.device("meta"):
        expected = {k: v.shape for k, v in AutoencoderKLWan(**config).state_dict().items()}

    def wan_name(key: str) -> str:
        try:
            return diffusers_to_wan_vae_key(key)
        except ValueError:
            return key

    check_state_fits(
        state, expected, path, model="this VAE config", config="VAE config", shown_name=wan_name
    )
    return state


# --------------------------------------------------------------------------------------------
# The VAE wrapper
# --------------------------------------------------------------------------------------------
class _ReferenceRMSNorm(WanRMS_norm):
    """`WanRMS_norm` that normalises in the input dtype, as the reference VAE does in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1 if self.channel_first else -1) * self.scale * self.gamma + self.bias


def _to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """Decoder output [B, 3, T, H, W] -> [B, T, 3, H, W] float32 in [0, 1] (the reference's order)."""
    video = video.float().clamp(-1.0, 1.0).permute(0, 2, 1, 3, 4)
    return (0.5 * video + 0.5).clamp(0.0, 1.0)


class WanVAE(nn.Module):
    """Normalised latents [B, F, C, h, w] <-> pixels [B, 1 + 4(F-1), 3, 8h, 8w] in [0, 1].

    `dtype` is the compute dtype (bf16 in the reference; fp32 is the clean option). Latents are
    normalised with the config's `latents_mean` / `latents_std`, one entry per latent channel.
    """

    def __init__(self, model: AutoencoderKLWan, *, dtype: torch.dtype = torch.bfloat16, compat: bool = True) -> None:
        super().__init__()
        cfg = model.config
        for name in ("latents_mean", "latents_std"):
            if len(cfg[name]) != cfg.z_dim:
                raise ValueError(f"VAE config: {name} has {len(cfg[name])} entries but z_dim is {cfg.z_dim}")
        if cfg.is_residual or cfg.patch_size is not None:
            raise ValueError("VAE config: only the Wan2.1 layout is supported (is_residual=False, patch_size=None)")
        if compat:
            for module in model.modules():
                if type(module) is WanRMS_norm:
                    module.__class__ = _ReferenceRMSNorm
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast even
        # when there are none (AutoencoderKLWan keeps nothing in fp32).
        self.model = nn.Module.to(model.eval().requires_grad_(False), dtype=dtype)
        self.dtype = dtype
        self.latents_mean = tuple(cfg.latents_mean)
        self.latents_std = tuple(cfg.latents_std)
        self.num_causal_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())

    @classmethod
    def from_wan_checkpoint(cls, path: str | Path, config: Mapping[str, Any] | None = None, **kwargs) -> "WanVAE":
        """Load Wan's original `Wan2.1_VAE.pth` (config overrides only for non-standard sizes)."""
        state = load_wan_vae_state_dict(path, config)
        with torch.device("meta"):
            model = AutoencoderKLWan(**wan_vae_config(**(config or {})))
        model.load_state_dict(state, strict=True, assign=True)
        return cls(model, **kwargs)

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bf16(mean), 1 / bf16(std)) in the compute dtype, shaped to broadcast over [B, C, F, h, w].

        The reference builds both from fp32 tensors and takes the reciprocal in the compute dtype.
        """
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=device).to(self.dtype)
        inv_std = 1.0 / torch.tensor(self.latents_std, dtype=torch.float32, device=device).to(self.dtype)
        return mean.view(shape), inv_std.view(shape)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised [B, C, F, h, w] -> raw VAE latents: z / (1/std) + mean, in the compute dtype (§7.1)."""
        mean, inv_std = self._stats(latents.device)
        return latents.to(self.dtype) / inv_std + mean

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents [B, C, F, h, w] -> normalised: (mu - mean) * (1/std), in the compute dtype."""
        mean, inv_std = self._stats(mu.device)
        return (mu.to(self.dtype) - mean) * inv_std

    def stream(self) -> "StreamingDecoder":
        """A fresh streaming decoder for one video."""
        return StreamingDecoder(self)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, F, C, h, w] -> pixels [B, 1 + 4(F-1), 3, H, W] float32 in [0, 1].

        Each video is decoded on its own, frame by frame through the causal caches (the reference's
        full decode); that is a single-chunk `StreamingDecoder` pass.
        """
        return torch.cat([self.stream().decode(latents[b : b + 1]) for b in range(latents.shape[0])])

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, T, 3, H, W] in [0, 1] with T = 1 + 4k -> normalised latents [B, k+1, C, h, w] float32.

        Uses the posterior mean, as the reference does.
        """
        if pixels.ndim != 5 or (pixels.shape[1] - 1) % 4:
            raise ValueError(f"VAE.encode: pixels must be [B, 1 + 4k, 3, H, W], got {tuple(pixels.shape)}")
        x = (2.0 * pixels - 1.0).permute(0, 2, 1, 3, 4).to(self.dtype)
        mus = [self.model.encode(x[b : b + 1]).latent_dist.mean for b in range(x.shape[0])]
        return self.normalize(torch.cat(mus)).float().permute(0, 2, 1, 3, 4)


class StreamingDecoder:
    """Decodes one video chunk by chunk, keeping diffusers' causal feature cache between chunks.

    `decode(chunk)` returns the pixel frames of that chunk at once: 1 + 4(f-1) frames for the first
    chunk of f latent frames and 4f for every later one. Concatenating the chunks equals
    `WanVAE.decode` of the whole latent sequence (§7.3). Batch size must be 1.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the cached features: the next chunk starts a new video."""
        self._feat_cache: list[Any] = [None] * self.vae.num_causal_convs
        self.frames_decoded = 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [1, f, C, h, w] -> pixels [1, frames, 3, H, W] float32 in [0, 1]."""
        if latents.ndim != 5 or latents.shape[0] != 1:
            raise ValueError(
                f"StreamingDecoder decodes one video at a time: latents must be [1, F, C, h, w], "
                f"got {tuple(latents.shape)}"
            )
        model = self.vae.model
        x = model.post_quant_conv(self.vae.denormalize(latents.permute(0, 2, 1, 3, 4)))
        frames: list[torch.Tensor] = []
        for i in range(x.shape[2]):
            frames.append(
                model.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],
                    first_chunk=self.frames_decoded == 0,
                )
            )
            self.frames_decoded += 1
        return _to_unit_range(torch.cat(frames, dim=2))
