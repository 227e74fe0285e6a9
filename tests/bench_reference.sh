#!/usr/bin/env bash
# Side-by-side training speed of an SPD decomposition: the reference library
# (goodfire-ai/spd @ 3f0bb61, PyTorch) vs spdlab, both on the CPU at ONE thread, with the same
# SPD hyperparameters (spdlab's preset written in the reference's config schema).
#
#   ih       the induction-head model: q/k/v/out C=100, vector_mlp CI [128], batch 16, kl,
#            5 loss terms, delta component, lr 1e-3 constant (the reference's ih_config.yaml;
#            the preset's minimality coefficient is 5e-3 instead of 1e-2, which costs no time).
#            Reference side: tests/reference/bench_ih.py.
#   tiny-lm  spdlab's planted-mechanism language model (LlamaSimpleMLP, 2 layers, d 64): all
#            12 linears, q/k/v/o C=64, c_fc/down_proj C=128, shared_mlp CI [128], batch 16 x 64
#            tokens, kl, faithfulness + minimality + stochastic + subset + CI-masked recon.
#            Both sides decompose the SAME weights: `spdlab export-reference --preset tiny-lm`
#            writes spdlab's shipped target, tokenizer and text (4,000 stories) as the
#            reference reads them, and tests/reference/bench_lm.py converts the weights to a
#            torch checkpoint, checks the reference model's CE on held-out stories
#            (target_ce, ~0.5 nats/token) and times the reference's lm_decomposition.
#
# Usage: tests/bench_reference.sh PRESET VENV_DIR [STEPS]      (PRESET: ih or tiny-lm; STEPS
#                                                               default 30)
#   VENV_DIR      a Python venv with the reference library importable (`import spd`), e.g.
#                 /work/ref/venv (set up as in the reference's pyproject: python 3.13, torch 2.8)
#   STEPS         timed steady-state steps for each side
# Environment:
#   IH_TARGET_DIR (ih) reference target folder (ih.pth + ih_train_config.yaml) that the
#                 reference decomposes; default tests/fixtures/ref-ih-tiny (a trained reference
#                 ih target of the same shape as spdlab's: vocab 128, seq 64, d_model 16,
#                 1 head, 2 layers, no MLP). The two sides decompose different weights of the
#                 same architecture; the time per step depends on the shapes only.
#   SPDLAB_BIN    spdlab binary (default target/release/spdlab; this script does not build it)
#   REF_WARMUP    reference steps skipped before timing (default 2; the step-0 eval is one)
#   BENCH_ONLY    "reference" or "spdlab" to run one side only
#   REF_JEMALLOC  path of libjemalloc.so.2, "auto" (default: use the system's if installed,
#                 e.g. apt-get install libjemalloc2) or "off". When set, the reference is
#                 timed a second time with LD_PRELOAD=jemalloc and
#                 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true (memory kept
#                 for reuse). Why: the ih step allocates ~52 MB activations (1024 tokens x C 100
#                 x CI hidden 128) dozens of times; glibc malloc mmaps/munmaps each one, so the
#                 stock reference spends about half of each step in the kernel page-faulting
#                 fresh memory (measured on a 2-core VM: 2.9 s/step stock, 1.55 with this).
#                 Both rows are shown; the stock one is what the reference does as shipped.
#
# The reference side runs the library's own experiment entry point (-> spd.run_spd.optimize)
# with OMP/MKL threads 1 and torch.set_num_threads(1), autocast off, wandb off, no eval or
# train logging in the timed window, and times STEPS steps after REF_WARMUP
# (tests/reference/bench_common.py). spdlab side: `spdlab --threads 1 bench --preset PRESET
# --steps STEPS` (it warms up 10 steps itself). Prints both JSON results on stderr and a table
# on stdout. Run it on an otherwise idle machine: both sides are single-threaded wall-clock
# timings.
set -euo pipefail
# Paths given by the caller (VENV_DIR, IH_TARGET_DIR, SPDLAB_BIN) are relative to the caller's
# directory; the defaults are relative to the repository root.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[ $# -lt 2 ] || set -- "$1" "$(abspath "$2")" "${@:3}"
[ -z "${IH_TARGET_DIR:-}" ] || IH_TARGET_DIR=$(abspath "$IH_TARGET_DIR")
[ -z "${SPDLAB_BIN:-}" ] || SPDLAB_BIN=$(abspath "$SPDLAB_BIN")
cd "$(dirname "$0")/.."

if [ $# -lt 2 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,48p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
preset="$1"
venv="$2"
steps="${3:-30}"
case "$preset" in
    ih|tiny-lm) ;;
    *) echo "PRESET must be ih or tiny-lm, got '$preset'" >&2; exit 2 ;;
esac
py="$venv/bin/python"
target_dir="${IH_TARGET_DIR:-tests/fixtures/ref-ih-tiny}"
bin="${SPDLAB_BIN:-target/release/spdlab}"
warmup="${REF_WARMUP:-2}"
only="${BENCH_ONLY:-}"
jemalloc="${REF_JEMALLOC:-auto}"
if [ "$jemalloc" = "auto" ]; then
    jemalloc=""
    for f in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 \
             /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2; do
        if [ -f "$f" ]; then jemalloc="$f"; break; fi
    done
