"""Train MemFlow: stage 1 (Self-Forcing DMD distillation with the memory bank) or stage 2
(LoRA streaming long tuning with prompt switches), chosen by the config's distribution_loss.

    python train.py --config_path configs/tiny_train_init.yaml --logdir logs/tiny
    torchrun --nproc_per_node=8 train.py --config_path configs/train_init.yaml --logdir logs/train_init
    torchrun --nproc_per_node=8 train.py --config_path configs/train_long.yaml --logdir logs/train_long

`configs/default_config.yaml` is merged under the given config; `key=value` arguments override
any key (unknown keys are rejected with a suggestion). With --logdir, checkpoints go to
logdir/checkpoint_model_<step>/ and a run resumes from the newest one (--no-auto-resume to start
over). Bad input ends with one `error:` line and exit status 2; a failure during training keeps
its traceback and exits non-zero.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from memflow.errors import InputError
from trainer.checkpoint_files import saved_run_seed
from trainer.config import CliFlags, TrainSettings, add_train_arguments, load_train_config
from utils.distributed import (
    barrier,
    cleanup_distributed,
    init_distributed,
    is_distributed,
    is_main_rank,
    pick_device,
)
from utils.signals import Terminated, sigterm_raises
from utils.video_writer import removed_if_left_empty

log = logging.getLogger("train")


def _single_process_group(device: torch.device) -> None:
    """FSDP2 mixed precision needs a process group, also for one GPU without torchrun."""
    if is_distributed():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _run_seed(settings: TrainSettings, device: torch.device) -> int:
    """seed 0 means a random seed drawn on rank 0 and shared with every rank (TRAINING.md §7.3:
    the reference draws one per run); a run that resumes takes the seed its checkpoint was
    trained with, so that it goes on exactly as an uninterrupted run would."""
    if settings.seed != 0:
        return settings.seed
    saved = None
    if settings.config.auto_resume and settings.logdir is not None and is_main_rank():
        saved = saved_run_seed(settings.logdir)
    value = torch.tensor([saved if saved is not None else 0], dtype=torch.int64)
    if saved is None and is_main_rank():
        value = torch.randint(1, 10**7, (1,), dtype=torch.int64)
    if is_distributed():
        value = value.to(device)
        dist.broadcast(value, src=0)
    return int(value.item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_raises():
            return _train(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Terminated as stop:  # scheduler / timeout / torchrun: no half-written checkpoint
        print(f"error: {stop}; the run resumes from its newest checkpoint", file=sys.stderr)
        return stop.exit_status


def _train(args: argparse.Namespace) -> int:
    """Load and check the config, set up the process group, train (one `error:` line for bad
    input is raised as InputError)."""
    cfg = load_train_config(args.config_path, args.overrides, CliFlags.from_args(args))
    settings = TrainSettings.from_config(cfg)
    info = init_distributed()
    try:
        device = pick_device(settings.config.device, info.local_rank)
        if settings.config.mixed_precision:
            if device.type != "cuda":
                raise InputError("config key `mixed_precision`: bf16 training needs a GPU; "
                                 "set mixed_precision=false on a CPU")
            _single_process_group(device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        settings = dataclasses.replace(settings, seed=_run_seed(settings, device))
        if info.is_main:
            log.info("seed %d", settings.seed)
        from trainer.long_tuning import Stage2Trainer
        from trainer.loop import DistillationTrainer

        trainer_class = Stage2Trainer if settings.stage == 2 else DistillationTrainer
        # a run refused after making its logdir (a checkpoint that does not fit) leaves none
        with removed_if_left_empty(settings.logdir if info.is_main else None):
            trainer = trainer_class(settings, device,
                                    config_for_logging=OmegaConf.to_container(cfg, resolve=True))
            trainer.run()
    finally:
        barrier()
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
