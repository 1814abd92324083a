"""YAML configs with ``key=value`` command-line overrides, and checks for the paths they name.

With a `schema` (a dataclass, see `config.checker`), every key of the file and of the overrides
must be one of the schema's, and every value of the merged config (the file's values that no
override replaces, and the overrides) must have the schema's type;
this is how the entry points load their configs. Without one, overrides may only set keys that
the YAML file already has (a typo such as ``num_output_frame=24`` would otherwise be accepted and
silently ignored); the exception is a section that the file leaves empty, like ``memory: {}``,
whose options are validated by the code that reads it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from config.checker import check_known_keys, check_override, check_section, did_you_mean
from memflow.checkpoint import WAN_T5_CHECKPOINT, WAN_T5_TOKENIZER, WAN_VAE_CHECKPOINT
from memflow.errors import InputError
from memflow.files import reading

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}

_OVERRIDE = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(.*)", re.DOTALL)


def _load_yaml(path: Path) -> DictConfig:
    try:
        with reading(path, "config file"):
            cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InputError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(cfg, DictConfig):
        raise InputError(f"{path}: a config file must be a mapping of keys to values")
    return cfg


def _check_known(cfg: DictConfig, key: str, path: Path) -> None:
    """Raise unless `key` exists in `cfg` or lies inside a section that is empty there."""
    node = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, DictConfig) and len(node) == 0:
            return
        if not isinstance(node, DictConfig) or part not in node:
            prefix = "".join(f"{p}." for p in parts[:depth])
            siblings = [f"{prefix}{k}" for k in node] if isinstance(node, DictConfig) else []
            raise InputError(f"unknown config key `{key}` (not in {path})"
                             f"{did_you_mean(key, siblings)}")
        node = node[part]


def load_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), schema: type | None = None
) -> DictConfig:
    """The YAML file at `path` with command-line overrides such as ``num_output_frames=24``.

    Values are parsed as YAML (``x=[1,2]`` is a list, ``x=`` is null), so
    ``switch_frame_indices=40,80`` stays the reference's comma-separated string. With `schema`,
    unknown keys (in the file or an override) and values of the wrong type are `InputError`s.
    """
    path = Path(path)
    cfg = file_cfg = _load_yaml(path)
    if schema is not None:
        check_known_keys(file_cfg, schema, where=str(path))
    for item in overrides:
        match = _OVERRIDE.fullmatch(item)
        if match is None:
            raise InputError(
                f"malformed override {item!r}; expected key=value, e.g. num_output_frames=24"
            )
        if schema is None:
            _check_known(file_cfg, match.group(1), path)  # sections empty in the file take any key
        try:
            patch = OmegaConf.from_dotlist([item])
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e
            raise InputError(
                f"override {item!r}: the value is not valid YAML ({problem})"
            ) from None
        if schema is not None:
            check_override(match.group(1), OmegaConf.select(patch, match.group(1)), schema)
        cfg = OmegaConf.merge(cfg, patch)
    if schema is not None:
        check_section(cfg, schema)
    return cfg


def _attribute(settings: object, key: str) -> object:
    for part in key.split("."):
        settings = getattr(settings, part, None)
    return settings


def require_path(cfg: DictConfig | object, key: str, kind: str = "file") -> Path:
    """The existing file or directory that config key `key` (dotted for nested keys) names, in a
    loaded config or in typed settings (`config.schema`).

    Relative paths are taken from the working directory, as in the reference, and ``~`` is
    expanded. Checking up front turns a missing checkpoint into one line naming the key instead
    of an error deep inside torch.load.
    """
    value = OmegaConf.select(cfg, key) if isinstance(cfg, DictConfig) else _attribute(cfg, key)
    if value is None or value == "":
        raise InputError(f"config key `{key}` is not set")
    if not isinstance(value, str):
        raise InputError(f"config key `{key}`: expected a path, got {value!r}")
    return existing_path(key, Path(value).expanduser(), kind)


def existing_path(key: str, path: Path, kind: str = "file", *, directory_hint: str | None = None) -> Path:
    """`path`, named by config key `key`, if it exists as a `kind` ("file" or "dir"); else one
    line naming the key. `directory_hint` says what to give instead of a directory where a file
    is expected (a checkpoint folder: the file inside it)."""
    if kind not in ("file", "dir"):
        raise ValueError(f"existing_path: kind must be 'file' or 'dir', got {kind!r}")
    noun = "file" if kind == "file" else "directory"
    if not path.exists():
        raise InputError(f"config key `{key}`: {noun} not found: {path}")
    if (kind == "file") != path.is_file():
        if kind == "file" and directory_hint:
            raise InputError(f"config key `{key}`: {path} is a directory; {directory_hint}")
        raise InputError(f"config key `{key}`: expected a {noun}: {path}")
    return path


def require_wan_folder(folder: Path, key: str, *, codecs: bool) -> Path:
    """A Wan2.1 model folder (named by config key `key`) with its config.json and, with `codecs`
    (the folder whose umT5 and VAE are loaded too), the T5 weights, tokenizer and VAE."""
    existing_path(key, folder, "dir")
    existing_path(key, folder / "config.json")
    if codecs:
        existing_path(key, folder / WAN_T5_CHECKPOINT)
        existing_path(key, folder / WAN_T5_TOKENIZER, "dir")
        existing_path(key, folder / WAN_VAE_CHECKPOINT)
    return folder
