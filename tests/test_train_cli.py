"""train_init.sh / train.py as a user runs them (subprocesses, tiny config, CPU).

* a full tiny run: exit 0, rotated checkpoint folders, log.jsonl with finite losses, and its
  model.pt generates MP4s through inference.sh;
* bad input: exit status 2, one `error:` line naming the file or key, no checkpoint folder;
* a truncated newest checkpoint: the run resumes from the previous one with a one-line warning
  naming the file, and reproduces the lost checkpoint exactly.

Each start of train.py costs ~10 s of imports on a CPU, so the bad-input runs go in parallel.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_launcher, subprocess_env

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny_train_init.yaml"


def test_training_never_imports_the_inference_package():
    """Training builds its models with the model library (memflow/), not with the inference
    application (pipeline/): no import of `pipeline` in train.py or trainer/, lazy ones included."""
    import ast

    found = []
    for path in [REPO / "train.py", *sorted((REPO / "trainer").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {m}" for m in modules if m.split(".")[0] == "pipeline"]
    assert found == []


def _env() -> dict[str, str]:
    return subprocess_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def _train_cmd(logdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", "--config_path", CONFIG, "--logdir", str(logdir), *overrides]


def _checkpoints(logdir: Path) -> list[str]:
    return sorted(p.name for p in logdir.glob("checkpoint_model_*")) if logdir.is_dir() else []


def _records(logdir: Path) -> list[dict]:
    return [json.loads(line) for line in (logdir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`bash train_init.sh` on the tiny config with checkpoints every 2 steps (2, 4, 6; rotation
    keeps the newest max_checkpoints = 2). Runs alone so that its wall time means something."""
    root = tmp_path_factory.mktemp("train_cli")
    logdir = root / "run"
    start = time.perf_counter()
    proc = run_launcher("train_init.sh", "--config_path", CONFIG, "--logdir", str(logdir),
                        "log_iters=2", env=_env(), cwd=REPO)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(root=root, logdir=logdir, wall=wall, proc=proc)


def test_train_init_sh_end_to_end(trained):
    logdir = trained.logdir
    assert _checkpoints(logdir) == ["checkpoint_model_000004", "checkpoint_model_000006"]
    assert not [p for p in logdir.iterdir() if p.name.startswith(".")]  # no partial/deleting
    for name in _checkpoints(logdir):
        assert {p.name for p in (logdir / name).iterdir()} == {"model.pt", "resume.pt"}
    model = torch.load(logdir / "checkpoint_model_000006" / "model.pt", weights_only=True)
    assert model["step"] == 6 and {"generator", "critic", "generator_ema"} <= set(model)

    records = _records(logdir)
    assert [r["step"] for r in records] == list(range(1, 7))  # iterations 0..max_iters - 1
    for r in records:
        assert math.isfinite(r["critic_loss"]) and math.isfinite(r["critic_grad_norm"])
        trained_gen = r["step"] - 1 in (0, 5)  # dfake_gen_update_ratio 5
        assert (r["generator_loss"] is not None) == trained_gen, r
        if trained_gen:
            assert math.isfinite(r["generator_loss"]) and math.isfinite(r["generator_grad_norm"])
    per_step = [r["sec_per_step"] for r in records[1:]]
    print(f"\n[train_init.sh tiny] wall {trained.wall:.1f} s for {len(records)} iterations "
          f"(incl. start-up); sec_per_step mean {sum(per_step) / len(per_step):.3f} s, "
          f"max {max(per_step):.3f} s")


class Job:
    """A started subprocess; `result()` waits for it once."""

    def __init__(self, cmd: list[str], **info):
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.info = SimpleNamespace(**info)
        self._result = None

    def result(self) -> SimpleNamespace:
        if self._result is None:
            stdout, stderr = self.proc.communicate()
            self._result = SimpleNamespace(returncode=self.proc.returncode, stdout=stdout,
                                           stderr=stderr,
                                           seconds=time.perf_counter() - self.started)
        return self._result


