#!/usr/bin/env bash
# Connection storm against an MTA under test.
#
# usage: benches/storm.sh MTA [CONNECTIONS]
#   MTA          mtad | postfix | postfix-tuned
#   CONNECTIONS  default 10000
#
# Every connection must get a 220 or a 421 within LIMIT seconds (default 2),
# none refused, reset or left hanging (see storm.py). Afterwards one message
# is sent, to show the MTA still serves after the storm.
#
# Output on stdout:
#   STORM mta=... n=... ok220=... ok421=... ... pass=yes|no peak_rss_kib=... alive=yes|no
# Exit status 0 only if the storm passed and the MTA still accepts mail.
set -euo pipefail

MTA=${1:?usage: $0 mtad|postfix|postfix-tuned [CONNECTIONS]}
N=${2:-10000}
LIMIT=${LIMIT:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=benches/lib.sh
source "$HERE/lib.sh"

python3 "$HERE/memsample.py" "$MTA_PID" 0.2 >"$T/mem.out" &
MEM_PID=$!
sleep 0.5 # one memory sample at rest before the storm

log "storm: $N connections"
storm_rc=0
python3 "$HERE/storm.py" "$HOST" "$PORT" "$N" --limit "$LIMIT" >"$T/storm.out" || storm_rc=$?
cat "$T/storm.out" >&2
storm_line=$(grep '^STORM' "$T/storm.out" || true)

alive=no
if kill -0 "$MTA_PID" 2>/dev/null &&
    python3 "$HERE/latency.py" "$HOST" "$PORT" --messages 1 --sessions 1 --timeout 30 >/dev/null 2>&1; then
    alive=yes
fi

# The sampler exits by itself if the MTA has died.
kill "$MEM_PID" 2>/dev/null || true
wait "$MEM_PID" || true
MEM_PID=''
peak_rss=$(sed 's/.*peak_rss_kib=\([0-9]*\).*/\1/' "$T/mem.out")
peak_pss=$(sed 's/.*peak_pss_kib=\([0-9]*\).*/\1/' "$T/mem.out")
if [[ $MTA == mtad && -r /proc/$MTA_PID/status ]]; then
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$MTA_PID/status")
    ((hwm > peak_rss)) && peak_rss=$hwm
fi

[[ -n $storm_line ]] || die "storm.py produced no result"
echo "${storm_line/STORM /STORM mta=$MTA } peak_rss_kib=$peak_rss peak_pss_kib=$peak_pss alive=$alive"
[[ $storm_rc == 0 && $alive == yes ]]
