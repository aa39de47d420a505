#!/usr/bin/env bash
# One node, N processes:  launch/torchrun.sh NPROC RECIPE.yaml [key=value ...]
# GPUs: one process per GPU (nccl). CPU: gloo; OMP threads split between the processes.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC RECIPE.yaml [key=value ...]}
RECIPE=${2:?usage: launch/torchrun.sh NPROC RECIPE.yaml [key=value ...]}
shift 2
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" -m foundation.cli train "$RECIPE" "$@"
