#!/usr/bin/env bash
# Memory formation on one GPU, in commands of at most 10 minutes, each self-contained:
#
#   scripts/gpu/formation.sh main       train the shipped recipe until this command's deadline (the schedule spans
#                                       PLAN_MINUTES of training, default 14, i.e. two commands), export, bench
#   scripts/gpu/formation.sh resume     continue that schedule: exactly from /root state when the machine is still
#                                       warm, else from the exported bf16 weights in $INIT (fresh optimizer moments,
#                                       re-warmed LR); export, bench
#   scripts/gpu/formation.sh baselines  train the causal-embedding and language-prior baselines (BASELINE_MINUTES
#                                       each, default 2.5), then the full fidelity bench against $MAIN_CKPT, saved
#                                       under benchmarks/results/ (summary.json "formation")
#   scripts/gpu/formation.sh throughput tokens/s and MFU for compile=none/encoder/all (SECONDS_EACH, default 60;
#                                       MODES picks some)
#   scripts/gpu/formation.sh ceiling    what bounds the MFU: scripts/formation/gemm_ceiling.py times the reasoner's GEMMs
#                                       at a step's shapes for the SmolLM2 135M, 360M and 1.7B shapes; then
#                                       profile_step.py times compiled steps at 256-token passages: the shipped
#                                       reasoner, and random-weight reasoners of the 360M and 1.7B shapes (records
#                                       formation/gemm-ceiling-$CEILING_RECORD, profile-ceiling-$CEILING_RECORD[-wide],
#                                       default h200)
#   scripts/gpu/formation.sh attention  is the square attention layout right and faster inside a compiled training
#                                       step? attention_kernels.py (the kernels alone), then profile_step.py --check
#                                       of run.reader_attention lower_right and square, compiled, at 256- and
#                                       512-token passages (ATTENTION_LENGTHS; records
#                                       formation/attention-kernels-$ATTENTION_RECORD and
#                                       profile-attention-$ATTENTION_RECORD-<length>, default h200)
#   scripts/gpu/formation.sh modes      do CUDA graphs or tuned matrix-multiply templates pay in a compiled training step?
#                                       profile_step.py --check of run.compile_mode default, reduce-overhead,
#                                       max-autotune-no-cudagraphs and max-autotune (COMPILE_MODES picks some), one
#                                       process each, at 256-token passages (MODES_LENGTH; records
#                                       formation/profile-mode-$MODES_RECORD-<length>-<mode>, default h200)
#   scripts/gpu/formation.sh ablation   the language-prior ablation at equal compute: configs/formation-prior.yaml
#                                       trained twice side by side on one GPU, encoder initialised from the reasoner's
#                                       layers and at random, the same architecture, data, seed and schedule of
#                                       ABLATION_STEPS (default 800) steps; run it again until both finish (exact
#                                       resume), then the fidelity bench of the pair (--record
#                                       formation/prior-ablation-equal-steps, summary.json untouched)
#   scripts/gpu/formation.sh scratch    does a zero-pretrained encoder learn faster when it also reads the reasoner's
#                                       hidden states of the passage? configs/formation-smollm2.yaml trained twice
#                                       from random init side by side on one GPU: `tokens` (as shipped) and `states`
#                                       (memory.encoder_reasoner_states=true), the same data, seed and schedule of
#                                       SCRATCH_STEPS (default 2388, the shipped checkpoint's first run); run it again
#                                       to continue (exact resume), then the fidelity bench of the pair (--record
#                                       formation/reasoner-states-scratch)
#   scripts/gpu/formation.sh growth     what limits the encoder of $INIT? Arms side by side on one GPU, all started
#                                       from $INIT on the same data, seed and schedule of GROWTH_STEPS (default 2400):
#                                       `same` as it is, `grown` grown by GROW_FLAGS (default `--add-blocks
#                                       $GROW_BLOCKS`, GROW_BLOCKS=4 identity-initialised blocks; `--reasoner-states`
#                                       adds the reasoner-state input, `--width W` a wider stream,
#                                       `--slot-attention chunk` slots that read one chunk each) by
#                                       scripts/formation/grow_encoder.py; ARMS
#                                       (default "same grown") picks the arms; the extend settings of the shipped
#                                       checkpoint's last run (lr 3e-4, lengths 64-512); run it again to continue
#                                       (exact resume); every call ends with the fidelity bench of the arms' latest
#                                       weights (--record formation/$GROWTH_RECORD, default encoder-growth, once every
#                                       schedule is finished)
#   scripts/gpu/formation.sh target     does the refined-latent target (objectives.refined_target) teach the encoder
#                                       of $INIT more than reconstruction alone? Two arms side by side on one GPU from
#                                       $INIT, the same data, seed and schedule of TARGET_STEPS (default 600; lr 2e-4,
#                                       128- and 512-token passages): `plain` and `target` (objectives.refined_target=
#                                       TARGET_WEIGHT, default 30, with TARGET_REFINE_STEPS refinement steps, default
#                                       2); run it again to continue (exact resume); then the fidelity bench of both
#                                       at 8x and 32x (--record formation/$TARGET_RECORD, default refined-target, once
#                                       both schedules are finished)
#   scripts/gpu/formation.sh extend     more training for the weights in $INIT (default: the shipped checkpoint) on a
#                                       new schedule of PLAN_MINUTES; COMPILE=auto first times compile=none and
#                                       compile=all (SECONDS_EACH) and trains with the faster; continue with `resume`
#
# SETS (space-separated section.field=value) are passed as --set to every training command of main/resume/extend;
# COMPILE=none|encoder|all sets run.compile there.
#
# Everything that comes back is under $OUT (at most 8 files, each <= 16 MiB):
#   memory/memsplice_config.json, memory/model.safetensors.index.json, memory/model-0000k-of-0000n.safetensors
#   results.tgz   metrics.jsonl, curves.png, train summary, train_config.yaml, bench JSON, benchmarks/results/*, log
# SMALL=1 runs every phase at a toy size on the CPU (the same code path), to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
PHASE=${1:?usage: formation.sh main|resume|extend|baselines|throughput|ceiling|attention|modes|ablation|scratch|growth|target}
T0=$(date +%s)
LIMIT_S=${LIMIT_S:-590}           # the host kills a command at 600 s
RESERVE_S=${RESERVE_S:-75}        # after training: final eval, export, bench, packaging
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export MEMSPLICE_DATA=${MEMSPLICE_DATA:-/root/stage/data}
export TOKENIZERS_PARALLELISM=true
# results record $MEMSPLICE_COMMIT when it is set (a copy of the tree may carry a stale .git: pass it to name the
# commit), else git's HEAD with -dirty when tracked files differ (memsplice.bench.record.git_commit)
COMMIT=${MEMSPLICE_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
RUN=${RUN:-/root/formation}
OUT=${OUT:?set OUT to the folder whose files come back}
PY=${PY:-python3}
MAIN_CKPT=${MAIN_CKPT:-$RUN/main/memory}
INIT=${INIT:-src/memsplice/checkpoints/smollm2-135m-instruct}
mkdir -p "$RUN" "$OUT"
STAGE="$RUN/stage-$PHASE"; rm -rf "$STAGE"; mkdir -p "$STAGE/results"
export MEMSPLICE_RESULTS="$STAGE/results"
LOG="$STAGE/log.txt"
exec > >(tee -a "$LOG") 2>&1

SMALL_FLAGS=()
TRAIN_SETS=()
for kv in ${SETS:-}; do TRAIN_SETS+=(--set "$kv"); done
[ -f "$RUN/compile-mode" ] && COMPILE=${COMPILE:-$(cat "$RUN/compile-mode")}
[ -n "${COMPILE:-}" ] && [ "$COMPILE" != auto ] && TRAIN_SETS+=(--set run.compile="$COMPILE")
PASSAGES=${PASSAGES:-128}
PLAN=${PLAN_MINUTES:-14}
MIN=${BASELINE_MINUTES:-2.5}
if [ "${SMALL:-0}" = 1 ]; then
  SMALL_FLAGS=(--device cpu --set data.tokens_per_step=256 --set "data.lengths=[32,64]" --set data.length_weights=null
               --set data.curriculum_steps=0 --set data.max_corpus_tokens=200000 --set "data.sources=[tinyshakespeare]"
               --set run.eval_passages=4 --set "run.eval_lengths=[32,64]" --set run.eval_every=4
               --set run.log_every=2 --set memory.encoder_layers=2 --set optim.warmup_steps=2)
  PASSAGES=4; PLAN=0.3; MIN=0.2
fi
BENCH_SMALL=()
[ "${SMALL:-0}" = 1 ] && BENCH_SMALL=(--device cpu --lengths 32 64 --sources tinyshakespeare)

time_compile() {  # time_compile MODE SECONDS [train flags...]: a throughput run at 256-token passages, JSON on stdout
  local mode=$1 secs=$2; shift 2
  $PY -m memsplice.cli.main train --config configs/formation-smollm2.yaml --output "$RUN/tp-$mode" --quiet \
    --steps 100000 --max-minutes "$($PY -c "print($secs / 60)")" --set run.compile="$mode" \
    --set "data.lengths=[256]" --set data.length_weights=null --set data.curriculum_steps=0 \
    --set run.eval_every=0 --set "run.eval_lengths=[64]" --set run.eval_passages=8 "$@" "${SMALL_FLAGS[@]}"
}

ARM_PIDS=()
start_arm() {  # start_arm PREFIX ARM CONFIG [train flags...]: one of several runs side by side, in the background
  # --resume continues exactly when this machine holds the arm's state, else starts fresh (or from --init-from);
  # the arms share run.steps, so they follow the same schedule whatever their speed
  local prefix=$1 arm=$2 config=$3; shift 3
  $PY -m memsplice.cli.main train --config "$config" --output "$RUN/$prefix-$arm" --quiet --resume \
    --stop-at "$(deadline)" "$@" "${TRAIN_SETS[@]}" "${SMALL_FLAGS[@]}" \
    > "$STAGE/train-summary-$arm.json" 2> "$STAGE/train-$arm.log" &
  ARM_PIDS+=($!)
}

wait_arms() {  # a bare `wait` would also wait for the log's tee, which never ends
  wait "${ARM_PIDS[@]}" || true
}

finished_pair() {  # finished_pair PREFIX ARM...: show and keep the side-by-side arms' summaries and curves; true when all finished
  local prefix=$1 arm all=0; shift
  for arm in "$@"; do
    cat "$STAGE/train-summary-$arm.json" || true
    for f in metrics.jsonl curves.png; do cp "$RUN/$prefix-$arm/$f" "$STAGE/$arm-$f" 2>/dev/null || true; done
    $PY -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['finished'] else 1)" \
      "$STAGE/train-summary-$arm.json" 2>/dev/null || all=1
  done
  return $all
}

