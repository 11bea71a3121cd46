#!/usr/bin/env bash
# After scripts/gpu/bootstrap-variants.sh on the same host, one command (<= 10 minutes): every variant's checkpoint
# on the eval's synthetic test split at 1k-4k tokens (latent, the questions of the CPU baselines in
# benchmarks/results/eval-cpu-baselines), and the recall benchmark at 16k-64k (latent, latent+window, rag-bm25,
# oracle) with the variant that did best on its own held-out train-split episodes (chosen without the test split).
#
#   OUT=/tmp/out bash scripts/gpu/bootstrap-eval.sh
#
# TEST_SYSTEMS: systems of the test-split eval (default: latent); TEST_VALUES: its value kinds, one eval each
# (default: pools; "pools open" for both); TEST_ARGS: its task flags (default: --examples 4 --lengths 1k,2k,4k);
# SELECT: chunks latent-select reads (default: 2).
# RECALL=0 skips the recall benchmark. $OUT gets bootstrap-eval.tgz (every results.json, report, plot and result file) and checkpoint.tgz.aa, .ab (the chosen
# variant's checkpoint), plus recall.log.
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
        --max-new-tokens 16 --values "$values" --systems ${TEST_SYSTEMS:-latent} --select-chunks "${SELECT:-2}" \
        --slot-budget 1024 --checkpoint "$dir" --out "$RUNS/eval/test-1k4k-$values-$name" \
        --record "eval-gpu-bootstrap-$values-$name" --quiet
    done
  ) > "$RUNS/eval/$name.log" 2>&1 &
done
unset CUDA_VISIBLE_DEVICES
[ "${RECALL:-1}" = 1 ] && timeout "${RECALL_TIMEOUT:-500}" $PY -m memsplice.cli.main bench online --part recall --checkpoint "$RUNS/$best/checkpoint" \
  --history-tokens ${HISTORY:-16384 32768 65536} --systems ${SYSTEMS:-latent latent+window rag-bm25 oracle} \
  --examples "${EXAMPLES:-2}" --select-chunks "${SELECT:-2}" --time-budget "${BUDGET:-130}" --save > "$OUT/recall.log" 2>&1
wait
tar czf "$OUT/bootstrap-eval.tgz" -C "$RUNS" results eval
tar czf - -C "$RUNS/$best" checkpoint | split -b 15m - "$OUT/checkpoint.tgz."  # files come back at <= 16 MiB each
tail -n 5 "$RUNS"/eval/*.log
[ "${RECALL:-1}" = 1 ] && { $PY -c "import json; print(json.load(open('$RUNS/results/online-recall.json'))['recall'])" || tail -n 5 "$OUT/recall.log"; }
grep -h "latent" "$RUNS"/eval/*.log
