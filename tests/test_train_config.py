"""Training configs: defaults + file + overrides + CLI flags (TRAINING.md §1), and the validated
`TrainSettings` built from them."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from config.stream import memory_preset
from memflow.config import MemoryOptions
from memflow.errors import InputError
from memflow.text_encoder import WAN_T5_CHECKPOINT, WAN_T5_TOKENIZER
from memflow.vae import WAN_VAE_CHECKPOINT
from trainer.config import (
    DEFAULT_CONFIG,
    CliFlags,
    TrainSettings,
    add_train_arguments,
    load_train_config,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_train_init.yaml"
INIT = REPO / "configs" / "train_init.yaml"
PROMPTS = REPO / "prompts" / "tiny_train_prompts.txt"


def tiny_settings(*overrides: str, check_files: bool = True) -> TrainSettings:
    cfg = load_train_config(TINY, [f"data_path={PROMPTS}", f"val_data_path={PROMPTS}", *overrides])
    return TrainSettings.from_config(cfg, check_files=check_files)


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the shipped configs --------------------------------------------------------------------
def test_train_init_derives_its_settings():
    """What the settings derive from train_init.yaml (its values themselves are the file's)."""
    s = TrainSettings.from_config(load_train_config(INIT), check_files=False)
    assert s.stage == 1 and not s.compat
    assert s.stream.memory == MemoryOptions.clean()  # the clean preset of behaviour: clean
    assert s.latent_hw == (60, 104) and s.latent_channels == 16  # from image_or_video_shape
    assert s.compute_dtype == torch.bfloat16 and s.param_dtype == torch.float32  # mixed precision
    assert s.data_shuffle == "epoch"  # by behaviour
    assert s.train_generator(0) and not s.train_generator(4) and s.train_generator(5)
    assert s.wandb.enabled and s.wandb.run_name == "train_init"  # the config file's name


def test_tiny_config_validates_with_files():
    s = tiny_settings()
    assert s.config.preset == "tiny" and s.config.device == "cpu"
    assert s.latent_hw == (12, 16)
    assert s.rollout.block_range(s.frames_per_block) == (2, 2)
    assert not s.config.mixed_precision and s.compute_dtype == torch.float32
    assert s.config.max_iters == 6 and s.config.log_iters == 3 and s.config.max_checkpoints == 2
    assert s.config.dfake_gen_update_ratio == 5 and s.config.gradient_checkpointing and s.config.vis_interval == 0
    assert not s.wandb.enabled
    assert s.tiny.generator["dim"] == 32 and s.tiny.teacher["dim"] == 48
    assert s.tiny.critic == s.tiny.generator  # the critic starts as the generator's base
    assert s.tiny.section("teacher")["seed"] == 1 and s.tiny.text_len == 64


def test_compat_uses_reference_bank_policy_and_score_table():
    s = tiny_settings("behaviour=compat")
    assert s.compat
    assert s.stream.memory == memory_preset(True, "stage1")
    assert s.score.score_shift == 8.0
    assert s.data_shuffle == "fixed"
    s = tiny_settings("behaviour=compat", "memory.score_in_fp32=true", "data_shuffle=epoch")
    assert s.stream.memory.score_in_fp32 and s.data_shuffle == "epoch"


def test_defaults_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(TINY)
    assert cfg.trainer == "score_distillation"
    assert DEFAULT_CONFIG == REPO / "configs" / "default_config.yaml"


# ---- merging --------------------------------------------------------------------------------
def test_file_overrides_defaults_and_nested_sections_merge(tmp_path):
    path = write(tmp_path, "lr: 1.0e-3\nmodel_kwargs:\n  sink_size: 1\n")
    cfg = load_train_config(path)
    assert cfg.lr == pytest.approx(1e-3)
    assert cfg.model_kwargs.sink_size == 1
    assert cfg.model_kwargs.local_attn_size == 12 and cfg.model_kwargs.bank_size == 3
    assert cfg.lr_critic == pytest.approx(4e-7)
    assert cfg.config_name == "train"


def test_overrides_and_cli_flags(tmp_path):
    cfg = load_train_config(TINY, ["max_iters=2", "model_kwargs.bank_size=1", "tiny.num_layers=1"])
    assert cfg.max_iters == 2 and cfg.model_kwargs.bank_size == 1 and cfg.tiny.num_layers == 1

    flags = CliFlags(logdir=str(tmp_path / "run"), no_save=True, disable_wandb=True, auto_resume=False)
    cfg = load_train_config(INIT, ["logdir=ignored"], flags)
    assert cfg.logdir == str(tmp_path / "run")  # the flag wins over an override
    assert cfg.no_save is True and cfg.disable_wandb is True and cfg.auto_resume is False
    s = TrainSettings.from_config(cfg, check_files=False)
    assert s.logdir == tmp_path / "run" and s.config.no_save and not s.config.auto_resume and not s.wandb.enabled

    cfg = load_train_config(INIT, (), CliFlags())  # flags not given: YAML values stay
    assert cfg.logdir == "" and cfg.no_save is False and cfg.auto_resume is True


def test_argument_parser_round_trip():
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--config_path", "x.yaml", "--logdir", "logs/a", "--no_save",
                              "--disable-wandb", "--no-auto-resume", "--no-one-logger", "lr=1"])
    flags = CliFlags.from_args(args)
    assert flags == CliFlags(logdir="logs/a", no_save=True, disable_wandb=True, auto_resume=False,
                             use_one_logger=False)
    assert args.overrides == ["lr=1"]
    args = parser.parse_args(["--config_path", "x.yaml", "--auto_resume"])
    assert CliFlags.from_args(args) == CliFlags(auto_resume=True)
    assert CliFlags.from_args(parser.parse_args(["--config_path", "x.yaml"])) == CliFlags()


