#!/usr/bin/env bash
# memsplice online benchmarks in one command (<= 10 minutes on one H100): conversation-memory write cost and answer
# latency at 16k, 32k and 64k tokens of history, then the stability stream with and without EWC + replay (two
# processes sharing the GPU), then the "online" summary. Everything lands in $OUT:
#   results/online-cost.json, results/online-stability-ewc_replay.json, results/online-stability-plain.json,
#   results/summary.json ("online"), and one log per part.
#
#   OUT=/tmp/out bash scripts/gpu/online.sh [MEMORY_CHECKPOINT_DIR]
#
# Without a checkpoint the shipped one for the reasoner is used (else an untrained memory, whose numbers are a
# floor). Sizes can be turned down for a CPU rehearsal through the environment (see the defaults below).
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
UPDATES="${UPDATES:-10000}"
STABILITY_SECONDS="${STABILITY_SECONDS:-300}"
TOTAL_SECONDS="${TOTAL_SECONDS:-560}"   # the whole command stays under the host's 10-minute limit
EVAL_EVERY="${EVAL_EVERY:-500}"
REASONER="${REASONER:-}"   # a reasoner source other than the default SmolLM2-135M-Instruct GGUF
EXTRA="${EXTRA:-}"         # more flags for every part, e.g. "--device cpu --facts 8" for a rehearsal
mkdir -p "$MEMSPLICE_RESULTS"
ck=()
[ -n "$CKPT" ] && ck=(--checkpoint "$CKPT")
[ -n "$REASONER" ] && ck+=(--reasoner "$REASONER")
t0=$(date +%s)
# Dequantize the reasoner once, so the parallel runs below find it cached instead of racing to convert it.
$PY -c "import sys; from memsplice.reasoner import load_reasoner; load_reasoner(sys.argv[1] or None, device='cpu')" \
  "$REASONER" > "$OUT/load.log" 2>&1
echo "reasoner ready after $(( $(date +%s) - t0 )) s"
$PY -m memsplice.cli.main bench online --part cost "${ck[@]}" $EXTRA --history-tokens $HISTORY \
  --mem0-turns 3 --save > "$OUT/cost.log" 2>&1 || echo "cost part failed (see cost.log)"
elapsed=$(( $(date +%s) - t0 ))
echo "cost done after $elapsed s"
# What is left of the command's budget goes to the stream (minus set-up, final evaluation and summary).
left=$(( TOTAL_SECONDS - elapsed - 60 ))
[ "$left" -lt "$STABILITY_SECONDS" ] && STABILITY_SECONDS=$(( left > 30 ? left : 30 ))
echo "stability streams get $STABILITY_SECONDS s each"
pids=()
for variant in ewc_replay plain; do
  timeout $(( STABILITY_SECONDS + 150 )) $PY -m memsplice.cli.main bench online --part stability --variant "$variant" \
    "${ck[@]}" $EXTRA --updates "$UPDATES" --max-seconds "$STABILITY_SECONDS" --eval-every "$EVAL_EVERY" \
    --objective-schedule alternate --save > "$OUT/stability-$variant.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || echo "a stability run failed (see stability-*.log)"; done
echo "stability done after $(( $(date +%s) - t0 )) s"
$PY -m memsplice.cli.main bench online --part summary --save > "$OUT/summary.log" 2>&1
cat "$OUT/summary.log"
rm -f "$OUT/load.log"
