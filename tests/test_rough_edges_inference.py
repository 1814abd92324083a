"""What a new user hits on the inference side (issue 15, part 3): the README's train -> infer
loop on a CPU for both stages, bad checkpoint paths, a full disk while writing a video, the
README's commands in order, video names that do not depend on the process count, and bad
input that must be one `error:` line."""
from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path

import pytest
from conftest import TINY_INTERACTIVE_YAML as TINY_INTERACTIVE
from conftest import TINY_YAML as TINY
from conftest import one_error_line as _error
from conftest import run_launcher, start_launcher

import inference
from utils.naming import video_filename

ROOT = Path(__file__).resolve().parents[1]
TINY_ADAPTER = "adapter={type: lora, rank: 4, alpha: 4}"  # configs/tiny_train_long.yaml's


def _newest_model_pt(logdir: Path) -> Path:
    folders = sorted(logdir.glob("checkpoint_model_*"))
    assert folders, f"no checkpoint in {logdir}"
    return folders[-1] / "model.pt"


# ------------------------------------------------------------------------------------------------
# 1. The README's train -> infer loop on a CPU, both stages
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One short tiny run of each stage through the README's launchers, side by side: stage 1
    (train_init.sh) trains the whole generator at its first step, stage 2 (train_long.sh) its
    LoRA. Returns each run's newest model.pt."""
    root = tmp_path_factory.mktemp("tiny_runs")
    short = ["max_iters=1", "log_iters=1"]
    runs = {
        "stage1": start_launcher("train_init.sh", "--config_path", "configs/tiny_train_init.yaml",
                                 "--logdir", str(root / "stage1"), *short),
        "stage2": start_launcher("train_long.sh", "--config_path", "configs/tiny_train_long.yaml",
                                 "--logdir", str(root / "stage2"), *short, "vis_interval=0"),
    }
    for name, proc in runs.items():
        _, err = proc.communicate()
        assert proc.returncode == 0, (name, err[-3000:])
    return {name: _newest_model_pt(root / name) for name in runs}


def _video(tmp_path: Path, name: str, config: str, *overrides: str) -> bytes:
    """The bytes of the one video an inference run with `overrides` writes."""
    out = tmp_path / name
    data = [] if config == TINY_INTERACTIVE else [f"data_path={ROOT / 'prompts' / 'tiny_train_prompts.txt'}"]
    frames = ["num_output_frames=9", "switch_frame_indices=3,6"] if not data else ["num_output_frames=6"]
    assert inference.main(["--config_path", config, f"output_folder={out}", "inference_iter=0",
                           *frames, *data, *overrides]) == 0
    (video,) = out.glob("*.mp4")
    return video.read_bytes()


def test_stage1_model_pt_changes_the_tiny_video(trained, tmp_path):
    """`generator_ckpt=` a tiny stage-1 run's model.pt: the video is that generator's, not the
    random initial one's."""
    random_init = _video(tmp_path, "random", TINY)
    ckpt = _video(tmp_path, "trained", TINY, f"generator_ckpt={trained['stage1']}")
    assert ckpt != random_init


def test_stage2_lora_changes_the_tiny_interactive_video(trained, tmp_path):
    """`lora_ckpt=` a tiny stage-2 run's model.pt with its `adapter`: the video changes. The
    adapter alone (a fresh LoRA adds zero) gives the plain video, so the change is the trained
    LoRA's."""
    plain = _video(tmp_path, "plain", TINY_INTERACTIVE)
    fresh = _video(tmp_path, "fresh", TINY_INTERACTIVE, TINY_ADAPTER)
    adapted = _video(tmp_path, "adapted", TINY_INTERACTIVE, TINY_ADAPTER,
                     f"lora_ckpt={trained['stage2']}")
    assert fresh == plain
    assert adapted != plain


