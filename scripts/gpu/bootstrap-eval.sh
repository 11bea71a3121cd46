#!/usr/bin/env bash
# After scripts/gpu/bootstrap-variants.sh on the same host, one command (<= 10 minutes): every variant's checkpoint
# on the eval's synthetic test split at 1k-4k tokens (the questions of the CPU baselines in
# benchmarks/results/eval-cpu-baselines), and the recall benchmark at 16k-64k with the variant that did best on its
# own held-out train-split episodes (chosen without the test split).
#
#   OUT=/tmp/out bash scripts/gpu/bootstrap-eval.sh
#
# TEST_SYSTEMS: systems of the test-split eval, comma-separated (default: latent-select,latent-oracle,latent);
# TEST_VALUES: its value kinds, one eval each (default: pools; "pools open" for both); TEST_ARGS: its task flags
# (default: --examples 4 --lengths 1k,2k,4k); SELECT: chunks latent-select reads (default: 2). SYSTEMS: recall
# systems, space-separated (default: latent-select rag-bm25 oracle); HISTORY: its lengths; RECALL=0 skips it.
# $OUT gets bootstrap-eval.tgz (every results.json, report, plot and result file, the merged online-recall.json),
# checkpoint.tgz.aa, .ab (the chosen variant's checkpoint) and recall-LENGTH.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT to the output directory}"
RUNS="${RUNS:-/root/boot}"
export PYTHONPATH="$PWD/src${EXTRA_SITE:+:$EXTRA_SITE}${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA="${MEMSPLICE_DATA:-/root/stage/data}"
export MEMSPLICE_RESULTS="$RUNS/results"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"
export TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$RUNS/eval"
best=$($PY - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = [(json.loads(p.read_text()), p.parent.name) for p in Path(sys.argv[1]).glob("*/report.json")]
# latent-select's answers where the variant has an address head, else latent's
score = lambda r: max(e.get("generated_contains_select", e["generated_contains"]) for e in r["curve"] if e["update"] == r["curve"][-1]["update"])
print(max(runs, key=lambda x: (x[0].get("heldout_values") == "open", score(x[0])))[1])
PY
)
echo "best on held-out train-split episodes: $best"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
i=0
for dir in "$RUNS"/*/checkpoint; do
  name=$(basename "$(dirname "$dir")")
  [ "$gpus" -gt 0 ] && export CUDA_VISIBLE_DEVICES=$((i % gpus))
  i=$((i + 1))
  (
    for values in ${TEST_VALUES:-pools}; do
      # shellcheck disable=SC2086
      $PY -m memsplice.cli.main eval --task synthetic ${TEST_ARGS:---examples 4 --lengths 1k,2k,4k} --facts 6 \
        --max-new-tokens 16 --values "$values" --systems "${TEST_SYSTEMS:-latent-select,latent-oracle,latent}" --select-chunks "${SELECT:-2}" \
        --slot-budget 1024 --checkpoint "$dir" --out "$RUNS/eval/test-1k4k-$values-$name" \
        --record "eval-gpu-bootstrap-$values-$name" --quiet
    done
  ) > "$RUNS/eval/$name.log" 2>&1 &
done
unset CUDA_VISIBLE_DEVICES
# Recall: one process per history length, spread over the GPUs (a single process ran out of time at 64k, where
# writing the memory takes minutes), each saving into its own directory; merged below.
if [ "${RECALL:-1}" = 1 ]; then
  j=0
  for length in ${HISTORY:-16384 32768 65536}; do
    [ "$gpus" -gt 0 ] && export CUDA_VISIBLE_DEVICES=$(((i + j) % gpus))
    j=$((j + 1))
    # shellcheck disable=SC2086
    MEMSPLICE_RESULTS="$RUNS/recall-$length" timeout "${RECALL_TIMEOUT:-500}" $PY -m memsplice.cli.main bench online \
      --part recall --checkpoint "$RUNS/$best/checkpoint" --history-tokens "$length" \
      --systems ${SYSTEMS:-latent-select rag-bm25 oracle} --examples "${EXAMPLES:-2}" --select-chunks "${SELECT:-2}" \
      --time-budget "${BUDGET:-130}" --save > "$OUT/recall-$length.log" 2>&1 &
  done
  unset CUDA_VISIBLE_DEVICES
fi
wait
[ "${RECALL:-1}" = 1 ] && $PY - "$RUNS" > "$RUNS/results/online-recall.json" <<'PY'
import json, sys
from pathlib import Path
runs = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("recall-*/online-recall.json"))]
merged = {"recall": {}, "kv_fraction": {}, "lengths": {}, "runs": []}
for r in runs:
    for key in ("recall", "kv_fraction", "lengths"):
        merged[key].update(r.get(key, {}))
    merged["runs"].append({k: r.get(k) for k in ("command", "commit", "device", "date")})
print(json.dumps(merged, indent=2))
PY
tar czf "$OUT/bootstrap-eval.tgz" -C "$RUNS" results eval
tar czf - -C "$RUNS/$best" checkpoint | split -b 15m - "$OUT/checkpoint.tgz."  # files come back at <= 16 MiB each
tail -n 5 "$RUNS"/eval/*.log
[ "${RECALL:-1}" = 1 ] && { $PY -c "import json; print(json.load(open('$RUNS/results/online-recall.json'))['recall'])"; tail -n 2 "$OUT"/recall-*.log; }
grep -h "latent" "$RUNS"/eval/*.log