deadline() {  # unix time by which training must stop so that RESERVE_S remains
  echo $(( T0 + LIMIT_S - RESERVE_S ))
}

package() {  # copy what comes back into $OUT: the memory (sharded) and one archive of everything else
  local run_dir=$1
  if [ -n "$run_dir" ] && [ -d "$run_dir/memory" ]; then
    rm -rf "$OUT/memory"; cp -r "$run_dir/memory" "$OUT/memory"
  fi
  for f in metrics.jsonl curves.png summary.json train_config.yaml; do
    [ -n "$run_dir" ] && [ -f "$run_dir/$f" ] && cp "$run_dir/$f" "$STAGE/" || true
  done
  tar -czf "$OUT/results.tgz" -C "$STAGE" .
  ls -la "$OUT" "$OUT/memory" 2>/dev/null || true
}

echo "== formation $PHASE on $(hostname) at $(date -u +%FT%TZ), commit $COMMIT"
$PY - <<'PY'
import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
                    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

case "$PHASE" in
  main)
    $PY -m memsplice.cli.main train --config configs/formation-smollm2.yaml --output "$RUN/main" --quiet \
      --plan-minutes "$PLAN" --stop-at "$(deadline)" "${TRAIN_SETS[@]}" "${SMALL_FLAGS[@]}" | tee "$STAGE/train-summary.json" || { package "$RUN/main"; exit 1; }
    $PY -m memsplice.cli.main bench fidelity --checkpoint "$RUN/main/memory" --passages "$PASSAGES" --json \
      "${BENCH_SMALL[@]}" > "$STAGE/fidelity-main.json" || true
    package "$RUN/main"
    ;;
  resume)
    if [ -f "$RUN/main/checkpoints/LATEST" ]; then
      echo "resuming exactly from $RUN/main/checkpoints/$(cat "$RUN/main/checkpoints/LATEST")"
      $PY -m memsplice.cli.main train --config configs/formation-smollm2.yaml --output "$RUN/main" --quiet \
        --resume --stop-at "$(deadline)" "${TRAIN_SETS[@]}" "${SMALL_FLAGS[@]}" | tee "$STAGE/train-summary.json" \
        || { package "$RUN/main"; exit 1; }
    else
      echo "no training state on this machine; continuing the schedule from the weights in $INIT"
      $PY -m memsplice.cli.main train --config configs/formation-smollm2.yaml --output "$RUN/main" --quiet \
        --init-from "$INIT" --continue-schedule --stop-at "$(deadline)" "${TRAIN_SETS[@]}" "${SMALL_FLAGS[@]}" \
        | tee "$STAGE/train-summary.json" || { package "$RUN/main"; exit 1; }
    fi
    $PY -m memsplice.cli.main bench fidelity --checkpoint "$RUN/main/memory" --passages "$PASSAGES" --json \
      "${BENCH_SMALL[@]}" > "$STAGE/fidelity-main.json" || true
    package "$RUN/main"
    ;;
  baselines)
    [ -d "$MAIN_CKPT" ] || MAIN_CKPT=$INIT
    [ -f "$MAIN_CKPT/memsplice_config.json" ] || { echo "no main checkpoint at $MAIN_CKPT (set MAIN_CKPT)"; exit 2; }
    HALF=$(( (LIMIT_S - RESERVE_S) / 2 ))
    for name in causal prior; do
      # each baseline must be done by its half of this command's training time, whatever its plan says
      if [ "$name" = causal ]; then STOP=$(( T0 + HALF )); else STOP=$(( T0 + 2 * HALF )); fi
      $PY -m memsplice.cli.main train --config "configs/formation-$name.yaml" --output "$RUN/$name" --quiet \
        --plan-minutes "$MIN" --stop-at "$STOP" "${SMALL_FLAGS[@]}" | tee "$STAGE/train-summary-$name.json"
      for f in metrics.jsonl curves.png; do cp "$RUN/$name/$f" "$STAGE/$name-$f" || true; done
    done
    TRAIN_RUN=$RUN/main; [ -f "$TRAIN_RUN/summary.json" ] || TRAIN_RUN=""
    $PY -m memsplice.cli.main bench fidelity --checkpoint "$MAIN_CKPT" --causal "$RUN/causal/memory" \
      --prior "$RUN/prior/memory" --passages "$PASSAGES" --save ${TRAIN_RUN:+--train-run "$TRAIN_RUN"} --json \
      "${BENCH_SMALL[@]}" > "$STAGE/fidelity-all.json"
    cat "$STAGE/results/summary.json"
    package ""
    ;;
  throughput)
    SECS=${SECONDS_EACH:-60}
    for mode in ${MODES:-none encoder all}; do
      time_compile "$mode" "$SECS" | tee "$STAGE/throughput-$mode.json" || echo "compile=$mode failed"
    done
    package ""
    ;;
  ceiling)
    REC=${CEILING_RECORD:-h200}
    PROFILE=(--length 256 --warmup 6 --steps 20 --profile-steps 3)
    [ "${SMALL:-0}" = 1 ] && PROFILE=(--length 32 --tokens-per-step 128 --warmup 1 --steps 1 --profile-steps 0)
    if [ "${SMALL:-0}" = 1 ]; then echo "(SMALL: no GEMM timing on the CPU)"
    else $PY scripts/formation/gemm_ceiling.py --shapes smollm2-135m smollm2-360m smollm2-1.7b --record "$REC" || true; fi
    $PY scripts/formation/profile_step.py "${PROFILE[@]}" --record "ceiling-$REC" \
      --variant smollm2-135m run.compile=all || true
    WIDE=()
    PRESETS="smollm2-360m smollm2-1.7b"; [ "${SMALL:-0}" = 1 ] && PRESETS="smollm2-360m"
    for preset in ${WIDE_PRESETS:-$PRESETS}; do
      $PY scripts/formation/gemm_ceiling.py --write-reasoner "$preset" "$RUN/random-$preset" \
        && WIDE+=(--variant "random-$preset" run.compile=all run.reasoner="$RUN/random-$preset")
    done
    [ "${#WIDE[@]}" -gt 0 ] && { $PY scripts/formation/profile_step.py "${PROFILE[@]}" --record "ceiling-$REC-wide" \
      "${WIDE[@]}" || true; }
    package ""
    ;;
  attention)
    REC=${ATTENTION_RECORD:-h200}
    if [ "${SMALL:-0}" = 1 ]; then echo "(SMALL: no kernel timing on the CPU)"
    else $PY scripts/formation/attention_kernels.py --record "$REC" || true; fi
    for length in ${ATTENTION_LENGTHS:-256 512}; do
      PROFILE=(--length "$length" --warmup 6 --steps 20 --profile-steps 3 --check)
      [ "${SMALL:-0}" = 1 ] && PROFILE=(--length 32 --tokens-per-step 128 --warmup 1 --steps 1 --profile-steps 0 --check)
      $PY scripts/formation/profile_step.py "${PROFILE[@]}" --record "attention-$REC-$length" \
        --variant lower_right run.compile=all run.reader_attention=lower_right \
        --variant square run.compile=all run.reader_attention=square || true
    done
    package ""
    ;;
  modes)
    REC=${MODES_RECORD:-h200}
    LEN=${MODES_LENGTH:-256}
    PROFILE=(--length "$LEN" --warmup 6 --steps 20 --profile-steps 3 --check)
    [ "${SMALL:-0}" = 1 ] && PROFILE=(--length 32 --tokens-per-step 128 --warmup 1 --steps 1 --profile-steps 0 --check)
    for mode in ${COMPILE_MODES:-default reduce-overhead max-autotune-no-cudagraphs max-autotune}; do
      $PY scripts/formation/profile_step.py "${PROFILE[@]}" --record "mode-$REC-$LEN-$mode" \
        --variant "$mode" run.compile=all run.compile_mode="$mode" || echo "compile_mode=$mode failed"
    done
    package ""
    ;;
  ablation)
    STEPS=${ABLATION_STEPS:-800}
    [ "${SMALL:-0}" = 1 ] && STEPS=4
    for init in reasoner random; do
      start_arm ablation "$init" configs/formation-prior.yaml --steps "$STEPS" --set memory.encoder_init="$init" \
        --set run.eval_every=200
    done
    wait_arms
    if finished_pair ablation reasoner random; then
      $PY -m memsplice.cli.main bench fidelity --checkpoint "$RUN/ablation-random/memory" \
        --prior "$RUN/ablation-reasoner/memory" --passages "$PASSAGES" --record formation/prior-ablation-equal-steps \
        --json "${BENCH_SMALL[@]}" > "$STAGE/fidelity-ablation.json" || echo "the fidelity bench failed"
    else
      echo "the schedules are not finished: run this phase again (it resumes exactly)"
    fi
    package ""
    ;;
  scratch)
    STEPS=${SCRATCH_STEPS:-2388}
    [ "${SMALL:-0}" = 1 ] && STEPS=4
    for arm in tokens states; do
      states=false; [ "$arm" = states ] && states=true
      start_arm scratch "$arm" configs/formation-smollm2.yaml --steps "$STEPS" \
        --set memory.encoder_reasoner_states=$states --set run.eval_every=200
    done
    wait_arms
    RECORD=()
    if finished_pair scratch tokens states; then RECORD=(--record formation/reasoner-states-scratch)
    else echo "the schedules are not finished: run this phase again (it resumes exactly)"; fi
    $PY -m memsplice.cli.main bench fidelity --checkpoint "$RUN/scratch-tokens/memory" \
      --checkpoint "$RUN/scratch-states/memory" --passages "$PASSAGES" "${RECORD[@]}" --json "${BENCH_SMALL[@]}" \
      > "$STAGE/fidelity-scratch.json" || echo "the fidelity bench failed"
    package ""
    ;;
  growth)
    STEPS=${GROWTH_STEPS:-2400}
    [ "${SMALL:-0}" = 1 ] && STEPS=4
    GROWN_INIT="$RUN/growth-init-grown"
    read -r -a ARM_LIST <<< "${ARMS:-same grown}"
    if [[ " ${ARM_LIST[*]} " == *" grown "* ]] && [ ! -f "$GROWN_INIT/memsplice_config.json" ]; then
      read -r -a GROW <<< "${GROW_FLAGS:---add-blocks ${GROW_BLOCKS:-4}}"
      $PY scripts/formation/grow_encoder.py --checkpoint "$INIT" "${GROW[@]}" --output "$GROWN_INIT"
    fi
    GROWTH_SETS=(--set optim.lr=3e-4 --set optim.warmup_steps=50 --set data.curriculum_steps=0
                 --set "data.lengths=[64,128,256,512]" --set "data.length_weights=[1.0,2.0,1.5,2.0]"
                 --set run.eval_every=200)
    for arm in "${ARM_LIST[@]}"; do
      if [ "$arm" = same ]; then from=$INIT; else from=$GROWN_INIT; fi
      start_arm growth "$arm" configs/formation-smollm2.yaml --init-from "$from" --steps "$STEPS" "${GROWTH_SETS[@]}"
    done
    wait_arms
    RECORD=()
    if finished_pair growth "${ARM_LIST[@]}"; then RECORD=(--record "formation/${GROWTH_RECORD:-encoder-growth}")
    else echo "the schedules are not finished: run this phase again (it resumes exactly)"; fi
    BENCH_ARMS=()
    for arm in "${ARM_LIST[@]}"; do BENCH_ARMS+=(--checkpoint "$RUN/growth-$arm/memory"); done
    $PY -m memsplice.cli.main bench fidelity "${BENCH_ARMS[@]}" --passages "$PASSAGES" "${RECORD[@]}" --json \
      "${BENCH_SMALL[@]}" > "$STAGE/fidelity-growth.json" || echo "the fidelity bench failed"
    # one arm: its weights come back too (two arms' would not fit in what returns)
    if [ "${#ARM_LIST[@]}" = 1 ]; then package "$RUN/growth-${ARM_LIST[0]}"; else package ""; fi
    ;;
  target)
    STEPS=${TARGET_STEPS:-600}
    [ "${SMALL:-0}" = 1 ] && STEPS=4
    TARGET_SETS=(--set optim.lr=2e-4 --set optim.warmup_steps=50 --set data.curriculum_steps=0
                 --set "data.lengths=[128,512]" --set data.length_weights=null --set run.eval_every=200
                 --set "run.eval_lengths=[128,512]")
    start_arm target plain configs/formation-smollm2.yaml --init-from "$INIT" --steps "$STEPS" "${TARGET_SETS[@]}"
    start_arm target target configs/formation-smollm2.yaml --init-from "$INIT" --steps "$STEPS" "${TARGET_SETS[@]}" \
      --set objectives.refined_target="${TARGET_WEIGHT:-30}" \
      --set objectives.refined_target_steps="${TARGET_REFINE_STEPS:-2}"
    wait_arms
    RECORD=()
    if finished_pair target plain target; then RECORD=(--record "formation/${TARGET_RECORD:-refined-target}")
    else echo "the schedules are not finished: run this phase again (it resumes exactly)"; fi
    LENGTHS=(--lengths 128 512); [ "${SMALL:-0}" = 1 ] && LENGTHS=()
    $PY -m memsplice.cli.main bench fidelity --checkpoint "$RUN/target-plain/memory" \
      --checkpoint "$RUN/target-target/memory" "${LENGTHS[@]}" --passages "$PASSAGES" "${RECORD[@]}" --json \
      "${BENCH_SMALL[@]}" > "$STAGE/fidelity-target.json" || echo "the fidelity bench failed"
    package ""
    ;;
  extend)
    if [ "${COMPILE:-none}" = auto ]; then
      SECS=${SECONDS_EACH:-45}
      best=none; best_tps=0
      for mode in none all; do
        time_compile "$mode" "$SECS" --init-from "$INIT" > "$STAGE/throughput-$mode.json" \
          || { echo "compile=$mode failed"; continue; }
        tps=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['throughput']['tokens_per_s'])" \
              "$STAGE/throughput-$mode.json" 2>/dev/null || echo 0)
        echo "compile=$mode: $tps tokens/s"
        if $PY -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$tps" "$best_tps"; then
          best=$mode; best_tps=$tps
        fi
      done
      COMPILE=$best
      TRAIN_SETS+=(--set run.compile="$COMPILE")
    fi
    echo "${COMPILE:-none}" > "$RUN/compile-mode"
    echo "extending $INIT with compile=${COMPILE:-none}, sets: ${SETS:-none}"
    rm -rf "$RUN/main"
    $PY -m memsplice.cli.main train --config configs/formation-smollm2.yaml --output "$RUN/main" --quiet \
      --init-from "$INIT" --plan-minutes "$PLAN" --stop-at "$(deadline)" "${TRAIN_SETS[@]}" "${SMALL_FLAGS[@]}" \
      | tee "$STAGE/train-summary.json" || { package "$RUN/main"; exit 1; }
    package "$RUN/main"
    ;;
  *)
    echo "unknown phase $PHASE"; exit 2 ;;
esac
echo "== done in $(( $(date +%s) - T0 )) s"
