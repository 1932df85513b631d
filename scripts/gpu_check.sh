#!/usr/bin/env bash
# Everything a lent GPU machine should check and measure, in one command (about 8-10 minutes on an
# H100/H200). Prepare here first:   bash ../shared/device/fetch_wheels.sh      (-> .whl/, git-ignored)
# then on the device (tool `run`, carry [".whl"], timeout_s 600):
#   bash scripts/gpu_check.sh
# Results land in $OUT (or gpu_results/): tests.log, bench_loss.json, fixed.json, realistic.json.
#
# 1. The loss tests on the GPU's torch (CPU-side exactness already runs in CI).
# 2. bf16 agreement of chunked vs full and peak memory of the loss step (2K-32K tokens, 32K/152K vocab).
# 3. End to end, Qwen2.5-1.5B shape, 8K tokens, batch 1, bf16, gradient checkpointing: ours (full and
#    chunked) beside trl.SFTTrainer(loss_type="dft") with and without Liger, same run, same card.
# 4. Realistic lengths: batch 1 vs padded vs packed (sdpa, flex_attention), real tokens per second.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

step() { echo "=== $*"; }
step "loss tests (GPU torch)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_loss.py 2>&1 | tail -3 | tee "$OUT/tests.log"

step "loss step: full vs chunked vs no loss (bf16)"
timeout 180 python3 scripts/bench_loss.py --seq_lens 2048 8192 16384 32768 --vocabs 32000 151936 --hidden 1536 \
  --repeats 3 --out "$OUT/bench_loss.json" > /dev/null && python3 - "$OUT/bench_loss.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
print(f"{'variant':8} {'T':>6} {'V':>7} {'extra GiB':>9} {'ms':>8} {'rel diff':>9}")
for r in rows:
    if r.get("oom"):
        print(f"{r['variant']:8} OOM"); continue
    print(f"{r['variant']:8} {r['seq_len']:>6} {r['vocab']:>7} {r.get('extra_memory_gib_vs_no_loss', 0):9.3f} "
          f"{r['median_s'] * 1e3:8.1f} {r.get('loss_rel_diff_vs_full', float('nan')):9.2e}")
EOF

step "end to end, fixed 8K rows, beside TRL"
timeout 240 python3 scripts/bench_train.py --model qwen2.5-1.5b --mode fixed --max_length 8192 --gradient_checkpointing \
  --compare_trl --output_json "$OUT/fixed.json"

step "end to end, realistic lengths: batch 1 / padded / packed"
timeout 240 python3 scripts/bench_train.py --model qwen2.5-1.5b --mode realistic --max_length 8192 --gradient_checkpointing \
  --output_json "$OUT/realistic.json"
echo "results in $OUT/"
