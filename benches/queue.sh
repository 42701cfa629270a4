#!/usr/bin/env bash
# Queue listing benchmark: fill the MTA's queue with MESSAGES deferred
# messages (its next hop is down), then time what an operator runs to see
# it: the whole queue listed as JSON (mtad: `ctl queue list --json`,
# fetched in pages of 1,000; Postfix: `postqueue -j`) and as text (mtad:
# `ctl queue list`; Postfix: `postqueue -p`), and mtad's per-destination
# summary (`ctl queue summary`; Postfix's qshape is a separate Perl tool
# and not timed). Each runs RUNS times; the median counts.
#
# usage: benches/queue.sh MTA [MESSAGES]
#   MTA       mtad | postfix
#   MESSAGES  default 20000
#
# Environment: RUNS=5, SESSIONS=20, and those of lib.sh.
# Output: `QUEUE mta=... messages=... rows=... json_s=... text_s=... summary_s=...`
set -euo pipefail

MTA=${1:?usage: $0 mtad|postfix [MESSAGES]}
MESSAGES=${2:-20000}
RUNS=${RUNS:-5}
SESSIONS=${SESSIONS:-20}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/lib.sh
source "$HERE/lib.sh"

# The next hop goes away: every message stays queued, deferred.
kill "$SINK_PID"
wait "$SINK_PID" 2>/dev/null || true
SINK_PID=''

CTL=("$MTAD_BIN" ctl --admin "http://$HOST:$ADMIN_PORT")
queued() {
    case $MTA in
    mtad) "${CTL[@]}" --json status | python3 -c 'import json,sys; print(json.load(sys.stdin)["queued"])' ;;
    *) postqueue -c "$PF_CONF" -p | awk '/ Requests?\.$/ { n = $5 } END { print n + 0 }' ;;
    esac
}

log "queueing $MESSAGES messages"
"$SMTP_SOURCE" -s "$SESSIONS" -m "$MESSAGES" -l 1024 -f "$SENDER" -t "$RCPT" \
    -M client.example.test "$HOST:$PORT" >"$T/source.out" 2>&1 ||
    die "smtp-source failed: $(tail -3 "$T/source.out")"
n=0
for _ in $(seq 600); do
    n=$(queued)
    [[ $n -ge $MESSAGES ]] && break
    sleep 1
done
[[ $n -ge $MESSAGES ]] || die "only $n of $MESSAGES queued"
log "$n queued; load: $(cut -d' ' -f1-3 /proc/loadavg)"

# Median wall time in seconds of RUNS runs of a command; the output of the
# first run is kept in $T/out.0.
median() {
    local i t0 t1 times=()
    for ((i = 0; i < RUNS; i++)); do
        t0=$(date +%s.%N)
        "$@" >"$T/out.$i" || die "$* failed"
        t1=$(date +%s.%N)
        times+=("$(awk "BEGIN { print $t1 - $t0 }")")
    done
    printf '%s\n' "${times[@]}" | sort -g | awk '{ a[NR] = $1 } END { printf "%.3f", a[int((NR + 1) / 2)] }'
}

case $MTA in
mtad)
    json=$(median "${CTL[@]}" --json queue list --limit "$MESSAGES")
    rows=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["messages"]))' "$T/out.0")
    text=$(median "${CTL[@]}" queue list --limit "$MESSAGES")
    summary=$(median "${CTL[@]}" queue summary)
    ;;
*)
    json=$(median postqueue -c "$PF_CONF" -j)
    rows=$(wc -l <"$T/out.0")
    text=$(median postqueue -c "$PF_CONF" -p)
    summary=-
    ;;
esac
[[ $rows -ge $MESSAGES ]] || die "the listing had $rows rows, not $MESSAGES"
echo "QUEUE mta=$MTA messages=$MESSAGES rows=$rows json_s=$json text_s=$text summary_s=$summary"
