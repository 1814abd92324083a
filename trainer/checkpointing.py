"""Training checkpoints: save, rotate, find and resume (TRAINING.md §6.4, §8.4).

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

import errno
import logging
import os
import pickle
import random
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from memflow.checkpoint import WRAPPER_PREFIX, CheckpointError, Mismatch, read_checkpoint
from memflow.lora import PEFT_PREFIX, normalize_lora_key
from utils.distributed import (
    current_rank,
    current_world_size,
    is_distributed,
    is_main_rank,
    on_main,
)

from .ema import EMA, plain_name

log = logging.getLogger(__name__)

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

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ------------------------------------------------------------------------------------------------
# Errors (rank-0 work shared with every rank: utils.distributed.on_main)
# ------------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    """The gist of an error on one line (torch's corrupt-zip message runs on for five sentences)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line.split(". ")[0] if len(line) > 160 else line


# ------------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# RNG states
# ------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and (if available) CUDA RNG states, in types
    `torch.load(weights_only=True)` accepts (NumPy's key array becomes an int64 tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored when this process has CUDA and
    the same number of devices; otherwise they are skipped with a warning."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("saved CUDA RNG states (%d devices) not restored on this machine", len(cuda))


def _gather_rng() -> list[dict[str, Any]] | None:
    """Every rank's RNG state, in rank order, on rank 0 (None elsewhere). Collective."""
    mine = capture_rng_state()
    if not is_distributed():
        return [mine]
    states: list[Any] | None = [None] * dist.get_world_size() if is_main_rank() else None
    dist.gather_object(mine, states, dst=0)
    return states


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
_PLAIN = (type(None), bool, int, float, str, torch.Tensor)


def _check_plain(value: Any, where: str) -> None:
    """resume_state must load with weights_only=True: tensors, numbers, strings, None, and
    lists / tuples / dicts of them. Fails at save time, naming the key, not at resume time."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; resume_state may only hold tensors, numbers, "
        "strings, None and lists/tuples/dicts of them"
    )


def _prefixed(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain Wan names with the training wrapper's `model.` prefix (the reference's keys)."""
    return {WRAPPER_PREFIX + plain_name(k): v for k, v in state.items()}


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _lora_keys(model: nn.Module) -> dict[str, str]:
    """{reference lora.pt key: the model's own state-dict key} of a model's LoRA tensors."""
    return {PEFT_PREFIX + normalize_lora_key(plain_name(k)): k
            for k in model.state_dict() if ".lora_" in k}


def _model_payload(role: str, model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """(entry, full state dict) of one model as model.pt stores it: its LoRA tensors under the
    reference's lora.pt names, or every tensor under the wrapper's `model.` names. Collective."""
    full = get_model_state_dict(model, options=_GATHER)
    if is_lora(model):
        names = {own: ref for ref, own in _lora_keys(model).items()}
        return LORA_ENTRIES[role], {names[k]: v for k, v in full.items() if k in names}
    return role, _prefixed(full)


def _write_file(path: Path, payload: Any, shown: Path) -> None:
    """torch.save to a new file, then fsync it. A failed write becomes a one-line
    CheckpointError naming the final path `shown` (the temporary name would mean nothing to the
    user) and what the OS said (`_write_failure`)."""
    try:
        with open(path, "xb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        reason = _write_failure(err, path.parent)
        if reason is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {shown}: {reason}") from None


# below this many free bytes a failed torch.save is taken for a full disk
_FULL_DISK_BYTES = 1 << 20


def _write_failure(err: BaseException, folder: Path) -> str | None:
    """Why a write failed, in the OS's words, or None for an error that is not a write failure.

    torch.save does not pass an OSError on: when a write of its zip writer fails (ENOSPC, EIO,
    ...), it raises `RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...`,
    either while handling the OSError (then named in its context) or with no trace of it; then
    the file system's free space tells a full disk."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    if "inline_container" not in str(err):
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < _FULL_DISK_BYTES:
        return f"{os.strerror(errno.ENOSPC)} ({free} bytes free)"
    return f"the write failed ({_first_line(err)})"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_temp_dir(logdir: Path, final: Path) -> str:
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        tmp = logdir / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        tmp.mkdir()
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoints to {logdir}: {err.strerror or err}"
        ) from None
    return str(tmp)


def _publish(tmp: Path, final: Path) -> Path:
    """Rename the finished temporary folder to its final name (replacing an older folder of the
    same step, e.g. after falling back past a corrupt one)."""
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = _trash_name(final)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(
    logdir: PathLike,
    step: int,
    *,
    generator: nn.Module,
    critic: nn.Module,
    generator_optimizer: torch.optim.Optimizer | None = None,
    critic_optimizer: torch.optim.Optimizer | None = None,
    generator_ema: EMA | Mapping[str, torch.Tensor] | None = None,
    resume_state: Mapping[str, Any] | None = None,
    rank_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write logdir/checkpoint_model_{step:06d}/{model.pt, resume.pt} (layout: module docstring).
    `rank_state` (every rank's own, same rules as resume_state) goes to rank_{r}.pt.

    Collective: every rank calls it with its own (FSDP2-sharded or plain) modules and optimisers;
    rank 0 writes. Returns the folder's path on every rank. `generator_ema` is an `EMA` or its
    state dict (rank 0's counts). `resume_state` is saved as given (rank 0's), e.g. the data
    loader's position; it may hold only tensors, numbers, strings, None and containers of them.
    Raises CheckpointError (an InputError: one line, naming the path) when the disk refuses.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    resume_state = dict(resume_state or {})
    on_main(lambda: _check_plain(resume_state, "resume_state"))  # only rank 0's is saved
    logdir = Path(logdir)
    final = checkpoint_dir(logdir, step)
    tmp = Path(on_main(lambda: _make_temp_dir(logdir, final)))
    try:
        # Stage 1: weights (gathered, written, freed before the optimiser states are gathered,
        # so rank 0 never holds both at once).
        payload: dict[str, Any] = dict(
            _model_payload(role, model) for role, model in (("generator", generator),
                                                             ("critic", critic))
        )
        if generator_ema is not None:
            ema_state = (
                generator_ema.state_dict() if isinstance(generator_ema, EMA) else generator_ema
            )
            payload["generator_ema"] = _prefixed(ema_state)
        payload["step"] = int(step)
        on_main(lambda: _write_file(tmp / MODEL_FILE, payload, final / MODEL_FILE))
        del payload

        # Stage 2: optimiser states, RNG states, the loop's state.
        resume: dict[str, Any] = {"format": RESUME_FORMAT, "step": int(step)}
        for key, model, optimizer in (
            ("generator_optimizer", generator, generator_optimizer),
            ("critic_optimizer", critic, critic_optimizer),
        ):
            if optimizer is not None:
                resume[key] = get_optimizer_state_dict(model, optimizer, options=_GATHER)
        resume["rng"] = _gather_rng()
        resume["world_size"] = current_world_size()
        resume["resume_state"] = resume_state
        on_main(lambda: _write_file(tmp / RESUME_FILE, resume, final / RESUME_FILE))
        del resume
        if rank_state is not None:
            _write_rank_file(tmp, final, dict(rank_state))
        on_main(lambda: _publish(tmp, final))
    except BaseException:
        if is_main_rank():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_rank_file(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Every rank writes its own rank_{r}.pt into the unpublished folder; the outcome is agreed
    on by all ranks before rank 0 publishes, so a failed write on any rank fails every rank."""
    rank = current_rank()
    name = RANK_FILE.format(rank=rank)
    error = ""
    try:
        _check_plain(state, "rank_state")
        _write_file(tmp / name, state, final / name)
    except (CheckpointError, TypeError) as err:
        error = str(err)
    failed = _first_error(error)
    if failed:
        raise CheckpointError(failed)


def _first_error(error: str) -> str:
    """The first non-empty error message of any rank ("" when every rank succeeded). Collective."""
    errors = [error]
    if is_distributed():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


def read_rank_state(checkpoint: PathLike) -> dict[str, Any] | None:
    """This rank's rank_{r}.pt of a checkpoint folder (or of the folder of its model.pt), or
    None when it has none."""
    folder = Path(checkpoint)
    if folder.name == MODEL_FILE:
        folder = folder.parent
    path = folder / RANK_FILE.format(rank=current_rank())
    if not path.is_file():
        return None
    data = _read(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} does not hold a rank state")
    return dict(data)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
@dataclass
class Resumed:
    """What a load restored. `resume_state` is the loop's dict ({} when the folder had no
    resume.pt, e.g. a base.pt or the reference's own checkpoint)."""

    path: Path
    step: int
    resume_state: dict[str, Any] = field(default_factory=dict)
    critic_loaded: bool = False
    ema_loaded: bool = False
    optimizers_loaded: tuple[str, ...] = ()
    rng_restored: bool = False
    rank_state: dict[str, Any] | None = None  # this rank's rank_{r}.pt (auto-resume only)


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6


def _read(path: Path, trust: bool = False) -> Any:
    """torch.load with mmap (rank 0 does not copy the file into memory twice), weights_only.

    A zip that does not load is a checkpoint cut short (a crash mid-write, a full disk, a
    partial copy): the message says so rather than repeating torch's internals ("mmap can only
    be used with ...", "[Errno 22] Invalid argument"). Anything else (an empty or legacy file,
    foreign pickled objects) goes to memflow's `read_checkpoint`, which names what it is."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        zipped = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    if not zipped:
        return read_checkpoint(path, trust=trust)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # foreign objects: memflow's guarded weights_only=False
        return read_checkpoint(path, trust=trust)
    except Exception:  # truncated, damaged
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a complete checkpoint (truncated or corrupt, "
            f"{path.stat().st_size} bytes)"
        ) from None


def _state_entry(data: Mapping[str, Any], entry: str, path: Path) -> dict[str, torch.Tensor]:
    value = data[entry]
    if not isinstance(value, Mapping) or not all(torch.is_tensor(v) for v in value.values()):
        raise CheckpointError(f"{path}: entry '{entry}' is not a state dict")
    return {plain_name(k).removeprefix(WRAPPER_PREFIX): v for k, v in value.items()}


@dataclass
class _Files:
    model_path: Path
    model: Mapping[str, Any]
    resume: Mapping[str, Any] | None


def _read_files(model_path: Path, trust: bool = False) -> _Files:
    """Read model.pt (and resume.pt beside it, if any); any read or layout problem raises
    CheckpointError naming the file. `trust`: see `memflow.checkpoint.read_checkpoint`."""
    data = _read(model_path, trust)
    if not isinstance(data, Mapping) or not ({"generator", "model", "generator_lora"} & set(data)):
        raise CheckpointError(f"{model_path} holds no 'generator', 'model' or 'generator_lora' entry")
    resume_path = model_path.parent / RESUME_FILE
    resume = None
    if resume_path.is_file():
        resume = _read(resume_path, trust)
        if not isinstance(resume, Mapping) or resume.get("format") != RESUME_FORMAT:
            raise CheckpointError(f"{resume_path} is not a resume file (format {RESUME_FORMAT})")
    return _Files(model_path, data, resume)


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under plain names; FSDP2 DTensors report their global shapes."""
    return {plain_name(k): v for k, v in model.state_dict().items()}


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                expected: Mapping[str, torch.Tensor] | None = None, hint: str = "") -> None:
    mismatch = Mismatch.between(_expected(model) if expected is None else expected, state)
    if mismatch:
        head, *details = mismatch.describe(source, hint).splitlines()
        raise CheckpointError(head + " " + "; ".join(d.strip() for d in details))


def _lora_entry(data: Mapping[str, Any], role: str, model: nn.Module,
                path: Path) -> dict[str, torch.Tensor]:
    """A model's LoRA tensors from a lora.pt entry, under the model's own state-dict keys,
    checked strictly against the adapter (a different rank is named as such)."""
    entry = LORA_ENTRIES[role]
    value = data[entry]
    if not isinstance(value, Mapping) or not all(torch.is_tensor(v) for v in value.values()):
        raise CheckpointError(f"{path}: entry '{entry}' is not a state dict")
    found = {PEFT_PREFIX + normalize_lora_key(k): v for k, v in value.items()}
    keys = _lora_keys(model)
    state = model.state_dict()
    expected = {ref: state[own] for ref, own in keys.items()}
    hint = ""
    ranks = sorted({v.shape[0] for k, v in found.items() if ".lora_A." in k and v.dim() == 2})
    rank = model.peft_config["default"].r
    if ranks and ranks != [rank]:
        hint = (f"LoRA rank mismatch: adapter.rank is {rank}, the file holds rank "
                f"{', '.join(map(str, ranks))}; set adapter.rank to match the file")
    _check_fits(model, found, f"{path} (entry '{entry}')", expected, hint)
    return {plain_name(keys[k]): v for k, v in found.items()}


def _fix_betas(optimizer: torch.optim.Optimizer) -> None:
    """set_optimizer_state_dict turns tuple hyper-parameters (Adam's betas) into lists; give
    them back their type, so the restored state dict equals the saved one."""
    for group in optimizer.param_groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])


def _check_model_entries(data: Mapping[str, Any], path: Path, generator: nn.Module,
                         critic: nn.Module | None, loaded: dict[str, Any]) -> None:
    """Rank 0: pick the generator's (and the critic's, when saved) entry of `data` into `loaded`,
    refusing a LoRA/plain mismatch with the config and weights that do not fit the models."""
    if is_lora(generator):
        if "generator_lora" not in data:
            raise CheckpointError(f"{path} holds no 'generator_lora' entry: not a LoRA "
                                  "checkpoint, but the config has an adapter")
        loaded["generator"] = _lora_entry(data, "generator", generator, path)
    else:
        if "generator_lora" in data and not ({"generator", "model"} & set(data)):
            raise CheckpointError(f"{path} is a LoRA checkpoint, but the config has no adapter")
        entry = "generator" if "generator" in data else "model"
        loaded["generator"] = _state_entry(data, entry, path)
        _check_fits(generator, loaded["generator"], f"{path} (entry '{entry}')")
    if critic is not None and is_lora(critic) and "critic_lora" in data:
        loaded["critic"] = _lora_entry(data, "critic", critic, path)
    elif critic is not None and not is_lora(critic) and "critic" in data:
        loaded["critic"] = _state_entry(data, "critic", path)
        _check_fits(critic, loaded["critic"], f"{path} (entry 'critic')")


def _load_ema_entry(ema: EMA | None, data: Mapping[str, Any], path: Path) -> bool:
    """Rank 0: load the saved EMA shadow (it lives on rank 0 only); whether there was one."""
    if ema is None or "generator_ema" not in data:
        return False
    try:
        ema.load_state_dict(_state_entry(data, "generator_ema", path), f"{path} (generator_ema)")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return True


def _pick_optimizer_states(resume: Mapping[str, Any] | None, path: Path, loaded: dict[str, Any],
                           optimizers: Mapping[str, torch.optim.Optimizer | None]) -> list[str]:
    """Rank 0: put each saved optimiser state into `loaded` (the critic's only with the critic's
    weights); the keys picked. An optimiser without a saved state starts fresh, with a warning."""
    picked = []
    for key, optimizer in optimizers.items():
        if optimizer is None:
            continue
        if resume is not None and key in resume:
            if key == "critic_optimizer" and "critic" not in loaded:
                continue
            loaded[key] = resume[key]
            picked.append(key)
        else:
            log.warning("%s: no %s state; that optimiser starts fresh", path.parent, key)
    return picked


def _saved_step(data: Mapping[str, Any], path: Path) -> int:
    """The step a checkpoint was saved at: its `step` entry, else the folder's number, else 0."""
    step = data.get("step")
    if isinstance(step, int):
        return step
    match = FOLDER_RE.fullmatch(path.parent.name)
    return int(match.group(1)) if match else 0


def _load_options(model: nn.Module, broadcast: bool) -> StateDictOptions:
    """Full state dicts from rank 0; a LoRA entry holds the adapter only (the base weights stay
    as they are), so a LoRA model loads non-strictly."""
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast,
                            strict=not is_lora(model))


