# Shared launcher code, sourced by inference.sh, serve.sh, train_init.sh, train_long.sh (and any
# new launcher); inference launchers use memflow_run, training launchers memflow_train (below):
#
#   source "$(dirname "$0")/utils/launch.sh"
#   memflow_run inference.py configs/inference.yaml "bash inference.sh [...]" "$@"
#
# memflow_launch runs a Python entry point of this project in NUM_GPUS processes (default 1):
# * with the interpreter in $PYTHON, else `python3` from PATH: torchrun is started as
#   `python -m torch.distributed.run` by that same interpreter, so a venv whose python3 is
#   found works without being activated;
# * one process runs the script directly, without torchrun's elastic agent: the script's own
#   `error:` line and exit status (2 for bad input, 143 for SIGTERM) reach the caller unchanged,
#   and a signal reaches the script itself (`exec`);
# * several processes run under torchrun --standalone; torchrun forwards SIGTERM to every rank,
#   and when a rank fails it adds its own summary and exits with status 1.
# A bad NUM_GPUS or a missing interpreter ends with one `error:` line and status 2.

# memflow_need_value USAGE OPTION [NEXT...]: in a launcher's argument loop, before reading an
# option's value ("$2"): an option given last, or followed by another --option, ends with one
# `error:` line showing USAGE and status 2 (under `set -u` "$2" would be an unbound variable).
memflow_need_value() {
  local usage="$1"
  shift
  if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
    echo "error: $1 needs a value; usage: ${usage}" >&2
    exit 2
  fi
}

# memflow_run SCRIPT DEFAULT_CONFIG USAGE [ARGS...]: SCRIPT (a Python entry point) with
# --config_path (default DEFAULT_CONFIG; the last one given wins); every other argument goes to
# SCRIPT unchanged. USAGE is the line a bad --config_path shows.
memflow_run() {
  local script="$1" config="$2" usage="$3"
  shift 3
  local args=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --config_path) memflow_need_value "$usage" "$@"; config="$2"; shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  memflow_launch "$script" --config_path "$config" "${args[@]+"${args[@]}"}"
}

memflow_launch() {
  local python="${PYTHON:-python3}"
  local gpus="${NUM_GPUS:-1}"
  if [[ ! "$gpus" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NUM_GPUS must be a whole number of processes >= 1, got '${gpus}'" >&2
    exit 2
  fi
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: Python interpreter '${python}' not found; set PYTHON to the one with this" \
      "project's packages (e.g. PYTHON=.venv/bin/python)" >&2
    exit 2
  fi
  if [[ "$gpus" == 1 ]]; then
    exec "$python" "$@"
  fi
  exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$gpus" "$@"
}

# memflow_train DEFAULT_CONFIG DEFAULT_LOGDIR [ARGS...]: train.py with --config_path (default
# DEFAULT_CONFIG) and --logdir (default DEFAULT_LOGDIR, or logs/<config name> for another
# config); every other argument goes to train.py unchanged.
memflow_train() {
  local default_config="$1" default_logdir="$2"
  shift 2
  local config="$default_config" logdir="$default_logdir"
  local args=()
  local usage="bash $(basename "$0") [--config_path FILE.yaml] [--logdir DIR] [train.py options] [key=value ...]"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --config_path) memflow_need_value "$usage" "$@"; config="$2"; shift 2 ;;
      --logdir) memflow_need_value "$usage" "$@"; logdir="$2"; shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  if [[ "$config" != "$default_config" && "$logdir" == "$default_logdir" ]]; then
    logdir="logs/$(basename "$config" .yaml)"
  fi
  memflow_launch train.py --config_path "$config" --logdir "$logdir" "${args[@]+"${args[@]}"}"
}
