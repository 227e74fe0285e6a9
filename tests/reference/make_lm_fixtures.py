"""Generate forward-pass fixtures for the spd.pretrain LM families.

Run (from any directory):
    source /work/ref/venv/bin/activate
    export OMP_NUM_THREADS=1
    python /work/ref/lm/make_fixtures.py

Writes /work/ref/lm/fixtures/<family>/ for family in
llama_simple_mlp, llama_simple, gpt2_simple.
"""

import json
import math
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from spd.pretrain.models import (
    GPT2Simple,
    GPT2SimpleConfig,
    LlamaSimple,
    LlamaSimpleConfig,
    LlamaSimpleMLP,
    LlamaSimpleMLPConfig,
)
from spd.pretrain.run_info import PretrainRunInfo

torch.set_num_threads(1)

OUT = Path("/work/ref/lm/fixtures")

COMMON = dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
# Llama families: n_intermediate is a constant default (3072 / 2048), not derived from n_embd,
# so it is set explicitly. n_key_value_heads defaults to 3, which does not divide n_head=4,
# so it must be set (2 -> GQA with 2 q-heads per kv-head). n_ctx (rotary table length) is set
# to the context size. rotary_dim is set to head_dim for consistency; the attention module
# ignores it (self.rotary_dim = self.head_dim). flash_attention=False as in every pretrain config
# (the manual path); the SDPA path is checked to agree below.
LLAMA_EXTRA = dict(
    n_intermediate=64, n_key_value_heads=2, n_ctx=16, rotary_dim=8, flash_attention=False
)

FAMILIES = {
    "llama_simple_mlp": (LlamaSimpleMLP, LlamaSimpleMLPConfig, "LlamaSimpleMLP", LLAMA_EXTRA),
    "llama_simple": (LlamaSimple, LlamaSimpleConfig, "LlamaSimple", LLAMA_EXTRA),
    "gpt2_simple": (GPT2Simple, GPT2SimpleConfig, "GPT2Simple", dict(flash_attention=False)),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Overwrite every (unique) parameter with random values from the global torch RNG.

    The model constructors initialise weights with their own torch.Generator seeded 42 and set
    norm weights to 1 and biases to 0; re-randomising makes norm weights/biases non-trivial so
    the fixture also tests that they are loaded and applied.
    named_parameters() yields the tied wte/lm_head tensor once (as "wte.weight").
    """
    for name, p in model.named_parameters():
        if p.ndim == 2:
            if name.endswith("wte.weight") or name.endswith("wpe.weight"):
                p.normal_(0.0, 0.5)
            else:  # nn.Linear weight [out, in]
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        elif "rms" in name or "ln" in name:
            if name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
        else:  # Linear bias
            p.normal_(0.0, 0.1)


@torch.no_grad()
def hidden_states(model, idx):
    """Residual stream after embedding, after each block, and after the final norm."""
    x = model.wte(idx)
    if hasattr(model, "wpe"):
        x = x + model.wpe(torch.arange(idx.shape[1]))
    out = {"embed": x.tolist(), "blocks": []}
    for block in model._h:
        x = block(x)
        out["blocks"].append(x.tolist())
    out["ln_f"] = model.ln_f(x).tolist()
    return out


def main() -> None:
    print("torch", torch.__version__)
    for fam, (Model, Config, model_type, extra) in FAMILIES.items():
        d = OUT / fam
        d.mkdir(parents=True, exist_ok=True)
        cfg = Config(model_type=model_type, **COMMON, **extra)

        torch.manual_seed(0)
        model = Model(cfg)
        randomize_(model)
        model.eval()

        # --- state dict, exactly as spd/pretrain/train.py::save_model does ---
        state_dict = model.state_dict()
        state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
        torch.save(state_dict, d / "model.pth")

        # Reference on-disk layout so PretrainRunInfo.from_path / Model.from_pretrained work:
        # <run>/model_config.yaml, <run>/final_config.yaml, <run>/checkpoints/model_step_0.pt
        run = d / "run"
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save(state_dict, run / "checkpoints" / "model_step_0.pt")
        with open(run / "model_config.yaml", "w") as f:
            yaml.dump(cfg.model_dump(mode="json"), f)
        with open(run / "final_config.yaml", "w") as f:
            yaml.dump({"model": cfg.model_dump(mode="json")}, f)

        # --- safetensors: float32, contiguous, tied tensors cloned (both keys present) ---
        st = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}
        save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})

        with open(d / "config.json", "w") as f:
            json.dump(cfg.model_dump(mode="json"), f, indent=2)

        # --- tokens (seed 1) and logits ---
        torch.manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
        with open(d / "tokens.json", "w") as f:
            json.dump({"tokens": tokens.tolist()}, f)

        with torch.no_grad():
            out = model(tokens)  # returns (logits, loss); loss is None without targets
        assert isinstance(out, tuple) and out[1] is None
        logits = out[0].to(torch.float32)
        assert logits.shape == (2, cfg.block_size, cfg.vocab_size)
        with open(d / "logits.json", "w") as f:
            json.dump({"logits": logits.tolist()}, f)
        with open(d / "hidden.json", "w") as f:
            json.dump(hidden_states(model, tokens), f)

        # --- verification 1: fresh model from safetensors ---
        fresh = Model(Config(**json.loads((d / "config.json").read_text())))
        fresh.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
        fresh.eval()
        with torch.no_grad():
            l2 = fresh(tokens)[0]
        diff_st = (l2 - logits).abs().max().item()

        # --- verification 2: reference loader path (PretrainRunInfo -> from_run_info) ---
        ri = PretrainRunInfo.from_path(run / "checkpoints" / "model_step_0.pt")
        ref = Model.from_run_info(ri)
        ref.eval()
        with torch.no_grad():
            l3 = ref(tokens)[0]
        diff_ref = (l3 - logits).abs().max().item()

        # --- verification 3: logits.json round trip ---
        l4 = torch.tensor(json.loads((d / "logits.json").read_text())["logits"])
        diff_json = (l4 - logits).abs().max().item()

        # --- info: SDPA (flash_attention=True) path vs manual path ---
        sdpa = Model(cfg.model_copy(update={"flash_attention": True}))
        sdpa.load_state_dict(state_dict, strict=True)
        sdpa.eval()
        with torch.no_grad():
            l5 = sdpa(tokens)[0]
        diff_sdpa = (l5 - logits).abs().max().item()

        print(
            f"{fam}: logits std={logits.std().item():.4f} "
            f"max|safetensors-fresh - saved|={diff_st:.3e} "
            f"max|from_run_info - saved|={diff_ref:.3e} "
            f"max|json - saved|={diff_json:.3e} "
            f"max|sdpa - manual|={diff_sdpa:.3e}"
        )
        assert diff_st == 0.0 and diff_ref == 0.0 and diff_json == 0.0
        print("   keys:", {k: list(v.shape) for k, v in st.items()})


if __name__ == "__main__":
    main()
