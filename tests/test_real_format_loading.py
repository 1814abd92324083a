"""The real loading path end to end: a tiny model written in the original on-disk formats
(Wan2.1 folder with config.json, DiT safetensors, umT5 .pth + tokenizer folder, VAE .pth, and
MemFlow base.pt / lora.pt) is generated from through the unchanged `configs/*.yaml`."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch
import yaml
from config_reads import record_reads
from reference_files import (
    save_generator_checkpoint,
    save_lora_checkpoint,
    save_wan_weights,
    to_wan_t5_state_dict,
    to_wan_vae_state_dict,
)

import inference
import train
from config.checker import config_key, section_of
from config.schema import IGNORED_KEYS, TrainConfig
from memflow.config import DiTConfig
from memflow.lora import LoraSettings, add_lora
from memflow.tiny import (
    build_tiny_dit,
    build_tiny_text_encoder,
    build_tiny_tokenizer,
    build_tiny_vae,
)
from utils.video_writer import read_video_info

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


# ---- every key of every shipped config is read -------------------------------------------------
def _shipped_keys(path: Path) -> set[str]:
    """The dotted keys a shipped config sets (`model_kwargs` and `adapter` by sub-key)."""
    keys: set[str] = set()
    for key, value in yaml.safe_load(path.read_text()).items():
        keys |= {f"{key}.{sub}" for sub in value} if key in SUB_KEYED and value else {key}
    return keys


SUB_KEYED = ("model_kwargs", "adapter")
# Read only on a path no test can take on a CPU in one process; the reason names that path.
READ_ELSEWHERE = {
    "sharding_strategy": "read when FSDP2 shards, in a distributed run (torchrun)",
    "text_encoder_cpu_offload": "read when the real umT5 of generator_name is loaded",
}


def _one_allowed_value(key: str) -> bool:
    """A key the schema restricts to one value (`trainer`, `adapter.type`): loading is its only
    reading."""
    schema, annotation = TrainConfig, None
    for part in key.split("."):
        fields = {config_key(f): f.name for f in dataclasses.fields(schema)}
        annotation = typing.get_type_hints(schema)[fields[part]]
        schema = section_of(annotation)
    return typing.get_origin(annotation) is typing.Literal and len(typing.get_args(annotation)) == 1


def test_every_key_of_every_shipped_config_is_read(wan_files, tmp_path, monkeypatch):
    """Each key a shipped config sets is read by the code when that config runs (the typed
    config records the reads of project code): inference from the original-format files, tiny
    training for one step, and the settings of the real training configs with their model
    folders present and each switch mode. Keys kept only so the reference's configs load are
    marked ignored in the schema; a key nothing reads would be a setting that does nothing."""
    from trainer.config import TrainSettings, load_train_config

    reads = record_reads(monkeypatch)
    root, t5 = wan_files
    data = tmp_path / "p.txt"
    data.write_text("a cat\n")
    story = tmp_path / "story.jsonl"
    story.write_text(json.dumps({"prompts": ["a cat sits", "the cat jumps"]}) + "\n")
    configs = ROOT / "configs"
    for name, extra in (("inference.yaml", [f"data_path={data}", "num_output_frames=3"]),
                        ("interactive_inference.yaml",
                         [f"data_path={story}", "num_output_frames=6", "switch_frame_indices=3"])):
        overrides = [*_overrides(root, tmp_path / name, data, t5), *extra]
        assert inference.main(["--config_path", str(configs / name), *overrides]) == 0
    for name in ("tiny.yaml", "tiny_interactive.yaml"):
        assert inference.main(["--config_path", str(configs / name),
                               f"output_folder={tmp_path / name}"]) == 0
    for name in ("tiny_train_init.yaml", "tiny_train_long.yaml"):
        assert train.main(["--config_path", str(configs / name), "--logdir",
                           str(tmp_path / name), "max_iters=1"]) == 0
    prompts = ROOT / "prompts" / "tiny_train_prompts.txt"
    checkpoint = tmp_path / "base.pt"
    checkpoint.write_bytes(b"")
    folders = [f"wan_models_root={root / 'wan_models'}", f"generator_ckpt={checkpoint}",
               "real_name=Wan2.1-T2V-1.3B", f"data_path={prompts}", f"val_data_path={prompts}",
               f"switch_prompt_path={prompts}", f"val_switch_prompt_path={prompts}"]
    for name in ("train_init.yaml", "train_long.yaml"):
        TrainSettings.from_config(load_train_config(configs / name, [*folders, "lora_ckpt=null"]))
    for mode in ("switch_mode=fixed", "switch_mode=random min_switch_frame_index=21 "
                 "max_switch_frame_index=42"):
        TrainSettings.from_config(load_train_config(configs / "train_long.yaml", [
            *folders, "lora_ckpt=null", *mode.split()]))
    TrainSettings.from_config(load_train_config(configs / "tiny_train_init.yaml",
                                                ["mixed_precision=true"]))
    unread = {}
    for path in sorted(configs.glob("*.yaml")):
        keys = {k for k in _shipped_keys(path) - reads - set(READ_ELSEWHERE)
                if k not in IGNORED_KEYS and not _one_allowed_value(k)}
        if keys:
            unread[path.name] = sorted(keys)
    assert unread == {}
    assert not set(READ_ELSEWHERE) & reads, "a key read here needs no exemption"
