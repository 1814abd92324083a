"""Per-step training metrics: ``logdir/log.jsonl``, a progress bar and (optionally) wandb.

Rank 0 only (TRAINING.md §8.1); on every other rank a `TrainLogger` does nothing. Each step is
one JSON object on its own line, flushed at once, so a crash loses nothing and the file can be
followed with ``tail -f``. The standard fields (`STEP_FIELDS`) are always present (null when
not measured that step: the generator losses on critic-only steps, for example); extra metrics
are added as given. Tensors become numbers (0-dim) or lists; NaN and infinities become the
strings "nan", "inf", "-inf" so that every line stays valid JSON.

A resumed run continues the file from the step it resumed at: records past that step (the
iterations a killed run did after its last checkpoint, which the resumed run does again) and a
line cut short by the kill are dropped first, so every step appears once, in order.

The module is `log`, not `logging`, so that it never shadows the standard library.

wandb is optional and imported lazily: it is used only when enabled in the settings, installed,
and in ``offline`` or ``disabled`` mode (never online: no login, no network). Any wandb failure,
at start-up or later, becomes one warning and wandb is switched off; training goes on.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from memflow.files import atomic_write_text

LOG_FILE = "log.jsonl"

# Always written (null when absent): the reference's wandb metrics (§8.1) plus what it computes
# but does not send (timesteps), learning rates, speed and memory.
STEP_FIELDS = (
    "step",
    "generator_loss",
    "critic_loss",
    "generator_grad_norm",
    "critic_grad_norm",
    "dmdtrain_gradient_norm",
    "timesteps",
    "lr",
    "lr_critic",
    "sec_per_step",
    "peak_memory_gib",
)


def to_json_value(value: Any) -> Any:
    """A JSON-safe copy of a metric: tensors and numpy values to Python numbers or lists,
    non-finite floats to strings, mappings and sequences recursively."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.double()
        value = value.item() if value.dim() == 0 else value.tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return str(value)


def peak_memory_gib(device: torch.device | str | None = None, reset: bool = True) -> float:
    """Peak memory since the last call: CUDA allocated memory on a GPU device (peak counter then
    reset), else the process's peak resident set size (never reset by the OS)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records of `path` past `step`, and any line that is not a whole JSON record
    (the last one, cut short by a kill); atomic (a temporary file renamed over it); no-op
    when nothing goes."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) is not None and _record_step(line) <= step]
    if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
        return
    atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def _record_step(line: str) -> int | None:
    """The step of one log.jsonl line, or None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


class TrainLogger:
    """Writes one record per training step (rank 0 only).

    `wandb` is a `trainer.config.WandbSettings` (or None for no wandb); `config` the resolved
    config to store with the wandb run. The progress bar counts steps from `start_step` up to
    `final_step`; an existing log.jsonl keeps its records up to `start_step` only.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str] | None,
        *,
        rank: int = 0,
        final_step: int | None = None,
        start_step: int = 0,
        wandb: Any = None,
        config: Mapping[str, Any] | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
    ):
        self.active = rank == 0
        self.device = device
        self._file = None
        self._bar = None
        self._wandb = None
        self._last_time: float | None = None
        self.path: Path | None = None
        if not self.active:
            return
        if logdir:
            self.path = Path(logdir) / LOG_FILE
            self.path.parent.mkdir(parents=True, exist_ok=True)
            keep_records_up_to(self.path, start_step)
            self._file = open(self.path, "a", encoding="utf-8")  # resume appends
        if progress:
            self._bar = tqdm(total=final_step, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, leave=True)
        if wandb is not None and getattr(wandb, "enabled", False):
            self._wandb = self._start_wandb(wandb, config)

    # ---- wandb --------------------------------------------------------------------------------
    @staticmethod
    def _start_wandb(settings: Any, config: Mapping[str, Any] | None) -> Any:
        mode = getattr(settings, "mode", "offline")
        if mode not in ("offline", "disabled"):
            warnings.warn(f"wandb mode {mode!r} is not allowed (offline or disabled); wandb is off",
                          stacklevel=3)
            return None
        if mode == "disabled":
            return None
        try:
            wandb = importlib.import_module("wandb")
        except ImportError:
            warnings.warn("wandb is not installed; metrics go to log.jsonl only", stacklevel=3)
            return None
        try:
            kwargs: dict[str, Any] = dict(
                project=getattr(settings, "project", None),
                entity=getattr(settings, "entity", None),
                name=getattr(settings, "run_name", None),
                mode=mode,
                config=to_json_value(dict(config)) if config is not None else None,
            )
            save_dir = getattr(settings, "save_dir", None)
            if save_dir:
                Path(save_dir).mkdir(parents=True, exist_ok=True)
                kwargs["dir"] = str(save_dir)
            run = wandb.init(**kwargs)
            return run if run is not None else wandb
        except Exception as err:  # noqa: BLE001 - wandb must never stop training
            warnings.warn(f"wandb failed to start ({type(err).__name__}: {err}); wandb is off",
                          stacklevel=3)
            return None

    def _wandb_log(self, record: Mapping[str, Any], step: int) -> None:
        if self._wandb is None:
            return
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            self._wandb.log(scalars, step=step)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"wandb.log failed ({type(err).__name__}: {err}); wandb is off",
                          stacklevel=3)
            self._wandb = None

    # ---- per step -----------------------------------------------------------------------------
    def log_step(self, step: int, **metrics: Any) -> dict[str, Any] | None:
        """Record step `step` (after its increment, as the reference logs it).

        `sec_per_step` defaults to the wall time since the previous call (0 the first time, as
        in the reference) and `peak_memory_gib` to `peak_memory_gib(device)`. Returns the record
        written (None on other ranks).
        """
        if not self.active:
            return None
        now = time.perf_counter()
        if "sec_per_step" not in metrics:
            metrics["sec_per_step"] = 0.0 if self._last_time is None else now - self._last_time
        self._last_time = now
        if "peak_memory_gib" not in metrics:
            metrics["peak_memory_gib"] = peak_memory_gib(self.device)
        record: dict[str, Any] = {key: None for key in STEP_FIELDS}
        record.update({k: to_json_value(v) for k, v in metrics.items()})
        record["step"] = int(step)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            self._file.flush()
        if self._bar is not None:
            postfix = {"step": step}
            for key, short in (("generator_loss", "gen"), ("critic_loss", "critic")):
                if isinstance(record.get(key), float):
                    postfix[short] = f"{record[key]:.4g}"
            postfix["s/step"] = f"{record['sec_per_step']:.2f}" if isinstance(
                record["sec_per_step"], float) else record["sec_per_step"]
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(max(0, step - self._bar.n))
        self._wandb_log(record, step)
        return record

    def write(self, message: str) -> None:
        """Print a line (rank 0 only) without breaking the progress bar."""
        if self.active:
            (self._bar.write if self._bar is not None else print)(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"wandb.finish failed ({type(err).__name__}: {err})", stacklevel=2)
            self._wandb = None

    def __enter__(self) -> TrainLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
