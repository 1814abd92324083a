"""Check a config's keys, types and allowed values against a typed schema, before anything loads.

A schema is a dataclass whose field annotations say what each key may hold; a nested dataclass
is a section (``model_kwargs:``, ``memory:``), whose keys are all optional. Only the annotations
and metadata are read here; the schemas and their defaults live in `config.schema`.
Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``,
unions of these, ``list[X]`` / ``tuple[X, ...]``, a nested dataclass, and ``Any`` (anything).
Field metadata adds bounds:
``minimum`` / ``maximum`` (ints and floats), ``below`` (an exclusive maximum: a beta, an EMA
weight), ``positive`` (> 0), ``nonempty`` (strings) and ``choices`` (a function giving the allowed
values at check time, such as a registry's names);
``alias`` is the key's spelling in the YAML when it differs from the field name.

A config assembled from a file and ``key=value`` overrides is checked in two passes: the file's
keys first (`check_known_keys`: an unknown key is named with the file it is in), then every
value of the merged config (`check_section`), so a bad value that an override replaces is no
error.

Every problem is an `InputError` naming the key, the value and what is allowed, e.g.
``config key `seed` must be an integer, got 'abc'``, so a typo or a wrong type never becomes a
traceback after the models are loaded, nor a silent fallback (a quoted "false" is not true, 3.7
frames is not 3).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from memflow.errors import InputError


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def _fields(schema: type) -> dict[str, tuple[Any, Mapping[str, Any]]]:
    """name -> (resolved annotation, metadata) of a schema dataclass."""
    hints = typing.get_type_hints(schema, include_extras=False)
    return {config_key(f): (hints[f.name], f.metadata) for f in dataclasses.fields(schema)}


def config_key(f: dataclasses.Field) -> str:
    """The YAML spelling of a schema field: its ``alias``, else its name."""
    return f.metadata.get("alias", f.name)


def schema_keys(schema: type) -> list[str]:
    """The keys a schema section allows, in declaration order (a field's ``alias`` metadata
    is its spelling in the YAML)."""
    return [config_key(f) for f in dataclasses.fields(schema)]


def did_you_mean(name: str, known: Iterable[str], quote: str = "`") -> str:
    """``; did you mean `close`?`` for the known name closest to a misspelt `name`, or ""."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {quote}{close[0]}{quote}?" if close else ""


def unknown_key_error(key: str, known: Iterable[str], where: str = "") -> InputError:
    """``unknown config key `a.b`; did you mean `a.c`?`` (`key` and `known` fully dotted)."""
    prefix = f"{where}: " if where else ""
    return InputError(f"{prefix}unknown config key `{key}`{did_you_mean(key, known)}")


def plain_value(value: Any) -> Any:
    """A loaded config node (OmegaConf) as plain Python; anything else as it is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _describe(annotation: Any) -> str:
    """What a value of `annotation` looks like, for messages ("an integer", "one of a, b")."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if annotation is type(None):
        return "null"
    if origin is Literal:
        choices = typing.get_args(annotation)
        return str(choices[0]) if len(choices) == 1 else "one of " + ", ".join(map(str, choices))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(annotation)[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a mapping of names to values"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return str(annotation)


def _matches(value: Any, annotation: Any) -> bool:
    """Whether `value` (plain Python, as YAML parsed it) is of type `annotation`."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:  # YAML `3.0` is a whole number too; `3.7` and `true` are not
        return not isinstance(value, bool) and (
            isinstance(value, int) or isinstance(value, float) and value.is_integer())
    if annotation is float:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        item = typing.get_args(annotation)[0]
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items())
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, dict)
    raise TypeError(f"config.checker: unsupported annotation {annotation!r}")


def section_of(annotation: Any) -> type | None:
    """The dataclass of a section annotation (``Section`` or ``Section | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _check_bounds(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    if "choices" in meta and value not in (allowed := tuple(meta["choices"]())):
        raise InputError(f"config key `{key}` must be one of {', '.join(map(str, allowed))}; "
                         f"got {_show(value)}")
    if meta.get("nonempty") and isinstance(value, str) and not value.strip():
        raise InputError(f"config key `{key}` must not be empty")
    if meta.get("positive") and isinstance(value, (int, float)) and value <= 0:
        raise InputError(f"config key `{key}` must be > 0, got {value}")
    if not isinstance(value, (int, float)):
        return
    minimum, maximum, below = meta.get("minimum"), meta.get("maximum"), meta.get("below")
    if below is not None and (value >= below or minimum is not None and value < minimum):
        raise InputError(f"config key `{key}` must be in [{minimum}, {below}), got {value}")
    if maximum is not None and (value > maximum or minimum is not None and value < minimum):
        low = f"between {minimum} and" if minimum is not None else "at most"
        raise InputError(f"config key `{key}` must be {low} {maximum}, got {value}")
    if minimum is not None and value < minimum:
        raise InputError(f"config key `{key}` must be >= {minimum}, got {value}")


def check_section(values: Mapping[str, Any], schema: type, prefix: str = "", where: str = "") -> None:
    """Check every key of `values` against the dataclass `schema` (keys under `prefix`).

    `where` (a file name) prefixes the message of an unknown key, which is what a user looks
    for in the file; type errors name the dotted key, which is unique.
    """
    fields = _fields(schema)
    for key, raw in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise unknown_key_error(full, [f"{prefix}{k}" for k in fields], where)
        annotation, meta = fields[key]
        _check_value(full, raw, annotation, meta, where)


def check_known_keys(values: Mapping[str, Any], schema: type, prefix: str = "", where: str = "") -> None:
    """Check only that every key of `values` (and of its sections) is one of `schema`'s; the
    values are checked later, on the merged config."""
    fields = _fields(schema)
    for key, raw in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise unknown_key_error(full, [f"{prefix}{k}" for k in fields], where)
        section, value = section_of(fields[key][0]), plain_value(raw)
        if section is not None and isinstance(value, dict):
            check_known_keys(value, section, f"{full}.", where)


def _check_value(key: str, raw: Any, annotation: Any, meta: Mapping[str, Any], where: str) -> None:
    value = plain_value(raw)
    if not _matches(value, annotation):
        raise InputError(f"config key `{key}` must be {_describe(annotation)}; got {_show(value)}")
    section = section_of(annotation)
    if section is not None and isinstance(value, dict):
        check_section(value, section, f"{key}.", where)
    _check_bounds(key, value, meta)


def check_override(key: str, value: Any, schema: type) -> None:
    """Check a ``key=value`` override (dotted `key`, YAML-parsed `value`) against `schema`
    before it is merged, so that ``model_kwargs=5`` is a clear error, not a merge failure."""
    parts = key.split(".")
    section, prefix = schema, ""
    for depth, part in enumerate(parts):
        fields = _fields(section)
        if part not in fields:
            raise unknown_key_error(key, [f"{prefix}{k}" for k in fields])
        annotation, meta = fields[part]
        if depth == len(parts) - 1:
            _check_value(key, value, annotation, meta, "")
            return
        inner = section_of(annotation)
        if inner is None:
            if annotation is Any:
                return  # an open value: its reader checks it
            raise InputError(f"config key `{'.'.join(parts[:depth + 1])}` has no sub-keys "
                             f"(override {key}=...)")
        section, prefix = inner, f"{prefix}{part}."
