#!/usr/bin/env bash
# The whole benchmark from the issue, in one run, on one machine:
#   1. relay MESSAGES through Postfix (Debian defaults), then through a
#      tuned Postfix, then through mtad (relay.sh, with an accept-latency
#      phase each);
#   2. a connection storm of STORM_N against mtad, and for comparison
#      against default Postfix (storm.sh);
# then prints a Markdown summary to paste into BENCHMARKS.md.
#
# usage: benches/run-all.sh [MESSAGES] [STORM_N]      (defaults 20000 10000)
#
# Environment: POSTFIX_TUNED=0 skips the tuned Postfix run; STORM_POSTFIX=0
# skips the storm against Postfix; OUT=DIR keeps raw outputs there (default
# a temp dir that is printed). Everything relay.sh and storm.sh read
# (SESSIONS, SIZE, LATENCY_MESSAGES, BENCH_TMPDIR, ...) passes through.
#
# Run it on a quiet machine: the figures are only comparable when nothing
# else competes for the CPUs and the disk. The script records the load
# average before each run so a noisy run is visible in the table.
set -euo pipefail

MESSAGES=${1:-20000}
STORM_N=${2:-10000}
POSTFIX_TUNED=${POSTFIX_TUNED:-1}
STORM_POSTFIX=${STORM_POSTFIX:-1}
LAT_N=${LATENCY_MESSAGES:-$MESSAGES}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
MTAD_BIN=${MTAD_BIN:-$ROOT/target/release/mtad}
OUT=${OUT:-$(mktemp -d /tmp/mtad-bench-results.XXXXXX)}
mkdir -p "$OUT"

say() { printf '[run-all] %s\n' "$*" >&2; }
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

# Build before anything is timed, so the compiler is not running during a
# measurement. A failed build still lets the Postfix half run.
mtad_ok=1
if [[ ! -x $MTAD_BIN ]]; then
    say "building mtad (cargo build --release)"
    (cd "$ROOT" && cargo build --release) >"$OUT/build.log" 2>&1 || {
        mtad_ok=0
        say "mtad build failed (see $OUT/build.log); only Postfix will be measured"
    }
fi

load() { cut -d' ' -f1 /proc/loadavg; }

# Let writeback from the previous run finish so it is not charged to the
# next one.
settle() { sync; sleep 5; }

declare -A RES LAT STORM LOAD
run_relay() { # name
    settle
    LOAD[$1]=$(load)
    say "relay $1 ($MESSAGES messages), load ${LOAD[$1]}"
    if "$HERE/relay.sh" "$1" "$MESSAGES" >"$OUT/relay-$1.out" 2>"$OUT/relay-$1.err"; then
        RES[$1]=$(grep '^RESULT' "$OUT/relay-$1.out" || true)
        LAT[$1]=$(grep '^LATENCY' "$OUT/relay-$1.out" || true)
        say "  ${RES[$1]}"
    else
        say "  relay $1 FAILED: $(tail -2 "$OUT/relay-$1.err" | tr '\n' ' ')"
    fi
}
run_storm() { # name
    settle
    say "storm $1 ($STORM_N connections)"
    "$HERE/storm.sh" "$1" "$STORM_N" >"$OUT/storm-$1.out" 2>"$OUT/storm-$1.err" || true
    STORM[$1]=$(grep '^STORM' "$OUT/storm-$1.out" || true)
    if [[ -n ${STORM[$1]} ]]; then say "  ${STORM[$1]}"; else say "  storm $1 FAILED: $(tail -2 "$OUT/storm-$1.err" | tr '\n' ' ')"; fi
}

run_relay postfix
((POSTFIX_TUNED)) && run_relay postfix-tuned
((mtad_ok)) && run_relay mtad
((mtad_ok)) && run_storm mtad
((STORM_POSTFIX)) && run_storm postfix

# --- summary -------------------------------------------------------------
# field LINE KEY: the value of KEY=value in a RESULT/LATENCY/STORM line.
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; }
or_na() { [[ -n $1 ]] && echo "$1" || echo "n/a"; }
mib() { [[ -n $1 ]] && awk "BEGIN { printf \"%.0f\", $1 / 1024 }" || echo "n/a"; }

names=(postfix)
((POSTFIX_TUNED)) && names+=(postfix-tuned)
names+=(mtad)
declare -A LABEL=([postfix]="Postfix (Debian defaults)" [postfix-tuned]="Postfix (tuned)" [mtad]="mtad")

row() { # title, then one value per MTA
    local title=$1 line="| $1 |"
    shift
    for v in "$@"; do line+=" $v |"; done
    echo "$line"
}

cols() { # fn: prints one cell per MTA using fn NAME
    local out=() n
    for n in "${names[@]}"; do out+=("$($1 "$n")"); done
    printf '%s\n' "${out[@]}"
}

