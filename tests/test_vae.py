"""Wan2.1 VAE adapter: original checkpoint layout, latent normalisation, streaming decode (§7)."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from reference_files import to_wan_vae_state_dict

from memflow.tiny import build_tiny_vae, tiny_vae_config
from memflow.vae import (
    WAN21_VAE_CONFIG,
    WAN_LATENT_MEAN,
    WAN_LATENT_STD,
    WAN_VAE_CHECKPOINT,
    WanVAE,
)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return build_tiny_vae(seed=0)


def latents(frames: int, batch: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Normalised latents [B, F, 16, size, size] (8x the size in pixels)."""
    return torch.randn(batch, frames, 16, size, size, generator=torch.Generator().manual_seed(seed))


def wan_raw(z: torch.Tensor) -> torch.Tensor:
    """Denormalise [B, F, C, h, w] by hand in fp32 and permute to diffusers' [B, C, F, h, w]."""
    mean = torch.tensor(WAN_LATENT_MEAN).view(1, 1, -1, 1, 1)
    std = torch.tensor(WAN_LATENT_STD).view(1, 1, -1, 1, 1)
    return (z * std + mean).permute(0, 2, 1, 3, 4)


# --------------------------------------------------------------------------------------------
# Original checkpoint layout
# --------------------------------------------------------------------------------------------
def test_wan_checkpoint_loads_and_matches(tmp_path, vae):
    path = tmp_path / WAN_VAE_CHECKPOINT
    torch.save(to_wan_vae_state_dict(vae.model.state_dict()), path)
    loaded = WanVAE.from_wan_checkpoint(path, config=tiny_vae_config(), dtype=torch.float32)
    for key, value in vae.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    z = latents(3)
    delta = (loaded.decode(z) - vae.decode(z)).abs().max().item()
    assert delta <= 1e-6, f"max |Δ| = {delta}"


def test_inverse_mapping_round_trips_through_diffusers_converter(vae):
    state = vae.model.state_dict()
    wan = to_wan_vae_state_dict(state)
    back = convert_wan_vae_to_diffusers(dict(wan))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_full_size_layout_has_the_original_wan_names():
    with torch.device("meta"):
        wan = to_wan_vae_state_dict(AutoencoderKLWan(**WAN21_VAE_CONFIG).state_dict())
    assert len(wan) == 194
    # Names fixed by the original module tree: middle = (res, attn, res); decoder stage = 3 res
    # blocks + resampler (upsample3d at 3 and 7, upsample2d at 11); conv1/conv2 = (post-)quant convs.
    expected = {
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.6.shortcut.weight": (384, 192, 1, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "decoder.middle.0.residual.0.gamma": (384, 1, 1, 1),
        "decoder.middle.2.residual.6.weight": (384, 384, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.7.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.3.gamma": (96, 1, 1, 1),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(wan[key].shape) == shape, key
    assert "decoder.upsamples.11.time_conv.weight" not in wan


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"nowhere.*{WAN_VAE_CHECKPOINT}.*not found"):
        WanVAE.from_wan_checkpoint(tmp_path / "nowhere" / WAN_VAE_CHECKPOINT, config=tiny_vae_config())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd.__setitem__("decoder.upsamples.4.shortcut.weight", torch.zeros(1)), r"key 'decoder\.upsamples\.4\.shortcut\.weight' has shape \(1,\)"),
        (lambda sd: sd.pop("conv2.bias"), r"missing key 'conv2\.bias'"),
    ],
)
def test_bad_checkpoint_names_file_and_key(tmp_path, vae, corrupt, message):
    path = tmp_path / WAN_VAE_CHECKPOINT
    wan = to_wan_vae_state_dict(vae.model.state_dict())
    corrupt(wan)
    torch.save(wan, path)
    with pytest.raises(ValueError, match=f"{WAN_VAE_CHECKPOINT}: {message}"):
        WanVAE.from_wan_checkpoint(path, config=tiny_vae_config())


