#!/usr/bin/env bash
# Relay benchmark: smtp-source -> MTA under test -> smtp-sink, end to end.
#
# usage: benches/relay.sh MTA [MESSAGES]
#   MTA       mtad | postfix | postfix-tuned
#   MESSAGES  default 20000
#
# Environment (all optional):
#   SESSIONS=20           parallel smtp-source sessions (one message each)
#   SIZE=4096             payload bytes per message
#   LATENCY_MESSAGES=N    smtp-source messages for the accept-latency phase
#                         (default: MESSAGES; 0 skips the phase)
#   PROBES=4              latency.py sessions timing messages in that phase
#   TIMEOUT=900           seconds allowed for the sink to receive everything
#   STALL=120             ... or to go without receiving anything
#   BENCH_TMPDIR=/var/tmp where spools are created; must be a real disk,
#                         not tmpfs, or fsync costs nothing
#   MTAD_BIN=target/release/mtad
#   KEEP=1                keep the temp dir (logs, spool) for inspection
#
# Output: human progress on stderr, and on stdout the machine-readable lines
#   RESULT mta=... messages=... seconds=... msgs_per_sec=... peak_rss_kib=...
#   LATENCY ... (from latency.py, prefixed with mta=)
set -euo pipefail

MTA=${1:?usage: $0 mtad|postfix|postfix-tuned [MESSAGES]}
MESSAGES=${2:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-4096}
LATENCY_MESSAGES=${LATENCY_MESSAGES:-$MESSAGES}
PROBES=${PROBES:-4}
TIMEOUT=${TIMEOUT:-900}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/lib.sh
source "$HERE/lib.sh"

python3 "$HERE/memsample.py" "$MTA_PID" 0.2 >"$T/mem.out" &
MEM_PID=$!

calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }

# --- phase 1: throughput ------------------------------------------------------
# smtp-source without -d disconnects after every message, so this is
# SESSIONS clients each doing connect/EHLO/MAIL/RCPT/DATA/QUIT in a loop.
log "relaying $MESSAGES x $SIZE B in $SESSIONS sessions"
t_start=$(date +%s.%N)
# The subshell notes when smtp-source finished: that bounds the accept side.
(
    "$SMTP_SOURCE" -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" -f "$SENDER" -t "$RCPT" \
        -M client.example.test "$HOST:$PORT" >"$T/source.out" 2>&1
    date +%s.%N >"$T/source.end"
) &
SOURCE_PID=$!
if ! sink_line=$(python3 "$HERE/sinkwait.py" "$T/sink.count" "$MESSAGES" "$TIMEOUT" "$MTA_PID"); then
    kill "$SOURCE_PID" 2>/dev/null || true
    die "sink did not receive $MESSAGES messages in ${TIMEOUT}s ($sink_line); smtp-source: $(tail -3 "$T/source.out")"
