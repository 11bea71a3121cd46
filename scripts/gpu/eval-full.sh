#!/usr/bin/env bash
# The full-size evaluation of every system, split into jobs (one task at one history length each) run on every GPU of
# the host at once, then merged into one report per task. Jobs persist on the host ($RUNS), so a later command on the
# same warm machine runs only what is missing and merges everything done so far.
#
#   OUT=/some/dir bash scripts/gpu/eval-full.sh MEMORY_CHECKPOINT_DIR
#
# Jobs: `synthetic:<length>`, `passkey:<length>`, `locomo` (the LoCoMo-format fixture: no LoCoMo data on the host).
# JOBS0, JOBS1, ... list the jobs of GPU 0, 1, ... in the order they run (space-separated). A job with a finished
# results.json in $RUNS is skipped; a job cut by its time budget ran fewer episodes than planned and says so in its
# report (run it again with more time to redo it). Every job gets the time left in this command (BUDGET seconds in
# all, minus a margin for merging) as its --time-budget, so it stops starting episodes in time.
#
# Environment: MEMSPLICE_GGUF (the reasoner), MEMSPLICE_DATA (filler corpora; default /root/stage/data),
# SYSTEMS (default: every registered system), SYN_EXAMPLES (episodes per synthetic length, default 4), PK_DEPTHS
# (default 0,0.5,1), SELECT_CHUNKS (latent-select systems, default 2). bm25s and the MiniLM embedder come from
# EXTRAS (default .gpu/extras, see stage_extras.py). $OUT ends up with run.log, summary.json (the
# "eval" scores of the merged runs) and eval-full.tar.gz (each task's merged report, results.json and plots, and
# the jobs' logs).
set -uo pipefail
cd "$(dirname "$0")/../.."
CKPT="${1:?usage: scripts/gpu/eval-full.sh MEMORY_CHECKPOINT_DIR}"
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
ROOT=$PWD
EXTRAS="${EXTRAS:-$ROOT/.gpu/extras}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$EXTRAS/site" ] && export PYTHONPATH="$EXTRAS/site:$PYTHONPATH"
[ -d "$EXTRAS/minilm" ] && export MEMSPLICE_EMBEDDER="${MEMSPLICE_EMBEDDER:-$EXTRAS/minilm}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export MEMSPLICE_RESULTS="$OUT/results"
export TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=cpu  # nothing here may run JAX on the GPU (see retrieval.py)
RUNS="${RUNS:-/root/evalruns}"
BUDGET="${BUDGET:-560}"
SYN_EXAMPLES="${SYN_EXAMPLES:-4}"
PK_DEPTHS="${PK_DEPTHS:-0,0.5,1}"
SELECT_CHUNKS="${SELECT_CHUNKS:-2}"
PY="${PYTHON:-python3}"
SYSTEMS="${SYSTEMS:-$($PY -c 'from memsplice.eval.systems import SYSTEMS; print(",".join(SYSTEMS))')}"
mkdir -p "$RUNS" "$MEMSPLICE_RESULTS"
LOG="$OUT/run.log"
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }

log "host: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) x $(nvidia-smi -L 2>/dev/null | wc -l); $($PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
log "retrieval extras: $($PY -c 'import bm25s; print("bm25s", bm25s.__version__)' 2>&1 | tail -1); embedder ${MEMSPLICE_EMBEDDER:-package}; systems $SYSTEMS"
# Dequantize the reasoner once, so the jobs below find it cached instead of racing to convert it.
$PY -c "from memsplice.reasoner import load_reasoner; load_reasoner(None, device='cpu')" >> "$LOG" 2>&1

finished() {  # finished DIR: a results.json that ran every planned episode
    $PY - "$1/results.json" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
sys.exit(0 if r["episodes"] == r["episodes_planned"] else 1)
PY
}

job() {  # job NAME GPU
    local name=$1 gpu=$2 dir="$RUNS/${1/:/-}" secs args
    if finished "$dir"; then log "$name: done in an earlier command"; return; fi
    secs=$(( $(left) - 60 ))
    if (( secs < 30 )); then log "$name: skipped, no time left"; return; fi
    case $name in
        synthetic:*) args=(--task synthetic --lengths "${name#*:}" --examples "$SYN_EXAMPLES") ;;
        passkey:*) args=(--task passkey --lengths "${name#*:}" --depths "$PK_DEPTHS" --examples 1) ;;
        locomo) args=(--task locomo --data tests/fixtures/locomo_tiny.json --examples 0) ;;
        *) log "$name: unknown job"; return ;;
    esac
    log "$name: start on GPU $gpu (time budget ${secs}s)"
    rm -rf "$dir"
    CUDA_VISIBLE_DEVICES=$gpu timeout --kill-after=10 $(( secs + 45 )) $PY -m memsplice.cli.main eval "${args[@]}" \
        --systems "$SYSTEMS" --select-chunks "$SELECT_CHUNKS" --checkpoint "$CKPT" --time-budget "$secs" \
        --out "$dir" --quiet > "$OUT/job-${name/:/-}.log" 2>&1
    log "$name: exit $? ($(grep -m1 -E '^[a-z]+: [0-9]+ episodes' "$OUT/job-${name/:/-}.log" || echo 'no summary'))"
}

gpus=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
pids=()
for (( g = 0; g < (gpus > 0 ? gpus : 1); g++ )); do
    var="JOBS$g"
    ( for name in ${!var:-}; do job "$name" "$g"; done ) &
    pids+=($!)
done
wait "${pids[@]}"

# One report per task from every job of it done so far (this command's and earlier ones').
for task in synthetic passkey locomo; do
    runs=$(ls -d "$RUNS/$task"* 2>/dev/null | while read -r d; do [ -f "$d/results.json" ] && echo "$d"; done | paste -sd, -)
    [ -n "$runs" ] || continue
    record="eval-$task"; [ "$task" = locomo ] && record="eval-locomo-fixture"
    $PY -m memsplice.cli.main eval --merge "$runs" --out "$OUT/$task" --record "$record" >> "$LOG" 2>&1 \
        && log "$task: merged $runs" || log "$task: merge failed (see run.log)"
done
[ -f "$MEMSPLICE_RESULTS/summary.json" ] && cp "$MEMSPLICE_RESULTS/summary.json" "$OUT/summary.json"
tar czf "$OUT/eval-full.tar.gz" -C "$OUT" $(cd "$OUT" && ls -d results synthetic passkey locomo job-*.log 2>/dev/null)
rm -rf "$OUT/results" "$OUT/synthetic" "$OUT/passkey" "$OUT/locomo" "$OUT"/job-*.log
log "done; $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
