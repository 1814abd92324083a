"""Writing a training checkpoint folder, collectively: FSDP2 gathers full state dicts to rank 0,
which writes `model.pt` and `resume.pt` into a hidden temporary folder and publishes it by a
rename; every rank writes its own `rank_{r}.pt`; rank 0's success or failure reaches every rank
(layout and reasons: `trainer.checkpoint_files`)."""
from __future__ import annotations

import errno
import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from memflow.checkpoint import WRAPPER_PREFIX, CheckpointError
from utils.distributed import current_rank, current_world_size, is_main_rank, on_main
from utils.signals import check_terminated

from .checkpoint_files import (
    LORA_ENTRIES,
    MODEL_FILE,
    RANK_FILE,
    RESUME_FILE,
    RESUME_FORMAT,
    PathLike,
    RunModules,
    checkpoint_dir,
    first_error,
    is_lora,
    lora_keys,
    make_temp_folder,
    publish_folder,
)
from .ema import plain_name
from .rng_state import gather_rng_states

log = logging.getLogger(__name__)

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _first_line(err: BaseException) -> str:
    """The gist of an error on one line (torch's corrupt-zip message runs on for five sentences)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line.split(". ")[0] if len(line) > 160 else line


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


def _model_payload(role: str, model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """(entry, full state dict) of one model as model.pt stores it: its LoRA tensors under the
    reference's lora.pt names, or every tensor under the wrapper's `model.` names. Collective."""
    full = get_model_state_dict(model, options=_GATHER)
    if is_lora(model):
        names = {own: ref for ref, own in lora_keys(model).items()}
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
        # SIGTERM raised inside torch.save's writer comes out as its "unexpected pos" error:
        # it is a stop (exit 143, resume from the previous checkpoint), not a write failure
        check_terminated()
        reason = _write_failure(err, path.parent)
        if reason is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {shown}: {reason}") from None


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


def save_checkpoint(
    logdir: PathLike,
    step: int,
    modules: RunModules,
    *,
    resume_state: Mapping[str, Any] | None = None,
    rank_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write logdir/checkpoint_model_{step:06d}/{model.pt, resume.pt} (layout: module docstring).
    `rank_state` (every rank's own, same rules as resume_state) goes to rank_{r}.pt.

    Collective: every rank calls it with its own `modules` (a critic included); rank 0 writes.
    Returns the folder's path on every rank. `resume_state` is saved as given (rank 0's), e.g. the data
    loader's position; it may hold only tensors, numbers, strings, None and containers of them.
    Raises CheckpointError (an InputError: one line, naming the path) when the disk refuses.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if modules.critic is None:
        raise ValueError("a training checkpoint holds the critic too: RunModules.critic is None")
    generator, critic = modules.generator, modules.critic
    generator_optimizer, critic_optimizer = modules.generator_optimizer, modules.critic_optimizer
    resume_state = dict(resume_state or {})
    on_main(lambda: _check_plain(resume_state, "resume_state"))  # only rank 0's is saved
    logdir = Path(logdir)
    final = checkpoint_dir(logdir, step)
    tmp = Path(on_main(lambda: make_temp_folder(logdir, final)))
    try:
        # Stage 1: weights (gathered, written, freed before the optimiser states are gathered,
        # so rank 0 never holds both at once).
        payload: dict[str, Any] = dict(
            _model_payload(role, model) for role, model in (("generator", generator),
                                                             ("critic", critic))
        )
        if modules.ema is not None:
            payload["generator_ema"] = _prefixed(modules.ema.state_dict())
        payload["step"] = int(step)
        on_main(partial(_write_file, tmp / MODEL_FILE, payload, final / MODEL_FILE))
        del payload

        # Stage 2: optimiser states, RNG states, the loop's state.
        resume: dict[str, Any] = {"format": RESUME_FORMAT, "step": int(step)}
        for key, model, optimizer in (
            ("generator_optimizer", generator, generator_optimizer),
            ("critic_optimizer", critic, critic_optimizer),
        ):
            if optimizer is not None:
                resume[key] = get_optimizer_state_dict(model, optimizer, options=_GATHER)
        resume["rng"] = gather_rng_states()
        resume["world_size"] = current_world_size()
        resume["resume_state"] = resume_state
        on_main(partial(_write_file, tmp / RESUME_FILE, resume, final / RESUME_FILE))
        del resume
        if rank_state is not None:
            _write_rank_file(tmp, final, dict(rank_state))
        on_main(lambda: publish_folder(tmp, final))
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
    failed = first_error(error)
    if failed:
        raise CheckpointError(failed)
