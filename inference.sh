#!/usr/bin/env bash
# Single-prompt generation. NUM_GPUS (default 1) processes, PYTHON (default python3) interpreter
# (see utils/launch.sh); extra arguments are passed to inference.py (a different --config_path,
# or key=value overrides). Exit status: inference.py's (0 ok, 1 a video failed, 2 bad input,
# 143 SIGTERM).
#   bash inference.sh                                  # configs/inference.yaml
#   bash inference.sh --config_path configs/tiny.yaml  # tiny random models, CPU, no downloads
set -euo pipefail
cd "$(dirname "$0")"
source utils/launch.sh
memflow_run inference.py configs/inference.yaml \
  "bash ${MEMFLOW_SCRIPT:-inference.sh} [--config_path FILE.yaml] [key=value ...]" "$@"