def _restore_saved_rng(rng: list[Any] | None, path: str) -> bool:
    """Restore this rank's saved RNG state; False (with a warning) when there is none or it was
    saved with another number of ranks."""
    if rng is None:
        return False
    world = current_world_size()
    if len(rng) != world:
        log.warning("%s: saved with %d rank(s), resuming with %d; RNG states not restored",
                    path, len(rng), world)
        return False
    restore_rng_state(rng[current_rank()])
    return True


def _apply(
    files: _Files | None,
    *,
    generator: nn.Module,
    critic: nn.Module | None,
    generator_optimizer: torch.optim.Optimizer | None,
    critic_optimizer: torch.optim.Optimizer | None,
    ema: EMA | None,
    restore_rng: bool,
) -> Resumed:
    """Load `files` (read on rank 0; None elsewhere) into the modules. Collective: rank 0 checks
    everything before any rank starts a collective load, so a bad file fails on every rank."""
    loaded: dict[str, Any] = {}
    optimizers = {"generator_optimizer": generator_optimizer, "critic_optimizer": critic_optimizer}

    def check() -> dict[str, Any]:
        """Rank 0: validate against the models, load the EMA, return the facts every rank needs."""
        assert files is not None
        path, data, resume = files.model_path, files.model, files.resume
        _check_model_entries(data, path, generator, critic, loaded)
        return {
            "path": str(path),
            "step": _saved_step(data, path),
            "critic": "critic" in loaded,
            "ema": _load_ema_entry(ema, data, path),
            "optimizers": tuple(_pick_optimizer_states(resume, path, loaded, optimizers)),
            "rng": resume.get("rng") if resume is not None and restore_rng else None,
            "resume_state": dict(resume.get("resume_state") or {}) if resume is not None else {},
        }

    facts = on_main(check)
    broadcast = is_distributed()
    loaded_models = [generator, critic] if facts["critic"] else [generator]
    for model, key in zip(loaded_models, ("generator", "critic")):
        set_model_state_dict(model, loaded.get(key, {}), options=_load_options(model, broadcast))
    # the optimisers load with the options of the last model loaded
    options = _load_options(loaded_models[-1], broadcast)
    owners = {"generator_optimizer": generator, "critic_optimizer": critic}
    for key in facts["optimizers"]:
        set_optimizer_state_dict(owners[key], optimizers[key], loaded.get(key, {}), options=options)
        _fix_betas(optimizers[key])
    loaded.clear()
    return Resumed(
        path=Path(facts["path"]),
        step=facts["step"],
        resume_state=facts["resume_state"],
        critic_loaded=facts["critic"],
        ema_loaded=facts["ema"],
        optimizers_loaded=facts["optimizers"],
        rng_restored=_restore_saved_rng(facts["rng"], facts["path"]),
    )


