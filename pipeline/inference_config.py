"""Loading an inference config: the YAML file and ``key=value`` overrides, checked against the
one schema of `utils.settings_schema` at load time.

`load_inference_config` rejects an unknown key in the YAML file or in a ``key=value`` override
with a "did you mean" hint, and a value of the wrong type or outside its allowed set with a
message naming the key, the value and what is allowed, all before any model is loaded. The
reference's configs (spec §0) use a subset of these keys, so they load as they are.

The checks that relate keys to each other (resolution multiple of 16, frames a whole number of
chunks, sink smaller than the window) are made when the typed settings are built
(`pipeline.settings`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from memflow.config import DiTConfig
from utils.config import load_config
from utils.errors import InputError
from utils.schema import check_section
from utils.settings_schema import SEED_RANGE, InferenceConfig

__all__ = ["SEED_RANGE", "InferenceConfig", "check_inference_config", "check_tiny_shape",
           "load_inference_config"]


def check_tiny_shape(cfg: DictConfig) -> None:
    """The `tiny:` section as a whole makes a DiT (e.g. `dim` divisible by `num_heads`): the
    relations between its keys, which a per-key schema cannot express."""
    tiny = cfg.get("tiny") if isinstance(cfg, DictConfig) else None
    if not tiny:
        return
    shape = {k: v for k, v in OmegaConf.to_container(tiny).items() if k != "seed"}
    try:
        DiTConfig.from_dict(shape)
    except ValueError as err:
        raise InputError(f"config key `tiny`: {err}") from None


def check_inference_config(cfg: DictConfig) -> None:
    """Check every key, type and allowed value of an already loaded config."""
    check_section(cfg, InferenceConfig)
    check_tiny_shape(cfg)


def load_inference_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> DictConfig:
    """The config file at `path` with ``key=value`` `overrides`, checked against the schema."""
    cfg = load_config(path, overrides, schema=InferenceConfig)
    check_tiny_shape(cfg)
    return cfg
