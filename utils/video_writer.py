"""Streaming H.264 MP4 writing with the reference's pixel conversion (spec §7.4).

Frames are piped to the ffmpeg binary that imageio-ffmpeg ships, so a video can be written
chunk by chunk as it is decoded instead of holding all 957 frames in memory. We run ffmpeg
ourselves rather than through `imageio_ffmpeg.write_frames`, because that generator discards
ffmpeg's exit status: a failed encode (disk full, bad size) would look like success.

The encoder settings match the reference's torchvision/PyAV path: libx264 with its default
options (CRF 23, preset medium), yuv420p, constant frame rate.

When the disk refuses the video (full, quota, read-only, ...) the writer raises one
`VideoWriteError` line, ``cannot write video <path>: No space left on device``, taken from
ffmpeg's log, and leaves no partial file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Iterator

import imageio_ffmpeg
import numpy as np
import torch

from memflow.errors import InputError

_CONVERT_FRAMES = 16  # frames converted to uint8 per pipe write


class VideoWriteError(RuntimeError):
    """A video could not be written (the disk or ffmpeg refused it). The message is one line
    naming the final path and the reason; nothing of the video is left on disk."""


def _os_reason(log: str) -> str | None:
    """The first operating-system error message in an ffmpeg log (ffmpeg prints strerror)."""
    found = [(log.find(text), text) for text in {os.strerror(code) for code in errno.errorcode}
             if text in log]
    return min(found)[1] if found else None


@contextlib.contextmanager
def removed_if_left_empty(folder: str | os.PathLike[str] | None) -> Iterator[None]:
    """On an exception inside, remove `folder` and the parents that did not exist on entry, if
    they are still empty: a run refused after making its output folder (a checkpoint that does
    not fit is found only when loaded) leaves nothing behind."""
    if folder is None:
        yield
        return
    folder = Path(folder).absolute()
    new = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for path in new:  # deepest first
            try:
                path.rmdir()
            except OSError:  # not empty (or gone): keep what is there
                break
        raise


def check_folder_path(folder: str | os.PathLike[str]) -> Path:
    """Refuse (InputError) a folder path of which some part is an existing file; creates nothing,
    so a run that fails later leaves no empty folder behind."""
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"output folder {folder}: {blocking} is a file, not a folder")
    return folder


def prepare_output_folder(folder: str | os.PathLike[str]) -> Path:
    """Create `folder` if needed and prove that files can be created in it.

    The probe creates and removes a real file, because permission bits say nothing for root
    or for read-only mounts.
    """
    folder = check_folder_path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"output folder {folder} is not writable: {e.strerror or e}") from None
    return folder


def _channels_last(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A [T, H, W, 3] view of [T, 3, H, W] or [T, H, W, 3] frames."""
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or 3 not in (frames.shape[1], frames.shape[3]):
        raise ValueError(
            f"frames must be [T, 3, H, W] or [T, H, W, 3], got shape {tuple(frames.shape)}"
        )
    return frames if frames.shape[3] == 3 else frames.permute(0, 2, 3, 1)


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 from float [T, 3, H, W] / [T, H, W, 3] in [0, 1], or uint8 frames.

    Floats become floor(255·x) computed in float32 and clamped to [0, 255]: the reference
    multiplies by 255 and casts to uint8, which truncates (0.999 → 254, not 255).
    """
    frames = _channels_last(frames)
    if frames.dtype == torch.uint8:
        return frames
    if not frames.is_floating_point():
        raise ValueError(f"frames must be floating point in [0, 1] or uint8, got {frames.dtype}")
    return (frames.to(torch.float32) * 255).clamp_(0, 255).to(torch.uint8)


class Mp4Writer:
    """Write frames to `path` as they arrive; the file appears only when complete.

    Use it as a context manager. Frames go to ``.<stem>.partial.mp4`` in the same folder, which
    is renamed to `path` after ffmpeg finishes successfully. If the block raises (including
    Ctrl-C), ffmpeg is killed and the partial file removed, so a crashed run never leaves a
    truncated video that looks finished.

    Width and height must be even (yuv420p halves the chroma planes). Odd sizes are rejected
    rather than padded or scaled, because a silently different frame size would break anything
    that compares videos; the model's 16-pixel granularity never produces them.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 16) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.fps = fps
        self._partial = prepare_output_folder(self.path.parent) / f".{self.path.stem}.partial.mp4"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()
        self._size: tuple[int, int] | None = None  # (width, height)
        self.num_frames = 0

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(
                f"H.264 (yuv420p) needs an even frame width and height, got {width}x{height}"
            )
        fps = Fraction(self.fps).limit_denominator(1001)
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps),
            "-i", "-", "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(self._partial.absolute()),  # absolute: a relative "-out/…" would be an option
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
        )
        self._size = (width, height)

    def _ffmpeg_error(self) -> VideoWriteError:
        """Why ffmpeg failed, in one line: the OS error it met (disk full, ...), else the first
        line of its log."""
        self._log.seek(0)
        log = self._log.read().decode("utf-8", "replace").strip()
        lines = log.splitlines()
        reason = _os_reason(log) or (lines[0] if lines else None)
        status = f"ffmpeg exited with status {self._proc.returncode}"
        return VideoWriteError(f"cannot write video {self.path}: {reason or status}")

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append frames: float [T, 3, H, W] or [T, H, W, 3] in [0, 1], or uint8 [T, H, W, 3].

        Floats are converted a few frames at a time, so passing a whole decoded video does not
        need a second full-size float copy.
        """
        frames = _channels_last(frames)
        for start in range(0, frames.shape[0], _CONVERT_FRAMES):
            block = to_uint8_frames(frames[start : start + _CONVERT_FRAMES]).cpu()
            height, width = block.shape[1:3]
            if self._proc is None:
                self._start(width, height)
            elif (width, height) != self._size:
                raise ValueError(
                    f"frame size changed from {self._size[0]}x{self._size[1]} to {width}x{height}"
                )
            try:
                self._proc.stdin.write(memoryview(block.contiguous().numpy()))
            except BrokenPipeError:
                self._proc.wait()
                raise self._ffmpeg_error() from None
            self.num_frames += block.shape[0]

    def close(self) -> None:
        """Finish the encode and move the file into place; nothing is written for 0 frames."""
        if self._proc is None:
            self.abort()
            raise ValueError(f"no frames were written; {self.path} was not created")
        try:
            self._proc.stdin.close()
        except BrokenPipeError:  # ffmpeg already exited; its status and log say why
            pass
        if self._proc.wait() != 0:
            error = self._ffmpeg_error()
            self.abort()
            raise error
        try:
            os.replace(self._partial, self.path)
        except OSError as err:
            self.abort()
            raise VideoWriteError(f"cannot write video {self.path}: {err.strerror or err}") from None
        self._log.close()

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._partial.unlink(missing_ok=True)
        self._log.close()


def read_video_info(path: str | os.PathLike[str]) -> tuple[int, int, int, float]:
    """(num_frames, width, height, fps) of a video file, counting the frames by decoding."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}")
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    num_frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    return num_frames, width, height, float(meta["fps"])
