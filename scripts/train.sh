#!/usr/bin/env bash
# Launch DFT fine-tuning. Settings come from environment variables; extra arguments go to train_dft.py.
#
#   bash scripts/train.sh                                   # bundled tiny model + sample data (CPU ok)
#   MODEL=/models/Qwen2.5-7B DATA_FILES="a.jsonl b.json" bash scripts/train.sh --num_train_epochs 3
#   nohup bash scripts/train.sh > train.out 2>&1 &         # the log file path is printed and kept
#
# Variables (defaults in brackets):
#   MODEL [assets/tiny-qwen2]  DATA_FILES [data/sample/*]  OUTPUT_DIR [outputs/dft-<timestamp>]
#   LOG_DIR [OUTPUT_DIR/logs]  NUM_GPUS [all visible]  NUM_PROCS [1: CPU processes when NUM_GPUS is 0]
#   DS_CONFIG [ds_config/zero3.json on GPUs; on CPU only when set]  NNODES [1]  HOSTFILE
#   MASTER_ADDR [127.0.0.1]  MASTER_PORT [a free port; 29500 with NNODES > 1]  DFT_ALPHA [unset: the --loss_type's own]  PYTHON [python]
#   SEQUENCE_PARALLEL_SIZE [1; S splits each sequence over S processes, DeepSpeed Ulysses: docs/sequence_parallel.md]
#   DRY_RUN [0; 1 prints the command and exits]
#
# Launchers: GPUs -> `deepspeed --num_gpus NUM_GPUS` (with --hostfile for NNODES > 1) and DS_CONFIG;
# CPU -> python (NUM_PROCS=1), torchrun (NUM_PROCS>1), or the deepspeed launcher when DS_CONFIG is set.
# SIGTERM/SIGINT to this script reach the training processes, which save a checkpoint and stop
# (resume with --resume_from_checkpoint latest).
#
# Paths, in the variables and in the extra arguments, are relative to the folder you run this from, as
# with train_dft.py itself; the bundled defaults (the tiny model, the sample data, ds_config/) are found
# in the checkout from anywhere. An --output_dir or --logging_dir among the extra arguments wins over
# OUTPUT_DIR and LOG_DIR, and the model and its logs stay in one folder: LOG_DIR defaults to <output dir>/logs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The checkout's files: relative from its root, so that the printed command reads as in the README.
if [ . -ef "$ROOT" ]; then BUNDLED=""; else BUNDLED="$ROOT/"; fi

STAMP="$(date +%Y%m%d-%H%M%S)"
DEMO_MODEL=0
if [ -z "${MODEL:-}" ] || [ "$MODEL" = "assets/tiny-qwen2" ]; then
  DEMO_MODEL=1
  MODEL="${BUNDLED}assets/tiny-qwen2"
fi
if [ -n "${DATA_FILES:-}" ]; then
  # shellcheck disable=SC2206  # split on spaces, and patterns expanded: DATA_FILES="a.jsonl more/*.json"
  DATA=($DATA_FILES)
else
  DATA=("${BUNDLED}data/sample/chat_en.jsonl" "${BUNDLED}data/sample/chat_zh.json")
fi
# train_dft.py takes the last --output_dir/--logging_dir it is given: the folders made here and the log
# file written here must be those.
ARG_OUTPUT_DIR="" ARG_LOGGING_DIR="" PREVIOUS=""
for arg in "$@"; do
  case "$PREVIOUS" in
    --output_dir | --output-dir) ARG_OUTPUT_DIR="$arg" ;;
    --logging_dir | --logging-dir) ARG_LOGGING_DIR="$arg" ;;
  esac
  case "$arg" in
    --output_dir=* | --output-dir=*) ARG_OUTPUT_DIR="${arg#*=}" ;;
    --logging_dir=* | --logging-dir=*) ARG_LOGGING_DIR="${arg#*=}" ;;
  esac
  PREVIOUS="$arg"