@pytest.mark.parametrize("config", [TINY, TINY_INTERACTIVE], ids=["tiny", "tiny_interactive"])
def test_tiny_preset_missing_lora_ckpt_is_an_error(tmp_path, capsys, config):
    missing = tmp_path / "no_such_lora.pt"
    code = inference.main(["--config_path", config, f"output_folder={tmp_path / 'out'}",
                           TINY_ADAPTER, f"lora_ckpt={missing}"])
    msg = _error(capsys, code)
    assert "`lora_ckpt`" in msg and str(missing) in msg
    assert not (tmp_path / "out").exists()


def test_tiny_preset_lora_of_another_rank_is_an_error(trained, tmp_path, capsys):
    """The checks of a real lora.pt apply: the mismatch message (its first line names the file,
    the next ones the rank to set) and status 2."""
    code = inference.main(["--config_path", TINY_INTERACTIVE, f"output_folder={tmp_path / 'out'}",
                           "adapter={type: lora, rank: 8, alpha: 8}", f"lora_ckpt={trained['stage2']}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: {trained['stage2']}") and "set adapter.rank to match the file" in err
    assert not (tmp_path / "out").exists()  # found when loading, after the folder was planned


def test_lora_ckpt_without_adapter_is_an_error_naming_adapter(tmp_path, capsys, trained):
    """It used to run without the LoRA (exit 0, videos named _regular): now refused before
    anything is loaded or written."""
    out = tmp_path / "out"
    code = inference.main(["--config_path", TINY, f"output_folder={out}", "num_output_frames=3",
                           f"lora_ckpt={trained['stage2']}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "`adapter` is null" in err
    assert not out.exists()


def test_a_video_past_the_rope_table_is_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    for frames in (1026, 99999999):
        code = inference.main(["--config_path", TINY, f"output_folder={out}",
                               f"num_output_frames={frames}"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"num_output_frames ({frames}) is past the RoPE position table: with positions: absolute at most 1024" in err
        assert "positions: relative has no such limit" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# 4. Bad input: one `error:` line (status 2), or a warning naming the key
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,message",
    [
        ("tiny.dim=33", "config key `tiny`: dim 33 is not divisible by num_heads 2"),
        ("tiny.num_heads=0", "config key `tiny.num_heads` must be >= 1, got 0"),
        ("seed=99999999999999999999",
         "config key `seed` must be between 0 and 9223372036854775807, got 99999999999999999999"),
        ("seed=-1", "config key `seed` must be between 0 and 9223372036854775807, got -1"),
        ("tiny.seed=18446744073709551616",
         "config key `tiny.seed` must be between 0 and 9223372036854775807, got 18446744073709551616"),
    ],
)
def test_values_that_used_to_give_a_traceback_are_one_line(tmp_path, capsys, override, message):
    code = inference.main(["--config_path", TINY, f"output_folder={tmp_path / 'out'}", override])
    assert _error(capsys, code) == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script,args,option,usage",
    [
        ("inference.sh", ["--config_path"], "--config_path",
         "bash inference.sh [--config_path FILE.yaml] [key=value ...]"),
        ("interactive_inference.sh", ["--config_path", "--x"], "--config_path",
         "bash interactive_inference.sh [--config_path FILE.yaml] [key=value ...]"),
        ("train_init.sh", ["--config_path", "configs/tiny_train_init.yaml", "--logdir"], "--logdir",
         "bash train_init.sh [--config_path FILE.yaml] [--logdir DIR] [train.py options] [key=value ...]"),
    ],
    ids=["inference", "interactive", "train_init-logdir"],
)
def test_launcher_option_without_value_is_a_usage_line(script, args, option, usage):
    """An option given last (or followed by another option) is one line, not bash's `$2:
    unbound variable`."""
    result = run_launcher(script, *args)
    assert result.returncode == 2
    assert result.stderr == f"error: {option} needs a value; usage: {usage}\n"


def test_a_folder_as_generator_ckpt_is_named_as_a_folder(tmp_path, capsys):
    folder = tmp_path / "checkpoint_model_000006"
    folder.mkdir()
    code = inference.main(["--config_path", TINY, f"output_folder={tmp_path / 'out'}",
                           f"generator_ckpt={folder}"])
    msg = _error(capsys, code)
    assert msg.startswith(f"error: config key `generator_ckpt`: {folder} is a directory")
    assert "not found" not in msg


def test_switches_in_single_prompt_mode_are_a_warning_naming_the_key(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert inference.main(["--config_path", TINY, f"output_folder={tmp_path / 'out'}",
                               "num_output_frames=3", "inference_iter=0",
                               "switch_frame_indices=3"]) == 0
    warnings = [m for m in caplog.messages if "mode: single ignores" in m]
    assert len(warnings) == 1 and "`switch_frame_indices`" in warnings[0]


def test_no_switch_warning_for_a_plain_single_prompt_config(caplog):
    from config.schema import InferenceConfig
    from pipeline.runner import warn_unused_switches

    with caplog.at_level(logging.WARNING):
        warn_unused_switches(InferenceConfig(mode="single", switch={}), interactive=False)
        warn_unused_switches(InferenceConfig(switch_frame_indices="3"), interactive=True)
    assert caplog.messages == []


def test_a_bad_value_in_the_file_that_an_override_replaces_is_no_error(tmp_path, capsys):
    """The merged config is what runs, so it is what is checked; a bad value that stays is
    still an error, and an unknown key in the file is still named with the file."""
    from config.inference import load_inference_config

    config = tmp_path / "my.yaml"
    config.write_text(Path(TINY).read_text().replace("seed: 0\nnum_samples", "seed: abc\nnum_samples")
                      .replace("  dim: 32", "  dim: 33"))
    cfg = load_inference_config(config, ["seed=3", "tiny.dim=32"])
    assert cfg.seed == 3 and cfg.tiny["dim"] == 32
    code = inference.main(["--config_path", str(config), "tiny.dim=32"])
    assert _error(capsys, code) == "error: config key `seed` must be an integer; got 'abc'"
    config.write_text(Path(TINY).read_text() + "num_output_frame: 3\n")
    code = inference.main(["--config_path", str(config), "num_output_frames=3"])
    assert _error(capsys, code) == (f"error: {config}: unknown config key `num_output_frame`; "
                                    "did you mean `num_output_frames`?")


# ------------------------------------------------------------------------------------------------
# 2. A full disk while writing a video
# ------------------------------------------------------------------------------------------------
def test_a_full_disk_stops_the_run_with_one_line_and_no_partial_file(tmp_path, capsys, monkeypatch):
    """Every video's temporary file is a link to /dev/full (each write fails with ENOSPC, as on
    a full disk): one `error:` line naming the video, status 1 (a video was not written; the
    input was fine), no traceback, nothing left in the output folder."""
    from test_video_writer import full_disk_partial

    from utils.video_writer import Mp4Writer

    start = Mp4Writer._start
    monkeypatch.setattr(Mp4Writer, "_start",
                        lambda self, w, h: (full_disk_partial(self.path), start(self, w, h)))
    out = tmp_path / "out"
    code = inference.main(["--config_path", TINY, f"output_folder={out}", "num_output_frames=3"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    first = out / video_filename(None, 0, 0, "regular")
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        f"error: cannot write video {first}: No space left on device"]
    assert not out.exists()  # the folder this run made held nothing: it is gone too


# ------------------------------------------------------------------------------------------------
# 3. The README's commands in order; names that do not depend on the process count
# ------------------------------------------------------------------------------------------------
INFERENCE_LAUNCHERS = ("inference.sh", "interactive_inference.sh")
TRAINING_LAUNCHERS = ("train_init.sh", "train_long.sh")


def _readme_tiny_commands() -> list[list[str]]:
    """The README's `bash <inference or training launcher> --config_path configs/tiny*.yaml ...`
    commands, in order, as argument lists (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [shlex.split(line, comments=True)
                for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [c for c in commands if c[:1] == ["bash"] and "--config_path" in c
            and c[1] in INFERENCE_LAUNCHERS + TRAINING_LAUNCHERS
            and c[c.index("--config_path") + 1].startswith("configs/tiny")]


def test_readme_tiny_commands_run_in_order():
    """Read top to bottom, the README's tiny commands must each work after the previous ones:
    no inference command writes into a folder an earlier one filled (that stops with exit 2),
    and each checkpoint it loads is the last one an earlier training command writes."""
    from omegaconf import OmegaConf

    from config.inference import load_inference_config

    commands = _readme_tiny_commands()
    assert {c[1] for c in commands} == set(INFERENCE_LAUNCHERS + TRAINING_LAUNCHERS)
    folders: list[str] = []
    loaded: set[str] = set()  # the training launchers whose checkpoints an inference command tries
    trained: dict[str, OmegaConf] = {}  # logdir -> training config
    for command in commands:
        config = command[command.index("--config_path") + 1]
        rest = command[command.index("--config_path") + 2:]
        if command[1].startswith("train"):
            logdir = rest[rest.index("--logdir") + 1] if "--logdir" in rest else f"logs/{Path(config).stem}"
            trained[logdir] = OmegaConf.load(ROOT / config)
            continue
        cfg = load_inference_config(ROOT / config, rest)
        assert cfg.output_folder not in folders or cfg.overwrite or cfg.skip_existing, command
        folders.append(cfg.output_folder)
        for key in ("generator_ckpt", "lora_ckpt"):
            path = getattr(cfg, key)
            if path is None:
                continue
            logdir = str(Path(path).parents[1])
            assert logdir in trained, (key, path, list(trained))
            loaded.add(key)
            last = trained[logdir].max_iters  # behaviour: clean saves the last step
            assert path == f"{logdir}/checkpoint_model_{last:06d}/model.pt", command
            if key == "lora_ckpt":
                run = trained[logdir].adapter
                assert (cfg.adapter.rank, cfg.adapter.alpha) == (run.rank, run.alpha)
    assert loaded == {"generator_ckpt", "lora_ckpt"}  # both stages' train -> infer loops


def test_video_names_do_not_depend_on_the_process_count():
    """clean: prompt i's file is the same on 1 and 2 processes, so skip_existing carries over;
    compat: the reference's rank-based names."""
    from pipeline.outputs import Job, plan_videos

    jobs = [Job(i, i + 1, [f"prompt {i}"]) for i in range(3)]

    def names(world_size: int, **kwargs) -> dict[int, str]:
        plan = plan_videos(jobs, world_size, Path("out"), "regular", save_with_index=True, **kwargs)
        assert sorted(v.job.index for v in plan) == [0, 1, 2]
        return {v.job.index: v.path.name for v in plan}

    assert names(1) == names(2) == {i: video_filename(None, i, 0, "regular") for i in range(3)}
    assert names(2, rank_in_names=True) == {0: "rank0-0-0_regular.mp4", 1: "rank1-1-0_regular.mp4",
                                            2: "rank0-2-0_regular.mp4"}
    assert names(1, rank_in_names=True)[1] == "rank0-1-0_regular.mp4"


def test_clashing_prompt_names_get_the_same_suffix_on_any_process_count():
    from pipeline.outputs import Job, plan_videos

    jobs = [Job(0, 1, ["a cat"]), Job(1, 2, ["a dog"]), Job(2, 3, ["a cat"])]
    for world_size in (1, 2, 3):
        plan = plan_videos(jobs, world_size, Path("out"), "regular", save_with_index=False)
        assert {v.job.line: v.path.name for v in plan} == {
            1: "a cat-0_regular.mp4", 2: "a dog-0_regular.mp4", 3: "a cat_line3-0_regular.mp4"}
