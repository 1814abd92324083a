"""Per-step training log: log.jsonl on rank 0, progress bar, optional offline wandb."""
from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

from trainer.config import WandbSettings
from trainer.log import LOG_FILE, STEP_FIELDS, TrainLogger, to_json_value


def settings(enabled: bool = True, mode: str = "offline", save_dir=None) -> WandbSettings:
    return WandbSettings(enabled=enabled, mode=mode, project="memflow-test", entity=None,
                         save_dir=save_dir, run_name="tiny_train_init")


class FakeRun:
    def __init__(self, fail_log: bool = False):
        self.logged: list[tuple[dict, int]] = []
        self.finished = False
        self.fail_log = fail_log

    def log(self, data, step):
        if self.fail_log:
            raise RuntimeError("disk full")
        self.logged.append((data, step))

    def finish(self):
        self.finished = True


def fake_wandb(monkeypatch, run: FakeRun | None = None, fail_init: bool = False):
    module = types.ModuleType("wandb")
    module.init_kwargs = None

    def init(**kwargs):
        if fail_init:
            raise OSError("no service")
        module.init_kwargs = kwargs
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rank0_writes_one_valid_json_line_per_step(tmp_path):
    logger = TrainLogger(tmp_path / "run", rank=0, final_step=4, progress=False)
    logger.log_step(1, generator_loss=torch.tensor(0.5, dtype=torch.float64),
                    critic_loss=torch.tensor(1.25), generator_grad_norm=torch.tensor(3.0),
                    critic_grad_norm=2.0, dmdtrain_gradient_norm=torch.tensor(0.1),
                    timesteps=torch.tensor([[412], [87]]), lr=2e-6, lr_critic=4e-7)
    path = tmp_path / "run" / LOG_FILE
    first = read_lines(path)  # flushed before close
    assert len(first) == 1
    logger.log_step(2, critic_loss=torch.tensor(float("nan")), critic_grad_norm=float("inf"),
                    extra={"a": torch.ones(2)})
    logger.close()
    lines = path.read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert set(STEP_FIELDS) <= set(r)
        assert isinstance(r["sec_per_step"], float) and r["peak_memory_gib"] > 0
    assert records[0]["generator_loss"] == 0.5 and records[0]["critic_loss"] == 1.25
    assert records[0]["timesteps"] == [[412], [87]] and records[0]["sec_per_step"] == 0.0
    assert records[1]["generator_loss"] is None  # critic-only step
    assert records[1]["critic_loss"] == "nan" and records[1]["critic_grad_norm"] == "inf"
    assert records[1]["extra"] == {"a": [1.0, 1.0]}


def test_resume_appends(tmp_path):
    with TrainLogger(tmp_path, progress=False) as logger:
        logger.log_step(1, critic_loss=1.0)
    with TrainLogger(tmp_path, start_step=1, progress=False) as logger:
        logger.log_step(2, critic_loss=0.5, sec_per_step=1.5, peak_memory_gib=0.25)
    records = read_lines(tmp_path / LOG_FILE)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["sec_per_step"] == 1.5 and records[1]["peak_memory_gib"] == 0.25


def test_resume_drops_the_records_past_the_resumed_step(tmp_path):
    """A run killed at step 5 after its checkpoint at 2 (and mid-line: a torn last record)
    resumes at 2 and redoes 3..5: each step appears once, in order, every line valid JSON."""
    with TrainLogger(tmp_path, progress=False) as logger:
        for step in range(1, 6):
            logger.log_step(step, critic_loss=float(step))
    with open(tmp_path / LOG_FILE, "a", encoding="utf-8") as f:
        f.write('{"step": 6, "critic_lo')  # kill -9 mid-write
    with TrainLogger(tmp_path, start_step=2, progress=False) as logger:
        for step in range(3, 6):
            logger.log_step(step, critic_loss=10.0 * step)
    records = read_lines(tmp_path / LOG_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["critic_loss"] for r in records] == [1.0, 2.0, 30.0, 40.0, 50.0]
    assert [p.name for p in tmp_path.iterdir()] == [LOG_FILE]  # no temporary file left


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    module = fake_wandb(monkeypatch, FakeRun())
    logger = TrainLogger(tmp_path / "run", rank=1, final_step=4, wandb=settings())
    assert logger.log_step(1, critic_loss=1.0) is None
    logger.write("hello")
    logger.close()
    assert not (tmp_path / "run").exists()
    assert module.init_kwargs is None