done
OUTPUT_DIR="${ARG_OUTPUT_DIR:-${OUTPUT_DIR:-outputs/dft-$STAMP}}"
LOG_DIR="${ARG_LOGGING_DIR:-${LOG_DIR:-$OUTPUT_DIR/logs}}"
CPU_DS_CONFIG="${DS_CONFIG:-}"
DS_CONFIG="${DS_CONFIG:-${BUNDLED}ds_config/zero3.json}"
TRAIN="${BUNDLED}train_dft.py"
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
NUM_PROCS="${NUM_PROCS:-1}"
DFT_ALPHA="${DFT_ALPHA:-}"
SEQUENCE_PARALLEL_SIZE="${SEQUENCE_PARALLEL_SIZE:-1}"
PYTHON="${PYTHON:-python}"
if [ -z "${MASTER_PORT:-}" ] && [ "$NNODES" = 1 ]; then
  # One machine: a free port, so that two runs at once (compare.py --parallel, two jobs on one 8-GPU node)
  # do not both try 29500 (EADDRINUSE). Several nodes must agree on it: 29500 unless set.
  MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 29500)"
fi
MASTER_PORT="${MASTER_PORT:-29500}"
DRY_RUN="${DRY_RUN:-0}"
# DeepSpeed compiles its CPU ops once; keep them across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"

if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi

if [ "$DEMO_MODEL" = 1 ] && [ ! -f "$MODEL/model.safetensors" ] && [ "$DRY_RUN" = 0 ]; then
  echo "building the bundled tiny model in $MODEL"
  "$PYTHON" "${BUNDLED}scripts/make_tiny_model.py" "$MODEL"
fi

ARGS=(
  --model_name_or_path "$MODEL"
  --data_files "${DATA[@]}"
  --output_dir "$OUTPUT_DIR"
  --logging_dir "$LOG_DIR"
)
# Only when set: --loss_type sft (e.g. from dft-compare) refuses an explicit --dft_alpha.
if [ -n "$DFT_ALPHA" ]; then ARGS+=(--dft_alpha "$DFT_ALPHA"); fi
if [ "$SEQUENCE_PARALLEL_SIZE" != 1 ]; then ARGS+=(--sequence_parallel_size "$SEQUENCE_PARALLEL_SIZE"); fi
if [ "$DEMO_MODEL" = 1 ]; then
  # Demo settings for the tiny model; any of them can be overridden by extra arguments.
  ARGS+=(--num_train_epochs 3 --per_device_train_batch_size 8 --learning_rate 2e-3 --lr_scheduler_type cosine
         --warmup_ratio 0.05 --logging_steps 10 --report_to none --max_length 512
         --validation_split_percentage 10 --eval_strategy epoch
         --eval_generation_files "${BUNDLED}data/sample_eval/questions.jsonl" --eval_answer_match contains
         --eval_generation_max_new_tokens 24 --eval_on_start True)
  # No checkpoints in the demo, unless asked for: a --save_steps of the user's would otherwise be ignored
  # (transformers only saves every --save_steps under --save_strategy steps).
  case " $* " in
    *" --save_strategy "* | *" --save_strategy="* | *" --save_steps "* | *" --save_steps="*) ;;
    *) ARGS+=(--save_strategy no) ;;
  esac
fi
# Without a terminal (nohup, pipes) keep progress to log lines instead of redrawn bars.
if [ ! -t 1 ]; then ARGS+=(--disable_tqdm True); fi

