#!/usr/bin/env bash
# One command on the GPU host: the latency benchmark and the full-size evaluation, everything under $OUT.
#
#   OUT=/some/dir bash scripts/gpu/eval.sh
#
# Environment: MEMSPLICE_GGUF (the reasoner), MEMSPLICE_DATA (corpora for filler; default /root/stage/data),
# MEMSPLICE_CHECKPOINT (a trained memory checkpoint for the latent systems; default: the shipped one, else an
# untrained memory whose scores are a floor). The retrieval baselines need bm25s and the MiniLM embedder: stage
# them with `python scripts/gpu/stage_extras.py` and carry .gpu/extras to the host.
#
# Phases share a deadline (DEADLINE seconds, default 570) so the whole run fits a 10-minute slot; each eval phase
# stops starting new episodes at its time budget and says so in its report (rewritten after every episode, so a
# phase cut by its timeout still leaves one). PHASES picks phases (default: latency synthetic passkey locomo
# compiled), e.g. PHASES=compiled for a second run of the torch.compile variant alone. $OUT ends up with at most
# 5 files:
#   run.log, summary.json, latency.json, latency-compiled.json, gpu-eval.tar.gz (every report, results.json, plot)
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
ROOT=$PWD
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu/extras/site ] && export PYTHONPATH="$ROOT/.gpu/extras/site:$PYTHONPATH"
[ -d .gpu/extras/minilm ] && export MEMSPLICE_EMBEDDER="${MEMSPLICE_EMBEDDER:-$ROOT/.gpu/extras/minilm}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export MEMSPLICE_RESULTS="$OUT/results"
export MEMSPLICE_CACHE="${MEMSPLICE_CACHE:-/tmp/memsplice-cache}"
export TOKENIZERS_PARALLELISM=false
DEADLINE=${DEADLINE:-570}
CKPT=()
[ -n "${MEMSPLICE_CHECKPOINT:-}" ] && CKPT=(--checkpoint "$MEMSPLICE_CHECKPOINT")
[ -n "${MEMSPLICE_REASONER:-}" ] && CKPT+=(--reasoner "$MEMSPLICE_REASONER")
# SMALL=1: the same phases at toy sizes, to prove the script on a CPU (add DEVICE=cpu)
[ -n "${DEVICE:-}" ] && CKPT+=(--device "$DEVICE")
if [ -n "${SMALL:-}" ]; then
    LAT=(--slots 16 --contexts 256 --question-tokens 16 --new-tokens 6 --repeats 2 --warmup 1 --hf-repeats 1)
    SYN=(--lengths 256,512 --examples 1 --facts 2 --max-new-tokens 4 --time-budget 60)
    PK=(--lengths 256 --depths 0,1 --examples 1 --max-new-tokens 4 --time-budget 30)
    LOC=(--max-new-tokens 4)
    CMP=(--question-tokens 16 --new-tokens 6 --repeats 2 --warmup 1)
else
    LAT=(--slots 16,256 --contexts 1k,2k,4k,8k --repeats 10 --hf-repeats 3)
    SYN=(--lengths 1k,2k,4k,8k,16k,32k,64k --examples 2 --time-budget 130)
    PK=(--lengths 1k,4k,16k,32k --depths 0,0.5,1 --examples 1 --time-budget 60)
    LOC=()
    CMP=()
fi
PY=${PYTHON:-python3}
LOG="$OUT/run.log"
: > "$LOG"

log() { echo "[$SECONDS s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - SECONDS )); }
# phase NAME MAX_SECONDS CMD...: run with a timeout of min(MAX_SECONDS, time left), log how it ended
PHASES=${PHASES:-latency synthetic passkey locomo compiled}
phase() {
    local name=$1 max=$2; shift 2
    case " $PHASES " in *" $name "*) ;; *) log "$name: not in PHASES"; return ;; esac
    local t; t=$(left); (( t > max )) && t=$max
    if (( t < 20 )); then log "$name: skipped, deadline reached"; return; fi
    log "$name: start (timeout ${t}s): $*"
    timeout --kill-after=10 "$t" "$@" >> "$LOG.$name" 2>&1
    log "$name: exit $? after $SECONDS s total"
}

log "host: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1); $($PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
log "retrieval extras: $($PY -c 'import bm25s; print("bm25s", bm25s.__version__)' 2>&1 | tail -1); embedder ${MEMSPLICE_EMBEDDER:-package}"

M=($PY -m memsplice.cli.main)
# 1. latency: engine (static cache + CUDA graphs) vs eager HF, none / 16 and 256 slots / 1k-8k context, with floor
phase latency 170 "${M[@]}" bench latency --json --save "${LAT[@]}" "${CKPT[@]}"
# 2. the full-size synthetic recall eval, every system, 1k to 64k tokens of history
phase synthetic 200 "${M[@]}" eval --task synthetic "${SYN[@]}" --out "$OUT/synthetic" --record eval-synthetic \
    --quiet "${CKPT[@]}"
# 3. passkey retrieval at growing depth and length
phase passkey 120 "${M[@]}" eval --task passkey "${PK[@]}" --out "$OUT/passkey" --record eval-passkey --quiet \
    "${CKPT[@]}"
# 4. the LoCoMo-format loader end to end (the fixture only: no LoCoMo data on the host)
phase locomo 40 "${M[@]}" eval --task locomo --data tests/fixtures/locomo_tiny.json --examples 0 "${LOC[@]}" \
    --out "$OUT/locomo-fixture" --quiet "${CKPT[@]}"
# 5. if time is left: the decode step through torch.compile, captured in the same CUDA graph
phase compiled 150 "${M[@]}" bench latency --json --save-as latency-compiled --compile --slots 16 --contexts "" \
    --hf-repeats 0 "${CMP[@]}" "${CKPT[@]}"

[ -f "$OUT/results/summary.json" ] && cp "$OUT/results/summary.json" "$OUT/summary.json"
for f in latency latency-compiled; do [ -f "$OUT/results/$f.json" ] && cp "$OUT/results/$f.json" "$OUT/$f.json"; done
tar czf "$OUT/gpu-eval.tar.gz" -C "$OUT" $(cd "$OUT" && ls -d results synthetic passkey locomo-fixture run.log.* 2>/dev/null)
rm -rf "$OUT/results" "$OUT/synthetic" "$OUT/passkey" "$OUT/locomo-fixture" "$OUT"/run.log.*
log "done; $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
