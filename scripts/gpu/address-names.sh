#!/usr/bin/env bash
# A fresh address head trained with half of each group of episodes' names made up, then measured where
# latent-readback is scored, in one visit:
#   train    python -m memsplice.online.address --new-head --open-names 0.5 (only the head trains; encoder,
#            projections and gate stay the start checkpoint's)
#   margin   its recency margin chosen on train-split conversations of 16k/32k/64k tokens, seeds 0 and 1
#            (scripts/online/address_recall.py --split train --recency-margins ..., scripts/online/choose_margin.py),
#            written into the new checkpoint's config
#   measure  at once: recall@k on the test split (seeds 0-3, 16k-64k; address_recall.py) and latent-readback's
#            answers there with the shipped reading prefix (scripts/gpu/reading.sh with PREFIX), one process per
#            (length, seed)
#
#   OUT=/tmp/out bash scripts/gpu/address-names.sh START_CHECKPOINT_DIR
#
# STAGES (default "train margin measure"), RUNS (default /root/address-names), LENGTHS (history tokens of the
# margin and recall conversations) and HISTORY (of the read-back ones; both default "16384 32768 65536"), BUDGET
# (each read-back process's --time-budget, default 540), STEPS/EPISODES (2000/400), TRAIN_ARGS (more flags for the
# head's training), MARGIN_SEEDS (train-split seeds the margin is chosen on, default "0 1"), USER_SEEDS (seeds of
# first-person conversations, 1k-4k tokens, added to the margin's choice and to the test recall; default none).
# The shipped head's recipe: TRAIN_ARGS="--user-perspective 0.3" MARGIN_SEEDS="0 1 2 3" USER_SEEDS="0 1".
# Writes under $RUNS: checkpoint/, address-train.log, report.json, margin-train-s{0,1}.json (and
# margin-train-user-s*.json), margin.json, recall-test-s{0..3}.json (and recall-test-user-s*.json), readback/
# (reading.sh's results and logs); $OUT/address-names.tgz holds all of it but the latent cache and the weights, which
# come back in $OUT/checkpoint.
set -uo pipefail
cd "$(dirname "$0")/../.."
CKPT="${1:?usage: address-names.sh START_CHECKPOINT_DIR}"
OUT="${OUT:?set OUT to the output directory}"
RUNS="${RUNS:-/root/address-names}"
STAGES="${STAGES:-train margin measure}"
LENGTHS="${LENGTHS:-16384 32768 65536}"
HISTORY="${HISTORY:-16384 32768 65536}"
BUDGET="${BUDGET:-540}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"
PY="${PYTHON:-python3}"
PREFIX="${PREFIX:-$PWD/src/memsplice/checkpoints/smollm2-135m-instruct-reading}"
MARGINS="0 0.25 0.5 0.75 1 1.5 2"
MARGIN_SEEDS="${MARGIN_SEEDS:-0 1}"
USER_SEEDS="${USER_SEEDS:-}"
mkdir -p "$RUNS" "$OUT"
pack() {  # the weights come back as their own shards (each under the 16 MiB a returned file may have), the rest as one archive
  tar czf "$OUT/address-names.tgz" -C "$RUNS" --exclude=cache --exclude='checkpoint/*.safetensors' .
  [ -d "$RUNS/checkpoint" ] && { rm -rf "$OUT/checkpoint"; cp -r "$RUNS/checkpoint" "$OUT/checkpoint"; }
  return 0
}
trap pack EXIT
if [[ " $STAGES " == *" train "* ]]; then
  # shellcheck disable=SC2086
  $PY -m memsplice.online.address --checkpoint "$CKPT" --output "$RUNS" --chunk-tokens 32 --new-head \
    --open-names 0.5 --steps "${STEPS:-2000}" --episodes "${EPISODES:-400}" ${TRAIN_ARGS:-} > "$RUNS/address-train.log" 2>&1 \
    || { echo "address training failed"; tail -n 20 "$RUNS/address-train.log"; exit 1; }
  echo "trained: $(grep -o '"recall@1": [0-9.]*' "$RUNS/report.json" | tail -1)"
fi
recall() {  # recall NAME SEED [address_recall.py flags...]: the head's recall@k, into $RUNS/NAME.json (log NAME.log)
  local name=$1 seed=$2; shift 2
  $PY scripts/online/address_recall.py "$RUNS/checkpoint" --seed "$seed" --values pools --cache "$RUNS/cache" "$@" \
    > "$RUNS/$name.json" 2> "$RUNS/$name.log"
}
if [[ " $STAGES " == *" margin "* ]]; then
  # shellcheck disable=SC2086
  for s in $MARGIN_SEEDS; do recall "margin-train-s$s" "$s" --split train --lengths $LENGTHS --recency-margins $MARGINS & done
  # shellcheck disable=SC2086
  for s in $USER_SEEDS; do recall "margin-train-user-s$s" "$s" --split train --perspective user --recency-margins $MARGINS & done
  wait
  $PY scripts/online/choose_margin.py "$RUNS/checkpoint" "$RUNS"/margin-train-*.json > "$RUNS/margin.json" \
    || { echo "choosing the margin failed"; exit 1; }
  echo "margin: $(grep '"value"' "$RUNS/margin.json")"
fi
if [[ " $STAGES " == *" measure "* ]]; then
  for pair in "0 1" "2 3"; do
    # shellcheck disable=SC2086
    (for s in $pair; do recall "recall-test-s$s" "$s" --split test --lengths $LENGTHS; done) &
  done
  for s in $USER_SEEDS; do recall "recall-test-user-s$s" "$s" --split test --perspective user & done
  OUT="$RUNS/readback" PREFIX="$PREFIX" HISTORY="$HISTORY" WAVES="0 1 2 3" SYSTEM_GROUPS=latent-readback \
    BUDGET="$BUDGET" bash scripts/gpu/reading.sh "$RUNS/checkpoint" || echo "read-back failed"
  wait
fi
