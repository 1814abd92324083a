"""Training checkpoints on disk: the folder layout, finding, rotating, cleaning up and publishing
folders (TRAINING.md §6.4, §8.4). Writing them: `trainer.checkpoint_save`; resuming from them:
`trainer.checkpoint_load`; the random generators' states: `trainer.rng_state`.

Layout, one folder per save, `logdir/checkpoint_model_{step:06d}/`:

* `model.pt`: the reference's full-checkpoint layout, `{"generator": sd, "critic": sd,
  "generator_ema": sd (when an EMA exists), "step": step}`, every key `"model." + <Wan name>` as
  the reference's wrapper writes it. So `memflow.checkpoint.load_generator_checkpoint` (inference,
  also with use_ema) and stage 2's base.pt loader read it, and it *is* a base.pt.
  With LoRA (stage 2, TRAINING.md §6.3) model.pt is the reference's `lora.pt` instead:
  `{"generator_lora": sd, "critic_lora": sd, "step": step}` (keys
  `base_model.model.blocks.N.<linear>.lora_{A|B}.weight`), which interactive inference loads as
  `lora_ckpt`; a critic without LoRA (apply_to_critic false) is saved whole under "critic".
* `resume.pt`: what exact resume needs beyond the weights: `{"format": 1, "step",
  "generator_optimizer", "critic_optimizer"` (full, name-keyed optimiser state dicts from
  `get_optimizer_state_dict`), `"rng"` (one entry per rank: Python, NumPy, torch CPU and CUDA
  states), `"world_size"`, `"resume_state"` (the loop's own dict: data-loader position, ...)}.
  The optimiser states live here, not in model.pt as in the reference, so that model.pt stays a
  lean base.pt / inference file (and LoRA runs resume their Adam moments, §10 item 15).
* `rank_{r}.pt` (optional): one file per rank with that rank's own state (stage 2's long
  sequence in flight: its KV cache, bank and latents). Every rank writes its own, so the run
  folder must be on a file system all ranks share (as it is for one node).

Why it is written this way:

* Collective. Every rank calls `save_checkpoint` / `load_checkpoint`: FSDP2 gathers full state
  dicts to rank 0 (CPU offload), and only rank 0 touches the disk. Rank 0's success or failure is
  broadcast, so a failed write raises on every rank instead of leaving the others hanging in
  the next collective. On load, rank 0 reads the files and `set_*_state_dict(...,
  broadcast_from_rank0=True)` sends each rank its shards, so no other rank holds a full copy.
* Atomic. The folder is written under a hidden temporary name in logdir (`.checkpoint_model_…
  .partial`), its files fsynced, then renamed; a crash leaves no folder under a final name, and
  rotation / resume never see the temporary one. Rotation renames a folder away before deleting.
* Resume falls back. The newest folder that reads is used: its model.pt and resume.pt on rank 0
  and every rank's own rank_{r}.pt. An unreadable one (truncated file) is reported in one
  warning line naming the file, and the previous one is tried. A checkpoint that reads but does
  not fit the model is a configuration error and raises.
* Crash leftovers are removed. A kill -9 while a folder is written or deleted leaves its
  hidden `.partial` / `.deleting` name behind (gigabytes at the real sizes); the next start
  removes them (`remove_leftovers`: this logdir only, only names this module makes).
* Without a process group (one process), everything runs locally as rank 0.
"""
from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from memflow.checkpoint import CheckpointError
from memflow.lora import PEFT_PREFIX, normalize_lora_key
from utils.distributed import is_distributed, is_main_rank

from .ema import EMA, plain_name

PathLike = str | os.PathLike[str]
FOLDER_PREFIX = "checkpoint_model_"
FOLDER_RE = re.compile(rf"{FOLDER_PREFIX}(\d+)")
MODEL_FILE = "model.pt"
RESUME_FILE = "resume.pt"
RANK_FILE = "rank_{rank}.pt"
LORA_ENTRIES = {"generator": "generator_lora", "critic": "critic_lora"}
RESUME_FORMAT = 1
PARTIAL_SUFFIX = ".partial"
DELETING_SUFFIX = ".deleting"
# the hidden names of a folder being written (pid, random) or deleted (random)
LEFTOVER_RE = re.compile(
    rf"\.{FOLDER_PREFIX}\d+\.(?:\d+\.[0-9a-f]{{8}}{re.escape(PARTIAL_SUFFIX)}"
    rf"|[0-9a-f]{{8}}{re.escape(DELETING_SUFFIX)})"
)


