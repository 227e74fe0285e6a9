"""Tiny goodfire-ai/spd (@3f0bb61) LM decomposition run + expected outputs, for the Rust port.

Everything is produced by the reference library itself (package `spd` from /work/ref/spd,
unmodified). All relative paths are resolved against THIS folder (the script chdir()s here),
because the reference resolves `pretrained_model_name`, `tokenizer_name`, `dataset_name`,
`hf_tokenizer_path` against the process working directory.

Usage (from anywhere):
    source /work/ref/venv/bin/activate
    python /work/ref/lm/run-fixture/make.py            # = all: pretrain, decompose, expected
    python /work/ref/lm/run-fixture/make.py expected   # only recompute expected.json/tokens.json

Steps
  pretrain : `python train_patched.py pretrain_config.yaml` (patched copy of spd/pretrain/train.py)
             -> _pretrain_out/<timestamp>/ moved to target/
  decompose: `python run_decomposition.py` (= spd.experiments.lm.lm_decomposition.main(
             config_path="spd_config.yaml", run_id="spd-run") with SPD_OUT_DIR=./_spd_out)
             -> _spd_out/spd/spd-run/ moved to spd-run/
  expected : ComponentModel.from_pretrained("spd-run/model_200.pth") -> expected.json,
             tokens.json, module_inputs.json
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.chdir(HERE)

ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    # keep every cache/output inside this folder
    "HF_HOME": str(HERE / ".hf_cache"),
    "HF_DATASETS_CACHE": str(HERE / ".hf_cache" / "datasets"),
    "SPD_OUT_DIR": str(HERE / "_spd_out"),
}
os.environ.update(ENV)

SPD_RUN = Path("spd-run")
CKPT = SPD_RUN / "model_200.pth"
N_SEQ = 2


def run_logged(cmd: list[str], log: str) -> None:
    print(f"$ {' '.join(cmd)}  > {log}", flush=True)
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())


def cleanup_caches() -> None:
    shutil.rmtree(".hf_cache", ignore_errors=True)
    shutil.rmtree("_spd_out", ignore_errors=True)
    shutil.rmtree("_pretrain_out", ignore_errors=True)


def step_pretrain() -> None:
    shutil.rmtree("target", ignore_errors=True)
    shutil.rmtree("_pretrain_out", ignore_errors=True)
    run_logged([sys.executable, "train_patched.py", "pretrain_config.yaml"], "pretrain.log")
    (out,) = list(Path("_pretrain_out").iterdir())  # <timestamp>/
    shutil.move(str(out), "target")
    cleanup_caches()


def step_decompose() -> None:
    shutil.rmtree(SPD_RUN, ignore_errors=True)
    shutil.rmtree("_spd_out", ignore_errors=True)
    run_logged([sys.executable, "run_decomposition.py"], "decompose.log")
    shutil.move("_spd_out/spd/spd-run", str(SPD_RUN))
    cleanup_caches()


def step_expected() -> None:
    import json

    import numpy as np
    import torch

    torch.set_num_threads(1)

    import datasets
    import tokenizers
    import transformers

    from spd.configs import CEandKLLossesConfig, LMTaskConfig
    from spd.data import DatasetConfig, create_data_loader
    from spd.eval import init_metric
    from spd.metrics.ce_and_kl_losses import CEandKLLosses
    from spd.models.component_model import ComponentModel, SPDRunInfo
    from spd.models.components import make_mask_infos
    from spd.utils.general_utils import calc_kl_divergence_lm, extract_batch_data

    def f32(t: torch.Tensor):
        """Nested lists of the float32 values, each written with its shortest round-trip repr."""
        a = t.detach().to(torch.float32).cpu().numpy()
        flat = [float(str(np.float32(x))) for x in a.reshape(-1)]
        return np.array(flat, dtype=object).reshape(a.shape).tolist()

    # ---------------- load the run exactly like spd's own scripts ----------------
    run_info = SPDRunInfo.from_path(CKPT)  # config = CKPT.parent / "final_config.yaml"
    config = run_info.config
    model = ComponentModel.from_run_info(run_info)  # == ComponentModel.from_pretrained(CKPT)
    model.eval()
    assert isinstance(config.task_config, LMTaskConfig)

    # ---------------- tokens: first 2 rows of the run's eval loader (test split) ----------------
    # identical construction to spd/experiments/lm/lm_decomposition.py::main (eval_loader)
    eval_data_config = DatasetConfig(
        name=config.task_config.dataset_name,
        hf_tokenizer_path=config.tokenizer_name,
        split=config.task_config.eval_data_split,
        n_ctx=config.task_config.max_seq_len,
        is_tokenized=config.task_config.is_tokenized,
        streaming=config.task_config.streaming,
        column_name=config.task_config.column_name,
        shuffle_each_epoch=config.task_config.shuffle_each_epoch,
        seed=None,
    )
    eval_loader, tokenizer = create_data_loader(
        dataset_config=eval_data_config,
        batch_size=config.eval_batch_size,
        buffer_size=config.task_config.buffer_size,
        global_seed=config.seed + 1,
        dist_state=None,
    )
    first_batch = extract_batch_data(next(iter(eval_loader)))
    tokens = first_batch[:N_SEQ].clone()
    assert tokens.shape == (N_SEQ, config.task_config.max_seq_len), tokens.shape

    with torch.no_grad():
        # target forward with input caching on every decomposed module
        target_out = model(tokens, cache_type="input")
        target_logits = target_out.output
        pre_weight_acts = target_out.cache
        assert torch.equal(target_logits, model(tokens))  # hooks only cache

        ci = model.calc_causal_importances(
            pre_weight_acts=pre_weight_acts, sampling=config.sampling, detach_inputs=False
        )
        component_acts = model.get_all_component_acts(pre_weight_acts)

        ci_masked_logits = model(tokens, mask_infos=make_mask_infos(ci.lower_leaky))
        unmasked_logits = model(
            tokens, mask_infos=make_mask_infos({k: torch.ones_like(v) for k, v in ci.lower_leaky.items()})
        )
        zero_masked_logits = model(
            tokens, mask_infos=make_mask_infos({k: torch.zeros_like(v) for k, v in ci.lower_leaky.items()})
        )
        rounded_masked_logits = model(
            tokens,
            mask_infos=make_mask_infos({k: (v > 0.0).float() for k, v in ci.lower_leaky.items()}),
        )
        weight_deltas = model.calc_weight_deltas()
        # sanity: all masks 1 + weight-delta component with delta mask 1 reproduces the target
        unmasked_plus_delta_logits = model(
            tokens,
            mask_infos=make_mask_infos(
                {k: torch.ones_like(v) for k, v in ci.lower_leaky.items()},
                weight_deltas_and_masks={
                    k: (weight_deltas[k], torch.ones(tokens.shape)) for k in ci.lower_leaky
                },
            ),
        )

        # ---------------- CEandKLLosses, built the way spd.eval.evaluate builds it ----------------
        ce_cfg = next(c for c in config.eval_metric_configs if isinstance(c, CEandKLLossesConfig))
        metric = init_metric(cfg=ce_cfg, model=model, run_config=config, device="cpu")
        assert isinstance(metric, CEandKLLosses)
        torch.manual_seed(0)  # only affects the *_stoch_masked / *_random_masked keys
        metric.update(batch=tokens, target_out=target_logits, ci=ci, weight_deltas=weight_deltas)
        ce_kl = metric.compute()

        # raw CE values with the metric's own formula (labels: batch[:,0] = -100, flattened shift)
        masked = tokens.clone()
        masked[:, 0] = -100
        flat_labels = masked.flatten()

        def ce(logits: torch.Tensor) -> float:
            flat = logits.reshape(-1, logits.shape[-1])
            return torch.nn.functional.cross_entropy(
                flat[:-1], flat_labels[1:], ignore_index=-100
            ).item()

        def kl(logits: torch.Tensor) -> float:
            return calc_kl_divergence_lm(pred=logits, target=target_logits).item()

        raw = {
            "ce_target": ce(target_logits),
            "ce_ci_masked": ce(ci_masked_logits),
            "ce_unmasked": ce(unmasked_logits),
            "ce_rounded_masked": ce(rounded_masked_logits),
            "ce_zero_masked": ce(zero_masked_logits),
            "kl_ci_masked": kl(ci_masked_logits),
            "kl_unmasked": kl(unmasked_logits),
            "kl_rounded_masked": kl(rounded_masked_logits),
            "kl_zero_masked": kl(zero_masked_logits),
            "max_abs_diff_unmasked_plus_delta_vs_target": (
                unmasked_plus_delta_logits - target_logits
            ).abs().max().item(),
        }

    modules = {}
    for name in model.target_module_paths:
        comp = model.components[name]
        modules[name] = {
            "d_in": comp.d_in,
            "d_out": comp.d_out,
            "C": comp.C,
            "component_acts": f32(component_acts[name]),
            "ci_lower_leaky": f32(ci.lower_leaky[name]),
            "ci_upper_leaky": f32(ci.upper_leaky[name]),
            "ci_pre_sigmoid": f32(ci.pre_sigmoid[name]),
        }

    deterministic_keys = [
        k for k in CEandKLLosses.loss_keys if "stoch" not in k and "random" not in k
    ]
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "spd": "goodfire-ai/spd @ 3f0bb61 (/work/ref/spd, unmodified)",
    }
    meta = {
        "checkpoint": str(CKPT),
        "load": 'SPDRunInfo.from_path("spd-run/model_200.pth") -> ComponentModel.from_run_info(run_info) '
        "(== ComponentModel.from_pretrained), cwd = /work/ref/lm/run-fixture",
        "target_checkpoint": config.pretrained_model_name,
        "module_order": model.target_module_paths,
        "ci_fn_type": config.ci_fn_type,
        "ci_fn_hidden_dims": config.ci_fn_hidden_dims,
        "sigmoid_type": config.sigmoid_type,
        "sampling": config.sampling,
        "lower_leaky_fn": "lower_leaky_hard: clamp(x, 0, 1) (leaky only in backward)",
        "upper_leaky_fn": "upper_leaky_hard: x>1 ? 1+0.01*(x-1) : clamp(x, 0, 1)",
        "tokens_source": "first 2 rows of the first batch of the run's eval loader "
        "(spd.data.create_data_loader, split=test, n_ctx=32, batch_size=eval_batch_size=8, "
        "global_seed=config.seed+1=1, num_proc=10 tokenization)",
        "dtype": "float32 everywhere (no autocast); values written as shortest float32 reprs",
        "versions": versions,
    }
    expected = {
        "meta": meta,
        "tokens": tokens.tolist(),
        "modules": modules,
        "target_logits": f32(target_logits),
        "ci_masked_logits": f32(ci_masked_logits),
        "unmasked_logits": f32(unmasked_logits),
        "ce_and_kl_losses": ce_kl,
        "ce_and_kl_losses_call": (
            "metric = spd.eval.init_metric(cfg=CEandKLLossesConfig(rounding_threshold=0.0), "
            "model=model, run_config=config, device='cpu')  # = CEandKLLosses(model, 'cpu', "
            "sampling='continuous', rounding_threshold=0.0); under torch.no_grad(): "
            "out = model(tokens, cache_type='input'); ci = model.calc_causal_importances("
            "out.cache, sampling='continuous'); torch.manual_seed(0); metric.update(batch=tokens, "
            "target_out=out.output, ci=ci, weight_deltas=model.calc_weight_deltas()); "
            "metric.compute()"
        ),
        "ce_and_kl_losses_deterministic_keys": deterministic_keys,
        "ce_and_kl_losses_rng_dependent_keys": [
            k for k in CEandKLLosses.loss_keys if k not in deterministic_keys
        ],
        "raw_ce_kl": raw,
    }
    with open("expected.json", "w") as f:
        json.dump(expected, f)
    tok_doc = {
        "source": meta["tokens_source"],
        "tokens": tokens.tolist(),
        "decoded": [tokenizer.decode(r) for r in tokens.tolist()],
        "first_eval_batch_all_8_rows": first_batch.tolist(),
    }
    with open("tokens.json", "w") as f:  # one token row per line
        f.write("{\n")
        for i, (k, v) in enumerate(tok_doc.items()):
            sep = "," if i < len(tok_doc) - 1 else ""
            if isinstance(v, list) and isinstance(v[0], list):
                rows = ",\n  ".join(json.dumps(r) for r in v)
                f.write(f' "{k}": [\n  {rows}\n ]{sep}\n')
            else:
                f.write(f' "{k}": {json.dumps(v, ensure_ascii=False)}{sep}\n')
        f.write("}\n")
    assert json.loads(Path("tokens.json").read_text()) == tok_doc
    with open("module_inputs.json", "w") as f:
        json.dump(
            {
                "note": "input activation of each decomposed module (forward-hook args[0]) for "
                "tokens.json, shape [2][32][d_in]; debugging aid",
                "inputs": {k: f32(v) for k, v in pre_weight_acts.items()},
            },
            f,
        )
    cleanup_caches()

    print("ce_and_kl_losses:", json.dumps(ce_kl, indent=1))
    print("raw:", json.dumps(raw, indent=1))
    min_abs = min(ci.pre_sigmoid[n].abs().min().item() for n in model.target_module_paths)
    print(f"min |pre_sigmoid| over all modules: {min_abs:.3e}")
    for name in model.target_module_paths:
        ps = ci.pre_sigmoid[name]
        print(
            f"{name}: pre<0 {(ps < 0).float().mean():.3f}  0..1 {((ps >= 0) & (ps <= 1)).float().mean():.3f}"
            f"  >1 {(ps > 1).float().mean():.3f}"
        )


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    assert what in ("all", "pretrain", "decompose", "expected"), what
    if what in ("all", "pretrain"):
        step_pretrain()
    if what in ("all", "decompose"):
        step_decompose()
    if what in ("all", "expected"):
        step_expected()


if __name__ == "__main__":
    main()
