#!/usr/bin/env bash
# The address head retrained on long train-split histories, then measured where latent-readback is scored: its
# recall@k on the synthetic test split at 16k/32k/64k (seeds 0 and 1), then latent-readback's answers there.
#
#   OUT=/tmp/out bash scripts/gpu/address-long.sh START_CHECKPOINT_DIR
#
# The shipped head was trained on 1k-4k-token conversations and is asked at 16k-64k, where each question has 4-16x
# more chunks to tell apart; HISTORY sets the training lengths (default 4096 8192 16384). Only the head trains
# (`python -m memsplice.online.address`): encoder, projections and gate stay as they are. Writes to $RUNS (default
# /root/address-long): the checkpoint, address-train.log, recall-<seed>.json and the read-back runs under
# results/<tokens>-seed<seed>/ (scripts/gpu/online-recall.sh with SPLIT=1); $OUT gets address-long.tgz (all of it
# but the checkpoint, which a later command can copy out: it is five files of 38 MB in all).
set -uo pipefail
cd "$(dirname "$0")/../.."
CKPT="${1:?usage: address-long.sh START_CHECKPOINT_DIR}"
OUT="${OUT:?set OUT to the output directory}"
RUNS="${RUNS:-/root/address-long}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"
PY="${PYTHON:-python3}"
HISTORY="${HISTORY:-4096 8192 16384}"
STEPS="${STEPS:-3000}"
EPISODES="${EPISODES:-240}"
READBACK_BUDGET="${READBACK_BUDGET:-420}"
mkdir -p "$RUNS" "$OUT"
# shellcheck disable=SC2086
$PY -m memsplice.online.address --checkpoint "$CKPT" --output "$RUNS" --history-tokens $HISTORY \
  --steps "$STEPS" --episodes "$EPISODES" --eval-every 500 > "$RUNS/address-train.log" 2>&1 \
  || { echo "address training failed"; tail -n 20 "$RUNS/address-train.log"; exit 1; }
for s in 0 1; do
  $PY scripts/online/address_recall.py "$RUNS/checkpoint" --lengths 16384 32768 65536 --seed "$s" \
    --values pools > "$RUNS/recall-$s.json" 2> "$RUNS/recall-$s.log" &
done
wait
OUT="$RUNS" SPLIT=1 SEEDS="0 1" EXAMPLES=4 SYSTEMS=latent-readback BUDGET="$READBACK_BUDGET" \
  EXTRA="--chunk-tokens 32 --refine-steps 5 --write-turns 128 --encode-batch 64 --select-chunks 1" \
  bash scripts/gpu/online-recall.sh "$RUNS/checkpoint" > "$RUNS/readback.log" 2>&1 || echo "read-back failed"
tar czf "$OUT/address-long.tgz" -C "$RUNS" --exclude=checkpoint .
