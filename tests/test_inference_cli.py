"""End to end: `inference.py` with the tiny preset writes real MP4s; bad input fails early."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import inference
from conftest import (TINY_INTERACTIVE_YAML as TINY_INTERACTIVE, TINY_YAML as TINY,
                      one_error_line as _error, run_inference as _run, run_launcher,
                      subprocess_env, write_prompts as _prompts)
from utils.video_writer import read_video_info

ROOT = Path(__file__).resolve().parents[1]


def test_single_prompt_tiny_writes_mp4s(tmp_path, capsys):
    data = _prompts(tmp_path, ["a cat on a chair", "a fox in the snow"])
    assert _run(TINY, tmp_path, f"data_path={data}", "num_output_frames=6") == 0
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["0-0_regular.mp4", "1-0_regular.mp4"]
    for f in files:
        assert read_video_info(f) == (1 + 4 * 5, 128, 96, 16.0)
    assert str(files[0]) in capsys.readouterr().out


def test_interactive_tiny_writes_mp4(tmp_path):
    assert _run(TINY_INTERACTIVE, tmp_path, "num_output_frames=9", "switch_frame_indices=3,6") == 0
    (video,) = (tmp_path / "out").iterdir()
    assert video.name == "0-0_regular.mp4"
    assert read_video_info(video) == (1 + 4 * 8, 128, 96, 16.0)


def test_same_config_same_video_and_compat_differs(tmp_path):
    data = _prompts(tmp_path, ["a cat on a chair"])
    common = [f"data_path={data}", "num_output_frames=9", "model_kwargs.record_interval=2"]
    runs = {}
    for name, extra in (("a", []), ("b", []), ("compat", ["behaviour=compat"])):
        out = tmp_path / name
        assert inference.main(["--config_path", TINY, f"output_folder={out}", *common, *extra]) == 0
        (video,) = out.iterdir()  # compat keeps the reference's name: rank0-0-0_regular.mp4
        assert video.name == ("rank0-0-0_regular.mp4" if extra else "0-0_regular.mp4")
        runs[name] = video.read_bytes()
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["compat"]  # every-chunk recording differs from every-interval


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["height=100"], "multiples of 16"),
        (["num_output_frames=10"], "whole number of chunks"),
        (["data_path=/nonexistent/prompts.txt"], "/nonexistent/prompts.txt"),
        (["behaviour=fast"], "behaviour"),
        (["model_kwargs.sink_size=9"], "sink_size"),
        (["dtype=float64"], "dtype"),
        (["output_folder=/proc/memflow_out"], "/proc/memflow_out"),
    ],
)
def test_bad_single_prompt_input(tmp_path, capsys, overrides, needle):
    code = inference.main(["--config_path", TINY, *overrides] if any(o.startswith("output_folder") for o in overrides)
                          else ["--config_path", TINY, f"output_folder={tmp_path / 'out'}", *overrides])
    assert needle in _error(capsys, code)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_empty_prompt_and_malformed_jsonl(tmp_path, capsys):
    empty = _prompts(tmp_path, ["   "])
    assert "empty" in _error(capsys, _run(TINY, tmp_path, f"data_path={empty}")).lower()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompts": ["a", "b", "c"]}) + "\n{not json\n")
    msg = _error(capsys, _run(TINY_INTERACTIVE, tmp_path, f"data_path={bad}"))
    assert "bad.jsonl:2" in msg


@pytest.mark.parametrize(
    "indices,needle",
    [("12, 6", "increasing"), ("6, 99", "range"), ("6", "need 2 switch indices"), ("3, 6, 9", "need 2 switch indices")],
)
def test_bad_switch_indices(tmp_path, capsys, indices, needle):
    msg = _error(capsys, _run(TINY_INTERACTIVE, tmp_path, f"switch_frame_indices={indices}"))
    assert needle in msg


def test_missing_checkpoints_name_the_config_key(tmp_path, capsys):
    config = str(ROOT / "configs" / "inference.yaml")
    data = _prompts(tmp_path, ["a cat"])
    msg = _error(capsys, _run(config, tmp_path, f"data_path={data}", f"wan_models_root={tmp_path}"))
    assert "wan_models_root" in msg and str(tmp_path) in msg
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    (folder / "google" / "umt5-xxl").mkdir(parents=True)
    for name in ("config.json", "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        (folder / name).write_text("{}")
    msg = _error(capsys, _run(config, tmp_path, f"data_path={data}", f"wan_models_root={tmp_path}",
                              f"generator_ckpt={tmp_path / 'missing.pt'}"))
    assert "generator_ckpt" in msg and "missing.pt" in msg


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on linux only")
def test_two_ranks_cover_every_prompt_with_the_videos_of_one_process(tmp_path):
    """Two prompts on two ranks, one each; then one process resumes that folder with
    skip_existing after line 1's video is lost. Names do not depend on the process count
    (behaviour: clean), so it keeps line 0's video and remakes only line 1's; with seed_mode
    per_prompt that video is byte for byte rank 1's, also on the CPU, where torchrun would give
    each process one thread (at 256x256 the thread count changes the sums)."""
    import shutil

    data = _prompts(tmp_path, ["a cat", "a fox"])
    common = [f"data_path={data}", "num_output_frames=3", "height=256", "width=256"]
    two, one = tmp_path / "two", tmp_path / "one"
    for num_gpus, out, extra in ((2, two, []), (1, one, ["skip_existing=true"])):
        if num_gpus == 1:
            shutil.copytree(two, one)
            (one / "1-0_regular.mp4").unlink()
            (one / "0-0_regular.mp4").write_bytes(b"kept")
        result = run_launcher("inference.sh", "--config_path", TINY, f"output_folder={out}",
                              *common, *extra, env=subprocess_env(NUM_GPUS=str(num_gpus)))
        assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(f.name for f in two.iterdir()) == ["0-0_regular.mp4", "1-0_regular.mp4"]
    assert (one / "0-0_regular.mp4").read_bytes() == b"kept"
    assert (one / "1-0_regular.mp4").read_bytes() == (two / "1-0_regular.mp4").read_bytes()


def test_checkpoint_with_pickled_objects_needs_trust_checkpoints(tmp_path, capsys):
    """A generator_ckpt holding pickled objects stops the run with one line naming the file and
    the opt-in; `trust_checkpoints=true` loads it."""
    import argparse

    from reference_files import save_generator_checkpoint
    from memflow.tiny import build_tiny_generator

    ckpt = tmp_path / "base.pt"
    generator = build_tiny_generator({"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2,
                                      "text_len": 64, "seed": 0})
    save_generator_checkpoint(generator, ckpt, extra={"args": argparse.Namespace(lr=1)})
    data = _prompts(tmp_path, ["a cat on a chair"])
    common = (f"data_path={data}", "num_output_frames=3", f"generator_ckpt={ckpt}")
    assert _run(TINY, tmp_path, *common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base.pt holds pickled objects (argparse.Namespace)" in err[0]
    assert "trust_checkpoints" in err[0]
    assert _run(TINY, tmp_path, *common, "trust_checkpoints=true") == 0


def _decoded(path: Path):
    """Every frame of an MP4, [frames, h*w*3] uint8."""
    import imageio_ffmpeg
    import numpy as np

    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)  # the metadata
    return np.stack([np.frombuffer(frame, dtype=np.uint8) for frame in reader])


def test_compile_true_runs_the_fixed_shape_stream_and_makes_the_same_video(tmp_path):
    """`compile: true` end to end (interactive, with a switch's recache): the compiled DiT on
    the fixed-shape stream decodes to the eager video within H.264's rounding."""
    common = ["num_output_frames=12", "switch_frame_indices=3,9"]
    videos = {}
    for name in ("eager", "compiled"):
        out = tmp_path / name
        extra = ["compile=true"] if name == "compiled" else []
        assert inference.main(["--config_path", TINY_INTERACTIVE, f"output_folder={out}",
                               *common, *extra]) == 0
        (video,) = out.iterdir()
        videos[name] = _decoded(video).astype(int)
    assert videos["eager"].shape == videos["compiled"].shape
    assert abs(videos["eager"] - videos["compiled"]).mean() < 1.0


def test_cuda_graphs_off_cuda_is_one_line(tmp_path, capsys):
    code = _run(TINY, tmp_path, "cuda_graphs=true", "device=cpu")
    assert "cuda_graphs: true needs a CUDA device" in _error(capsys, code)
    assert not (tmp_path / "out").exists()
