"""Start images and videos: read, fit to the video size, checked, as [1, T, 3, H, W] in [0, 1].

A stream may start from an image (its first latent frame is the image's) or continue a video (its
first latent frames are the video's last ones); memflow.chunk_loop.ChunkStepper.commit_prefix
commits them. Here only the pixels: a file path or the file's bytes (what the live server
receives; it never takes a server path), decoded with Pillow (images) or ffmpeg (videos), scaled
to cover the configured size and center-cropped, so any aspect ratio works. Anything unreadable
is an `InputError` of one line naming the source.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from memflow.errors import InputError
from memflow.files import reading

Source = str | os.PathLike[str] | bytes


def _name(source: Source) -> str:
    return "the uploaded file" if isinstance(source, bytes) else str(source)


def fit(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale `image` to cover height x width (aspect kept), then crop the center."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _to_frames(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] frames -> [1, T, 3, H, W] float32 in [0, 1]."""
    array = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).unsqueeze(0)


def image_frames(image: Image.Image | np.ndarray, height: int, width: int) -> torch.Tensor:
    """An image (Pillow, or a uint8 array [H, W], [H, W, 3] or [H, W, 4]) as one frame
    [1, 1, 3, height, width] in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
                image.ndim == 3 and image.shape[2] not in (3, 4)) or min(image.shape[:2]) < 1:
            raise InputError(f"an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], got "
                             f"{image.dtype} {list(image.shape)}")
        image = Image.fromarray(image)
    return _to_frames([np.asarray(fit(image.convert("RGB"), height, width))])


def _check_readable(source: Source, what: str) -> None:
    """A path that cannot be opened is one InputError (not found, a directory, the OS's
    reason); bytes always can."""
    if not isinstance(source, bytes):
        with reading(source, what), open(source, "rb"):
            pass


def read_image(source: Source, height: int, width: int) -> torch.Tensor:
    """The image file at a path (or its bytes) as one frame [1, 1, 3, height, width]."""
    _check_readable(source, "image file")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        image.load()
    except UnidentifiedImageError:
        raise InputError(f"{_name(source)} is not an image (unknown format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{_name(source)} is not a readable image: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return image_frames(image, height, width)


def read_video(source: Source, height: int, width: int) -> torch.Tensor:
    """Every frame of the video file at a path (or its bytes), [1, T, 3, height, width]."""
    if isinstance(source, bytes):
        with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
            tmp.write(source)
            tmp.flush()
            return _read_video_file(tmp.name, _name(source), height, width)
    _check_readable(source, "video file")
    return _read_video_file(str(source), str(source), height, width)


def _read_video_file(path: str, name: str, height: int, width: int) -> torch.Tensor:
    try:
        reader = imageio_ffmpeg.read_frames(path)
        meta = next(reader)
        w, h = meta["size"]
        frames = [fit(Image.frombuffer("RGB", (w, h), bytes(f)), height, width) for f in reader]
    except (RuntimeError, OSError, StopIteration, ValueError, KeyError) as err:
        raise InputError(f"{name} is not a readable video: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not frames:
        raise InputError(f"{name} holds no video frames")
    return _to_frames([np.asarray(f) for f in frames])