if [ "$NUM_GPUS" -gt 0 ]; then
  LAUNCH=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
  if [ "$NNODES" -gt 1 ]; then
    LAUNCH=(deepspeed --hostfile "${HOSTFILE:?HOSTFILE is required with NNODES > 1}" --num_nodes "$NNODES"
            --num_gpus "$NUM_GPUS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  fi
  CMD=("${LAUNCH[@]}" "$TRAIN" "${ARGS[@]}" --deepspeed "$DS_CONFIG" --bf16 True "$@")
elif [ -n "$CPU_DS_CONFIG" ]; then
  # DeepSpeed on CPU (gloo): how the multi-process tests run ZeRO-3 without a GPU.
  CMD=(deepspeed --num_gpus "$NUM_PROCS" --master_port "$MASTER_PORT" "$TRAIN" "${ARGS[@]}"
       --deepspeed "$CPU_DS_CONFIG" --use_cpu True "$@")
elif [ "$NUM_PROCS" -gt 1 ]; then
  CMD=(torchrun --nproc_per_node "$NUM_PROCS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
       "$TRAIN" "${ARGS[@]}" --use_cpu True "$@")
else
  CMD=("$PYTHON" "$TRAIN" "${ARGS[@]}" "$@")
fi

if [ "$DRY_RUN" != 0 ]; then
  echo "${CMD[*]}"
  exit 0
fi

for dir in "OUTPUT_DIR:$OUTPUT_DIR" "LOG_DIR:$LOG_DIR"; do
  if ! why="$(mkdir -p -- "${dir#*:}" 2>&1)"; then
    echo "error: ${dir%%:*} ${dir#*:}: cannot create it (${why##*: }); choose another directory" >&2
    exit 2
  fi
done
LOG_FILE="$(cd "$LOG_DIR" && pwd)/train-$STAMP.log"
echo "log file: $LOG_FILE"
echo "command: ${CMD[*]}" >> "$LOG_FILE"

# The launcher runs in the background, in its own process group (set -m), so that a SIGTERM/SIGINT sent
# to this script (kill, Ctrl-C, a scheduler) reaches every training process: the single-node deepspeed
# runner does not pass signals on, and a process left behind would keep training. They finish the
# current step, save a checkpoint and exit (resume with --resume_from_checkpoint latest).
set +e
set -m
# tee and awk are in that group too: they ignore the signal and end when the last writer closes the pipe
# (killed, they would take the workers down with SIGPIPE in the middle of their checkpoint).
# torchrun answers the signal with a 25-line SignalException traceback of its own although every rank
# stopped as asked and said so: the console leaves it out (the awk program), the log file keeps everything.
QUIET_SIGNAL_TRACEBACK='
  held != "" && /^[ \t]/ { held = held "\n" $0; next }
  held != "" && /^torch\.distributed\.elastic\.multiprocessing\.api\.SignalException: / { held = ""; next }
  held != "" { print held; held = "" }
  /^Traceback \(most recent call last\):$/ { held = $0; next }
  { print; fflush() }
  END { if (held != "") print held }'
"${CMD[@]}" > >(trap '' TERM INT; tee -a "$LOG_FILE" | awk "$QUIET_SIGNAL_TRACEBACK") 2>&1 < /dev/null &
CHILD=$!
set +m
STOPPING=0
trap 'STOPPING=1; echo "train.sh: stopping (SIGTERM to process group $CHILD)" | tee -a "$LOG_FILE"; kill -TERM -- "-$CHILD" 2>/dev/null' TERM INT
wait "$CHILD"
STATUS=$?
while kill -0 "$CHILD" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
  wait "$CHILD"
  STATUS=$?
done
while kill -0 -- "-$CHILD" 2>/dev/null; do sleep 1; done  # workers still saving after their launcher left
set -e
# torchrun exits with status 1 even when every rank stopped as asked (checkpoint saved): report what the
# ranks did, with the status of a stop (143).
if [ "$STOPPING" = 1 ] && [ "$STATUS" != 0 ] && STOP_LINE="$(grep -m1 -o 'stopped by SIGTERM at step .*' "$LOG_FILE")"; then
  echo "train.sh: the run $STOP_LINE" | tee -a "$LOG_FILE"
  STATUS=143
fi
echo "exit status $STATUS; log file: $LOG_FILE" | tee -a "$LOG_FILE"
exit "$STATUS"
