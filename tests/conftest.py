"""Shared fixtures: tiny random DiTs and the location of the reference's golden outputs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memflow.config import DiTConfig
from memflow.model import WanDiT

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden"

TINY = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=16)


def tiny_dit(config: DiTConfig = TINY, seed: int = 0) -> WanDiT:
    """A tiny random DiT in fp32 and eval mode (every parameter non-zero, head included)."""
    torch.manual_seed(seed)
    return WanDiT(config).eval()


def tiny_prompt(batch: int = 1, length: int = 5, config: DiTConfig = TINY, seed: int = 1) -> torch.Tensor:
    """Random prompt embeddings with zeroed padding rows past `length`, like the T5 output."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, config.text_len, config.text_dim, generator=g)
    ctx[:, length:] = 0
    return ctx


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"reference golden outputs not found at {GOLDEN} (../shared/golden is absent)")
    return GOLDEN


@torch.no_grad()
def fixed_forward(model: WanDiT) -> torch.Tensor:
    """The model's full-attention output on one fixed random input (for save/load comparisons)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g)
    context = torch.randn(1, 8, cfg.text_dim, generator=g)
    return model(x, torch.tensor([[700.0, 300.0]]), context)


def free_port() -> int:
    """A free TCP port on the loopback interface, for a multi-process Gloo test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join a CPU (Gloo) process group in a test worker started by torch.multiprocessing."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


@pytest.fixture
def one_thread():
    """One torch thread for the test (in-process training runs compare bitwise)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def train_settings(config: Path, logdir: Path | None = None, **overrides):
    """`TrainSettings` of a training YAML with `key=value` overrides (and --logdir)."""
    from trainer.config import CliFlags, TrainSettings, load_train_config

    items = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_train_config(config, items, CliFlags(logdir=str(logdir) if logdir else None))
    return TrainSettings.from_config(cfg)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a launcher or Python subprocess of a test: PYTHON is the interpreter
    running the tests (utils/launch.sh runs $PYTHON, else `python3` from PATH, which in a
    virtualenv that is not activated is another Python without this project's packages)."""
    return {**os.environ, "PYTHON": sys.executable, **extra}


def run_launcher(script: str, *args: str, env: dict[str, str] | None = None,
                 **kwargs) -> subprocess.CompletedProcess:
    """`bash <repo>/<script> ARGS` with `subprocess_env()` (or `env`), output captured as text.
    No time limit: a busy machine is slow, not broken; the run ends on its own."""
    return subprocess.run(["bash", str(REPO / script), *args],
                          env=subprocess_env() if env is None else env,
                          capture_output=True, text=True, **kwargs)


def start_launcher(script: str, *args: str, env: dict[str, str] | None = None,
                   **kwargs) -> subprocess.Popen:
    """`run_launcher` without waiting: the started process, stdout and stderr piped as text."""
    return subprocess.Popen(["bash", str(REPO / script), *args],
                            env=subprocess_env() if env is None else env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
