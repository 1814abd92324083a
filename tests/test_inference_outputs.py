"""No video is lost, overwritten by accident or left half-written (issue 10, item 3): unique
names, `skip_existing` / `overwrite`, SIGTERM clean-up on every rank, NaN/inf detection."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import inference
from conftest import (TINY_YAML as TINY, run_inference, start_launcher, subprocess_env,
                      write_prompts as _prompts)
from pipeline.outputs import Job, plan_videos

TINY_SHAPE = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_len": 64, "seed": 0}


def _run(tmp_path: Path, *overrides: str) -> int:
    return run_inference(TINY, tmp_path, "num_output_frames=3", *overrides)


def test_prompts_that_sanitise_alike_get_distinct_files(tmp_path, caplog):
    data = _prompts(tmp_path, [".", ".."])
    with caplog.at_level(logging.WARNING):
        assert _run(tmp_path, f"data_path={data}", "save_with_index=false") == 0
    names = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert names == ["untitled-0_regular.mp4", "untitled_line2-0_regular.mp4"]
    assert f"{data}:1 and {data}:2 give the same file name untitled-0_regular.mp4; line 2 " \
           "is written as untitled_line2-0_regular.mp4" in caplog.text


def test_interactive_stories_with_the_same_first_prompt_get_distinct_files(tmp_path):
    jobs = [Job(0, 1, ["a cat", "a dog"]), Job(1, 2, ["a cat", "a fox"]), Job(2, 3, ["a cat", "x"])]
    plan = plan_videos(jobs, 2, tmp_path, "regular", save_with_index=False)
    assert [(v.rank, v.path.name) for v in plan] == [
        (0, "a cat-0_regular.mp4"), (0, "a cat_line3-0_regular.mp4"),
        (1, "a cat_line2-0_regular.mp4"),
    ]
    reference = plan_videos(jobs, 2, tmp_path, "regular", save_with_index=False, rank_in_names=True)
    assert [(v.rank, v.path.name) for v in reference] == [
        (0, "rank0-a cat-0_regular.mp4"), (0, "rank0-a cat_line3-0_regular.mp4"),
        (1, "rank1-a cat-0_regular.mp4"),
    ]


def test_existing_videos_are_kept_skipped_or_overwritten_only_when_asked(tmp_path, capsys):
    data = _prompts(tmp_path, ["a cat", "a fox"])
    out = tmp_path / "out"
    out.mkdir()
    first, second = out / "0-0_regular.mp4", out / "1-0_regular.mp4"
    first.write_bytes(b"finished video")  # an earlier run crashed before the second video

    assert _run(tmp_path, f"data_path={data}") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: 1 of the 2 videos exist already (e.g. {first}); set skip_existing=true to keep "
        "them and generate the rest, or overwrite=true to replace them")
    assert first.read_bytes() == b"finished video" and not second.exists()

    assert _run(tmp_path, f"data_path={data}", "skip_existing=true") == 0
    assert capsys.readouterr().out.split() == [str(second)]  # only the missing video is made
    assert first.read_bytes() == b"finished video" and second.exists()

    assert _run(tmp_path, f"data_path={data}", "overwrite=true", "inference_iter=0") == 0
    assert first.read_bytes() != b"finished video"
    assert _run(tmp_path, f"data_path={data}", "overwrite=true", "skip_existing=true") == 2
    assert "`skip_existing` and `overwrite` are both true; choose one" in capsys.readouterr().err


def test_nonfinite_latents_stop_the_video_not_the_run(tmp_path, capsys):
    """NaN weights: every prompt fails with its line and chunk named, none is written, the
    run goes on to the next prompt and exits with status 1."""
    from reference_files import save_generator_checkpoint
    from memflow.tiny import build_tiny_generator

    generator = build_tiny_generator(TINY_SHAPE)
    with torch.no_grad():
        generator.blocks[1].ffn[2].weight.fill_(float("inf"))
    ckpt = tmp_path / "broken.pt"
    save_generator_checkpoint(generator, ckpt)
    data = _prompts(tmp_path, ["a cat", "a fox"])
    assert _run(tmp_path, f"data_path={data}", f"generator_ckpt={ckpt}") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: 2 video(s) not written: "
        f"{data}:1: chunk 1 of 1 (latent frames 0-2) came out NaN/inf; 0-0_regular.mp4 was not written; "
        f"{data}:2: chunk 1 of 1 (latent frames 0-2) came out NaN/inf; 1-0_regular.mp4 was not written")
    assert list((tmp_path / "out").iterdir()) == []


def test_sigterm_removes_the_partial_video_and_exits_143(tmp_path, capsys, monkeypatch):
    """A real SIGTERM arrives while the first chunk is being written."""
    from utils.video_writer import Mp4Writer

    write = Mp4Writer.write

    def write_then_sigterm(self, frames):
        write(self, frames)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Mp4Writer, "write", write_then_sigterm)
    data = _prompts(tmp_path, ["a cat"])
    assert _run(tmp_path, f"data_path={data}") == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: terminated by SIGTERM; unfinished videos were removed")
    assert not (tmp_path / "out").exists()  # this run made it and it holds nothing: gone too
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored after the run


def _wait_for_partials(folder: Path, proc: subprocess.Popen, count: int) -> None:
    """Until `count` partial videos exist (the run is mid-video on every rank) or the run ends."""
    while not (folder.is_dir() and len(list(folder.glob(".*.partial.mp4"))) >= count):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)


@pytest.mark.skipif(sys.platform != "linux", reason="signals and torchrun with gloo on linux only")
def test_sigterm_to_the_launcher_cleans_up_on_every_rank(tmp_path):
    out = tmp_path / "out"
    data = _prompts(tmp_path, ["a cat", "a fox"])
    proc = start_launcher("inference.sh", "--config_path", TINY, f"output_folder={out}",
                          f"data_path={data}", "num_output_frames=600",
                          env=subprocess_env(NUM_GPUS="2"))
    try:
        _wait_for_partials(out, proc, 2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert stderr.count("error: terminated by SIGTERM; unfinished videos were removed") == 2
    assert not out.exists() or list(out.iterdir()) == []  # rank 0 removes it once empty
