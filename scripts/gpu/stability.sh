#!/usr/bin/env bash
# One command's share of the 10,000-update stability stream, for both variants, resumable across commands on the
# same host; optionally the latency benchmark first. Everything lands in $OUT:
#   results/online-stability-ewc_replay.json, results/online-stability-plain.json (the run so far: `updates`,
#   `segments`, `complete`), results/latency*.json with LATENCY=1, and one log per process.
#
#   OUT=/tmp/out bash scripts/gpu/stability.sh MEMORY_CHECKPOINT_DIR
#
# Run it again (same checkpoint path, same settings) until both results say `"complete": true`: each variant's
# learner, optimizer, anchor, Fisher, replay reservoir and place in the stream stay in $STATE/<variant> on the host
# between commands (`bench online --part stability --state`). With two GPUs each variant has one to itself; with one
# GPU they share it. LATENCY=1 first runs `bench latency` alone on the last GPU (the plain stream there starts after
# it, so it gets less time in that command). VARIANTS picks the streams (default "ewc_replay plain"); with
# EXTRA="--rehearsal 4" they rehearse (results online-stability-<variant>-rehearsal.json; give them a STATE of their
# own), e.g. VARIANTS=ewc_replay EXTRA="--rehearsal 4" STATE=/root/stability-rehearsal, one GPU left for other work.
# Several copies may run at once (e.g. one per CUDA_VISIBLE_DEVICES, each with its own STATE and EXTRA such as
# "--guard-tolerance 0.01"): TAG names each copy's logs. FIRST_GPU=1 puts the first variant on GPU 1.
set -uo pipefail
cd "$(dirname "$0")/../.."
CKPT="${1:?usage: scripts/gpu/stability.sh MEMORY_CHECKPOINT_DIR}"
OUT="${OUT:?set OUT to the output directory}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export MEMSPLICE_RESULTS="$OUT/results"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"
PY="${PYTHON:-python3}"
STATE="${STATE:-/root/stability}"
BUDGET="${BUDGET:-540}"   # seconds this command may take in all (the host allows 600)
UPDATES="${UPDATES:-10000}"
# The stream's definition; it must not change between the commands of one run (the state refuses otherwise).
RUN_ARGS="${RUN_ARGS:---context-tokens 32 --facts 128 --eval-every 500 --objective-schedule alternate}"
EXTRA="${EXTRA:-}"        # e.g. "--rehearsal 4" (skill rehearsal; results then end in -rehearsal) or "--device cpu"
VARIANTS="${VARIANTS:-ewc_replay plain}"  # the first runs on GPU $FIRST_GPU, any other on the last GPU
FIRST_GPU="${FIRST_GPU:-0}"
TAG="${TAG:+-$TAG}"       # suffix of this copy's log names
LATENCY="${LATENCY:-}"
mkdir -p "$MEMSPLICE_RESULTS" "$STATE"
gpus=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
last=$(( gpus > 0 ? gpus - 1 : 0 ))
t0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
# Dequantize the reasoner once, so the processes below find it cached instead of racing to convert it.
$PY -c "from memsplice.reasoner import load_reasoner; load_reasoner(None, device='cpu')" > "$OUT/load$TAG.log" 2>&1

stream() {  # stream VARIANT GPU: this command's segment of one variant, stopping in time to evaluate and save
    local variant=$1 gpu=$2 secs
    secs=$(( $(left) - 90 ))
    if (( secs < 30 )); then echo "$variant: no time left in this command"; return; fi
    CUDA_VISIBLE_DEVICES=$gpu timeout $(( secs + 80 )) $PY -m memsplice.cli.main bench online --part stability \
        --variant "$variant" --checkpoint "$CKPT" --updates "$UPDATES" $RUN_ARGS $EXTRA \
        --state "$STATE/$variant" --max-seconds "$secs" --save >> "$OUT/stability-$variant$TAG.log" 2>&1 \
        || echo "$variant: the segment failed or was cut (see stability-$variant$TAG.log)"
}

read -ra variants <<< "$VARIANTS"
stream "${variants[0]}" "$FIRST_GPU" &
pids=($!)
if [ -n "$LATENCY" ]; then
    CUDA_VISIBLE_DEVICES=$last $PY -m memsplice.cli.main bench latency --checkpoint "$CKPT" --slots 16 --contexts 1k,8k \
        --repeats 10 --hf-repeats 2 --compile $EXTRA --json --save > "$OUT/latency.log" 2>&1 || echo "latency failed (see latency.log)"
    echo "latency done after $(( $(date +%s) - t0 )) s"
fi
for v in "${variants[@]:1}"; do
    stream "$v" "$last" &
    pids+=($!)
done
wait "${pids[@]}"
echo "segment done after $(( $(date +%s) - t0 )) s"
for f in "$MEMSPLICE_RESULTS"/online-stability-*.json; do
    $PY - "$f" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
print(r["variant"], "updates", r["updates"], "segments", r.get("segments"), "complete", r.get("complete"),
      "forgetting_drop", r.get("forgetting_drop"), "perplexity_drop", r.get("perplexity_drop"),
      "mean_update_ms", r.get("mean_update_ms"))
PY
done
rm -f "$OUT/load$TAG.log"
