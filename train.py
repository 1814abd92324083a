"""Train MemFlow: stage 1, Self-Forcing DMD distillation with the memory bank.

    python train.py --config_path configs/tiny_train_init.yaml --logdir logs/tiny
    torchrun --nproc_per_node=8 train.py --config_path configs/train_init.yaml --logdir logs/train_init

`configs/default_config.yaml` is merged under the given config; `key=value` arguments override
any key (unknown keys are rejected with a suggestion). With --logdir, checkpoints go to
logdir/checkpoint_model_<step>/ and a run resumes from the newest one (--no-auto-resume to start
over). Bad input ends with one `error:` line and exit status 2; a failure during training keeps
its traceback and exits non-zero.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from pipeline.build import resolve_device
from trainer.config import CliFlags, TrainSettings, add_train_arguments, load_train_config
from utils.distributed import cleanup_distributed, init_distributed
from utils.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_train_config(args.config_path, args.overrides, CliFlags.from_args(args))
        settings = TrainSettings.from_config(cfg)
        if settings.stage != 1:
            raise InputError("config key `distribution_loss`: only stage 1 (dmd) is implemented")
        info = init_distributed()
        try:
            device = resolve_device(cfg, info.local_rank)
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            from trainer.loop import Stage1Trainer

            trainer = Stage1Trainer(settings, device,
                                    config_for_logging=OmegaConf.to_container(cfg, resolve=True))
            trainer.run()
        finally:
            if dist.is_initialized():
                dist.barrier()
            cleanup_distributed()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
