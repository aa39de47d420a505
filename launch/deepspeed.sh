#!/usr/bin/env bash
# DeepSpeed's launcher:  launch/deepspeed.sh NPROC RECIPE.yaml [ZERO_STAGE] [key=value ...]
#   ZERO_STAGE 1|2|3 picks launch/ds_configs/zero$ZERO_STAGE.json (default 2).
# Several nodes: write a hostfile and set HOSTFILE=path (see docs/distributed.md).
# On CPU: DS_ACCELERATOR=cpu, gloo, a torch AdamW client optimizer (no op compile).
# No restarts after a dead worker with this launcher: for those run DeepSpeed under launch/torchrun.sh
# --max-restarts N ... parallel.backend=deepspeed (docs/distributed.md).
set -euo pipefail
NPROC=${1:?usage: launch/deepspeed.sh NPROC RECIPE.yaml [ZERO_STAGE] [key=value ...]}
RECIPE=${2:?usage: launch/deepspeed.sh NPROC RECIPE.yaml [ZERO_STAGE] [key=value ...]}
shift 2
STAGE=2
if [[ $# -gt 0 && $1 =~ ^[0-3]$ ]]; then STAGE=$1; shift; fi
HERE=$(cd "$(dirname "$0")" && pwd)
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HERE/../.cache/torch_extensions}
HOSTS=()
if [[ -n ${HOSTFILE:-} ]]; then HOSTS=(--hostfile "$HOSTFILE"); else HOSTS=(--num_gpus "$NPROC"); fi
if [[ ${DS_ACCELERATOR:-} == cpu ]]; then HOSTS=(--num_gpus "$NPROC"); fi
exec deepspeed "${HOSTS[@]}" --no_local_rank --module foundation.cli train "$RECIPE" \
  parallel.backend=deepspeed parallel.deepspeed_config="$HERE/ds_configs/zero$STAGE.json" "$@"
