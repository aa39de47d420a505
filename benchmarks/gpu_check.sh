#!/usr/bin/env bash
# The CUDA check, in one short run on a lent GPU machine (CI has no GPU; everything here also has CPU
# tests). Each step runs under its own timeout and the script goes on after a failure, so one broken
# step still leaves the others' figures. Everything is appended to OUT_DIR/gpu_check.log; the reports
# (train summaries, quantization table, robustness/SysNoise reports, benchmark JSON lines) are copied
# next to it.
#
#   benchmarks/gpu_check.sh OUT_DIR [FASHION_MNIST_IDX_DIR]
#
# Environment: PYTHON (default python3; the package must be importable, e.g. PYTHONPATH=$PWD),
# DEVICE (default cuda; `DEVICE=cpu STEPS=20` dry-runs the script on a laptop), STEPS (training steps,
# default 300), STEP_TIMEOUT (seconds per step, default 240), SKIP (space-separated step names), NGPU (GPUs
# the DDP/FSDP2 MFU steps use, default 1).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [FASHION_MNIST_IDX_DIR]}
SRC=${2:-}
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
STEPS=${STEPS:-300}
SKIP=" ${SKIP:-} "
WORK=${WORK:-$(mktemp -d)}
LOG=$OUT/gpu_check.log
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
F=("$PY" -m foundation.cli)
DATA=$WORK/fmnist/manifest.json
RUN=$WORK/runs/resnet18_fmnist_bf16

step() {  # step NAME CMD...: run CMD under a timeout, log it, print rc and seconds
  local name=$1; shift
  if [[ $SKIP == *" $name "* ]]; then echo "== $name: skipped" | tee -a "$LOG"; return; fi
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-240}" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

step env "$PY" -c "import torch, timm, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'ort', ort.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
step data "${F[@]}" data fashion-mnist --out "$WORK/fmnist" --captions ${SRC:+--src "$SRC"}

# The training loop on the device: fp32 vs bf16 autocast (samples/s in each summary.json).
TRAIN=(recipes/classification/resnet18_fmnist.yaml "output_dir=$WORK/runs" "data.train=$DATA" "data.val=$DATA"
       "train.device=$DEV" "train.steps=$STEPS" data.workers=6 logging.wandb=disabled)
step train_fp32 "${F[@]}" train "${TRAIN[@]}" name=resnet18_fmnist_fp32 train.precision=fp32
step train_bf16 "${F[@]}" train "${TRAIN[@]}" name=resnet18_fmnist_bf16 train.precision=bf16
# The process-group path (nccl on a GPU) through torchrun, one rank, DDP forced.
step torchrun_ddp "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m foundation.cli train \
  "${TRAIN[@]}" name=resnet18_fmnist_ddp parallel.backend=ddp train.precision=bf16 train.steps=$((STEPS / 3))

# Quantization on the device: W4A4 for the four methods (short reconstruction), W8A8 RTN + onnxruntime.
Q=(--checkpoint "$RUN" --data "$DATA" --val "$DATA" --val-images 2000 --calib-images 256 --device "$DEV"
   --out "$WORK/quant")
step quant_w4a4 "${F[@]}" quantize "${Q[@]}" --method rtn,adaround,brecq,qdrop --wbits 4 --abits 4 --iters 300
step quant_w8a8_onnx "${F[@]}" quantize "${Q[@]}" --method rtn --wbits 8 --abits 8 --onnx

# Robustness and SysNoise on the device (torchvision's nvJPEG decoder row needs CUDA).
step robustness "${F[@]}" eval robustness --checkpoint "$RUN" --data "$DATA" --max-samples 500 --device "$DEV" \
  --workers "$(nproc --all)" --quiet --out "$WORK/robustness"
step sysnoise "${F[@]}" eval sysnoise --checkpoint "$RUN" --data "$DATA" --max-samples 1000 --device "$DEV" \
  --quiet --out "$WORK/sysnoise"

# Throughput of CLIP training against open_clip_train on the device; INT8 latency on its CPU.
if [ "$DEV" = cuda ]; then
  step clip_b32_bf16 "$PY" benchmarks/clip_throughput.py --model ViT-B-32 --device cuda --precision bf16 \
    --batch-size 128 --steps 40
else
  step clip_b32_bf16 "$PY" benchmarks/clip_throughput.py --steps 4 --warmup 1 --no-declip
fi
step int8_speed "$PY" benchmarks/int8_speed.py --threads 1 --reps-b1 20 --reps-b16 6

# bf16 MFU of a ViT-B/16 CLIP training step under DDP and under FSDP2 (benchmarks/clip_mfu.py, one process per
# GPU; NGPU=8 for a whole node), and FSDP2's memory against DDP's at 2 ranks (benchmarks/fsdp_memory.py: on
# 2 GPUs when there are, else on CPU ranks). A CPU dry run takes the narrow model and the smallest settings.
NGPU=${NGPU:-1}
for b in ddp fsdp2; do
  if [ "$DEV" = cuda ]; then
    step clip_b16_mfu_$b "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" benchmarks/clip_mfu.py \
      --backend $b --device cuda --model ViT-B-16 --batch-size 128 --steps 20 --warmup 5
  else
    step clip_b16_mfu_$b "$PY" benchmarks/clip_mfu.py --backend $b --smoke
  fi
done
if [ "$DEV" = cuda ] && [ "$NGPU" -ge 2 ]; then
  step fsdp_memory "$PY" benchmarks/fsdp_memory.py --device cuda --batch-size 32
elif [ "$DEV" = cuda ]; then
  step fsdp_memory "$PY" benchmarks/fsdp_memory.py
else
  step fsdp_memory "$PY" benchmarks/fsdp_memory.py --smoke
fi

for f in runs/resnet18_fmnist_fp32/summary.json runs/resnet18_fmnist_bf16/summary.json quant/results.md \
         robustness/report.md sysnoise/report.md; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$(echo "$f" | tr / _)"
done
grep -h '^{"bench"' "$LOG" > "$OUT/bench.jsonl" || true
echo "== done" | tee -a "$LOG"
