#!/usr/bin/env bash
# Interactive multi-prompt generation: inference.sh with configs/interactive_inference.yaml as
# the default config (a later --config_path wins). NUM_GPUS and extra arguments as there
# (MEMFLOW_SCRIPT names this script in inference.sh's usage line).
#   bash interactive_inference.sh
#   bash interactive_inference.sh --config_path configs/tiny_interactive.yaml  # CPU, no downloads
set -euo pipefail
MEMFLOW_SCRIPT=interactive_inference.sh exec bash "$(dirname "$0")/inference.sh" --config_path configs/interactive_inference.yaml "$@"
