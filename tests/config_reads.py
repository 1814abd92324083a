"""Which config keys a run really reads: the typed config that `settings_from_config` builds is
swapped for a copy that records every field read by project code (a read by `dataclasses`
itself, such as `==` or `asdict`, is no reading of a key)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import config.inference
import config.schema
import trainer.config

_MACHINERY = {Path(dataclasses.__file__).resolve(), Path(__file__).resolve()}


def _by_project_code() -> bool:
    """Whether the read two frames up (past `__getattribute__`) comes from a real source file
    other than the dataclass machinery (a generated `__eq__` has no file)."""
    filename = sys._getframe(2).f_code.co_filename
    return not filename.startswith("<") and Path(filename).resolve() not in _MACHINERY


def recording(typed: object, reads: set[str], prefix: str = "") -> object:
    """`typed` (a schema dataclass) as an instance of a subclass that adds to `reads` the dotted
    key of every field project code reads; sections are recorded the same way."""
    names = {f.name: config.checker.config_key(f) for f in dataclasses.fields(typed)}
    values = {}
    for f in dataclasses.fields(typed):
        value = getattr(typed, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = recording(value, reads, f"{prefix}{names[f.name]}.")
        values[f.name] = value

    def __getattribute__(self, name):  # noqa: N807
        if name in names and _by_project_code():
            reads.add(prefix + names[name])
        return object.__getattribute__(self, name)

    cls = type(typed)
    recorder = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})
    copy = object.__new__(recorder)
    for name, value in values.items():
        object.__setattr__(copy, name, value)
    return copy


def record_reads(monkeypatch) -> set[str]:
    """Record the keys read from every typed config built from now on (inference and training)."""
    reads: set[str] = set()
    build = config.schema.settings_from_config

    def recorded(values, schema):
        return recording(build(values, schema), reads)

    for module in (config.inference, trainer.config):
        monkeypatch.setattr(module, "settings_from_config", recorded)
    return reads
