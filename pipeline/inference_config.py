"""Loading an inference config: the YAML file and ``key=value`` overrides, checked against the
one schema of `utils.settings_schema` at load time and returned as the typed `InferenceConfig`.

`load_inference_config` rejects an unknown key in the YAML file or in a ``key=value`` override
with a "did you mean" hint, and a value of the wrong type or outside its allowed set with a
message naming the key, the value and what is allowed, all before any model is loaded. The
reference's configs (spec §0) use a subset of these keys, so they load as they are.

It is the one place where a loaded mapping becomes typed settings: the runner, the builders and
the live session take an `InferenceConfig` and never see the YAML mapping, so every default of
an absent key is the schema's.

The checks that relate keys to each other (resolution multiple of 16, frames a whole number of
chunks, sink smaller than the window) are made when the stream settings are built
(`pipeline.settings`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from memflow.config import DiTConfig
from utils.config import load_config
from utils.errors import InputError
from utils.settings_schema import SEED_RANGE, InferenceConfig, settings_from_config

__all__ = ["SEED_RANGE", "InferenceConfig", "check_tiny_shape", "load_inference_config"]


def check_tiny_shape(c: InferenceConfig) -> None:
    """The `tiny:` section as a whole makes a DiT (e.g. `dim` divisible by `num_heads`): the
    relations between its keys, which a per-key schema cannot express."""
    if not c.tiny:
        return
    shape = {k: v for k, v in c.tiny.items() if k != "seed"}
    try:
        DiTConfig.from_dict(shape)
    except ValueError as err:
        raise InputError(f"config key `tiny`: {err}") from None


def load_inference_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> InferenceConfig:
    """The typed settings of the config file at `path` with ``key=value`` `overrides`, checked
    against the schema (keys, types, allowed values, the tiny shape) before any model loads."""
    cfg = load_config(path, overrides, schema=InferenceConfig)
    c = settings_from_config(cfg, InferenceConfig)
    check_tiny_shape(c)
    return c
