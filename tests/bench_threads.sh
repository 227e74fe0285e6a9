#!/usr/bin/env bash
# Threads under load (issue: training speed collapsing with two threads on a busy machine).
# Measures steps/s of tms-5-2, tms-40-10 and resid-mlp-1 at every thread count and at the
# default, first on an idle machine, then with one busy process (`yes`) per core. Medians of
# REPEAT runs. Usage: tests/bench_threads.sh [REPEAT] (default 3). Needs a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
repeat="${1:-3}"
bin=target/release/spdlab
[ -x "$bin" ] || cargo build --release
cores=$(nproc)
table() {
    python3 -c '
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    scan = d["scan"]
    best = max(r["steps_per_second"] for r in scan if r["threads"] != "default")
    cells = ["%s: %.1f (shards %s)" % (r["threads"], r["steps_per_second"], r["used"]["shards"]) for r in scan]
    default = [r for r in scan if r["threads"] == "default"][0]["steps_per_second"]
    print("%-12s %s | default/best %.2f" % (d["preset"], " | ".join(cells), default / best))
'
}
run_all() {
    for spec in tms-5-2:1000 tms-40-10:60 resid-mlp-1:60; do
        "$bin" bench --preset "${spec%%:*}" --steps "${spec#*:}" --threads-scan --repeat "$repeat"
    done | table
}
echo "== idle ($cores cores)"
run_all
echo "== one busy process per core"
pids=()
for _ in $(seq "$cores"); do yes > /dev/null & pids+=($!); done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
run_all
