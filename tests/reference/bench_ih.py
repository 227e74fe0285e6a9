"""Steady-state training speed of the reference library (goodfire-ai/spd @ 3f0bb61) on the
induction-head (ih) decomposition, with exactly the hyperparameters of spdlab's `ih` preset
(= the reference's ih_config.yaml with its deprecated loss keys converted to
loss_metric_configs): q/k/v/out_proj C=100 each, vector_mlp CI fn [128], batch 16, kl output
loss, Faithfulness 100, ImportanceMinimality 1e-2 (p=0.1), CIMaskedRecon 1, StochasticRecon 1,
StochasticReconLayerwise 1, delta component on, continuous sampling, leaky_hard sigmoid,
AdamW lr 1e-3 constant, faithfulness warmup 200 steps, autocast_bf16 off.

It runs the reference's own code path, spd.experiments.ih.ih_decomposition.main ->
spd.run_spd.run_experiment -> optimize, on the CPU at ONE thread, wandb off. Evaluation and
train logging are pushed out of the timed window (eval_freq / slow_eval_freq /
train_log_freq = 10**9: they only fire at step 0, which is not timed). Steps are timed as
bench_common.py says (WARMUP, default 2, skipped; then STEPS timed).

The target model (ih.pth + ih_train_config.yaml, InductionTransformer vocab 128, seq 64,
d_model 16, 1 head, 2 layers, no MLP, positional encoding, no layer norm) is read from
TARGET_DIR; the timing does not depend on its weights, only on its shape.

Usage (normally via tests/bench_ih_reference.sh):
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python tests/reference/bench_ih.py TARGET_DIR [STEPS=30] [WARMUP=2]
All library output goes to stderr; stdout gets exactly one JSON line:
  {"steps_per_second": ..., "seconds_per_step": ..., "steps": ..., ...}
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402  (sets the thread variables before torch is imported)
from bench_common import BIG  # noqa: E402

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
    print(__doc__, file=sys.stderr)
    sys.exit(2)
target_dir = Path(sys.argv[1]).resolve()
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 30
warmup = int(sys.argv[3]) if len(sys.argv) > 3 else 2
assert steps >= 1 and warmup >= 0, "STEPS must be >= 1, WARMUP >= 0"
for f in ("ih.pth", "ih_train_config.yaml"):
    assert (target_dir / f).is_file(), f"{target_dir / f} is missing"

result_fd = bench_common.stdout_to_stderr()
# The library writes its run folder under SPD_OUT_DIR (read at import time): a temp dir.
out_root = tempfile.mkdtemp(prefix="spd-bench-ih-")
os.environ["SPD_OUT_DIR"] = out_root
bench_common.single_threaded_torch()

import spd.experiments.ih.ih_decomposition as ih_decomposition  # noqa: E402

total_steps = steps + warmup
# spdlab `ih` preset (src/presets.rs), written in the reference's Config schema.
config = {
    "wandb_project": None,
    "wandb_run_name": None,
    "seed": 0,
    "autocast_bf16": False,
    "batch_size": 16,
    "steps": total_steps,
    "lr_schedule": {"start_val": 1e-3, "fn_type": "constant", "warmup_pct": 0.0, "final_val_frac": 1.0},
    "n_eval_steps": 1,  # only the untimed step-0 eval runs; keep it short
    "task_config": {"task_name": "ih"},
    "n_mask_samples": 1,
    "sampling": "continuous",
    "sigmoid_type": "leaky_hard",
    "use_delta_component": True,
    "ci_alive_threshold": 0.0,
    "module_info": [
        {"module_pattern": "blocks.*.attn.q_proj", "C": 100},
        {"module_pattern": "blocks.*.attn.k_proj", "C": 100},
        {"module_pattern": "blocks.*.attn.v_proj", "C": 100},
        {"module_pattern": "blocks.*.attn.out_proj", "C": 100},
    ],
    "loss_metric_configs": [
        {"classname": "FaithfulnessLoss", "coeff": 100},
        {"classname": "ImportanceMinimalityLoss", "coeff": 1e-2, "pnorm": 0.1, "beta": 0},
        {"classname": "CIMaskedReconLoss", "coeff": 1},
        {"classname": "StochasticReconLoss", "coeff": 1},
        {"classname": "StochasticReconLayerwiseLoss", "coeff": 1},
    ],
    "output_loss_type": "kl",
    "ci_fn_type": "vector_mlp",
    "ci_fn_hidden_dims": [128],
    "faithfulness_warmup_steps": 200,
    "faithfulness_warmup_lr": 0.01,
    "faithfulness_warmup_weight_decay": 0.1,
    "train_log_freq": BIG,
    "eval_freq": BIG,
    "slow_eval_freq": BIG,
    "slow_eval_on_first_step": False,
    "save_freq": None,
    "pretrained_model_class": "spd.experiments.ih.model.InductionTransformer",
    "pretrained_model_path": str(target_dir / "ih.pth"),
}


bench_common.install_clock()
ih_decomposition.get_device = lambda: "cpu"  # always the CPU, even where CUDA exists

t_start = time.perf_counter()
try:
    ih_decomposition.main(config_json="json:" + json.dumps(config), run_id="bench-ih")
finally:
    shutil.rmtree(out_root, ignore_errors=True)
result = {
    **bench_common.timing(steps, warmup),
    "preset": "ih",
    "target": str(target_dir),
    "wall_seconds_total": time.perf_counter() - t_start,
}
bench_common.emit(result_fd, result)
