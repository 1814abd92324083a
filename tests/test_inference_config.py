"""Every inference config key is checked against one typed schema, in the file and on the command
line, before any model is loaded (issue 10, item 2)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import one_error_line

import inference
import pipeline.runner
from config.checker import schema_keys
from config.inference import InferenceConfig, load_inference_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI, which must stop with status 2 and exactly one `error:` line."""
    return one_error_line(capsys, inference.main(argv))


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """A config error must be found before anything is built."""
    def fail(*_args, **_kwargs):
        raise AssertionError("models were loaded although the config is invalid")

    monkeypatch.setattr(pipeline.runner, "load_components", fail)


@pytest.mark.parametrize(
    "yaml_line,message",
    [
        ("num_output_frame: 3", "unknown config key `num_output_frame`; did you mean `num_output_frames`?"),
        ("model_kwargs:\n  bank_sise: 2", "unknown config key `model_kwargs.bank_sise`; did you mean `model_kwargs.bank_size`?"),
        ("memory:\n  score_in_fp3: true", "unknown config key `memory.score_in_fp3`; did you mean `memory.score_in_fp32`?"),
    ],
)
def test_unknown_key_in_the_file_is_rejected_with_a_suggestion(tmp_path, capsys, yaml_line, message):
    config = tmp_path / "my.yaml"
    config.write_text(f"preset: tiny\ndata_path: prompts/example_prompts.txt\n{yaml_line}\n")
    assert _error(capsys, ["--config_path", str(config)]) == f"error: {config}: {message}"


@pytest.mark.parametrize(
    "override,message",
    [
        ("seed=abc", "config key `seed` must be an integer; got 'abc'"),
        ("height=abc", "config key `height` must be an integer; got 'abc'"),
        ("denoising_step_list=abc", "config key `denoising_step_list` must be a list of integers; got 'abc'"),
        ("num_output_frames=3.7", "config key `num_output_frames` must be an integer; got 3.7"),
        ('save_with_index="false"', "config key `save_with_index` must be true or false; got 'false'"),
        ("memory.bank_score=foo", "config key `memory.bank_score` must be one of mean_qk, softmax_masked; got 'foo'"),
        ("memory.record_policy=foo", "config key `memory.record_policy` must be one of every_chunk, every_interval; got 'foo'"),
        ("memory.keep_order=foo", "config key `memory.keep_order` must be one of score_desc, temporal; got 'foo'"),
        ("attn_backend=foo", "config key `attn_backend` must be one of auto, sdpa, flash2, flash3, flash4, flash; got 'foo'"),
        ("model_kwargs=5", "config key `model_kwargs` must be a mapping or null; got 5"),
        ("height=null", "config key `height` must be an integer; got null"),
        ("fps=0", "config key `fps` must be > 0, got 0"),
        ("output_folder=", "config key `output_folder` must be a string; got null"),
        ("output_folder=''", "config key `output_folder` must not be empty"),
        ("seed_mode=per_gpu", "config key `seed_mode` must be one of per_prompt, per_rank, shared; got 'per_gpu'"),
        ("num_output_frame=3", "unknown config key `num_output_frame`; did you mean `num_output_frames`?"),
        ("tiny.dimm=8", "unknown config key `tiny.dimm`; did you mean `tiny.dim`?"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(tmp_path, capsys, override, message):
    argv = ["--config_path", str(TINY), f"output_folder={tmp_path / 'out'}", override]
    assert _error(capsys, argv) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_wrong_type_in_the_file_is_caught_too(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text(TINY.read_text().replace("trust_checkpoints: false", 'trust_checkpoints: "false"'))
    msg = _error(capsys, ["--config_path", str(config)])
    assert msg == "error: config key `trust_checkpoints` must be true or false; got 'false'"


@pytest.mark.parametrize("name", ["inference.yaml", "interactive_inference.yaml", "tiny.yaml",
                                  "tiny_interactive.yaml"])
def test_shipped_configs_use_only_schema_keys(name):
    load_inference_config(ROOT / "configs" / name)


def test_a_reference_config_loads_as_it_is(tmp_path):
    """The reference's interactive config (spec §0): a string of switch indices, adapter keys
    that are only printed."""
    config = tmp_path / "reference.yaml"
    config.write_text(
        "denoising_step_list: [1000, 750, 500, 250]\nwarp_denoising_step: true\n"
        "num_frame_per_block: 3\nmodel_name: Wan2.1-T2V-1.3B\n"
        "model_kwargs: {local_attn_size: 12, timestep_shift: 5.0, sink_size: 3, bank_size: 3, "
        "record_interval: 3, SMA: false}\n"
        "data_path: prompts/interactive_example.jsonl\noutput_folder: videos/interactive\n"
        "inference_iter: -1\nnum_output_frames: 240\nuse_ema: false\nseed: 1\nnum_samples: 1\n"
        "save_with_index: true\nglobal_sink: true\ncontext_noise: 0\n"
        "switch_frame_indices: 40, 80, 120, 160, 200\n"
        "generator_ckpt: checkpoints/base.pt\nlora_ckpt: checkpoints/lora.pt\n"
        "adapter: {type: lora, rank: 256, alpha: 256, dropout: 0.0, dtype: bfloat16, verbose: false}\n"
    )
    cfg = load_inference_config(config)
    assert cfg.switch_frame_indices == "40, 80, 120, 160, 200"


def test_schema_lists_the_keys_every_shipped_config_documents():
    """The schema and the annotated configs/inference.yaml describe the same keys (plus the keys
    of the tiny preset and of interactive mode)."""
    from omegaconf import OmegaConf

    documented = set()
    for name in ("inference.yaml", "interactive_inference.yaml", "tiny.yaml", "tiny_interactive.yaml"):
        documented |= set(OmegaConf.load(ROOT / "configs" / name))
    assert documented == set(schema_keys(InferenceConfig))
