"""Quality evaluation end to end on CPU: tiny random CLIP and DINO folders written with
`save_pretrained` (the real local loading code), tiny MP4s, the two commands."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from eval import compare, evaluate
from eval.inputs import Generation
from eval.models import ClipScorer, DinoEncoder
from eval.score import Protocol, VideoScorer
from eval.segments import segment_spans
from eval.tiny import save_tiny_clip, save_tiny_dino
from eval.video import probe
from utils.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # frame height and width
STORY = ["a red scene", "a green scene", "a blue scene"]
SWITCHES = "6,12"  # latent frames; 18 latent frames -> 69 pixel frames, segments 0-21-45-69
LATENT = 18


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    return save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def scorer(models) -> VideoScorer:
    clip, dino = models
    device = torch.device("cpu")
    return VideoScorer(ClipScorer(clip, device), DinoEncoder(dino, device), Protocol(clip_fps=4.0))


def write_video(path: Path, frames: np.ndarray, fps: float = 16) -> Path:
    """uint8 [T, H, W, 3] -> H.264 MP4, as the pipeline writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps,
                                         macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def moving_square(num_frames: int) -> np.ndarray:
    """A bright square sliding over a gradient: a smooth, non-static video."""
    frames = np.zeros((num_frames, SIZE, SIZE, 3), dtype=np.uint8)
    frames[..., 2] = np.linspace(0, 200, SIZE, dtype=np.uint8)[None, None, :]
    for t in range(num_frames):
        x = t * (SIZE - 8) // max(num_frames - 1, 1)
        frames[t, 8:16, x : x + 8] = 255
    return frames


def coloured_segments(num_frames: int, bounds: list[int]) -> np.ndarray:
    """Solid red, green, blue frames, switching exactly at the given pixel frames."""
    frames = np.zeros((num_frames, SIZE, SIZE, 3), dtype=np.uint8)
    for channel, (a, b) in enumerate(zip(bounds, bounds[1:])):
        frames[a:b, ..., channel] = 255
    return frames


def story_file(tmp_path: Path, lines: int) -> Path:
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"prompts": STORY}) + "\n" for _ in range(lines)))
    return path


def test_identical_frames_give_consistency_one(scorer, tmp_path):
    frame = moving_square(1)
    path = write_video(tmp_path / "rank0-0-0_regular.mp4", np.repeat(frame, 21, axis=0))
    record = scorer.score(path, probe(path), ["a square"], segment_spans([], 6, 3), drift=True)
    assert record["subject_consistency"]["score"] == pytest.approx(1.0, abs=1e-5)
    assert record["background_consistency"]["score"] == pytest.approx(1.0, abs=1e-5)
    assert record["subject_consistency"]["pairs"] == 20  # every frame, as VBench
    assert [w["delta_clip_score"] for w in record["drift"]] == [0.0]


def test_shuffled_video_scores_lower(scorer, tmp_path):
    frames = moving_square(21)
    order = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(20)])
    smooth = write_video(tmp_path / "smooth.mp4", frames)
    shuffled = write_video(tmp_path / "shuffled.mp4", frames[order])
    spans = segment_spans([], 6, 3)
    a = scorer.score(smooth, probe(smooth), ["a square"], spans, drift=False)
    b = scorer.score(shuffled, probe(shuffled), ["a square"], spans, drift=False)
    assert b["subject_consistency"]["score"] < a["subject_consistency"]["score"]
    assert b["background_consistency"]["score"] < a["background_consistency"]["score"]


class ColourClip:
    """A hand-built CLIP: an image embeds as its mean colour, a prompt as the colour it names."""

    folder, fingerprint, max_tokens = Path("colour-clip"), "colour", 77
    model = types.SimpleNamespace(config=types.SimpleNamespace(name_or_path="colour"))

    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.float().mean(dim=(1, 2))

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        names = ["red", "green", "blue"]
        return torch.stack([torch.eye(3)[next(i for i, n in enumerate(names) if n in p)]
                            for p in prompts])


