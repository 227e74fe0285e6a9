"""Steady-state training speed of the reference library (goodfire-ai/spd @ 3f0bb61) on the
tiny-lm decomposition, with exactly the hyperparameters of spdlab's `tiny-lm` preset
(src/presets.rs): the 12 linears of LlamaSimpleMLP (2 layers, d_model 64, 4 heads, MLP 256),
q/k/v/o_proj C = 64, c_fc/down_proj C = 128, shared_mlp CI fn [128], batch 16 x 64 tokens,
kl output loss, Faithfulness 1e6, ImportanceMinimality 1e-3 (p 2 -> 0.3), StochasticRecon 1,
StochasticReconSubset 1 (uniform k subset), CIMaskedRecon 1, delta component on, continuous
sampling, leaky_hard sigmoid, AdamW lr 1e-3 cosine -> 0.1, faithfulness warmup 200 steps,
autocast_bf16 off.

The target, tokenizer and text are spdlab's own, written by
`spdlab export-reference --preset tiny-lm --out DIR`; this script converts the weights to the
torch checkpoint the reference loads (DIR/target/checkpoints/model.pt), checks that the
reference's LlamaSimpleMLP with them predicts the held-out text as spdlab's target does (CE
per token, printed as target_ce), and runs the reference's own code path,
spd.experiments.lm.lm_decomposition.main -> spd.run_spd.run_experiment -> optimize, from DIR
(the reference resolves the model, tokenizer and dataset paths against the working
directory), on the CPU at ONE thread, wandb off, evaluation and logging only at the untimed
step 0. Steps are timed as bench_common.py says.

Usage (normally via tests/bench_reference.sh tiny-lm):
  python tests/reference/bench_lm.py DIR [STEPS=30] [WARMUP=2]
All library output goes to stderr; stdout gets exactly one JSON line.
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
export_dir = Path(sys.argv[1]).resolve()
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 30
warmup = int(sys.argv[3]) if len(sys.argv) > 3 else 2
assert steps >= 1 and warmup >= 0, "STEPS must be >= 1, WARMUP >= 0"
for f in ("target/model.safetensors", "target/model_config.yaml", "tokenizer/tokenizer.json", "data/train.jsonl"):
    assert (export_dir / f).is_file(), f"{export_dir / f} is missing (spdlab export-reference writes it)"

result_fd = bench_common.stdout_to_stderr()
scratch = tempfile.mkdtemp(prefix="spd-bench-lm-")
os.environ.update(
    {
        "SPD_OUT_DIR": str(Path(scratch) / "out"),
        "HF_HOME": str(Path(scratch) / "hf"),
        "HF_DATASETS_CACHE": str(Path(scratch) / "hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
)
torch = bench_common.single_threaded_torch()

import safetensors.torch  # noqa: E402
import yaml  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import spd.experiments.lm.lm_decomposition as lm_decomposition  # noqa: E402
from spd.pretrain.models.llama_simple_mlp import LlamaSimpleMLP, LlamaSimpleMLPConfig  # noqa: E402

os.chdir(export_dir)
model_config = yaml.safe_load(open("target/model_config.yaml"))
target = LlamaSimpleMLP(LlamaSimpleMLPConfig(**model_config))
missing, unexpected = target.load_state_dict(safetensors.torch.load_file("target/model.safetensors"), strict=False)
params = {n for n, _ in target.named_parameters()}
assert not unexpected, f"parameters the reference's model does not have: {unexpected}"
assert not (set(missing) & params), f"parameters missing from the export: {set(missing) & params}"
os.makedirs("target/checkpoints", exist_ok=True)
torch.save(target.state_dict(), "target/checkpoints/model.pt")

# The converted target on held-out text: CE per predicted token of the first 64 stories.
tok = Tokenizer.from_file("tokenizer/tokenizer.json")
eos = tok.token_to_id("<|endoftext|>")
ids = []
with open("data/test.jsonl") as f:
    for line, _ in zip(f, range(64)):
        ids += tok.encode(json.loads(line)["story"]).ids + [eos]
seq = model_config["n_ctx"]
rows = torch.tensor(ids[: len(ids) // seq * seq]).reshape(-1, seq)
with torch.no_grad():
    target.eval()
    logits, _ = target(rows)
    target_ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).item()

total_steps = steps + warmup
# spdlab `tiny-lm` preset (src/presets.rs), written in the reference's Config schema.
config = {
    "wandb_project": None,
    "wandb_run_name": None,
    "seed": 0,
    "autocast_bf16": False,
    "batch_size": 16,
    "eval_batch_size": 16,
    "steps": total_steps,
    "lr_schedule": {"start_val": 1e-3, "fn_type": "cosine", "warmup_pct": 0.0, "final_val_frac": 0.1},
    "n_eval_steps": 1,
    "n_mask_samples": 1,
    "sampling": "continuous",
    "sigmoid_type": "leaky_hard",
    "use_delta_component": True,
    "ci_alive_threshold": 0.0,
    "ci_fn_type": "shared_mlp",
    "ci_fn_hidden_dims": [128],
    "module_info": [
        {"module_pattern": "h.*.attn.q_proj", "C": 64},
        {"module_pattern": "h.*.attn.k_proj", "C": 64},
        {"module_pattern": "h.*.attn.v_proj", "C": 64},
        {"module_pattern": "h.*.attn.o_proj", "C": 64},
        {"module_pattern": "h.*.mlp.c_fc", "C": 128},
        {"module_pattern": "h.*.mlp.down_proj", "C": 128},
    ],
    "loss_metric_configs": [
        {"classname": "FaithfulnessLoss", "coeff": 1e6},
        {
            "classname": "ImportanceMinimalityLoss",
            "coeff": 1e-3,
            "pnorm": 2.0,
            "beta": 0.0,
            "p_anneal_start_frac": 0.0,
            "p_anneal_final_p": 0.3,
            "p_anneal_end_frac": 1.0,
            "eps": 1e-12,
        },
        {"classname": "StochasticReconLoss", "coeff": 1.0},
        {"classname": "StochasticReconSubsetLoss", "coeff": 1.0, "routing": {"type": "uniform_k_subset"}},
        {"classname": "CIMaskedReconLoss", "coeff": 1.0},
    ],
    "eval_metric_configs": [],
    "output_loss_type": "kl",
    "faithfulness_warmup_steps": 200,
    "faithfulness_warmup_lr": 1e-3,
    "faithfulness_warmup_weight_decay": 0.0,
    "train_log_freq": BIG,
    "eval_freq": BIG,
    "slow_eval_freq": BIG,
    "slow_eval_on_first_step": False,
    "save_freq": None,
    "pretrained_model_class": "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
    "pretrained_model_name": "target/checkpoints/model.pt",
    "pretrained_model_output_attr": "idx_0",
    "tokenizer_name": "tokenizer",
    "task_config": {
        "task_name": "lm",
        "max_seq_len": 64,
        "dataset_name": "data",
        "column_name": "story",
        "train_data_split": "train",
        "eval_data_split": "test",
        "is_tokenized": False,
        "streaming": False,
    },
}
bench_common.install_clock()
lm_decomposition.get_device = lambda: "cpu"  # always the CPU, even where CUDA exists

t_start = time.perf_counter()
try:
    lm_decomposition.main(config_json="json:" + json.dumps(config), run_id="bench-lm")
finally:
    shutil.rmtree(scratch, ignore_errors=True)
result = {
    **bench_common.timing(steps, warmup),
    "preset": "tiny-lm",
    "target": str(export_dir),
    "target_ce": target_ce,
    "wall_seconds_total": time.perf_counter() - t_start,
}
bench_common.emit(result_fd, result)
