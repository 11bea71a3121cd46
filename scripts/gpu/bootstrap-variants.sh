#!/usr/bin/env bash
# Several bootstrap variants side by side on one GPU, one command (<= 10 minutes on one H100 or H200). The 135M
# reasoner leaves the card mostly idle, so N processes do nearly N times the work of one.
#
#   OUT=/tmp/out bash scripts/gpu/bootstrap-variants.sh START_CHECKPOINT_DIR
#
# On a host with several GPUs the variants take them in turn (CUDA_VISIBLE_DEVICES); processes sharing one GPU are
# time-sliced (one 3-way run on an H200 made ~1 update/s per process), so one variant per GPU is best.
# VARIANTS: one "NAME FLAGS..." per line (default below); COMMON flags go to every variant. Each run writes to
# $RUNS/NAME (default /root/boot), so its checkpoint stays on the host for scripts/gpu/bootstrap-eval.sh; each
# report is saved with provenance as $RUNS/results/bootstrap-gpu-NAME.json. $OUT gets variants.tgz (reports,
# metrics, logs; no checkpoints) and variants.json (each variant's held-out curve).
set -uo pipefail
cd "$(dirname "$0")/../.."
CKPT="${1:?usage: bootstrap-variants.sh START_CHECKPOINT_DIR}"
OUT="${OUT:?set OUT to the output directory}"
RUNS="${RUNS:-/root/boot}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export MEMSPLICE_RESULTS="$RUNS/results"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"
PY="${PYTHON:-python3}"
COMMON="${COMMON:---updates 4000 --max-seconds ${SECONDS_BUDGET:-360} --eval-every ${EVAL_EVERY:-400} --lr 1.5e-4}"
# Default: the latent-select read path (select updates, evidence-only updates, the address loss with the encoder) at
# 64- and 32-token chunks, as run on 2026-11-29 (benchmarks/results/online/bootstrap-gpu-select/). The start
# checkpoint gets an address head if it has none (better: one trained first with python -m memsplice.online.address).
VARIANTS="${VARIANTS:-c64-select --chunk-tokens 64 --open-values 0.5 --episodes 1500 --evidence-share 0.3 --select-share 0.6 --address-weight 0.2 --reconstruction-rows 1
c32-select --chunk-tokens 32 --open-values 0.5 --episodes 1500 --evidence-share 0.3 --select-share 0.6 --address-weight 0.2 --reconstruction-rows 1}"
mkdir -p "$RUNS/results" "$OUT"
$PY -c "from memsplice.reasoner import load_reasoner; load_reasoner(None)"  # dequantize once, before they race
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
i=0
while read -r name flags; do
  [ -z "$name" ] && continue
  [ "$gpus" -gt 0 ] && export CUDA_VISIBLE_DEVICES=$((i % gpus))
  i=$((i + 1))
  # shellcheck disable=SC2086
  $PY -m memsplice.online.bootstrap --checkpoint "$CKPT" $COMMON $flags --output "$RUNS/$name" \
    --record "bootstrap-gpu-$name" > "$RUNS/$name.log" 2>&1 &
done <<< "$VARIANTS"
wait
$PY - "$RUNS" > "$OUT/variants.json" <<'PY'
import json, sys
from pathlib import Path
out = {}
for report in sorted(Path(sys.argv[1]).glob("*/report.json")):
    r = json.loads(report.read_text())
    out[report.parent.name] = {
        "updates": r["updates"], "stopped_by": r["stopped_by"], "seconds": r["seconds"],
        "heldout_values": r.get("heldout_values"), "no_memory": r["answer_accuracy_no_memory"],
        "curve": r["curve"],
    }
print(json.dumps(out, indent=1))
PY
tar czf "$OUT/variants.tgz" -C "$RUNS" --exclude=checkpoint .
for f in "$RUNS"/*.log; do echo "== $f"; tail -n 4 "$f"; done
cat "$OUT/variants.json" | grep -E '"(update|generated_contains|answer_accuracy)"' | paste - - - | tail -n 30