BAD_CASES = ["empty_prompt_file", "frames_not_a_multiple", "unwritable_logdir",
             "missing_wan_folders", "wrong_architecture_ckpt", "unknown_key"]


@pytest.fixture(scope="module")
def jobs(trained, tmp_path_factory):
    """After the timed training run, start every other CLI run at once (each start of
    train.py / inference.py spends ~10 s importing; 2 cores share them):
    * inference.sh on the trained checkpoint_model_000006/model.pt;
    * train.py on a copy of the finished run whose newest model.pt is truncated;
    * train.py with each bad input."""
    root = tmp_path_factory.mktemp("cli_jobs")
    started: dict[str, Job] = {}

    prompts = root / "one_prompt.txt"
    prompts.write_text("a red fox runs through fresh snow\n")
    ckpt = trained.logdir / "checkpoint_model_000006" / "model.pt"
    videos = root / "videos"
    started["inference"] = Job(
        ["bash", str(REPO / "inference.sh"), "--config_path", "configs/tiny.yaml", f"generator_ckpt={ckpt}",
         f"output_folder={videos}", f"data_path={prompts}", "num_output_frames=6"],
        out=videos)

    corrupt = root / "corrupt_run"
    shutil.copytree(trained.logdir, corrupt)
    bad = corrupt / "checkpoint_model_000006" / "model.pt"
    original = torch.load(bad, weights_only=True)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    started["corrupt"] = Job(_train_cmd(corrupt, "log_iters=2"), logdir=corrupt, bad=bad,
                             original=original)

    (root / "empty.txt").write_text("")
    (root / "a_file").write_text("not a folder\n")
    from memflow.tiny import build_tiny_generator

    other = build_tiny_generator(dict(dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_len=64))
    torch.save({"generator": other.state_dict()}, root / "wider_dit.pt")
    cases = {
        "empty_prompt_file": ([f"data_path={root / 'empty.txt'}"], None,
                              ["data_path", str(root / "empty.txt")]),
        "frames_not_a_multiple": (["num_training_frames=7"], None,
                                  ["num_training_frames", "num_frame_per_block"]),
        "unwritable_logdir": ([], root / "a_file" / "run", [str(root / "a_file" / "run")]),
        "missing_wan_folders": (["preset=null", f"wan_models_root={root / 'no_wan'}"], None,
                                ["wan_models_root", str(root / "no_wan")]),
        "wrong_architecture_ckpt": ([f"generator_ckpt={root / 'wider_dit.pt'}"], None,
                                    [str(root / "wider_dit.pt"), "patch_embedding.weight"]),
        "unknown_key": (["num_training_frame=6"], None,
                        ["num_training_frame`", "did you mean `num_training_frames`"]),
    }
    assert sorted(cases) == sorted(BAD_CASES)
    for name, (overrides, logdir, fragments) in cases.items():
        logdir = logdir or root / name
        started[name] = Job(_train_cmd(logdir, *overrides), logdir=logdir, fragments=fragments)
    yield started
    for job in started.values():
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.communicate()