# ---- unknown keys ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, key, hint", [
    ("dfake_gen_update_raito: 5\n", "dfake_gen_update_raito", "dfake_gen_update_ratio"),
    ("model_kwargs:\n  sink_sise: 3\n", "model_kwargs.sink_sise", "model_kwargs.sink_size"),
])
def test_unknown_key_in_file_is_rejected_with_suggestion(tmp_path, text, key, hint):
    path = write(tmp_path, text)
    with pytest.raises(InputError, match=rf"unknown config key `{key}`.*did you mean `{hint}`"):
        load_train_config(path)


def test_unknown_key_on_command_line_is_rejected_with_suggestion():
    with pytest.raises(InputError, match=r"unknown config key `max_iter`.*did you mean `max_iters`"):
        load_train_config(TINY, ["max_iter=3"])
    with pytest.raises(InputError, match=r"did you mean `model_kwargs.bank_size`"):
        load_train_config(TINY, ["model_kwargs.bank_sise=3"])
    with pytest.raises(InputError, match="malformed override"):
        load_train_config(TINY, ["max_iters"])


def test_unknown_tiny_key_is_rejected():
    with pytest.raises(InputError, match=r"`tiny.num_layer`.*did you mean `tiny.num_layers`"):
        tiny_settings("tiny.num_layer=1")
    with pytest.raises(InputError, match=r"tiny.teacher.text_len"):
        tiny_settings("tiny.teacher.text_len=8")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="invalid YAML"):
        load_train_config(write(tmp_path, "lr: [1, 2\n"))


# ---- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["num_training_frames=7", "min_num_training_frames=6"],
     r"`num_training_frames` \(7\) must be a multiple of num_frame_per_block \(3\)"),
    (["min_num_training_frames=5"], r"`min_num_training_frames` \(5\) must be a multiple"),
    (["min_num_training_frames=9", "slice_last_frames=9"], r"`min_num_training_frames` \(9\) must not exceed"),
    (["num_training_frames=9", "min_num_training_frames=9"], r"`slice_last_frames`"),
    (["param_dtype=float64"], r"`param_dtype` must be one of bfloat16, .*; got 'float64'"),
    (["compute_dtype=bf17"], r"`compute_dtype` must be one of .*; got 'bf17'"),
    (["dfake_gen_update_ratio=0"], r"`dfake_gen_update_ratio` must be >= 1"),
    (["gradient_accumulation_steps=0"], r"`gradient_accumulation_steps` must be >= 1"),
    (["batch_size=0"], r"`batch_size` must be >= 1"),
    (["beta2=1.0"], r"`beta2` must be in \[0, 1\), got 1.0"),
    (["lr=abc"], r"`lr` must be a number; got 'abc'"),
    (["max_iters=2.5"], r"`max_iters` must be an integer; got 2.5"),
    (["switch_mode=fixed", "streaming_training=true", "distribution_loss=dmd_switch",
      "fixed_switch_index=4"], r"`fixed_switch_index`: switch frame 4 must be a positive multiple"),
    (["lr_critic=-1"], r"`lr_critic` must be > 0"),
    (["ema_weight=1.5"], r"`ema_weight` must be in"),
    (["max_grad_norm_generator=0"], r"`max_grad_norm_generator` must be > 0"),
    (["behaviour=fast"], r"`behaviour` must be one of clean, compat"),
    (["wandb_mode=online"], r"`wandb_mode` must be one of offline, disabled"),
    (["data_shuffle=random"], r"`data_shuffle` must be one of"),
    (["denoising_loss_type=x0"], r"`denoising_loss_type`"),
    (["distribution_loss=dmd_switch"], r"`distribution_loss` and `streaming_training` disagree"),
    (["i2v=true"], r"`i2v`"),
    (["fake_guidance_scale=2.0"], r"`fake_guidance_scale`"),
    (["image_or_video_shape=[1,6,16,13,16]"], r"latent size 13x16 must be even"),
    (["image_or_video_shape=[1,6,16]"], r"`image_or_video_shape` must be 5 positive integers"),
    (["model_kwargs.sink_size=6"], r"`model_kwargs`.*sink_size"),
    (["memory.bogus=1"], r"unknown config key `memory.bogus`"),
    (["memory.bank_score=foo"], r"`memory.bank_score` must be one of mean_qk, softmax_masked"),
    (["trainer=other"], r"`trainer` must be score_distillation"),
    (["seed=-1"], r"`seed` must be between 0 and 9223372036854775807"),
    (["seed=99999999999999999999"], r"`seed` must be between 0 and 9223372036854775807"),  # as inference
    (["vis_video_lengths=[4]"], r"`vis_video_lengths`"),
    (["device=tpu"], r"`device` must be one of"),
    (["preset=small"], r"`preset` must be tiny or null; got 'small'"),
    (["real_name="], r"`real_name` must be a string; got null"),
])
def test_bad_values_fail_in_one_line_naming_the_key(overrides, message):
    with pytest.raises(InputError, match=message) as info:
        tiny_settings(*overrides)
    assert "\n" not in str(info.value)


