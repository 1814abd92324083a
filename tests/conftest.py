"""Shared fixtures: tiny random DiTs and the location of the reference's golden outputs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch

from memflow.attention import AttentionKernel, attention
from memflow.config import DiTConfig
from memflow.model import WanDiT

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden"

TINY = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=16)
# The shape of the reference's golden-output model (shared/golden/README): a 2-layer 64-wide DiT.
GOLDEN_DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=512)
CPU = torch.device("cpu")

# The tiny inference presets (configs/), as paths the CLIs take.
TINY_YAML = str(REPO / "configs" / "tiny.yaml")
TINY_INTERACTIVE_YAML = str(REPO / "configs" / "tiny_interactive.yaml")


def block_causal_mask(num_frames: int, frames_per_block: int, frame_len: int) -> torch.Tensor:
    """Boolean [L, L] mask: a token of chunk i sees every token of chunks 0..i (bidirectional
    inside its own chunk): what a cached chunk-by-chunk forward computes while the window is
    not exceeded."""
    block = torch.arange(num_frames) // frames_per_block
    token_block = block.repeat_interleave(frame_len)
    return token_block[:, None] >= token_block[None, :]


@dataclass(frozen=True)
class DenseMask:
    """A full (non-streaming) DiT call whose self-attention is masked by a dense [L, L] mask
    (`WanDiT.forward(..., stream=DenseMask(mask))`): the reference a streamed run must equal."""

    mask: torch.Tensor
    start_frame: int = 0
    places_frames: bool = False
    graph_variant: None = None

    def layer(self, index: int, kernel: AttentionKernel, phases=None):
        return partial(attention, mask=self.mask, kernel=kernel)


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


def make_trainer(settings):
    """The in-process trainer of `settings`' stage (as train.py picks it), on the CPU, no bars."""
    from trainer.long_tuning import Stage2Trainer
    from trainer.loop import DistillationTrainer

    trainer_class = Stage2Trainer if settings.stage == 2 else DistillationTrainer
    return trainer_class(settings, CPU, progress=False)


def named_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter by name (to compare before/after a step)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def named_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every gradient that exists, by parameter name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def write_prompts(tmp_path: Path, lines: list[str], name: str = "p.txt") -> str:
    """A prompt file of `lines` (one prompt a line) under `tmp_path`; its path as the CLI takes it."""
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_inference(config: str, tmp_path: Path, *overrides: str) -> int:
    """`inference.py --config_path CONFIG output_folder=<tmp>/out OVERRIDES`, in process."""
    import inference

    return inference.main(["--config_path", config, f"output_folder={tmp_path / 'out'}", *overrides])


def one_error_line(capsys, code: int) -> str:
    """The one `error:` line of a CLI run that must have stopped with status 2."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


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


def bank_of(state):
    """The memory bank of a state with the standard layout (tests of the bank itself)."""
    return state.source("bank").bank
