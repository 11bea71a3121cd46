#!/usr/bin/env bash
# Train a reading prefix (python -m memsplice.reading.train), then measure recall with it in front of every system's
# prompt: the synthetic test split at 16k, 32k and 64k tokens, each (length, seed) its own process, all at once on
# the visible GPU, as scripts/gpu/online-recall.sh runs them.
#
#   OUT=/tmp/out bash scripts/gpu/reading.sh MEMORY_CHECKPOINT_DIR
#
# WAVES: seed groups run one after the other ("0 1|2 3"); SYSTEM_GROUPS: system groups, one process each per length and
# seed ("latent-readback+window|oracle rag-bm25|latent-readback"); LATER_GROUPS: the groups of the later waves
# (default: SYSTEM_GROUPS). PREFIX: an already trained prefix (skips training). Results: $OUT/reading/ (the prefix,
# report.json, metrics.jsonl) and $OUT/results/<tokens>-seed<seed>-g<group>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT="${1:?memory checkpoint directory}"
OUT="${OUT:?set OUT to the output directory}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-10}"
PY="${PYTHON:-python3}"
HISTORY="${HISTORY:-16384 32768 65536}"
WAVES="${WAVES:-0 1|2 3}"
SYSTEM_GROUPS="${SYSTEM_GROUPS:-latent-readback+window|oracle rag-bm25|latent-readback}"
LATER_GROUPS="${LATER_GROUPS:-$SYSTEM_GROUPS}"
TRAIN="${TRAIN:---steps 600 --batch 16 --eval-every 300}"
EXTRA="${EXTRA:---chunk-tokens 32 --refine-steps 5 --write-turns 128 --encode-batch 64 --select-chunks 1 --window-tokens 256}"
BUDGET="${BUDGET:-560}"
PREFIX="${PREFIX:-}"
mkdir -p "$OUT/results"
if [ -z "$PREFIX" ]; then
  MEMSPLICE_RESULTS="$OUT/results" $PY -m memsplice.reading.train --output "$OUT/reading" $TRAIN \
    --record reading-prefix > "$OUT/reading-train.log" 2>&1
  PREFIX="$OUT/reading/prefix"
fi
wave=0
IFS='|' read -ra waves <<< "$WAVES"
for seeds in "${waves[@]}"; do
  groups="$SYSTEM_GROUPS"; [ "$wave" -gt 0 ] && groups="$LATER_GROUPS"
  IFS='|' read -ra gs <<< "$groups"
  pids=()
  for g in "${!gs[@]}"; do
    for h in $HISTORY; do
      for s in $seeds; do
        MEMSPLICE_RESULTS="$OUT/results/$h-seed$s-g$g" $PY -m memsplice.cli.main bench online --part recall \
          --checkpoint "$CKPT" --reading-prefix "$PREFIX" $EXTRA --seed "$s" --history-tokens "$h" \
          --systems ${gs[$g]} --examples 4 --time-budget "$BUDGET" --save > "$OUT/recall-$h-seed$s-g$g.log" 2>&1 &
        pids+=($!)
      done
    done
  done
  status=0
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  echo "wave $wave (seeds $seeds) done, status $status"
  wave=$((wave + 1))
done