def test_prompt_file_checks(tmp_path):
    with pytest.raises(InputError, match=r"config key `data_path` is not set"):
        tiny_settings("data_path=null")
    with pytest.raises(InputError, match=r"config key `data_path`: file not found"):
        tiny_settings(f"data_path={tmp_path / 'missing.txt'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match=r"config key `data_path`: prompt file .*empty"):
        tiny_settings(f"data_path={empty}")
    assert tiny_settings(f"data_path={tmp_path / 'missing.txt'}", check_files=False)


def make_wan_folder(root: Path, name: str, codecs: bool) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if codecs:
        (folder / WAN_T5_CHECKPOINT).write_bytes(b"")
        (folder / WAN_T5_TOKENIZER).mkdir(parents=True)
        (folder / WAN_VAE_CHECKPOINT).write_bytes(b"")


def test_model_paths_are_checked_unless_tiny(tmp_path):
    root = tmp_path / "wan_models"
    base = [f"data_path={PROMPTS}", f"val_data_path={PROMPTS}", f"wan_models_root={root}"]

    def settings(*extra: str) -> TrainSettings:
        return TrainSettings.from_config(load_train_config(INIT, [*base, *extra]))

    with pytest.raises(InputError, match=r"config key `generator_ckpt`: file not found"):
        settings()
    ckpt = tmp_path / "ode_init.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(InputError, match=r"`wan_models_root/generator_name`: directory not found"):
        settings(f"generator_ckpt={ckpt}")
    make_wan_folder(root, "Wan2.1-T2V-1.3B", codecs=True)
    with pytest.raises(InputError, match=r"`wan_models_root/real_name`: directory not found: .*14B"):
        settings(f"generator_ckpt={ckpt}")
    make_wan_folder(root, "Wan2.1-T2V-14B", codecs=False)
    s = settings(f"generator_ckpt={ckpt}")  # fake_name is the 1.3B folder too
    assert s.generator_ckpt == ckpt and s.wan_models_root == root
    with pytest.raises(InputError, match=r"`wan_models_root/fake_name`: directory not found"):
        settings(f"generator_ckpt={ckpt}", "fake_name=Wan-critic")
    # the tiny preset needs no model files at all
    assert tiny_settings(f"wan_models_root={tmp_path / 'none'}").config.preset == "tiny"


def test_guidance_ema_and_lora():
    assert tiny_settings("real_guidance_scale=4.5").score.guidance_scale == 4.5
    assert tiny_settings("ema_weight=null").ema_weight is None
    s = tiny_settings("adapter={type: lora, rank: 4, alpha: 4}")
    assert s.ema_weight is None  # no EMA with LoRA (spec §2.4)


def test_cli_script_style_parse_from_env_paths(tmp_path, monkeypatch):
    """A relative --config_path works from the repository root, as the launch scripts use it."""
    monkeypatch.chdir(REPO)
    cfg = load_train_config(os.path.join("configs", "tiny_train_init.yaml"))
    assert TrainSettings.from_config(cfg).data_path == Path("prompts/tiny_train_prompts.txt")


def test_cuda_graphs_are_refused_in_training(tmp_path):
    from conftest import train_settings

    with pytest.raises(InputError, match="CUDA graphs are for inference"):
        train_settings(TINY, tmp_path, cuda_graphs="true")


def test_compile_reaches_every_trained_model(tmp_path):
    """`compile: true` in training compiles the generator, critic and teacher blocks."""
    from conftest import make_trainer, train_settings

    trainer = make_trainer(train_settings(TINY, tmp_path, compile="true"))
    for model in (trainer.generator, trainer.critic, trainer.teacher):
        assert model.compiled
