"""Pre-LN vs post-LN Transformers: gradients at init, warmup, depth (Xiong et al., 2020) on Tiny Shakespeare.

Three studies on a character-level GPT-style model (`normlab.models.transformer.Transformer`):

1. `grad_at_init`: the gradient norm of every layer's FFN output weight $W^2$ at initialization
   (Xavier), averaged over real training batches, for post- and pre-LN at several depths and seeds —
   the measurement of Xiong et al.'s Figure 3.
2. `train`: Adam ($\\beta_2 = 0.98$) with and without a linear learning-rate warmup at several peak
   learning rates, post vs pre (and pre-LN with RMSNorm), same number of steps.
3. `depth`: post vs pre as depth grows, at one learning rate and no warmup (the train study's depth
   comes from the train study's runs at that learning rate).

Data: Tiny Shakespeare, characters as tokens, the first 90% for training and the last 10% for
validation; losses are in nats per character.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from normlab.models.transformer import Transformer
from normlab.tasks import CharLM
from normlab.train import Trainer, TrainConfig, log_grad_norm
from normlab.utils import seed_all

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": {"d_model": 32, "n_heads": 2, "context": 32},
        "batch_size": 8, "val_fraction": 0.1, "eval_windows": 64,
        "grad_at_init": {"depths": [2, 4], "placements": ["post", "pre"], "seeds": [0], "batches": 2},
        "train": {"depth": 2, "steps": 12, "lrs": [1e-3, 3e-3], "warmup_steps": [0, 4], "seeds": [0],
                  "rmsnorm_lines": True, "eval_every": 6, "log_every": 3},
        "depth": {"depths": [1, 3], "lr": 3e-3, "steps": 12, "seeds": [0], "eval_every": 6, "log_every": 3},
    },
    # ~30 min on one busy core of a shared 2-core machine; the sizes were set by measuring tokens/s first
    "cpu": {
        "model": {"d_model": 64, "n_heads": 4, "context": 64},
        "batch_size": 16, "val_fraction": 0.1, "eval_windows": 256,
        "grad_at_init": {"depths": [6, 12, 24], "placements": ["post", "pre"], "seeds": [0, 1, 2, 3, 4],
                         "batches": 8},
        "train": {"depth": 6, "steps": 300, "lrs": [1e-3, 3e-3], "warmup_steps": [0, 50], "seeds": [0],
                  "rmsnorm_lines": True, "eval_every": 50, "log_every": 10},
        "depth": {"depths": [2, 12], "lr": 1e-3, "steps": 300, "seeds": [0], "eval_every": 50, "log_every": 10},
    },
    "full": {
        "model": {"d_model": 256, "n_heads": 8, "context": 256},
        "batch_size": 64, "val_fraction": 0.1, "eval_windows": 1024,
        "grad_at_init": {"depths": [6, 12, 24], "placements": ["post", "pre"], "seeds": [0, 1, 2, 3, 4],
                         "batches": 16},
        "train": {"depth": 6, "steps": 2000, "lrs": [5e-4, 1e-3, 3e-3], "warmup_steps": [0, 300], "seeds": [0],
                  "rmsnorm_lines": True, "eval_every": 100, "log_every": 20},
        "depth": {"depths": [3, 12, 24], "lr": 1e-3, "steps": 2000, "seeds": [0], "eval_every": 250,
                  "log_every": 50},
    },
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per run: `study`, `placement`, `norm`, `depth` (+ `lr`, `warmup_steps` for training), `seed`."""
    out: list[dict[str, Any]] = []
    g = config["grad_at_init"]
    for depth in g["depths"]:
        for placement in g["placements"]:
            for seed in g["seeds"]:
                out.append({"study": "grad_at_init", "placement": placement, "norm": "layernorm",
                            "depth": depth, "seed": seed})
    t = config["train"]
    for lr in t["lrs"]:
        for placement, norm in [("post", "layernorm"), ("pre", "layernorm")]:
            for warmup in t["warmup_steps"]:
                for seed in t["seeds"]:
                    out.append({"study": "train", "placement": placement, "norm": norm, "depth": t["depth"],
                                "lr": lr, "warmup_steps": warmup, "seed": seed})
        if t.get("rmsnorm_lines"):  # the extra line: RMSNorm in the pre-LN position, no warmup
            for seed in t["seeds"]:
                out.append({"study": "train", "placement": "pre", "norm": "rmsnorm", "depth": t["depth"],
                            "lr": lr, "warmup_steps": 0, "seed": seed})
    # The depth study at the train study's depth is the train study's run with the same lr and no warmup;
    # list such a depth in `depths` only if `lr` is not one of the train study's learning rates.
    d = config["depth"]
    for depth in d["depths"]:
        for placement in ("post", "pre"):
            for seed in d["seeds"]:
                out.append({"study": "depth", "placement": placement, "norm": "layernorm", "depth": depth,
                            "lr": d["lr"], "warmup_steps": 0, "seed": seed})
    return out