def load_checkpoint(
    logdir: PathLike,
    *,
    generator: nn.Module,
    critic: nn.Module | None = None,
    generator_optimizer: torch.optim.Optimizer | None = None,
    critic_optimizer: torch.optim.Optimizer | None = None,
    ema: EMA | None = None,
    restore_rng: bool = True,
) -> Resumed | None:
    """Auto-resume from the newest readable checkpoint folder in `logdir` (collective).

    Restores the generator and critic (strict, FSDP2-aware), the EMA (when given and saved), the
    optimiser states (when given and saved), each rank's RNG states (same world size only) and
    returns the step, the loop's resume_state and this rank's rank_{r}.pt. A folder whose
    model.pt, resume.pt or any rank's rank_{r}.pt does not read is skipped with a one-line
    warning naming the file. Returns None when `logdir` has no checkpoint; raises
    CheckpointError when it has some but none reads (saying how to start over), or when the
    newest readable one does not fit the models.
    """
    logdir = Path(logdir)
    found = on_main(lambda: [str(c.path) for c in list_checkpoints(logdir)])
    box: dict[str, Any] = {}
    for i in range(len(found) - 1, -1, -1):
        error = _read_folder(Path(found[i]), box)
        if not error:
            break
        box.clear()
        if is_main_rank():
            nxt = f"falling back to {Path(found[i - 1]).name}" if i else "no older checkpoint"
            log.warning("skipping unreadable checkpoint: %s; %s", error, nxt)
    else:
        if found:
            raise CheckpointError(
                f"no readable checkpoint among the {len(found)} in {logdir}; to start over, "
                "pass --no-auto-resume (auto_resume=false) or use another --logdir"
            )
        return None
    resumed = _apply(box.get("files"), generator=generator, critic=critic,
                     generator_optimizer=generator_optimizer, critic_optimizer=critic_optimizer,
                     ema=ema, restore_rng=restore_rng)
    resumed.rank_state = box.get("rank_state")
    return resumed


