#!/usr/bin/env bash
# Stage-2 training (LoRA streaming long tuning with prompt switches), from a stage-1 base.pt.
# NUM_GPUS (default 1) processes, PYTHON (default python3) interpreter (see utils/launch.sh);
# extra arguments go to train.py (a different --config_path, --logdir, --no_save,
# --no-auto-resume, key=value overrides).
#   bash train_long.sh                                                 # configs/train_long.yaml
#   NUM_GPUS=8 bash train_long.sh generator_ckpt=checkpoints/base.pt
#   bash train_long.sh --config_path configs/tiny_train_long.yaml      # tiny random models, CPU
set -euo pipefail
cd "$(dirname "$0")"
source utils/launch.sh
memflow_train configs/train_long.yaml logs/train_long "$@"