def test_trained_checkpoint_generates_videos(jobs):
    job = jobs["inference"]
    res = job.result()
    assert res.returncode == 0, res.stderr[-3000:]
    videos = sorted(job.info.out.glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000
    print(f"\n[inference.sh on the trained model.pt] {[v.name for v in videos]}")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line(jobs, case):
    job = jobs[case]
    res, logdir = job.result(), job.info.logdir
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for fragment in job.info.fragments:
        assert fragment in errors[0], (fragment, errors[0])
    # the rest of stderr is log lines, not a second message
    others = [line for line in res.stderr.splitlines() if not line.startswith("error:")]
    assert all(line.startswith(("INFO ", "WARNING ")) for line in others), others
    assert not logdir.exists()  # a refused run leaves no (empty) logdir


def test_truncated_latest_checkpoint_falls_back_with_one_warning(jobs):
    """A copy of the finished run (checkpoints 4 and 6) with 6's model.pt cut in half: the rerun
    resumes from 4 with one warning line naming the file, redoes 4..6 and writes checkpoint 6
    again, bit for bit the one that was lost."""
    job = jobs["corrupt"]
    res, logdir, bad = job.result(), job.info.logdir, job.info.bad
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [line for line in res.stderr.splitlines() if "unreadable checkpoint" in line]
    assert len(warnings) == 1, res.stderr
    assert warnings[0].startswith("WARNING ")
    assert str(bad) in warnings[0] and "falling back to checkpoint_model_000004" in warnings[0]
    assert "Traceback" not in res.stderr
    assert any("resumed from" in line and "checkpoint_model_000004" in line and "step 4" in line
               for line in res.stderr.splitlines()), res.stderr

    assert _checkpoints(logdir) == ["checkpoint_model_000004", "checkpoint_model_000006"]
    redone = torch.load(bad, weights_only=True)
    assert redone["step"] == 6
    for entry in ("generator", "critic", "generator_ema"):
        assert redone[entry].keys() == job.info.original[entry].keys()
        for key, value in job.info.original[entry].items():
            assert torch.equal(redone[entry][key], value), (entry, key)
    steps = [r["step"] for r in _records(logdir)]
    assert steps == list(range(1, 7))  # resumed at 4: steps 5 and 6 once, as redone


def test_sigterm_stops_training_with_143_and_no_half_written_checkpoint(tmp_path):
    """SIGTERM (what schedulers, `timeout` and torchrun send) mid-run: one `error:` line, exit
    143 and only complete checkpoint folders (the one being written, if any, is removed)."""
    import signal

    logdir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(logdir, "max_iters=1000", "log_iters=1"), cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not list(logdir.glob("checkpoint_model_*")) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 143, err[-2000:]
    assert "error: terminated by SIGTERM" in err
    assert "Traceback" not in err
    leftovers = [p.name for p in logdir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    done = sorted(logdir.glob("checkpoint_model_*"))
    assert done and all((d / "model.pt").is_file() and (d / "resume.pt").is_file() for d in done)


def test_train_long_sh_runs_the_tiny_stage2_config_and_names_bad_input(tmp_path):
    """train_long.sh on the tiny stage-2 config: one iteration through the launcher (exit 0,
    a logged generator and critic loss); a switch that no sequence can reach is one `error:`
    line with exit status 2."""
    base = ["--config_path", "configs/tiny_train_long.yaml"]
    ok = run_launcher("train_long.sh", *base, "--logdir", str(tmp_path / "run"), "max_iters=1",
                      "vis_interval=0", env=_env(), cwd=REPO)
    assert ok.returncode == 0, ok.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["generator_loss"]) and math.isfinite(record["critic_loss"])
    bad = run_launcher("train_long.sh", *base, "--logdir", str(tmp_path / "bad"),
                       "switch_choices=[30]", env=_env(), cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "error: config key `switch_choices`: no switch frame below streaming_max_length (18)")
    assert not (tmp_path / "bad").exists()


def test_a_run_with_seed_0_resumes_with_the_seed_it_drew(tmp_path):
    """seed: 0 (the released configs) draws a seed; a run killed after a checkpoint and started
    again must go on with that seed, ending on the very weights of an uninterrupted run."""
    import train
    from trainer.checkpoint_files import saved_run_seed

    logdir = tmp_path / "run"
    args = ["--config_path", CONFIG, "--logdir", str(logdir), "seed=0", "max_iters=4",
            "log_iters=2", "max_checkpoints=5", "vis_interval=0"]
    assert train.main(args) == 0
    final = logdir / "checkpoint_model_000004" / "model.pt"
    uninterrupted = final.read_bytes()
    drawn = saved_run_seed(logdir)
    assert isinstance(drawn, int) and drawn > 0
    shutil.rmtree(final.parent)  # killed (kill -9) before step 4 was written
    assert saved_run_seed(logdir) == drawn  # step 2's checkpoint carries it too
    assert train.main(args) == 0
    assert final.read_bytes() == uninterrupted
