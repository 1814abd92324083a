#!/usr/bin/env bash
# The whole GPU check in one command (benchmarks/gpu_check.py): speed, first-chunk latency,
# compile time and peak VRAM per memory mode, execution and attention backend at the real
# Wan2.1-1.3B shape with random weights, and CUDA-vs-CPU agreement. No downloads; under 8 min.
#   bash benchmarks/gpu_check.sh             # on a machine with one NVIDIA GPU
#   bash benchmarks/gpu_check.sh --dry-run   # the same code on a CPU, tiny shapes (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
