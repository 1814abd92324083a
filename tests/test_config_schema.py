"""One schema (`utils.settings_schema`) for every config key: its defaults agree with
`configs/default_config.yaml` and with the library's typed objects, inference and training share
their sections, and every key of every shipped config is read by some code path."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from memflow.config import SamplingConfig, StreamConfig, SwitchOptions
from utils.schema import config_key, schema_keys
from utils.settings_schema import (
    IGNORED_KEYS,
    InferenceConfig,
    ModelKwargs,
    SamplingKeys,
    StreamKeys,
    TrainConfig,
    schema_defaults,
    settings_from_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SCHEMA_MODULES = {ROOT / "utils" / "settings_schema.py", ROOT / "utils" / "schema.py"}


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


def _one_allowed_value(f: dataclasses.Field) -> bool:
    """A key the schema restricts to a single value (any other fails to load)."""
    annotation = typing.get_type_hints(TrainConfig).get(f.name)
    return typing.get_origin(annotation) is typing.Literal and len(typing.get_args(annotation)) == 1


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
        if _one_allowed_value(f):
            continue  # `trainer`, `denoising_loss_type`: the check on load is their only reading
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
