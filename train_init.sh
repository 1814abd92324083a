#!/usr/bin/env bash
# Stage-1 training (Self-Forcing DMD with the memory bank). NUM_GPUS (default 1) processes,
# PYTHON (default python3) interpreter (see utils/launch.sh); extra arguments go to train.py (a different --config_path, --logdir, --no_save,
# --no-auto-resume, key=value overrides).
#   bash train_init.sh --logdir logs/train_init                        # configs/train_init.yaml
#   bash train_init.sh --config_path configs/tiny_train_init.yaml      # tiny random models, CPU
set -euo pipefail
cd "$(dirname "$0")"
source utils/launch.sh
memflow_train configs/train_init.yaml logs/train_init "$@"
