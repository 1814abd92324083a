"""Output videos: file names, and streaming MP4 writing (frame count, size, fps, colours,
truncation, and no half-written files)."""
from __future__ import annotations

import os
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from memflow.errors import InputError
from utils.naming import sanitize_filename, video_filename
from utils.video_writer import (
    Mp4Writer,
    VideoWriteError,
    prepare_output_folder,
    read_video_info,
    to_uint8_frames,
)

W, H = 64, 48


def first_frame(path: Path) -> np.ndarray:
    """The first decoded frame as [H, W, 3] uint8."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frame = np.frombuffer(next(reader), dtype=np.uint8).reshape(meta["size"][1], meta["size"][0], 3)
    reader.close()
    return frame


def test_frame_by_frame_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    with Mp4Writer(path) as writer:
        for i in range(9):
            writer.write(torch.full((1, 3, H, W), i / 10))
        assert not path.exists()  # only the partial file exists while writing
    assert writer.num_frames == 9
    assert read_video_info(path) == (9, W, H, 16.0)
    assert os.listdir(tmp_path) == ["video.mp4"]


def test_layouts_and_fps(tmp_path: Path) -> None:
    red = torch.zeros(4, H, W, 3)
    red[..., 0] = 1.0
    path = tmp_path / "red.mp4"
    with Mp4Writer(path, fps=8) as writer:
        writer.write(red)  # float, channels last
        writer.write(red.permute(0, 3, 1, 2))  # float, channels first
        writer.write(to_uint8_frames(red).numpy())  # uint8 numpy, channels last
    assert read_video_info(path) == (12, W, H, 8.0)
    r, g, b = first_frame(path).reshape(-1, 3).mean(0)
    assert r > 230 and g < 25 and b < 25  # channels not swapped or transposed


def test_float_to_uint8_truncates_like_the_reference() -> None:
    x = torch.tensor([0.999, 1.0, 0.0, 0.5, 0.00392, -0.2, 1.5, 254.9 / 255])
    frames = x.view(1, 1, -1, 1).expand(1, 1, 8, 3)
    out = to_uint8_frames(frames)[0, 0, :, 0].tolist()
    assert out == [254, 255, 0, 127, 0, 0, 255, 254]
    assert to_uint8_frames(frames.to(torch.bfloat16)).dtype == torch.uint8


def test_exception_inside_the_block_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="decode failed"):
        with Mp4Writer(tmp_path / "video.mp4") as writer:
            writer.write(torch.rand(3, 3, H, W))
            raise RuntimeError("decode failed")
    assert os.listdir(tmp_path) == []


def test_exception_before_any_frame_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with Mp4Writer(tmp_path / "video.mp4"):
            raise KeyError("x")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "frames,message",
    [
        (torch.rand(2, 3, H, W + 1), "needs an even frame width and height, got 65x48"),
        (torch.rand(2, 4, H, W), r"frames must be \[T, 3, H, W\] or \[T, H, W, 3\]"),
        (torch.zeros(2, H, W, 3, dtype=torch.int64), "floating point in \\[0, 1\\] or uint8"),
    ],
)
def test_bad_frames_raise_and_leave_no_file(
    tmp_path: Path, frames: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        with Mp4Writer(tmp_path / "video.mp4") as writer:
            writer.write(frames)
    assert os.listdir(tmp_path) == []


def test_size_change_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frame size changed from 64x48 to 32x48"):
        with Mp4Writer(tmp_path / "video.mp4") as writer:
            writer.write(torch.rand(1, 3, H, W))
            writer.write(torch.rand(1, 3, H, 32))
    assert os.listdir(tmp_path) == []


def test_no_frames_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames were written"):
        with Mp4Writer(tmp_path / "video.mp4"):
            pass
    assert os.listdir(tmp_path) == []


def test_missing_folder_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "video.mp4"
    with Mp4Writer(path) as writer:
        writer.write(torch.rand(2, 3, H, W))
    assert read_video_info(path)[0] == 2


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in, also when it runs as root."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permission bits
        folder = Path("/sys")  # sysfs refuses new files even for root
        if not folder.is_dir():
            pytest.skip("running as root without /sys: no folder is unwritable")
    return folder


def test_unwritable_folder_is_an_input_error(tmp_path: Path) -> None:
    folder = unwritable_folder(tmp_path)
    before = os.listdir(folder)
    with pytest.raises(InputError, match=f"output folder {folder} is not writable"):
        Mp4Writer(folder / "video.mp4")
    assert os.listdir(folder) == before


def test_folder_below_a_file_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "file" / "out"
    with pytest.raises(InputError, match=f"output folder {folder}: {tmp_path / 'file'} is a file"):
        prepare_output_folder(folder)


def full_disk_partial(path: Path) -> Path:
    """Make the writer's temporary file for `path` a link to /dev/full, which accepts opening
    and refuses every write with ENOSPC, as a full disk does. Returns the link."""
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is needed to simulate a full disk")
    link = path.parent / f".{path.stem}.partial.mp4"
    link.symlink_to("/dev/full")
    return link


@pytest.mark.parametrize("frames", [2, 40], ids=["refused-at-close", "refused-while-writing"])
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, frames: int) -> None:
    path = tmp_path / "video.mp4"
    link = full_disk_partial(path)
    with pytest.raises(VideoWriteError) as caught:
        with Mp4Writer(path) as writer:
            for _ in range(0, frames, 2):
                writer.write(torch.rand(2, 3, H, W))
    assert str(caught.value) == f"cannot write video {path}: No space left on device"
    assert not path.exists() and not link.is_symlink()
    assert os.listdir(tmp_path) == []
    assert Path("/dev/full").exists()


def test_relative_folder_starting_with_a_dash_is_not_an_ffmpeg_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with Mp4Writer(Path("-out") / "video.mp4") as writer:
        writer.write(torch.zeros(2, 3, H, W))
    assert read_video_info(tmp_path / "-out" / "video.mp4")[0] == 2


def test_read_video_info_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"video not found: {tmp_path / 'x.mp4'}"):
        read_video_info(tmp_path / "x.mp4")


# ---------------------------------------------------------------- file names


def test_indexed_video_names() -> None:
    assert video_filename(0, 12, 0, "lora") == "rank0-12-0_lora.mp4"
    assert video_filename(1, 3, 2, "ema", prompt="ignored") == "rank1-3-2_ema.mp4"
    assert video_filename(None, 12, 0, "lora") == "12-0_lora.mp4"  # clean: no rank


def test_prompt_video_names_are_sanitised() -> None:
    prompt = "A cat / a dog: 50% <fun>?"
    name = video_filename(0, 5, 1, "lora", prompt=prompt, save_with_index=False)
    assert name == "rank0-A cat _ a dog_ 50% _fun__-1_lora.mp4"
    with pytest.raises(ValueError, match="a prompt is required"):
        video_filename(0, 5, 1, "lora", save_with_index=False)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A  red\tfox\n jumps", "A red fox jumps"),
        ("..hidden. ", "hidden"),
        ("a\x00b\x07c\u202ed", "a_b_c_d"),
        ('<>:"/\\|?*', "_________"),
        ("", "untitled"),
        (" ... ", "untitled"),
        ("x" * 150, "x" * 100),
    ],
)
def test_sanitize_filename(text: str, expected: str) -> None:
    assert sanitize_filename(text) == expected


def test_sanitize_filename_limits_bytes_and_can_be_created(tmp_path: Path) -> None:
    name = sanitize_filename("猫" * 100)  # 300 UTF-8 bytes: over most filesystems' 255-byte limit
    assert len(name.encode()) <= 200 and set(name) == {"猫"}
    assert sanitize_filename("abcdef", max_len=3) == "abc"
    weird = "Tom's \"day\"/night:\t..a\\b\r\n" * 8
    name = video_filename(0, 0, 0, "lora", prompt=weird, save_with_index=False)
    (tmp_path / name).write_bytes(b"")
    assert len(os.listdir(tmp_path)) == 1


def test_an_output_folder_that_is_a_file_is_named_as_such(tmp_path):
    from utils.video_writer import prepare_output_folder

    blocker = tmp_path / "taken"
    blocker.write_text("")
    for folder in (blocker, blocker / "below"):
        with pytest.raises(InputError, match=f"{blocker} is a file, not a folder"):
            prepare_output_folder(folder)


def test_eval_clis_name_an_output_path_that_is_a_file(tmp_path, capsys):
    from eval import compare, tiny

    blocker = tmp_path / "taken"
    blocker.write_text("")
    assert tiny.main([str(blocker)]) == 2
    assert compare.main(["--config_path", "configs/tiny_interactive.yaml", "--out",
                         str(blocker / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{blocker} is a file, not a folder") == 2 and "Traceback" not in err
