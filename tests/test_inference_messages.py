"""One clear line and a documented exit status, also through the launchers; messages that name
the file and say what is wrong; warnings that say which prompt (issue 10, item 4)."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import TINY_YAML as TINY
from conftest import one_error_line, run_launcher, subprocess_env
from test_real_format_loading import _overrides, wan_files  # noqa: F401 (a fixture)

import inference
from config.schema import Adapter, InferenceConfig
from pipeline.build import CheckpointPaths, warn_ignored_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("num_gpus", ["0", "abc", "-1", "1.5"])
def test_bad_num_gpus_is_one_line(num_gpus):
    result = run_launcher("inference.sh", "--config_path", TINY,
                          env=subprocess_env(NUM_GPUS=num_gpus))
    assert result.returncode == 2
    assert result.stderr == f"error: NUM_GPUS must be a whole number of processes >= 1, got '{num_gpus}'\n"


@pytest.mark.skipif(sys.platform != "linux", reason="launcher test on linux only")
def test_launcher_without_torchrun_on_path_gives_the_line_and_status_2(tmp_path):
    """Only `python3` (the interpreter with the packages) is on PATH, no torchrun, no PYTHON:
    the launcher still starts, and a bad value ends with the one `error:` line and status 2, no
    traceback. `python3` is a script that execs the test's interpreter (a symlink to a venv's
    python from outside the venv would start the venv's base Python, without its packages)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env.pop("PYTHON", None)
    assert shutil.which("torchrun", path=env["PATH"]) is None
    result = run_launcher("interactive_inference.sh", "--config_path",
                          str(ROOT / "configs" / "tiny_interactive.yaml"), "seed=abc", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == ["error: config key `seed` must be an integer; got 'abc'"]


@pytest.mark.skipif(sys.platform != "linux", reason="launcher test on linux only")
def test_launcher_runs_the_tests_interpreter_not_python3_on_path(tmp_path):
    """`subprocess_env()` (every test's launcher runs) hands the launcher this interpreter, so
    a `python3` first on PATH that is another Python (a virtualenv not activated) is never run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text("#!/bin/sh\necho 'not the test interpreter' >&2\nexit 1\n")
    python3.chmod(0o755)
    env = subprocess_env(PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    result = run_launcher("inference.sh", "--config_path", TINY, "seed=abc", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == ["error: config key `seed` must be an integer; got 'abc'"]


def _copy_wan(wan_files, tmp_path: Path) -> Path:
    root, _ = wan_files
    copy = tmp_path / "models"
    shutil.copytree(root, copy)
    return copy


def _error_line(capsys, args: list[str]) -> str:
    assert inference.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate Wan2.1_VAE.pth", "cannot read VAE checkpoint {folder}/Wan2.1_VAE.pth: the file is "
                                    "truncated (an incomplete PyTorch zip archive; copy it again)"),
        ("garbage models_t5_umt5-xxl-enc-bf16.pth",
         "cannot read umT5 checkpoint {folder}/models_t5_umt5-xxl-enc-bf16.pth: not a PyTorch "
         "checkpoint (its contents are neither a zip archive nor a pickle)"),
        ("empty google/umt5-xxl", "{folder}/google/umt5-xxl: umT5 tokenizer folder has none of "
                                  "tokenizer.json, spiece.model (copy Wan's google/umt5-xxl folder)"),
        ("empty base.pt", "cannot read checkpoint {root}/checkpoints/base.pt: the file is empty (0 bytes)"),
        ("garbage lora.pt", "cannot read checkpoint {root}/checkpoints/lora.pt: not a PyTorch checkpoint "
                            "(its contents are neither a zip archive nor a pickle)"),
    ],
)
def test_unreadable_files_are_named_with_what_is_wrong(wan_files, tmp_path, capsys, damage, message):
    root = _copy_wan(wan_files, tmp_path)
    folder = root / "wan_models" / "Wan2.1-T2V-1.3B"
    how, name = damage.split(" ")
    target = (root / "checkpoints" / name) if name.endswith(".pt") else folder / name
    if how == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        target.write_bytes(b"this is not a checkpoint\n" * 50)
    elif target.is_dir():
        shutil.rmtree(target)
        target.mkdir()
    else:
        target.write_bytes(b"")
    data = tmp_path / "p.txt"
    data.write_text("a cat\n")
    args = ["--config_path", str(ROOT / "configs" / "inference.yaml"), "num_output_frames=3",
            *_overrides(root, tmp_path / "out", data, wan_files[1])]
    assert _error_line(capsys, args) == "error: " + message.format(folder=folder, root=root)


def test_over_long_prompt_warning_names_file_and_line(tmp_path, caplog, recwarn):
    data = tmp_path / "p.txt"
    data.write_text("\n\n" + "a very long prompt " * 40 + "\n")
    with caplog.at_level(logging.WARNING):
        assert inference.main(["--config_path", TINY, f"output_folder={tmp_path / 'out'}",
                               f"data_path={data}", "num_output_frames=3"]) == 0
    long = [r.getMessage() for r in caplog.records if "tokens are cut" in r.getMessage()]
    assert len(long) == 1 and long[0].startswith(f"{data}:3: the prompt has ")
    tokens = int(long[0].split(" has ")[1].split(" ")[0])
    assert long[0].endswith(f"keeps 64 (text_len), so its last {tokens - 64} tokens are cut")
    assert not [w for w in recwarn if "truncated" in str(w.message)]  # no "prompt 0" warning


TINY_PATHS = CheckpointPaths(wan_folder=None, generator_ckpt=None, lora_ckpt=None)


def test_adapter_without_lora_ckpt_warns(caplog):
    with caplog.at_level(logging.WARNING):
        warn_ignored_settings(InferenceConfig(adapter=Adapter(rank=4), lora_ckpt=None), TINY_PATHS)
    assert caplog.messages == [
        "`adapter` is set but `lora_ckpt` is null: the LoRA keeps its initial weights (no effect "
        "on the video), yet the files are named _lora"]


def test_tiny_preset_warns_about_the_paths_it_ignores(caplog):
    with caplog.at_level(logging.WARNING):
        warn_ignored_settings(InferenceConfig(adapter=Adapter(rank=4), lora_ckpt="checkpoints/lora.pt",
                                              wan_models_root="/data/wan", generator_ckpt=None),
                              TINY_PATHS)
    assert caplog.messages == [
        "preset: tiny builds random base models in memory and ignores `wan_models_root` (its "
        "generator_ckpt and lora_ckpt are loaded)"]


def test_an_unavailable_attention_backend_leaves_no_output_folder(tmp_path, capsys, monkeypatch):
    """`attn_backend: flash3` without its package is bad input like any other: one `error:`
    line, status 2, and it is found before the output folder is made (none is left behind)."""
    from memflow import attention

    monkeypatch.setattr(attention, "_importable", lambda module: False)  # no flash-attn here
    monkeypatch.setattr(attention, "_auto", None)
    out = tmp_path / "out"
    code = inference.main(["--config_path", TINY, f"output_folder={out}", "num_output_frames=3",
                           "attn_backend=flash3"])
    assert one_error_line(capsys, code).startswith(
        "error: attention backend 'flash3' needs the flash_attn_interface package")
    assert not out.exists()