c_rate() { or_na "$(field "${RES[$1]:-}" msgs_per_sec)"; }
c_secs() { or_na "$(field "${RES[$1]:-}" seconds)"; }
c_acc() {
    local s
    s=$(field "${RES[$1]:-}" accept_seconds)
    [[ -n $s ]] && awk "BEGIN { printf \"%.1f\", $MESSAGES / $s }" || echo n/a
}
c_lat() {
    local l=${LAT[$1]:-}
    [[ -n $l ]] || { echo n/a; return; }
    local f
    f=$(field "$l" failed)
    echo "$(field "$l" p50_ms) / $(field "$l" p99_ms) / $(field "$l" max_ms) (n=$(field "$l" ok) at $(field "$l" load_msgs_per_sec) msgs/s)$([[ $f == 0 ]] || echo " ($f FAILED)")"
}
c_rss() { mib "$(field "${RES[$1]:-}" peak_rss_kib)"; }
c_pss() { mib "$(field "${RES[$1]:-}" peak_pss_kib)"; }
c_procs() { or_na "$(field "${RES[$1]:-}" peak_procs)"; }
c_load() { or_na "${LOAD[$1]:-}"; }

mapfile -t h < <(for n in "${names[@]}"; do echo "${LABEL[$n]}"; done)
ratio() { # a b: a/b of msgs_per_sec
    local a b
    a=$(field "${RES[$1]:-}" msgs_per_sec) b=$(field "${RES[$2]:-}" msgs_per_sec)
    [[ -n $a && -n $b ]] && awk "BEGIN { printf \"%.2f\", $a / $b }" || echo n/a
}

{
    echo "## Relay benchmark ($(date -u +%Y-%m-%d))"
    echo
    echo "$MESSAGES messages of ${SIZE:-4096} B from \`smtp-source -s ${SESSIONS:-20} -m $MESSAGES -l ${SIZE:-4096}\`"
    echo "(one message per connection) through the MTA to \`smtp-sink\`, all on 127.0.0.1;"
    echo "time from the start of smtp-source until the sink has received every message."
    echo "Host: $(nproc) CPUs, $(uname -r), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM,"
    echo "spool on $(df --output=fstype "${BENCH_TMPDIR:-/var/tmp}" | tail -1); Postfix $(postconf -d -h mail_version 2>/dev/null);"
    echo "Load average before the suite: $LOAD0 (the per-run figures below lag, and include"
    echo "the previous run's processes blocked in fsync, which Linux counts as load)."
    echo "mtad at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), binary \`${MTAD_BIN#"$ROOT"/}\`."
    echo
    row "" "${h[@]}"
    row "---" $(for _ in "${names[@]}"; do echo "---"; done)
    mapfile -t v < <(cols c_rate);  row "**msgs/s end to end**" "${v[@]}"
    mapfile -t v < <(cols c_secs);  row "seconds end to end" "${v[@]}"
    mapfile -t v < <(cols c_acc);   row "msgs/s accepted (smtp-source finished)" "${v[@]}"
    mapfile -t v < <(cols c_lat);   row "accept latency p50 / p99 / max, ms" "${v[@]}"
    mapfile -t v < <(cols c_rss);   row "peak RSS, MiB (Postfix: sum over processes)" "${v[@]}"
    mapfile -t v < <(cols c_pss);   row "peak PSS, MiB (shared pages split)" "${v[@]}"
    mapfile -t v < <(cols c_procs); row "processes at peak" "${v[@]}"
    mapfile -t v < <(cols c_load);  row "1-min load before the run" "${v[@]}"
    echo
    echo "**mtad / Postfix (defaults), msgs/s: $(ratio mtad postfix)**"
    ((POSTFIX_TUNED)) && echo "mtad / Postfix (tuned), msgs/s: $(ratio mtad postfix-tuned)"
    echo
    echo "Accept latency: a second phase right after the relay run: smtp-source sends $LAT_N more messages"
    echo "in $((${SESSIONS:-20} - ${PROBES:-4})) sessions while ${PROBES:-4} \`benches/latency.py\` sessions (${SESSIONS:-20} in all) time each of"
    echo "their messages from sending \`<CRLF>.<CRLF>\` to the 250; n = samples, at smtp-source's accept rate in that phase."
    echo "Postfix tuned = \`default_process_limit = 200\`, \`in_flow_delay = 0s\`, \`initial_destination_concurrency = 20\`."
    echo
    echo "## Connection storm ($STORM_N simultaneous connections, 2 s limit)"
    echo
    echo "| MTA | 220 | 421 | late (>2 s) | refused | reset | closed | timeout | client errors | p99 ms | max ms | peak RSS MiB | serves after | pass |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for n in mtad postfix; do
        s=${STORM[$n]:-}
        [[ -n $s ]] || continue
        echo "| ${LABEL[$n]} | $(field "$s" ok220) | $(field "$s" ok421) | $(field "$s" late) | $(field "$s" refused) | $(field "$s" reset) | $(field "$s" closed) | $(field "$s" timeout) | $(field "$s" client_err) | $(field "$s" p99_ms) | $(field "$s" max_ms) | $(mib "$(field "$s" peak_rss_kib)") | $(field "$s" alive) | **$(field "$s" pass)** |"
    done
    echo
    echo "Raw outputs: \`$OUT\`"
} | tee "$OUT/summary.md"
