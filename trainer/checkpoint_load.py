"""Resuming from training checkpoints: the newest folder that reads is loaded into the models,
optimisers, EMA and random generators of every rank (rank 0 reads, FSDP2 broadcasts); an
unreadable one is reported and the previous one tried; one that does not fit the model is a
configuration error (layout and reasons: `trainer.checkpoint_files`)."""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from memflow.checkpoint import WRAPPER_PREFIX, CheckpointError, Mismatch, read_checkpoint
from memflow.lora import PEFT_PREFIX, normalize_lora_key
from utils.distributed import current_rank, is_distributed, is_main_rank, on_main

from .checkpoint_files import (
    FOLDER_RE,
    LORA_ENTRIES,
    MODEL_FILE,
    RANK_FILE,
    RESUME_FILE,
    RESUME_FORMAT,
    PathLike,
    RunModules,
    first_error,
    is_lora,
    list_checkpoints,
    lora_keys,
)
from .ema import EMA, plain_name
from .rng_state import restore_saved_rng

log = logging.getLogger(__name__)


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
    keys = lora_keys(model)
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


def _apply(files: _Files | None, modules: RunModules, restore_rng: bool) -> Resumed:
    """Load `files` (read on rank 0; None elsewhere) into the modules. Collective: rank 0 checks
    everything before any rank starts a collective load, so a bad file fails on every rank."""
    generator, critic, ema = modules.generator, modules.critic, modules.ema
    loaded: dict[str, Any] = {}
    optimizers = {"generator_optimizer": modules.generator_optimizer,
                  "critic_optimizer": modules.critic_optimizer}

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
        rng_restored=restore_saved_rng(facts["rng"], facts["path"]),
    )


def load_checkpoint(
    logdir: PathLike, modules: RunModules, *, restore_rng: bool = True
) -> Resumed | None:
    """Auto-resume `modules` from the newest readable checkpoint folder in `logdir` (collective).

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
    resumed = _apply(box.get("files"), modules, restore_rng)
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
    return first_error(mine)


def load_checkpoint_file(
    path: PathLike, modules: RunModules, *, restore_rng: bool = False, trust: bool = False
) -> Resumed:
    """Load one file into `modules`: a checkpoint folder's model.pt (with its resume.pt, if any), a base.pt or
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
    return _apply(box.get("files"), modules, restore_rng)