def _read_folder(folder: Path, box: dict[str, Any]) -> str:
    """Read a checkpoint folder into `box` (rank 0: "files"; every rank: its "rank_state");
    the first error of any rank, or "" when everything read. Collective."""

    def read_main() -> str:
        try:
            box["files"] = _read_files(folder / MODEL_FILE)
        except CheckpointError as err:
            return str(err)
        return ""

    error = on_main(read_main)
    if error:
        return error
    mine = ""
    try:
        box["rank_state"] = read_rank_state(folder)
    except CheckpointError as err:
        mine = str(err)
    return _first_error(mine)


def load_checkpoint_file(
    path: PathLike,
    *,
    generator: nn.Module,
    critic: nn.Module | None = None,
    generator_optimizer: torch.optim.Optimizer | None = None,
    critic_optimizer: torch.optim.Optimizer | None = None,
    ema: EMA | None = None,
    restore_rng: bool = False,
    trust: bool = False,
) -> Resumed:
    """Load one file: a checkpoint folder's model.pt (with its resume.pt, if any), a base.pt or
    the generator_ckpt (e.g. ode_init.pt: "generator" or "model", critic/EMA/step if present),
    as §8.4 does when there is nothing to auto-resume from. Collective; no fallback. `trust`
    (config key `trust_checkpoints`): load a file that holds pickled objects, which runs their
    code (a run's own checkpoints never need it)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    # An unreadable file must raise on every rank: rank 0 reads, the others learn the outcome.
    box: dict[str, _Files] = {}

    def read() -> None:
        box["files"] = _read_files(path, trust)

    on_main(read)
    return _apply(box.get("files"), generator=generator, critic=critic,
                  generator_optimizer=generator_optimizer, critic_optimizer=critic_optimizer,
                  ema=ema, restore_rng=restore_rng)