@dataclass(frozen=True)
class RunModules:
    """What a training checkpoint holds the state of: the generator, the critic, their optimisers
    and the generator's EMA, as the run holds them (FSDP2-sharded or plain). A part left None is
    neither saved nor loaded (a base.pt carries no optimiser state)."""

    generator: nn.Module
    critic: nn.Module | None = None
    generator_optimizer: torch.optim.Optimizer | None = None
    critic_optimizer: torch.optim.Optimizer | None = None
    ema: EMA | None = None

    def without_optimizers(self) -> RunModules:
        return dataclasses.replace(self, generator_optimizer=None, critic_optimizer=None)


@dataclass(frozen=True)
class CheckpointDir:
    step: int
    path: Path


def checkpoint_dir(logdir: PathLike, step: int) -> Path:
    """logdir/checkpoint_model_{step:06d} (the reference's name)."""
    return Path(logdir) / f"{FOLDER_PREFIX}{step:06d}"


def saved_run_seed(logdir: PathLike) -> int | None:
    """The seed the newest readable checkpoint of `logdir` was trained with (a run started with
    `seed: 0` draws one, and a resumed run must go on with it), or None. resume.pt is mapped, not
    read whole: only its `resume_state` is looked at."""
    for checkpoint in reversed(list_checkpoints(logdir)):
        try:
            data = torch.load(checkpoint.path / RESUME_FILE, map_location="cpu", mmap=True,
                              weights_only=True)
        except Exception:  # unreadable: load_checkpoint skips it too, with its warning
            continue
        seed = (data.get("resume_state") or {}).get("seed") if isinstance(data, dict) else None
        if isinstance(seed, int):
            return seed
    return None


def list_checkpoints(logdir: PathLike) -> list[CheckpointDir]:
    """Complete checkpoint folders, oldest first: sub-folders named checkpoint_model_<int> that
    hold model.pt (the reference's rule), sorted by the integer. Nothing else counts."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return []
    found = []
    for entry in logdir.iterdir():
        match = FOLDER_RE.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / MODEL_FILE).is_file():
            found.append(CheckpointDir(int(match.group(1)), entry))
    return sorted(found, key=lambda c: (c.step, c.path.name))


def rotate_checkpoints(logdir: PathLike, max_checkpoints: int) -> list[Path]:
    """Keep the newest `max_checkpoints` complete folders, delete the older ones (rank 0 only;
    no-op when max_checkpoints <= 0). Returns the deleted folders. Each folder is first renamed to
    a hidden name, so a crash mid-delete never leaves a half-deleted folder that looks complete."""
    if max_checkpoints <= 0 or not is_main_rank():
        return []
    deleted = []
    for old in list_checkpoints(logdir)[:-max_checkpoints]:
        trash = _trash_name(old.path)
        os.replace(old.path, trash)
        shutil.rmtree(trash)
        deleted.append(old.path)
    return deleted


def _trash_name(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.{secrets.token_hex(4)}{DELETING_SUFFIX}")


def remove_leftovers(logdir: PathLike) -> list[Path]:
    """Delete what a killed run left in `logdir` (rank 0; call before this run writes): hidden
    folders of a checkpoint being written (`.checkpoint_model_<step>.<pid>.<hex>.partial`) or
    deleted (`.checkpoint_model_<step>.<hex>.deleting`). Only direct sub-folders with exactly
    those names go (no symlinks, nothing else); returns them."""
    logdir = Path(logdir)
    if not is_main_rank() or not logdir.is_dir():
        return []
    removed = []
    for entry in sorted(logdir.iterdir()):
        if LEFTOVER_RE.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_temp_folder(logdir: Path, final: Path) -> str:
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        tmp = logdir / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        tmp.mkdir()
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoints to {logdir}: {err.strerror or err}"
        ) from None
    return str(tmp)


def publish_folder(tmp: Path, final: Path) -> Path:
    """Rename the finished temporary folder to its final name (replacing an older folder of the
    same step, e.g. after falling back past a corrupt one)."""
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = _trash_name(final)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def lora_keys(model: nn.Module) -> dict[str, str]:
    """{reference lora.pt key: the model's own state-dict key} of a model's LoRA tensors."""
    return {PEFT_PREFIX + normalize_lora_key(plain_name(k)): k
            for k in model.state_dict() if ".lora_" in k}


def first_error(error: str) -> str:
    """The first non-empty error message of any rank ("" when every rank succeeded). Collective."""
    errors = [error]
    if is_distributed():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")
