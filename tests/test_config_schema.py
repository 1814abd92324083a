"""One schema (`config.schema`) for every config key: its defaults agree with
`configs/default_config.yaml` and with the library's typed objects, inference and training share
their sections. That every key of every shipped config is read: tests/test_real_format_loading.py."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from config.checker import config_key, schema_keys, section_of
from config.schema import (
    IGNORED_KEYS,
    InferenceConfig,
    ModelKwargs,
    SamplingKeys,
    StreamKeys,
    TrainConfig,
    schema_defaults,
    settings_from_config,
)
from memflow.config import SamplingConfig, StreamConfig, SwitchOptions

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _flat(mapping: dict, prefix: str = "") -> dict:
    """Dotted key -> value of a nested mapping (an empty section is no key)."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_default_config_yaml_and_the_dataclass_defaults_agree():
    """Every value the commented defaults file writes is the schema's default of that key."""
    written = _flat(yaml.safe_load((ROOT / "configs" / "default_config.yaml").read_text()))
    defaults = _flat(schema_defaults(TrainConfig))
    assert {k: defaults.get(k, "<not a schema key>") for k in written} == written


def test_a_training_key_needs_only_its_schema_field(tmp_path):
    """The defaults file documents the defaults; the schema holds them: training with an empty
    defaults file gives the same settings, so a new key is added in one place."""
    from trainer.config import TrainSettings, load_train_config

    empty = tmp_path / "defaults.yaml"
    empty.write_text("{}\n")
    for name in ("tiny_train_init.yaml", "tiny_train_long.yaml", "train_init.yaml", "train_long.yaml"):
        config, prompts = ROOT / "configs" / name, ROOT / "prompts" / "tiny_train_prompts.txt"
        overrides = [f"data_path={prompts}", f"val_data_path={prompts}"]
        if "long" in name:
            overrides += [f"switch_prompt_path={prompts}", f"val_switch_prompt_path={prompts}"]
        with_file = TrainSettings.from_config(load_train_config(config, overrides), check_files=False)
        without = TrainSettings.from_config(load_train_config(config, overrides, defaults_path=empty),
                                            check_files=False)
        assert without == with_file, name


def test_library_defaults_are_the_schema_defaults():
    """memflow's typed objects, built with no arguments, hold the schema's defaults."""
    mk, stream, sampling = ModelKwargs(), StreamConfig(), SamplingConfig(
        denoising_step_list=tuple(SamplingKeys().denoising_step_list))
    assert (stream.local_attn_size, stream.sink_size, stream.bank_size, stream.record_interval,
            stream.sma, stream.sma_top_k) == (mk.local_attn_size, mk.sink_size, mk.bank_size,
                                              mk.record_interval, mk.sma, mk.sma_top_k)
    assert stream.num_frame_per_block == StreamKeys().num_frame_per_block
    assert sampling.timestep_shift == mk.timestep_shift
    assert sampling.warp_denoising_step == SamplingKeys().warp_denoising_step
    assert sampling.context_noise == SamplingKeys().context_noise
    assert SwitchOptions().global_sink == InferenceConfig().global_sink


def test_inference_and_training_share_their_sections():
    for section in (StreamKeys, SamplingKeys):
        assert issubclass(InferenceConfig, section) and issubclass(TrainConfig, section)
    shared = set(schema_keys(InferenceConfig)) & set(schema_keys(TrainConfig))
    assert {"model_kwargs", "denoising_step_list", "behaviour", "memory", "device"} <= shared


def test_reference_spelling_is_an_alias():
    assert "SMA" in schema_keys(ModelKwargs) and "sma" not in schema_keys(ModelKwargs)
    typed = settings_from_config({"model_kwargs": {"SMA": True, "sink_size": 0}}, InferenceConfig)
    assert typed.model_kwargs.sma is True and typed.model_kwargs.sink_size == 0
    assert typed.model_kwargs.local_attn_size == ModelKwargs().local_attn_size  # default


def _marked_ignored(schema: type, prefix: str = "") -> set[str]:
    """The dotted keys of `schema` (and its sections) whose field is marked ignored."""
    hints, marked = typing.get_type_hints(schema), set()
    for f in dataclasses.fields(schema):
        if f.metadata.get("ignored"):
            marked.add(prefix + config_key(f))
        section = section_of(hints[f.name])
        if section is not None and dataclasses.is_dataclass(section):
            marked |= _marked_ignored(section, f"{prefix}{config_key(f)}.")
    return marked


def test_ignored_keys_are_exactly_the_fields_marked_ignored():
    assert _marked_ignored(TrainConfig) | _marked_ignored(InferenceConfig) == set(IGNORED_KEYS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_against_their_schema(path):
    """Every shipped config loads with its schema's checks on (unknown keys, types, bounds)."""
    from config.loader import load_config

    schema = TrainConfig if "train" in path.name or path.name == "default_config.yaml" else InferenceConfig
    cfg = load_config(path, schema=schema)
    assert set(cfg) == set(yaml.safe_load(path.read_text()))


def test_every_typed_training_setting_is_read_outside_its_parser():
    """A setting that is validated and then never read does nothing (the old sharding_strategy,
    latent_channels and param_dtype did): each field of `TrainSettings` is read somewhere."""
    from trainer.config import TrainSettings

    parser = ROOT / "trainer" / "config.py"
    files = [p for d in ("memflow", "pipeline", "trainer", "eval") for p in (ROOT / d).rglob("*.py")
             if p != parser]
    source = "\n".join(p.read_text() for p in files)
    own = parser.read_text()  # its methods and properties (train_generator, ...)
    unread = [f.name for f in dataclasses.fields(TrainSettings)
              if not re.search(rf"\.{f.name}\b", source) and f"self.{f.name}" not in own]
    assert unread == []


def test_an_absent_training_key_takes_the_schema_default():
    """Training reads its fallbacks from the schema: dropping every key whose value is the
    default gives the same settings as the fully merged config."""
    from omegaconf import OmegaConf

    from trainer.config import TrainSettings, load_train_config

    tiny = ROOT / "configs" / "tiny_train_long.yaml"
    full = load_train_config(tiny, [f"data_path={ROOT / 'prompts' / 'tiny_train_prompts.txt'}"])
    defaults = schema_defaults(TrainConfig)
    values = OmegaConf.to_container(full)
    dropped = {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}
    assert len(dropped) < len(values) - 20  # most keys are defaults
    sparse = TrainSettings.from_config(OmegaConf.create(dropped), check_files=False)
    assert sparse == TrainSettings.from_config(full, check_files=False)