def test_segments_follow_the_switches_and_wrong_prompts_show(scorer, tmp_path):
    """Every frame scored (clip_fps 0): a boundary off by one frame would mix colours and drop a
    segment below 100; the same video scored against the story in the wrong order scores ~0."""
    spans = segment_spans([6, 12], LATENT, 3)
    assert [(s.start, s.stop) for s in spans] == [(0, 21), (21, 45), (45, 69)]
    path = write_video(tmp_path / "v.mp4", coloured_segments(69, [0, 21, 45, 69]))
    exact = VideoScorer(ColourClip(), scorer.dino, Protocol(clip_fps=0))
    right = exact.score(path, probe(path), STORY, spans, drift=False)
    assert [s["clip_score"] for s in right["segments"]] == pytest.approx([100.0] * 3, abs=0.5)
    assert [s["sampled_frames"] for s in right["segments"]] == [21, 24, 24]
    wrong = exact.score(path, probe(path), STORY[1:] + STORY[:1], spans, drift=False)
    assert max(s["clip_score"] for s in wrong["segments"]) < 5.0
    shifted = segment_spans([9, 12], LATENT, 3)  # the second switch one chunk late
    late = exact.score(path, probe(path), STORY, shifted, drift=False)
    assert late["segments"][0]["clip_score"] < 90.0


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = evaluate.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_cli_reports_and_resumes_by_hash(models, tmp_path, capsys, monkeypatch):
    clip, dino = models
    videos = tmp_path / "videos"
    for line in range(2):
        write_video(videos / f"rank{line}-{line}-0_regular.mp4", moving_square(69))
    prompts = story_file(tmp_path, 2)
    out = tmp_path / "report"
    argv = ["--videos", str(videos), "--prompts", str(prompts), "--out", str(out),
            "--switch_frame_indices", SWITCHES, "--clip_model", str(clip), "--dino_model", str(dino)]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Quality report")
    assert report["protocol"]["clip_fps"] == 2.0 and len(report["protocol"]["clip_model"]["sha256"]) == 64
    assert report["generation"]["switch_frames"] == [6, 12]
    assert [v["file"] for v in report["videos"]] == ["rank0-0-0_regular.mp4", "rank1-1-0_regular.mp4"]
    assert [len(v["segments"]) for v in report["videos"]] == [3, 3]
    assert report["aggregate"]["segments"][1]["seconds"] == [21 / 16, 45 / 16]
    assert not list(out.rglob("*.tmp"))

    # a rerun scores nothing: both records match their video's sha256 and the protocol
    def fail(*_a, **_k):
        raise AssertionError("a video was scored again")

    monkeypatch.setattr(VideoScorer, "score", fail)
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    assert json.loads((out / "report.json").read_text())["aggregate"] == report["aggregate"]
    # a changed video is scored again
    write_video(videos / "rank1-1-0_regular.mp4", moving_square(69)[::-1].copy())
    with pytest.raises(AssertionError, match="scored again"):
        evaluate.main(argv)


def test_limit_and_rank_sharding(scorer, tmp_path):
    videos = tmp_path / "videos"
    for line in range(3):
        write_video(videos / f"rank0-{line}-0_regular.mp4", moving_square(5))
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    gen = Generation(interactive=False)
    report = evaluate.evaluate_folder(scorer, videos, prompts, gen, tmp_path / "a", limit=2)
    assert [v["line"] for v in report["videos"]] == [0, 1]
    # rank 1 of 2 scores line 1 (of 0, 1, 2) only and leaves the report to rank 0
    assert evaluate.evaluate_folder(scorer, videos, prompts, gen, tmp_path / "b",
                                    dist=DistInfo(rank=1, world_size=2)) is None
    assert sorted(p.name for p in (tmp_path / "b" / "records").iterdir()) == ["rank0-1-0_regular.json"]


