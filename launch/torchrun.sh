#!/usr/bin/env bash
# One node, N processes:  launch/torchrun.sh [--max-restarts N] NPROC RECIPE.yaml [key=value ...]
# GPUs: one process per GPU (nccl). CPU: gloo; OMP threads split between the processes.
# Restart-safe: a c10d rendezvous on RDZV_HOST:RDZV_PORT (default 127.0.0.1 and a free port) that a new
# round of workers can join again (--standalone's does not: restarted gloo workers hang), and
# --max-restarts (or MAX_RESTARTS; default 0): when a worker dies, torchrun stops the others and starts
# them all again; they resume from the newest checkpoint (train.resume: auto). parallel.timeout_s turns
# a collective stuck on a dead rank into an error, so the restart happens.
set -euo pipefail
MAX_RESTARTS=${MAX_RESTARTS:-0}
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --max-restarts) MAX_RESTARTS=${2:?--max-restarts needs a number}; shift 2 ;;
    --max-restarts=*) MAX_RESTARTS=${1#*=}; shift ;;
    *) echo "launch/torchrun.sh: unknown option $1 (known: --max-restarts N)" >&2; exit 2 ;;
  esac
done
USAGE="usage: launch/torchrun.sh [--max-restarts N] NPROC RECIPE.yaml [key=value ...]"
NPROC=${1:?$USAGE}
RECIPE=${2:?$USAGE}
shift 2
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
PYTHON=$(command -v python3 || command -v python)
RDZV_HOST=${RDZV_HOST:-127.0.0.1}
RDZV_PORT=${RDZV_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
exec torchrun --nnodes=1 --nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="${RDZV_ID:-foundation-$$}" \
  -m foundation.cli train "$RECIPE" "$@"
