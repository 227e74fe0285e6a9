#!/usr/bin/env bash
# The ih side-by-side benchmark: tests/bench_reference.sh ih VENV_DIR [STEPS] (see there).
exec "$(dirname "$0")/bench_reference.sh" ih "$@"
