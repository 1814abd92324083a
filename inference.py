"""Generate videos from a prompt file: single-prompt or interactive (multi-prompt) mode.

    python inference.py --config_path configs/inference.yaml [key=value ...]
    torchrun --nproc_per_node=2 inference.py --config_path configs/interactive_inference.yaml

The mode is `mode: single | interactive` in the config (a config with `switch_frame_indices` and
no `mode` is interactive). Any config key can be overridden with OmegaConf dot-list arguments,
e.g. `num_output_frames=60 model_kwargs.bank_size=2 behaviour=compat`.

Exit status (each failure ends with one `error:` line on stderr):
  0    every video was written (or skipped with skip_existing)
  1    some video was not written (NaN/inf output; the others were), the disk refused a video
       (`cannot write video <file>: No space left on device`; the run stops there, nothing
       half-written is left), or an unexpected error (with its traceback)
  2    bad input: config, prompt file, checkpoint, output folder; found before generating
  130  interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM). Unfinished videos are removed.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from config.inference import load_inference_config
from memflow.errors import InputError
from pipeline.runner import run
from utils.distributed import cleanup_distributed, init_distributed
from utils.signals import Terminated, sigterm_raises
from utils.video_writer import VideoWriteError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_raises():
            cfg = load_inference_config(args.config_path, args.overrides)
            dist = init_distributed()
            try:
                result = run(cfg, dist)
            finally:
                cleanup_distributed()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Terminated as stop:
        print(f"error: {stop}; unfinished videos were removed", file=sys.stderr)
        return stop.exit_status
    except VideoWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT); unfinished videos were removed", file=sys.stderr)
        return 128 + signal.SIGINT
    for path in result.written:
        print(path)
    if result.failed:
        print(f"error: {len(result.failed)} video(s) not written: {'; '.join(result.failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
