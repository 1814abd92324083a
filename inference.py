"""Generate videos from a prompt file: single-prompt or interactive (multi-prompt) mode.

    python inference.py --config_path configs/inference.yaml [key=value ...]
    torchrun --nproc_per_node=2 inference.py --config_path configs/interactive_inference.yaml

The mode is `mode: single | interactive` in the config (a config with `switch_frame_indices` and
no `mode` is interactive). Any config key can be overridden with OmegaConf dot-list arguments,
e.g. `num_output_frames=60 model_kwargs.bank_size=2 behaviour=compat`.
Bad input (missing files, malformed prompts, impossible settings) ends with one `error:` line
and exit status 2, before any model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.runner import run
from utils.config import load_config
from utils.distributed import cleanup_distributed, init_distributed
from utils.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config_path, args.overrides)
        dist = init_distributed()
        try:
            written = run(cfg, dist)
        finally:
            cleanup_distributed()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
