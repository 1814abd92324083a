"""YAML configs with command-line overrides, and the up-front checks for the paths they name."""
from __future__ import annotations

from pathlib import Path

import pytest

from config.loader import load_config, require_path
from memflow.errors import InputError
from utils.prompts import parse_switch_frame_indices

REPO = Path(__file__).resolve().parents[1]

BASE = """\
num_output_frames: 120
seed: 0
switch_frame_indices: 40, 80
model_kwargs:
  sink_size: 3
  local_attn_size: 12
memory: {}
generator_ckpt: null
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "inference.yaml"
    path.write_text(BASE)
    return path


def test_overrides_are_parsed_as_yaml(config_file: Path) -> None:
    cfg = load_config(
        config_file,
        ["num_output_frames=24", "model_kwargs.sink_size=0", "memory.score_in_fp32=true",
         "switch_frame_indices=40,80,100", "seed=[1, 2]", "generator_ckpt=/x/y.pt"],
    )
    assert cfg.num_output_frames == 24 and cfg.model_kwargs.sink_size == 0
    assert cfg.model_kwargs.local_attn_size == 12  # siblings survive the merge
    assert cfg.memory.score_in_fp32 is True
    assert cfg.switch_frame_indices == "40,80,100"
    assert list(cfg.seed) == [1, 2] and cfg.generator_ckpt == "/x/y.pt"


def test_no_overrides(config_file: Path) -> None:
    cfg = load_config(config_file, [])
    indices = parse_switch_frame_indices(cfg.switch_frame_indices, 3, cfg.num_output_frames, 3)
    assert indices == [40, 80]


def shipped_config(name: str) -> Path:
    path = REPO / "configs" / name
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    return path


@pytest.mark.parametrize("name", ["inference.yaml", "interactive_inference.yaml"])
def test_shipped_configs_take_overrides(name: str) -> None:
    cfg = load_config(shipped_config(name), ["num_output_frames=24", "model_kwargs.sink_size=0"])
    assert cfg.num_output_frames == 24 and cfg.model_kwargs.sink_size == 0


def test_shipped_interactive_switch_points() -> None:
    cfg = load_config(shipped_config("interactive_inference.yaml"), [])
    indices = parse_switch_frame_indices(
        cfg.switch_frame_indices, 6, cfg.num_output_frames, cfg.num_frame_per_block
    )
    assert indices == [40, 80, 120, 160, 200]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"config file not found: {tmp_path / 'nope.yaml'}"):
        load_config(tmp_path / "nope.yaml", [])


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 0\nlist: [1, 2\n")
    with pytest.raises(InputError, match=f"{path}:3: invalid YAML"):
        load_config(path, [])


def test_config_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="a config file must be a mapping"):
        load_config(path, [])


@pytest.mark.parametrize("item", ["num_output_frames", "=3", "a..b=1", "a b=1", "-x=1"])
def test_malformed_override(config_file: Path, item: str) -> None:
    with pytest.raises(InputError) as info:
        load_config(config_file, [item])
    expected = f"malformed override {item!r}; expected key=value, e.g. num_output_frames=24"
    assert str(info.value) == expected


def test_override_with_invalid_yaml_value(config_file: Path) -> None:
    with pytest.raises(InputError, match=r"override 'seed=\[1, 2': the value is not valid YAML"):
        load_config(config_file, ["seed=[1, 2"])


@pytest.mark.parametrize(
    "item,message",
    [
        (
            "num_output_frame=24",
            "unknown config key `num_output_frame` (not in {path}); "
            "did you mean `num_output_frames`?",
        ),
        (
            "model_kwargs.sinksize=1",
            "unknown config key `model_kwargs.sinksize` (not in {path}); "
            "did you mean `model_kwargs.sink_size`?",
        ),
        ("seed.value=1", "unknown config key `seed.value` (not in {path})"),
    ],
)
def test_unknown_override_key(config_file: Path, item: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        load_config(config_file, [item])
    assert str(info.value) == message.format(path=config_file)


def test_require_path(tmp_path: Path) -> None:
    ckpt = tmp_path / "base.pt"
    ckpt.write_bytes(b"")
    text = f"generator_ckpt: {ckpt}\ntok: {tmp_path}\nadapter:\n  path: {ckpt}\n"
    cfg = load_config(_write(tmp_path, text), [])
    assert require_path(cfg, "generator_ckpt") == ckpt
    assert require_path(cfg, "tok", kind="dir") == tmp_path
    assert require_path(cfg, "adapter.path") == ckpt


# (config text, key, kind, message); "{tmp}" is the test's temporary folder.
REQUIRE_PATH_ERRORS = [
    ("ckpt: {tmp}/missing.pt", "ckpt", "file", "`ckpt`: file not found: {tmp}/missing.pt"),
    ("tok: {tmp}/umt5", "tok", "dir", "`tok`: directory not found: {tmp}/umt5"),
    ("ckpt: {tmp}", "ckpt", "file", "`ckpt`: expected a file: {tmp}"),
    ("tok: {tmp}/c.yaml", "tok", "dir", "`tok`: expected a directory: {tmp}/c.yaml"),
    ("ckpt: null", "ckpt", "file", "`ckpt` is not set"),
    ("seed: 0", "ckpt", "file", "`ckpt` is not set"),
    ("ckpt: 3", "ckpt", "file", "`ckpt`: expected a path, got 3"),
]


@pytest.mark.parametrize("yaml_text,key,kind,message", REQUIRE_PATH_ERRORS)
def test_require_path_errors(
    tmp_path: Path, yaml_text: str, key: str, kind: str, message: str
) -> None:
    cfg = load_config(_write(tmp_path, yaml_text.format(tmp=tmp_path)), [])
    with pytest.raises(InputError) as info:
        require_path(cfg, key, kind=kind)
    assert str(info.value) == "config key " + message.format(tmp=tmp_path)


def test_require_path_message_for_a_missing_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "generator_ckpt: checkpoints/base.pt"), [])
    with pytest.raises(InputError) as info:
        require_path(cfg, "generator_ckpt")
    assert str(info.value) == "config key `generator_ckpt`: file not found: checkpoints/base.pt"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path
