#!/usr/bin/env bash
# Side-by-side training speed of the `ih` (induction head) decomposition: the reference
# library (goodfire-ai/spd @ 3f0bb61, PyTorch) vs spdlab, both on the CPU at ONE thread,
# same SPD hyperparameters (spdlab's `ih` preset = the reference's ih_config.yaml: q/k/v/out
# C=100, vector_mlp CI [128], batch 16, kl, 5 loss terms, delta component, lr 1e-3 constant).
#
# Usage: tests/bench_ih_reference.sh VENV_DIR [STEPS]      (STEPS default 30)
#   VENV_DIR      a Python venv with the reference library importable (`import spd`), e.g.
#                 /work/ref/venv (set up as in the reference's pyproject: python 3.13, torch 2.8)
#   STEPS         timed steady-state steps for each side
# Environment:
#   IH_TARGET_DIR reference target folder (ih.pth + ih_train_config.yaml) that the reference
#                 decomposes; default tests/fixtures/ref-ih-tiny (a trained reference ih target
#                 of the same shape as spdlab's: vocab 128, seq 64, d_model 16, 1 head,
#                 2 layers, no MLP). spdlab has no command that dumps its shipped target in
#                 the reference's format, so the two sides decompose different weights of the
#                 same architecture; the time per step depends on the shapes only.
#   SPDLAB_BIN    spdlab binary (default target/release/spdlab; this script does not build it)
#   REF_WARMUP    reference steps skipped before timing (default 2; the step-0 eval is one)
#   BENCH_ONLY    "reference" or "spdlab" to run one side only
#
# Reference side: tests/reference/bench_ih.py runs spd.experiments.ih.ih_decomposition.main
# (-> spd.run_spd.optimize) with OMP/MKL threads 1 and torch.set_num_threads(1), autocast off,
# wandb off, no eval or train logging in the timed window, and times STEPS steps after
# REF_WARMUP. spdlab side: `spdlab --threads 1 bench --preset ih --steps STEPS` (it warms up
# 10 steps itself). Prints both JSON results on stderr and a table on stdout.
# Run it on an otherwise idle machine: both sides are single-threaded wall-clock timings.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
venv="$1"
steps="${2:-30}"
py="$venv/bin/python"
target_dir="${IH_TARGET_DIR:-tests/fixtures/ref-ih-tiny}"
bin="${SPDLAB_BIN:-target/release/spdlab}"
warmup="${REF_WARMUP:-2}"
only="${BENCH_ONLY:-}"

[[ "$steps" =~ ^[1-9][0-9]*$ ]] || { echo "STEPS must be a positive integer, got '$steps'" >&2; exit 2; }
[ -x "$py" ] || { echo "no python at $py (VENV_DIR must be a venv with the reference installed)" >&2; exit 2; }

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 WANDB_MODE=disabled

ref_json=""
spd_json=""
spd_err=""
status=0

if [ "$only" != "spdlab" ]; then
    for f in ih.pth ih_train_config.yaml; do
        [ -f "$target_dir/$f" ] || { echo "IH_TARGET_DIR: $target_dir/$f is missing" >&2; exit 2; }
    done
    echo "== reference (goodfire-ai/spd), target $target_dir, $steps steps after $warmup warm-up" >&2
    ref_log=$(mktemp)
    trap 'rm -f "$ref_log"' EXIT
    if ref_json=$("$py" tests/reference/bench_ih.py "$target_dir" "$steps" "$warmup" 2>"$ref_log"); then
        echo "$ref_json" >&2
    else
        echo "reference run failed; its last output:" >&2
        tail -n 30 "$ref_log" >&2
        ref_json=""
        status=1
    fi
fi

if [ "$only" != "reference" ]; then
    echo "== spdlab ($bin), $steps steps" >&2
    if [ ! -x "$bin" ]; then
        spd_err="no binary at $bin (cargo build --release, or set SPDLAB_BIN)"
        status=1
    elif spd_json=$("$bin" --threads 1 bench --preset ih --steps "$steps" 2>&1); then
        echo "$spd_json" >&2
    else
        spd_err=$(echo "$spd_json" | tail -n 3)
        spd_json=""
        status=1
    fi
    [ -z "$spd_err" ] || echo "spdlab bench failed: $spd_err" >&2
fi

REF_JSON="$ref_json" SPD_JSON="$spd_json" SPD_ERR="$spd_err" STEPS="$steps" "$py" - <<'PY'
import json, os

def load(name):
    s = os.environ.get(name, "").strip()
    if not s:
        return None
    return json.loads(s.splitlines()[-1])

ref, spd = load("REF_JSON"), load("SPD_JSON")
ref_s = ref["seconds_per_step"] if ref else None
spd_s = 1.0 / spd["steps_per_second"] if spd and spd.get("steps_per_second") else None
fmt = lambda v, f: (f % v) if v is not None else "%10s" % "n/a"
print(f"ih decomposition, CPU, 1 thread, {os.environ['STEPS']} timed steps")
print(f"{'':22s} {'s/step':>10s} {'steps/s':>10s}")
for name, s in (("reference (PyTorch)", ref_s), ("spdlab", spd_s)):
    print(f"{name:22s} {fmt(s, '%10.4f')} {fmt(1 / s if s else None, '%10.3f')}")
ratio = ref_s / spd_s if ref_s and spd_s else None
print(f"{'speedup (ref / spdlab)':22s} {fmt(ratio, '%10.2fx')}")
if os.environ.get("SPD_ERR"):
    print(f"spdlab: {os.environ['SPD_ERR']}")
PY
exit $status