elif [ "$jemalloc" = "off" ]; then
    jemalloc=""
elif [ ! -f "$jemalloc" ]; then
    echo "REF_JEMALLOC: no file $jemalloc" >&2; exit 2
fi

[[ "$steps" =~ ^[1-9][0-9]*$ ]] || { echo "STEPS must be a positive integer, got '$steps'" >&2; exit 2; }
[ -x "$py" ] || { echo "no python at $py (VENV_DIR must be a venv with the reference installed)" >&2; exit 2; }

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 WANDB_MODE=disabled

ref_json=""
refj_json=""
spd_json=""
spd_err=""
status=0
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
ref_log="$logs/reference.log"
spd_log="$logs/spdlab.log"

if [ "$only" != "spdlab" ]; then
    if [ "$preset" = "ih" ]; then
        for f in ih.pth ih_train_config.yaml; do
            [ -f "$target_dir/$f" ] || { echo "IH_TARGET_DIR: $target_dir/$f is missing" >&2; exit 2; }
        done
        ref_py=tests/reference/bench_ih.py
    else
        # spdlab's own tiny-lm target, tokenizer and text, laid out for the reference.
        [ -x "$bin" ] || { echo "no binary at $bin (cargo build --release, or set SPDLAB_BIN)" >&2; exit 2; }
        target_dir="$logs/tiny-lm"
        "$bin" export-reference --preset tiny-lm --stories 4000 --out "$target_dir" 2>"$ref_log" \
            || { cat "$ref_log" >&2; exit 1; }
        ref_py=tests/reference/bench_lm.py
    fi
    # One timed run of the reference (extra environment as arguments): its JSON line on
    # stdout (and stderr), or its last output on stderr and status 1.
    run_reference() {
        local out
        if out=$(env "$@" "$py" "$ref_py" "$target_dir" "$steps" "$warmup" 2>"$ref_log"); then
            echo "$out" >&2
            echo "$out"
        else
            echo "reference run failed${1:+ ($*)}; its last output:" >&2
            tail -n 30 "$ref_log" >&2
            return 1
        fi
    }
    echo "== reference (goodfire-ai/spd), $preset, target $target_dir, $steps steps after $warmup warm-up" >&2
    ref_json=$(run_reference) || status=1
    if [ -n "$jemalloc" ]; then
        echo "== reference again, LD_PRELOAD=$jemalloc (retaining allocator)" >&2
        refj_json=$(run_reference LD_PRELOAD="$jemalloc" \
            MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true") || status=1
    fi
fi

if [ "$only" != "reference" ]; then
    echo "== spdlab ($bin), $steps steps" >&2
    if [ ! -x "$bin" ]; then
        spd_err="no binary at $bin (cargo build --release, or set SPDLAB_BIN)"
        status=1
    elif spd_json=$("$bin" --threads 1 bench --preset "$preset" --steps "$steps" 2>"$spd_log"); then
        echo "$spd_json" >&2
    else
        spd_err=$(tail -n 3 "$spd_log")
        spd_json=""
        status=1
    fi
    [ -z "$spd_err" ] || echo "spdlab bench failed: $spd_err" >&2
fi

REF_JSON="$ref_json" REFJ_JSON="$refj_json" SPD_JSON="$spd_json" SPD_ERR="$spd_err" STEPS="$steps" PRESET="$preset" "$py" - <<'PY'
import json, os

def load(name):
    s = os.environ.get(name, "").strip()
    if not s:
        return None
    return json.loads(s.splitlines()[-1])

ref, refj, spd = load("REF_JSON"), load("REFJ_JSON"), load("SPD_JSON")
ref_s = ref["seconds_per_step"] if ref else None
spd_s = 1.0 / spd["steps_per_second"] if spd and spd.get("steps_per_second") else None
rows = [("reference (PyTorch)", ref_s)]
if refj:
    rows.append(("reference + jemalloc", refj["seconds_per_step"]))
rows.append(("spdlab", spd_s))
fmt = lambda v, f: (f % v) if v is not None else "%10s" % "n/a"
print(f"{os.environ['PRESET']} decomposition, CPU, 1 thread, {os.environ['STEPS']} timed steps")
print(f"{'':30s} {'s/step':>10s} {'steps/s':>10s} {'ref/spdlab':>11s}")
for name, s in rows:
    ratio = s / spd_s if s and spd_s and name != "spdlab" else None
    print(f"{name:30s} {fmt(s, '%10.4f')} {fmt(1 / s if s else None, '%10.3f')} "
          + (fmt(ratio, '%10.2fx') if name != "spdlab" else ""))
if os.environ.get("SPD_ERR"):
    print(f"spdlab: {os.environ['SPD_ERR']}")
PY
exit $status
