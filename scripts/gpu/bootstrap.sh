#!/usr/bin/env bash
# Bootstrap a memory on the eval harness's synthetic multi-session conversations (train split only), one command
# (<= 10 minutes on one H100). Writes $OUT/bootstrap/checkpoint/ (bf16 safetensors shards of <= 15 MiB, config,
# index), $OUT/bootstrap/report.json and $OUT/bootstrap/metrics.jsonl.
#
#   OUT=/tmp/out bash scripts/gpu/bootstrap.sh [START_CHECKPOINT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT="${1:-}"
OUT="${OUT:?set OUT to the output directory}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-10}"
PY="${PYTHON:-python3}"
ck=()
[ -n "$CKPT" ] && ck=(--checkpoint "$CKPT")
$PY -m memsplice.online.bootstrap "${ck[@]}" ${EXTRA:-} --output "$OUT/bootstrap" --updates "${UPDATES:-3000}" \
  --max-seconds "${SECONDS_BUDGET:-420}" --episodes "${EPISODES:-2000}" --eval-every "${EVAL_EVERY:-500}" \
  > "$OUT/bootstrap.log" 2>&1
tail -n 30 "$OUT/bootstrap.log"
