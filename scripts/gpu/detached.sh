#!/usr/bin/env bash
# Long GPU work that outlives one 10-minute command of the lent machine: jobs started detached (setsid), so they run
# on between commands as long as the machine stays warm (each next command must come within its idle release), and
# later commands only watch them and collect what they wrote.
#
#   scripts/gpu/detached.sh start NAME -- COMMAND...   run COMMAND detached; its output goes to $JOBS/NAME.log
#   scripts/gpu/detached.sh watch SECONDS              wait up to SECONDS for the jobs, print each log's last lines
#   scripts/gpu/detached.sh collect                    pack $JOBS (logs and whatever the jobs wrote) into
#                                                      $OUT/jobs.tgz
#
# Used for the write-consolidation stability streams (three copies of scripts/gpu/stability.sh on GPU 0, with
# BUDGET set to the whole visit) beside `scripts/gpu/formation.sh ablation` on GPU 1.
set -uo pipefail
JOBS=${JOBS:-/root/jobs}
mkdir -p "$JOBS"
case "${1:?usage: detached.sh start NAME -- COMMAND... | watch SECONDS | collect}" in
  start)
    name=${2:?job name}; shift 2; [ "${1:-}" = "--" ] && shift
    setsid nohup "$@" > "$JOBS/$name.log" 2>&1 < /dev/null &
    echo "$!" > "$JOBS/$name.pid"
    echo "started $name (pid $!)"
    ;;
  watch)
    end=$(( $(date +%s) + ${2:?seconds} ))
    while (( $(date +%s) < end )); do
      running=0
      for f in "$JOBS"/*.pid; do [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && running=1; done
      (( running )) || break
      sleep 10
    done
    for f in "$JOBS"/*.log; do echo "== $f"; tail -c 1500 "$f" | tr '\r' '\n' | tail -n 6; done
    for f in "$JOBS"/*.pid; do
      kill -0 "$(cat "$f")" 2>/dev/null && echo "$(basename "$f" .pid): running" || echo "$(basename "$f" .pid): ended"
    done
    ;;
  collect)
    tar -czf "${OUT:?set OUT}/jobs.tgz" -C "$JOBS" . && ls -la "$OUT"
    ;;
  *)
    echo "unknown mode $1"; exit 2 ;;
esac
