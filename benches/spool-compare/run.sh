#!/bin/sh
# Run the whole comparison: every (engine, writers) configuration REPS
# times, engines alternating within each round, then print the medians.
#   ./run.sh [messages] [reps]      (defaults: 20000 3)
set -eu
cd "$(dirname "$0")"
N=${1:-20000}
REPS=${2:-3}
cargo build --release --quiet
B=target/release/spool-compare
mkdir -p results
OUT=results/$(date -u +%Y%m%dT%H%M%SZ)
TSV=$OUT.tsv
LOAD=$OUT.load
$B header > "$TSV"
{ echo "# $(uname -srm), $(nproc) cpus"; df -T "${TMPDIR:-/tmp}" | tail -1; } > "$LOAD"
for rep in $(seq 1 "$REPS"); do
    if [ $((rep % 2)) -eq 1 ]; then order="mtad fjall"; else order="fjall mtad"; fi
    for w in 1 20 200; do
        for e in $order; do
            echo "before $e w=$w rep=$rep: $(uptime)" >> "$LOAD"
            $B run "$e" "$w" "$N" | tee -a "$TSV"
        done
    done
done
echo "end: $(uptime)" >> "$LOAD"
echo
$B summarize "$TSV" | tee "$OUT.md"
echo
echo "raw: $TSV  load: $LOAD"
