"""Starting from an image and continuing a video (pipeline/start.py, utils/media.py): the start
is encoded by the VAE and committed as the stream's first frames; offline (a prompt line's
"image" / "video"), live (`Session.start(image=..., video=...)`) and their replay agree bit for
bit; bad input is one line and nothing is written."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, one_error_line, run_inference
from PIL import Image
from test_session import CONFIG, SEED, SMALL, run_offline, video_frames

from memflow.errors import InputError
from pipeline.session import Session
from utils.media import read_image, read_video
from utils.video_writer import to_uint8_frames

TINY_INTERACTIVE = str(REPO / "configs" / "tiny_interactive.yaml")


def _png(height: int = 60, width: int = 90) -> bytes:
    """A picture with large flat areas (survives an 8x pooling), of another size and aspect."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (220, 40, 40)
    image[:, width // 2 :] = (30, 60, 200)
    image[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = 250
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def session():
    old = torch.get_num_threads()
    yield Session.from_config(CONFIG, SMALL)
    torch.set_num_threads(old)


class PixelVAE:
    """A stand-in for the Wan VAE whose round trip keeps an image's picture (the tiny random
    VAE's does not): latent frame j is the 8x8 mean of pixel frame 4j (RGB in the first three
    channels), decoded by nearest upsampling, one frame first then four per latent frame."""

    z_dim = 16

    def __init__(self, vae):
        self.device = vae.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        frames = pixels[:, ::4]  # [B, F, 3, H, W]
        pooled = F.avg_pool2d(frames.flatten(0, 1), 8).unflatten(0, frames.shape[:2])
        return F.pad(pooled, (0, 0, 0, 0, 0, self.z_dim - 3)) * 2 - 1

    def stream(self):
        class Decoder:
            first = True

            def decode(self, latents: torch.Tensor) -> torch.Tensor:
                rgb = ((latents[0, :, :3].float() + 1) / 2).clamp(0, 1)
                up = F.interpolate(rgb, scale_factor=8, mode="nearest")
                repeats = [1 if (self.first and i == 0) else 4 for i in range(up.shape[0])]
                self.first = False
                return torch.cat([f[None].expand(n, -1, -1, -1) for f, n in zip(up, repeats)])[None]

        return Decoder()


def test_an_image_start_opens_the_video_with_the_images_vae_round_trip(session):
    """The tiny session's first frame is the image's encode -> decode, byte for byte, and the
    stream's first latent frame is the image's encoding."""
    data = _png()
    session.start("a cat", seed=SEED, image=data)
    first = session.next_chunk()
    assert first.pixel_start == 1 and session.frames_generated == 1 + len(first.frames)
    vae = session.components.vae
    image = read_image(data, session.height, session.width)
    encoded = vae.encode(image)
    trip = to_uint8_frames(vae.decode(encoded)[0]).numpy()[0]
    assert np.array_equal(session.thumbnail(0), trip)
    stream = session._video.stream
    assert stream.state.prefix_frames == 1 and torch.equal(stream.recent[:, :1].cpu(), encoded)


def test_an_image_start_is_closer_to_the_image_than_any_other_frame(session, monkeypatch):
    """With a VAE whose round trip keeps the picture, the video's first frame is the image
    (up to 8x8 pooling), far closer to it than every generated frame."""
    monkeypatch.setattr(session.components, "vae", PixelVAE(session.components.vae))
    data = _png()
    session.start("a cat", seed=SEED, image=data)
    results = [session.next_chunk() for _ in range(3)]
    image = read_image(data, session.height, session.width)[0, 0].permute(1, 2, 0).numpy() * 255
    first = np.abs(session.thumbnail(0).astype(float) - image).mean()
    others = [np.abs(frame.astype(float) - image).mean() for r in results for frame in r.frames]
    print(f"\nmean |frame - image|: first {first:.1f}, generated {min(others):.1f}..{max(others):.1f}")
    assert first < 12 and first < 0.25 * min(others)


def _clip(tmp_path: Path) -> Path:
    """A tiny MP4 this project wrote (12 latent frames, 45 video frames)."""
    assert run_inference(TINY_INTERACTIVE, tmp_path, "num_output_frames=12",
                         "switch_frame_indices=3,9", *SMALL) == 0
    (clip,) = (tmp_path / "out").iterdir()
    return clip


def test_a_continued_video_commits_its_encoded_last_frames(session, tmp_path: Path):
    """The context is the source's last 1 + 4(P - 1) frames encoded (P = window - one chunk),
    first in the stream; the session's video shows it before the new frames."""
    clip = _clip(tmp_path)
    session.start("the fox walks on", seed=SEED, video=clip)
    result = session.next_chunk()
    window, fpb = session.settings.stream.local_attn_size, session.frames_per_chunk
    keep = window - fpb
    source = read_video(clip, session.height, session.width)
    expected = session.components.vae.encode(source[:, -(1 + 4 * (keep - 1)):])
    stream = session._video.stream
    assert stream.state.prefix_frames == keep
    assert torch.equal(stream.recent[:, :keep].cpu(), expected)
    assert result.pixel_start == 1 + 4 * (keep - 1)


def test_offline_lines_start_from_images_and_videos_and_replay_a_session(session, tmp_path: Path):
    """A session started from an image with a transition, saved, replays through interactive
    inference (its line's "image" is the saved fitted frame) to the same latents; a "video"
    line continues the source the same way as the session."""
    session.start("a cat", seed=SEED, image=_png())
    results = []
    for n in range(4):
        if n == 2:
            session.set_prompt("a dog", transition_chunks=2, blend="slerp")
        results.append(session.next_chunk())
    mp4, sidecar = session.save_mp4(tmp_path / "live" / "clip.mp4")
    meta = json.loads(sidecar.read_text())
    assert meta["interactive_jsonl"]["image"] == "clip.start.png"
    line = mp4.parent / meta["replay"]["data_path"]
    line.write_text(json.dumps(meta["interactive_jsonl"]) + "\n")
    replay = [o for o in meta["replay"]["overrides"] if not o.startswith("data_path=")]
    offline, video = run_offline(tmp_path, [*replay, f"data_path={line}"])
    assert torch.equal(offline.cpu(), torch.cat([r.latents for r in results], dim=1))
    assert np.array_equal(video_frames(mp4), video_frames(video))  # the image frame included

    clip = mp4
    session.start("the dog runs", seed=SEED, video=clip)
    live = torch.cat([session.next_chunk().latents for _ in range(2)], dim=1)
    story = tmp_path / "continue.jsonl"
    story.write_text(json.dumps({"prompts": ["the dog runs"], "video": str(clip)}) + "\n")
    offline, _ = run_offline(tmp_path / "c", [f"data_path={story}", "num_output_frames=6",
                                              f"seed={SEED}", "switch_frame_indices=[]"])
    assert torch.equal(offline.cpu(), live)


def test_prepend_source_writes_the_source_clip_first(tmp_path: Path):
    clip = _clip(tmp_path / "src")
    story = tmp_path / "p.jsonl"
    story.write_text(json.dumps({"prompt": "more", "video": str(clip)}) + "\n")
    counts = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        assert run_inference(str(REPO / "configs" / "tiny.yaml"), out, f"data_path={story}",
                             "num_output_frames=6", f"prepend_source={flag}", *SMALL) == 0
        (video,) = (out / "out").iterdir()
        counts[flag] = len(video_frames(video))
    assert counts["true"] == counts["false"] + len(video_frames(clip))


@pytest.mark.parametrize("line, message", [
    ({"prompt": "a", "image": "missing.png"}, "missing.png does not exist"),
    ({"prompt": "a", "image": "start.png", "video": "start.png"}, "not both"),
    ({"prompt": "a", "image": 5}, '"image" must be a file path'),
    ({"prompt": "a", "image": "broken.png"}, "p.jsonl:1: "),  # truncated: found before writing
    ({"prompt": "a", "video": "start.png"}, "has 1 frame; at least one chunk"),  # an image
])
def test_bad_start_fields_are_one_line_and_nothing_is_written(tmp_path, capsys, line, message):
    (tmp_path / "start.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(_png()[:150])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(line) + "\n")
    code = run_inference(str(REPO / "configs" / "tiny.yaml"), tmp_path, f"data_path={prompts}")
    assert message in one_error_line(capsys, code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, data, message", [
    ("image", _png()[:200], "is not a readable image: image file is truncated"),
    ("image", b"not an image at all", "is not an image (unknown format)"),
    ("video", b"not a video", "is not a readable video"),
])
def test_unreadable_starts_are_refused_in_one_line(session, kind, data, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        session.start("a", image=data) if kind == "image" else session.start("a", video=data)


def test_a_video_shorter_than_one_chunk_and_odd_arrays_are_refused(session, tmp_path: Path):
    from utils.media import image_frames
    from utils.video_writer import Mp4Writer

    short = tmp_path / "short.mp4"
    with Mp4Writer(short, fps=16) as writer:
        writer.write(torch.rand(5, 3, 48, 64))
    with pytest.raises(InputError, match="has 5 frames; at least one chunk"):
        session.start("a", video=short)
    for array in (np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32)):
        with pytest.raises(InputError, match="an image array must be uint8"):
            image_frames(array, 48, 64)
    with pytest.raises(ValueError, match="not both"):
        session.start("a", image=_png(), video=short)
