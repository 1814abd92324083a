#!/usr/bin/env bash
# Live interactive generation in the browser: serve.py (FastAPI + uvicorn) with
# configs/interactive_inference.yaml as the default config (a --config_path wins). PYTHON
# (default python3) is the interpreter (see utils/launch.sh); the server runs one process on one
# device, so NUM_GPUS must be 1. Other arguments go to serve.py (--host, --port, --token,
# key=value overrides). It prints the URL to open.
#   bash serve.sh --config_path configs/tiny_interactive.yaml   # CPU, tiny random models
#   bash serve.sh --host 0.0.0.0 --token "$(openssl rand -hex 16)"
set -euo pipefail
cd "$(dirname "$0")"
source utils/launch.sh
if [[ "${NUM_GPUS:-1}" != 1 ]]; then
  echo "error: the live server runs one process on one device; got NUM_GPUS=${NUM_GPUS}" \
    "(start one server per GPU, each with its own --port and device=cuda:N)" >&2
  exit 2
fi
memflow_run serve.py configs/interactive_inference.yaml \
  "bash serve.sh [--config_path FILE.yaml] [serve.py options] [key=value ...]" "$@"
