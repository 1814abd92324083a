#!/usr/bin/env bash
# Interactive multi-prompt generation. NUM_GPUS (default 1) processes under torchrun; extra arguments are
# passed to inference.py (a different --config_path, or key=value overrides).
#   bash interactive_inference.sh                                  # configs/interactive_inference.yaml
#   bash interactive_inference.sh --config_path configs/tiny_interactive.yaml  # tiny random models, CPU, no downloads
set -euo pipefail
cd "$(dirname "$0")"
config=configs/interactive_inference.yaml
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config_path) config="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
exec torchrun --standalone --nproc_per_node="${NUM_GPUS:-1}" \
  inference.py --config_path "$config" "${args[@]+"${args[@]}"}"
