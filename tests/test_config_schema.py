"""One schema (`utils.settings_schema`) for every config key: its defaults agree with
`configs/default_config.yaml` and with the library's typed objects, inference and training share
their sections, and every key of every shipped config is read by some code path."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from memflow.config import SamplingConfig, StreamConfig, SwitchOptions
from utils.schema import schema_keys
from utils.settings_schema import (
    IGNORED_KEYS,
    InferenceConfig,
    ModelKwargs,
    SamplingKeys,
    StreamKeys,
    TrainConfig,
    config_key,
    schema_defaults,
    settings_from_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SCHEMA_MODULES = {ROOT / "utils" / "settings_schema.py", ROOT / "utils" / "schema.py"}


def test_default_config_yaml_and_the_dataclass_defaults_agree():
    written = yaml.safe_load((ROOT / "configs" / "default_config.yaml").read_text())
    assert written == schema_defaults(TrainConfig)


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


def _fields_by_key(schema: type) -> dict[str, dataclasses.Field]:
    return {config_key(f): f for f in dataclasses.fields(schema)}


def _shipped_keys() -> set[str]:
    keys: set[str] = set()
    for path in CONFIGS:
        for key, value in yaml.safe_load(path.read_text()).items():
            keys.add(key)
            if key == "model_kwargs" and isinstance(value, dict):
                keys |= set(value)
    return keys


def _source_text() -> str:
    files = [p for d in ("memflow", "pipeline", "trainer", "utils", "eval") for p in
             (ROOT / d).rglob("*.py") if p not in SCHEMA_MODULES]
    files += [p for p in ROOT.glob("*.py")]
    return "\n".join(p.read_text() for p in files)


def test_every_key_of_every_shipped_config_is_read():
    """A key is read when code outside the schema names it (as an attribute or a string);
    the reference keys that are accepted only so that its configs load are listed, each with
    the reason, in `IGNORED_KEYS`."""
    fields = {**_fields_by_key(TrainConfig), **_fields_by_key(InferenceConfig),
              **_fields_by_key(ModelKwargs)}
    source = _source_text()
    unread = []
    for key in sorted(_shipped_keys()):
        f = fields[key]
        if f.metadata.get("ignored"):
            assert key in IGNORED_KEYS
            continue
        if not re.search(rf"(\.|[\"']){re.escape(f.name)}\b", source):
            unread.append(key)
    assert unread == []


def test_ignored_keys_are_exactly_the_fields_marked_ignored():
    marked = {config_key(f) for f in dataclasses.fields(TrainConfig) if f.metadata.get("ignored")}
    assert marked == set(IGNORED_KEYS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_use_schema_keys(path):
    data = yaml.safe_load(path.read_text())
    known = set(schema_keys(TrainConfig)) | set(schema_keys(InferenceConfig))
    assert set(data) <= known


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