fi
t_end=${sink_line##*at=}
wait "$SOURCE_PID" && [[ -s $T/source.end ]] || die "smtp-source failed: $(tail -5 "$T/source.out")"
t_source=$(cat "$T/source.end")

seconds=$(calc "$t_end - $t_start")
rate=$(calc "$MESSAGES / $seconds")
received=$(sed 's/.*mesg=\([0-9]*\).*/\1/' <<<"$sink_line")

# --- phase 2: accept latency ----------------------------------------------
# smtp-source reports no latencies, and latency.py (Python) cannot generate
# smtp-source's load by itself. So the load is smtp-source again, with
# SESSIONS - PROBES sessions, and PROBES latency.py sessions alongside timing
# every message they send: SESSIONS in all, as in phase 1. Phase 1 stays free
# of probe traffic so its figure is exactly the issue's benchmark.
latency_line=''
if ((LATENCY_MESSAGES > 0)); then
    load_sessions=$((SESSIONS > PROBES ? SESSIONS - PROBES : 1))
    log "accept latency: $PROBES probe sessions alongside smtp-source ($LATENCY_MESSAGES messages, $load_sessions sessions)"
    t2_start=$(date +%s.%N)
    (
        # The stop file must appear even if smtp-source fails, or the
        # probes would run on until their cap.
        rc=0
        "$SMTP_SOURCE" -s "$load_sessions" -m "$LATENCY_MESSAGES" -l "$SIZE" -f "$SENDER" -t "$RCPT" \
            -M client.example.test "$HOST:$PORT" >"$T/source2.out" 2>&1 || rc=$?
        date +%s.%N >"$T/source2.end"
        exit $rc
    ) &
    SOURCE2_PID=$!
    python3 "$HERE/latency.py" "$HOST" "$PORT" --messages 1000000 --stop-file "$T/source2.end" \
        --sessions "$PROBES" --size "$SIZE" --from "$SENDER" --to "$RCPT" >"$T/latency.out" ||
        log "WARNING: latency probes had failures"
    wait "$SOURCE2_PID" || log "WARNING: smtp-source failed in the latency phase: $(tail -2 "$T/source2.out")"
    cat "$T/latency.out" >&2
    latency_line=$(grep '^LATENCY' "$T/latency.out" || true)
    # The load the probes saw: smtp-source's accept rate in this phase.
    [[ -n $latency_line ]] && latency_line+=" load_msgs_per_sec=$(printf %.1f "$(calc "$LATENCY_MESSAGES / ($(cat "$T/source2.end") - $t2_start)")")"
    probes=$(sed -n 's/.* ok=\([0-9]*\).*/\1/p' <<<"$latency_line")
    # Let the MTA finish relaying those too, so peak memory covers the
    # whole of its work and nothing is still in flight when we stop it.
    python3 "$HERE/sinkwait.py" "$T/sink.count" $((MESSAGES + LATENCY_MESSAGES + ${probes:-0})) "$TIMEOUT" "$MTA_PID" >/dev/null ||
        log "WARNING: sink did not receive all the latency-phase messages"
fi

# A crash after the sink had everything still invalidates the figures
# (memory, latency), and is a finding in itself.
kill -0 "$MTA_PID" 2>/dev/null || die "$MTA exited during the run"

# --- memory ----------------------------------------------------------------
# The sampler exits by itself if the MTA has died.
kill "$MEM_PID" 2>/dev/null || true
wait "$MEM_PID" || true
MEM_PID=''
mem=$(cat "$T/mem.out")
peak_rss=$(sed 's/.*peak_rss_kib=\([0-9]*\).*/\1/' <<<"$mem")
peak_pss=$(sed 's/.*peak_pss_kib=\([0-9]*\).*/\1/' <<<"$mem")
procs=$(sed 's/.*peak_procs=\([0-9]*\).*/\1/' <<<"$mem")
if [[ $MTA == mtad ]]; then
    # One process: the kernel's high-water mark is exact, sampling is not.
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$MTA_PID/status")
    ((hwm > peak_rss)) && peak_rss=$hwm
fi

# mtad's CPU time (user + system, every mtad process of the run: with
# REPLICAS > 1 the holders too) per message relayed, over both phases.
cpu_us=0
if [[ $MTA == mtad ]]; then
    ticks=0
    for pid in "$MTA_PID" "${HOLDER_PIDS[@]}"; do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        ticks=$((ticks + t))
    done
    cpu_us=$(calc "$ticks * 1000000 / $(getconf CLK_TCK) / ($MESSAGES + ${LATENCY_MESSAGES:-0})")
fi

printf 'RESULT mta=%s route=%s messages=%d received=%d size=%d sessions=%d seconds=%.3f msgs_per_sec=%.1f accept_seconds=%.3f peak_rss_kib=%d peak_pss_kib=%d peak_procs=%d cpu_us_per_msg=%.0f dns_queries=%d\n' \
    "$MTA" "$ROUTE" "$MESSAGES" "$received" "$SIZE" "$SESSIONS" "$seconds" "$rate" \
    "$(calc "$t_source - $t_start")" "$peak_rss" "$peak_pss" "$procs" "$cpu_us" "$(dns_queries)"
[[ -n $latency_line ]] && echo "${latency_line/LATENCY /LATENCY mta=$MTA }"
exit 0