# ----------------------------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=4)
def char_data(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`normlab.data.char_split`, cached per process (the sweep's runs share one encoding)."""
    from normlab.data import char_split

    return char_split(val_fraction)


def build(run: dict[str, Any], config: dict[str, Any], vocab_size: int, device: torch.device) -> Transformer:
    return Transformer(vocab_size, depth=run["depth"], placement=run["placement"], norm=run["norm"],
                       **config["model"]).to(device)


# ------------------------------------------------------------------------------------------- studies

def grad_at_init(run: dict[str, Any], config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    r"""$\lVert \partial \mathcal{L} / \partial W^2_l \rVert_F$ per layer $l$ (input side first) at initialization,
    averaged over `batches` real training batches; also $W^1$ and the attention output $W^O$."""
    task = lm_task(config).to(device)
    gen = seed_all(run["seed"])
    model = build(run, config, len(char_data(config["val_fraction"])[2]), device)
    n = config["grad_at_init"]["batches"]
    sums = {"w2": torch.zeros(run["depth"]), "w1": torch.zeros(run["depth"]), "wo": torch.zeros(run["depth"])}
    weights = {"w2": [b.ffn.w2.weight for b in model.blocks], "w1": [b.ffn.w1.weight for b in model.blocks],
               "wo": [b.attn.proj.weight for b in model.blocks]}
    losses = []
    for _ in range(n):
        x, y = task.batch(config["batch_size"], gen)
        loss = model.loss(x, y)
        grads = torch.autograd.grad(loss, [w for ws in weights.values() for w in ws])
        losses.append(loss.item())
        for i, name in enumerate(weights):
            sums[name] += torch.stack([g.norm() for g in grads[i * run["depth"]:(i + 1) * run["depth"]]]).cpu()
    by_layer = {k: [round(v / n, 6) for v in s.tolist()] for k, s in sums.items()}
    w2 = by_layer["w2"]
    return {"metrics": {"grad_norm_by_layer": w2, "grad_norm_by_layer_w1": by_layer["w1"],
                        "grad_norm_by_layer_wo": by_layer["wo"], "last_over_first": round(w2[-1] / w2[0], 4),
                        "init_loss": round(sum(losses) / n, 4)},
            "history": []}


def lm_task(config: dict[str, Any]) -> CharLM:
    train_ids, val_ids, _ = char_data(config["val_fraction"])
    return CharLM(train_ids, val_ids, config["model"]["context"], eval_windows=config["eval_windows"],
                  eval_batch_size=config["batch_size"] * 4)


def train(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool,
          checkpoint=None) -> dict[str, Any]:
    """Adam (β = 0.9, 0.98; Xiong et al. 2020) from Xavier init, no dropout, no clipping, no weight decay;
    linear warmup over `warmup_steps`, then linear decay to zero."""
    study = config["train"] if run["study"] == "train" else config["depth"]
    seed_all(run["seed"])
    vocab = char_data(config["val_fraction"])[2]
    model = build(run, config, len(vocab), device)
    tc = TrainConfig(steps=study["steps"], epochs=None, batch_size=config["batch_size"], optimizer="adamw",
                     lr=run["lr"], betas=(0.9, 0.98), adam_eps=1e-8, weight_decay=0.0, schedule="linear",
                     warmup=run["warmup_steps"], eval_every=study["eval_every"], log_every=study["log_every"],
                     seed=run["seed"])
    trainer = Trainer(model, lm_task(config), tc, hooks=[log_grad_norm], checkpoint=checkpoint, device=device)
    history = trainer.fit(progress=progress, desc=f"{run['placement']}-LN lr={run['lr']}")
    final = history[-1].get("val_loss")
    divergence_threshold = math.log(len(vocab)) + 1.0  # worse than guessing uniformly, by a margin
    return {"metrics": {"val_loss": final, "steps": trainer.step,
                        "diverged": trainer.diverged or final is None or final > divergence_threshold,
                        "best_val_loss": min((h["val_loss"] for h in history if h.get("val_loss") is not None),
                                             default=None)},
            "history": history}


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False,
            checkpoint=None) -> dict[str, Any]:
    if run["study"] == "grad_at_init":
        return grad_at_init(run, config, device)
    if run["study"] in ("train", "depth"):
        return train(run, config, device, progress, checkpoint)
    raise ValueError(f"unknown study {run['study']!r}; expected grad_at_init, train or depth")


# --------------------------------------------------------------------------------- reading a record

def depth_runs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The depth study's runs, with the train study's runs at the depth study's lr (no warmup, LayerNorm)
    filling in the train study's depth — sorted by depth."""
    d = record["config"]["depth"]
    out = [r for r in record["runs"] if r["config"]["study"] == "depth"]
    have = {(r["config"]["depth"], r["config"]["placement"], r["seed"]) for r in out}
    for r in record["runs"]:
        c = r["config"]
        if (c["study"] == "train" and c["lr"] == d["lr"] and c["warmup_steps"] == 0 and c["norm"] == "layernorm"
                and (c["depth"], c["placement"], r["seed"]) not in have):
            out.append(r)
    return sorted(out, key=lambda r: (r["config"]["depth"], r["config"]["placement"], r["seed"]))