def test_wrong_latent_stats_length_is_a_config_error():
    with pytest.raises(ValueError, match="latents_mean has 16 entries but z_dim is 4"):
        WanVAE(AutoencoderKLWan(**{**tiny_vae_config(), "z_dim": 4}))


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, batch", [(1, 1), (2, 2), (4, 1)])
def test_frame_count_and_pixel_range(vae, frames, batch):
    video = vae.decode(latents(frames, batch))
    assert video.shape == (batch, 1 + 4 * (frames - 1), 3, 64, 64)
    assert video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1
    assert video.std() > 0.02 and ((video > 0) & (video < 1)).float().mean() > 0.9, "decoder output is degenerate"


def test_streaming_decode_equals_whole_decode(vae):
    z = latents(9)
    whole = vae.decode(z)
    stream = vae.stream()
    chunks = [stream.decode(z[:, i : i + 3]) for i in range(0, 9, 3)]
    assert [c.shape[1] for c in chunks] == [9, 12, 12]
    delta = (torch.cat(chunks, dim=1) - whole).abs().max().item()
    assert delta <= 1e-6, f"streaming vs whole decode: max |Δ| = {delta}"
    stream.reset()
    again = stream.decode(z[:, :3])
    assert torch.equal(again, chunks[0]), "reset() must start a new video"


def test_streaming_decode_requires_batch_one(vae):
    with pytest.raises(ValueError, match="one video at a time"):
        vae.stream().decode(latents(3, batch=2))


def test_decode_denormalises_latents(vae):
    z = latents(2)
    expected = vae.model.decode(wan_raw(z)).sample  # diffusers' own decode of raw latents
    expected = (0.5 * expected.permute(0, 2, 1, 3, 4) + 0.5).clamp(0, 1)
    delta = (vae.decode(z) - expected).abs().max().item()
    assert delta <= 1e-5, f"adapter vs diffusers decode of denormalised latents: max |Δ| = {delta}"
    skipped = vae.model.decode(z.permute(0, 2, 1, 3, 4)).sample
    skipped = (0.5 * skipped.permute(0, 2, 1, 3, 4) + 0.5).clamp(0, 1)
    assert (skipped - expected).abs().max() > 1e-2, "test is blind: mean/std make no difference"


def test_bf16_denormalisation_follows_the_reference_rounding():
    vae = build_tiny_vae(seed=0, dtype=torch.bfloat16)
    z = latents(2).permute(0, 2, 1, 3, 4).bfloat16()
    inv = 1.0 / torch.tensor(WAN_LATENT_STD).bfloat16()
    expected = z / inv.view(1, -1, 1, 1, 1) + torch.tensor(WAN_LATENT_MEAN).bfloat16().view(1, -1, 1, 1, 1)
    out = vae.denormalize(z)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


def test_bf16_streaming_equals_whole_and_uses_reference_norms():
    vae = build_tiny_vae(seed=0, dtype=torch.bfloat16)
    z = latents(4, size=4)  # bf16 convolutions are slow on CPU
    whole = vae.decode(z)
    stream = vae.stream()
    streamed = torch.cat([stream.decode(z[:, :3]), stream.decode(z[:, 3:])], dim=1)
    delta = (streamed - whole).abs().max().item()
    assert delta == 0, f"bf16 streaming vs whole decode: max |Δ| = {delta}"
    stock = build_tiny_vae(seed=0, dtype=torch.bfloat16, compat=False)
    assert not torch.equal(stock.decode(z), whole), "compat norms should change bf16 rounding"


# --------------------------------------------------------------------------------------------
# Encode
# --------------------------------------------------------------------------------------------
def test_encode_returns_normalised_latents(vae):
    video = vae.decode(latents(3))
    z = vae.encode(video)
    assert z.shape == (1, 3, 16, 8, 8) and z.dtype == torch.float32
    mu = vae.model.encode((2 * video - 1).permute(0, 2, 1, 3, 4)).latent_dist.mean
    mean = torch.tensor(WAN_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN_LATENT_STD).view(1, -1, 1, 1, 1)
    delta = (z - ((mu - mean) / std).permute(0, 2, 1, 3, 4)).abs().max().item()
    assert delta <= 1e-5, f"max |Δ| = {delta}"
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        vae.encode(video[:, :4])
