#!/usr/bin/env bash
# Stage-1 training (Self-Forcing DMD with the memory bank). NUM_GPUS (default 1) processes,
# PYTHON (default python3) interpreter (see utils/launch.sh); extra arguments go to train.py (a different --config_path, --logdir, --no_save,
# --no-auto-resume, key=value overrides).
#   bash train_init.sh --logdir logs/train_init                        # configs/train_init.yaml
#   bash train_init.sh --config_path configs/tiny_train_init.yaml      # tiny random models, CPU
set -euo pipefail
cd "$(dirname "$0")"
source utils/launch.sh
config=configs/train_init.yaml
logdir=logs/train_init
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config_path) config="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ "$config" != configs/train_init.yaml && "$logdir" == logs/train_init ]]; then
  logdir="logs/$(basename "$config" .yaml)"
fi
memflow_launch train.py --config_path "$config" --logdir "$logdir" "${args[@]+"${args[@]}"}"
