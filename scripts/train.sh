#!/usr/bin/env bash
# Launch DFT fine-tuning. Settings come from environment variables; extra arguments go to train_dft.py.
#
#   bash scripts/train.sh                                   # bundled tiny model + sample data (CPU ok)
#   MODEL=/models/Qwen2.5-7B DATA_FILES="a.jsonl b.json" bash scripts/train.sh --num_train_epochs 3
#   nohup bash scripts/train.sh > /dev/null 2>&1 &          # the log file path is printed and kept
#
# Variables (defaults in brackets):
#   MODEL [assets/tiny-qwen2]  DATA_FILES [data/sample/*]  OUTPUT_DIR [outputs/dft-<timestamp>]
#   LOG_DIR [OUTPUT_DIR/logs]  NUM_GPUS [all visible]  NUM_PROCS [1, CPU processes when no GPU]
#   DS_CONFIG [ds_config/zero3.json]  NNODES [1]  HOSTFILE  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   DFT_ALPHA [1.0]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STAMP="$(date +%Y%m%d-%H%M%S)"
MODEL="${MODEL:-assets/tiny-qwen2}"
DATA_FILES="${DATA_FILES:-data/sample/chat_en.jsonl data/sample/chat_zh.json}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/dft-$STAMP}"
LOG_DIR="${LOG_DIR:-$OUTPUT_DIR/logs}"
DS_CONFIG="${DS_CONFIG:-ds_config/zero3.json}"
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NUM_PROCS="${NUM_PROCS:-1}"
DFT_ALPHA="${DFT_ALPHA:-1.0}"
PYTHON="${PYTHON:-python}"

if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi

if [ "$MODEL" = "assets/tiny-qwen2" ] && [ ! -f "$MODEL/model.safetensors" ]; then
  echo "building the bundled tiny model in $MODEL"
  "$PYTHON" scripts/make_tiny_model.py "$MODEL"
fi

mkdir -p "$OUTPUT_DIR" "$LOG_DIR"
LOG_FILE="$LOG_DIR/train-$STAMP.log"

# shellcheck disable=SC2206
ARGS=(
  --model_name_or_path "$MODEL"
  --data_files $DATA_FILES
  --output_dir "$OUTPUT_DIR"
  --logging_dir "$LOG_DIR"
  --dft_alpha "$DFT_ALPHA"
)
if [ "$MODEL" = "assets/tiny-qwen2" ]; then
  # Demo settings for the tiny model; any of them can be overridden by extra arguments.
  ARGS+=(--num_train_epochs 3 --per_device_train_batch_size 8 --learning_rate 2e-3 --lr_scheduler_type cosine
         --warmup_ratio 0.05 --logging_steps 10 --save_strategy no --report_to none --max_length 512
         --validation_split_percentage 10 --eval_strategy epoch)
fi
# Without a terminal (nohup, pipes) keep progress to log lines instead of redrawn bars.
if [ ! -t 1 ]; then ARGS+=(--disable_tqdm True); fi

if [ "$NUM_GPUS" -gt 0 ]; then
  LAUNCH=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
  if [ "$NNODES" -gt 1 ]; then
    LAUNCH=(deepspeed --hostfile "${HOSTFILE:?HOSTFILE is required with NNODES > 1}" --num_nodes "$NNODES"
            --num_gpus "$NUM_GPUS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  fi
  CMD=("${LAUNCH[@]}" train_dft.py "${ARGS[@]}" --deepspeed "$DS_CONFIG" --bf16 True "$@")
elif [ "$NUM_PROCS" -gt 1 ]; then
  CMD=(torchrun --nproc_per_node "$NUM_PROCS" --master_port "$MASTER_PORT" train_dft.py "${ARGS[@]}" --use_cpu True "$@")
else
  CMD=("$PYTHON" train_dft.py "${ARGS[@]}" "$@")
fi

echo "log file: $LOG_FILE"
echo "command: ${CMD[*]}" | tee "$LOG_FILE"
set +e
"${CMD[@]}" 2>&1 | tee -a "$LOG_FILE"
STATUS=${PIPESTATUS[0]}
set -e
echo "exit status $STATUS; log file: $LOG_FILE"
exit "$STATUS"