def test_progress_bar_runs(tmp_path, capsys):
    with TrainLogger(tmp_path, final_step=3, progress=True) as logger:
        for step in (1, 2, 3):
            logger.log_step(step, generator_loss=0.1, critic_loss=0.2)
        assert logger._bar.n == 3
        logger.write("a line")
    err = capsys.readouterr().err
    assert "critic=0.2" in err and "s/step" in err


def test_wandb_absent_warns_and_keeps_logging(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.warns(UserWarning, match="wandb is not installed"):
        logger = TrainLogger(tmp_path, wandb=settings(), progress=False)
    logger.log_step(1, critic_loss=1.0)
    logger.close()
    assert len(read_lines(tmp_path / LOG_FILE)) == 1


def test_wandb_disabled_is_never_imported(tmp_path, monkeypatch):
    module = fake_wandb(monkeypatch, FakeRun())
    for s in (settings(enabled=False), settings(mode="disabled"), None):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with TrainLogger(tmp_path, wandb=s, progress=False) as logger:
                logger.log_step(1, critic_loss=1.0)
    assert module.init_kwargs is None


def test_wandb_online_is_refused(tmp_path, monkeypatch):
    module = fake_wandb(monkeypatch, FakeRun())
    with pytest.warns(UserWarning, match="not allowed"):
        TrainLogger(tmp_path, wandb=settings(mode="online"), progress=False).close()
    assert module.init_kwargs is None


def test_wandb_offline_logs_scalars(tmp_path, monkeypatch):
    run = FakeRun()
    module = fake_wandb(monkeypatch, run)
    config = {"lr": 2e-6, "model_kwargs": {"sink_size": 3}}
    with TrainLogger(tmp_path, wandb=settings(save_dir=str(tmp_path / "wandb")),
                     config=config, progress=False) as logger:
        logger.log_step(5, generator_loss=torch.tensor(0.5), critic_loss=1.0,
                        timesteps=torch.tensor([[3]]))
    kwargs = module.init_kwargs
    assert kwargs["mode"] == "offline" and kwargs["project"] == "memflow-test"
    assert kwargs["name"] == "tiny_train_init" and kwargs["config"] == config
    assert kwargs["dir"] == str(tmp_path / "wandb") and (tmp_path / "wandb").is_dir()
    [(data, step)] = run.logged
    assert step == 5 and data["generator_loss"] == 0.5 and data["critic_loss"] == 1.0
    assert "timesteps" not in data and "generator_grad_norm" not in data  # lists and nulls skipped
    assert run.finished


def test_wandb_failures_become_warnings(tmp_path, monkeypatch):
    fake_wandb(monkeypatch, fail_init=True)
    with pytest.warns(UserWarning, match="wandb failed to start"):
        logger = TrainLogger(tmp_path / "a", wandb=settings(), progress=False)
    logger.log_step(1, critic_loss=1.0)
    logger.close()

    run = FakeRun(fail_log=True)
    fake_wandb(monkeypatch, run)
    logger = TrainLogger(tmp_path / "b", wandb=settings(), progress=False)
    with pytest.warns(UserWarning, match="wandb.log failed"):
        logger.log_step(1, critic_loss=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_step(2, critic_loss=1.0)  # wandb is off now: no second warning
    logger.close()
    assert len(read_lines(tmp_path / "b" / LOG_FILE)) == 2 and not run.finished


def test_to_json_value():
    assert to_json_value(torch.tensor(2, dtype=torch.int64)) == 2
    assert to_json_value(torch.tensor(1.5, dtype=torch.bfloat16)) == 1.5
    assert to_json_value(float("-inf")) == "-inf"
    assert to_json_value((1, None, True)) == [1, None, True]
    assert to_json_value(torch.float32) == "torch.float32"
