"""The real loading path end to end: a tiny model written in the original on-disk formats
(Wan2.1 folder with config.json, DiT safetensors, umT5 .pth + tokenizer folder, VAE .pth, and
MemFlow base.pt / lora.pt) is generated from through the unchanged `configs/*.yaml`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import inference
from memflow.checkpoint import save_wan_weights
from memflow.config import DiTConfig
from memflow.lora import LoraSettings, add_lora
from memflow.text_encoder import to_wan_t5_state_dict
from memflow.tiny import build_tiny_dit, build_tiny_text_encoder, build_tiny_tokenizer, build_tiny_vae
from memflow.vae import to_wan_vae_state_dict
from utils.video_writer import read_video_info
from reference_files import save_generator_checkpoint, save_lora_checkpoint

ROOT = Path(__file__).resolve().parents[1]
T5 = dict(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2)


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    folder = root / "wan_models" / "Wan2.1-T2V-1.3B"
    tokenizer = build_tiny_tokenizer(save_dir=folder / "google" / "umt5-xxl")
    t5 = build_tiny_text_encoder(tokenizer)
    torch.save(to_wan_t5_state_dict(t5.encoder.state_dict()), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    vae = build_tiny_vae()
    torch.save(to_wan_vae_state_dict(vae.model.state_dict()), folder / "Wan2.1_VAE.pth")
    dit_cfg = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, text_len=512)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", **dit_cfg.to_dict()}))
    save_wan_weights(build_tiny_dit(dit_cfg, seed=1), folder / "diffusion_pytorch_model.safetensors")
    save_generator_checkpoint(build_tiny_dit(dit_cfg, seed=2), root / "checkpoints" / "base.pt")
    lora_model = add_lora(build_tiny_dit(dit_cfg, seed=2), LoraSettings(rank=4, alpha=4))
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    save_lora_checkpoint(lora_model, root / "checkpoints" / "lora.pt")
    vocab = len(tokenizer)
    return root, [f"text_encoder_config.{k}={v}" for k, v in {**T5, "vocab_size": vocab}.items()]


def _overrides(root: Path, out: Path, data: Path, t5: list[str]) -> list[str]:
    return [
        f"wan_models_root={root / 'wan_models'}",
        f"generator_ckpt={root / 'checkpoints' / 'base.pt'}",
        f"lora_ckpt={root / 'checkpoints' / 'lora.pt'}",
        "adapter.rank=4", "adapter.alpha=4", "vae_config.base_dim=8",
        f"output_folder={out}", f"data_path={data}",
        "height=64", "width=96", "dtype=float32", "vae_dtype=float32", "device=cpu",
        "denoising_step_list=[1000,500]", *t5,
    ]


def test_single_prompt_from_original_format_files(wan_files, tmp_path):
    root, t5 = wan_files
    data = tmp_path / "p.txt"
    data.write_text("a cat on a red chair\n")
    args = ["--config_path", str(ROOT / "configs" / "inference.yaml"), "num_output_frames=6"]
    out = tmp_path / "out"
    assert inference.main(args + _overrides(root, out, data, t5)) == 0
    (video,) = out.iterdir()
    assert video.name == "0-0_lora.mp4"
    assert read_video_info(video) == (21, 96, 64, 16.0)
    # the LoRA file is really applied: without it the video differs
    out2 = tmp_path / "out2"
    assert inference.main(args + _overrides(root, out2, data, t5) + ["lora_ckpt=null"]) == 0
    assert video.read_bytes() != (out2 / video.name).read_bytes()


def test_interactive_from_original_format_files(wan_files, tmp_path):
    root, t5 = wan_files
    data = tmp_path / "story.jsonl"
    data.write_text(json.dumps({"prompts": ["a cat sits", "the cat jumps", "the cat sleeps"]}) + "\n")
    out = tmp_path / "out"
    args = ["--config_path", str(ROOT / "configs" / "interactive_inference.yaml"),
            "num_output_frames=9", "switch_frame_indices=3, 6"]
    assert inference.main(args + _overrides(root, out, data, t5)) == 0
    (video,) = out.iterdir()
    assert read_video_info(video)[0] == 1 + 4 * 8


def test_wrong_size_text_encoder_file_is_one_line(wan_files, tmp_path, capsys):
    root, t5 = wan_files
    data = tmp_path / "p.txt"
    data.write_text("a cat\n")
    bad = [o.replace("d_ff=64", "d_ff=128") for o in t5]
    code = inference.main(["--config_path", str(ROOT / "configs" / "inference.yaml"), "num_output_frames=3"]
                          + _overrides(root, tmp_path / "out", data, bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "models_t5_umt5-xxl-enc-bf16.pth" in err[0]
