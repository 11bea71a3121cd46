#!/usr/bin/env bash
# Recall on the eval harness's synthetic multi-session task (test split) at 16k, 32k and 64k tokens of history:
# latent, latent+window, rag-bm25 and oracle, one command (<= 10 minutes on one H100, bounded by --time-budget).
# Writes $OUT/results/online-recall.json, $OUT/results/summary.json ("online") and recall-seed<seed>.log.
#
#   OUT=/tmp/out bash scripts/gpu/online-recall.sh [MEMORY_CHECKPOINT_DIR]
#
# With SEEDS="0 1" SPLIT=1 every (history length, seed) runs as its own process, all at once on the visible GPU
# (an episode's work is launch-bound, so they share it well), each into $OUT/results/<tokens>-seed<seed>/ with its
# own log; the summary is then left to merge by hand.
#
# rag-bm25 needs bm25s; where it is not installed, carry its wheel and `pip install --no-index` it first, or drop
# the system with SYSTEMS="latent latent+window oracle".
set -euo pipefail
cd "$(dirname "$0")/../.."
CKPT="${1:-}"
OUT="${OUT:?set OUT to the output directory}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export MEMSPLICE_RESULTS="$OUT/results"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-10}"
PY="${PYTHON:-python3}"
HISTORY="${HISTORY:-16384 32768 65536}"
SYSTEMS="${SYSTEMS:-latent latent+window rag-bm25 oracle}"
EXAMPLES="${EXAMPLES:-2}"
BUDGET="${BUDGET:-150}"
REASONER="${REASONER:-}"
EXTRA="${EXTRA:-}"
SEEDS="${SEEDS:-0}"
SPLIT="${SPLIT:-}"
mkdir -p "$MEMSPLICE_RESULTS"
ck=()
[ -n "$CKPT" ] && ck=(--checkpoint "$CKPT")
[ -n "$REASONER" ] && ck+=(--reasoner "$REASONER")
if [ -n "$SPLIT" ]; then
  pids=()
  for h in $HISTORY; do
    for s in $SEEDS; do
      MEMSPLICE_RESULTS="$OUT/results/$h-seed$s" $PY -m memsplice.cli.main bench online --part recall "${ck[@]}" \
        $EXTRA --seed "$s" --history-tokens "$h" --systems $SYSTEMS --examples "$EXAMPLES" --time-budget "$BUDGET" \
        --save > "$OUT/recall-$h-seed$s.log" 2>&1 &
      pids+=($!)
    done
  done
  status=0
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  exit $status
fi
for s in $SEEDS; do
  $PY -m memsplice.cli.main bench online --part recall "${ck[@]}" $EXTRA --seed "$s" --history-tokens $HISTORY \
    --systems $SYSTEMS --examples "$EXAMPLES" --time-budget "$BUDGET" --save > "$OUT/recall-seed$s.log" 2>&1
done
$PY -m memsplice.cli.main bench online --part summary --save