def test_missing_model_folder_is_one_line(tmp_path, capsys):
    videos = tmp_path / "videos"
    write_video(videos / "rank0-0-0_regular.mp4", moving_square(21))
    (tmp_path / "p.txt").write_text("a square\n")
    rc, _, err = _run(["--videos", str(videos), "--prompts", str(tmp_path / "p.txt"),
                       "--clip_model", str(tmp_path / "nowhere")], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and str(tmp_path / "nowhere") in err and "put a transformers CLIP" in err


def test_video_count_must_match_the_prompts(models, tmp_path, capsys):
    clip, dino = models
    videos = tmp_path / "videos"
    write_video(videos / "rank0-0-0_regular.mp4", moving_square(21))
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    rc, _, err = _run(["--videos", str(videos), "--prompts", str(tmp_path / "p.txt"),
                       "--clip_model", str(clip), "--dino_model", str(dino)], capsys)
    assert rc == 2 and "1 videos for 2 prompt lines; none for line(s) [1]" in err


def test_vbench_cross_check_reports_both(scorer, tmp_path, monkeypatch):
    """With a stand-in `vbench` package: its numbers land next to ours, per video and overall."""
    class FakeVBench:
        def __init__(self, device, full_info, output_path):
            self.output = Path(output_path)

        def evaluate(self, videos_path, name, dimension_list, local, mode):
            rows = [{"video_path": str(p), "video_results": 0.5} for p in sorted(Path(videos_path).iterdir())]
            result = {dim: [0.5, rows] for dim in dimension_list}
            (self.output / f"{name}_eval_results.json").write_text(json.dumps(result))

    fake = types.ModuleType("vbench")
    fake.VBench, fake.__file__ = FakeVBench, str(tmp_path / "vbench" / "__init__.py")
    monkeypatch.setitem(sys.modules, "vbench", fake)
    videos = tmp_path / "videos"
    write_video(videos / "rank0-0-0_regular.mp4", moving_square(21))
    (tmp_path / "p.txt").write_text("a square\n")
    report = evaluate.evaluate_folder(scorer, videos, tmp_path / "p.txt", Generation(interactive=False),
                                      tmp_path / "out", vbench_device="cpu")
    assert report["vbench"]["aggregate"] == {"subject_consistency": 0.5, "background_consistency": 0.5}
    assert report["vbench"]["videos"]["rank0-0-0_regular.mp4"]["subject_consistency"] == 0.5
    assert "Cross-check with VBench" in (tmp_path / "out" / "report.md").read_text()


def test_compare_tiny_preset_all_memory_modes(models, tmp_path, capsys):
    """Generate with the tiny interactive preset in every memory mode, evaluate, and print the
    Table 3 rows."""
    clip, dino = models
    out = tmp_path / "cmp"
    story = tmp_path / "story.jsonl"
    story.write_text(json.dumps({"prompts": STORY[:2]}) + "\n")
    rc = compare.main(["--config_path", str(ROOT / "configs/tiny_interactive.yaml"),
                       "num_output_frames=6", "switch_frame_indices=3", "height=32", "width=32",
                       f"data_path={story}",
                       "--out", str(out), "--clip_model", str(clip), "--dino_model", str(dino)])
    stdout = capsys.readouterr().out
    assert rc == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [m["mode"] for m in summary["modes"]] == ["none", "sink", "nam", "nam_sma"]
    kwargs = []
    for mode in summary["modes"]:
        assert mode["videos_on_rank0"] == 1 and mode["fps"] > 0
        assert [s["seconds"] for s in mode["aggregate"]["segments"]] == [[0.0, 9 / 16], [9 / 16, 21 / 16]]
        report = json.loads(Path(mode["report"]).read_text())
        assert report["videos"][0]["num_frames"] == 21  # 6 latent frames
        kwargs.append(report["generation"]["model_kwargs"])
    assert [(k["sink_size"], k["bank_size"], k["SMA"]) for k in kwargs] == [
        (0, 0, False), (3, 0, False), (3, 2, False), (3, 2, True)
    ]
    assert "| nam_sma |" in stdout and "FPS" in stdout
