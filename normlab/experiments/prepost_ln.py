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
from tqdm import tqdm

from normlab.models.transformer import Transformer
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
    """Tiny Shakespeare as int64 character ids: (train, validation, vocabulary).

    The vocabulary is every character of the whole text, sorted (65 for the standard file); the split
    is contiguous — the first `1 - val_fraction` of the text trains, the rest validates — so no
    validation window overlaps a training window.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    from normlab.data import tiny_shakespeare

    text = tiny_shakespeare()
    vocab = "".join(sorted(set(text)))
    lookup = torch.zeros(max(map(ord, vocab)) + 1, dtype=torch.int64)
    lookup[torch.tensor([ord(c) for c in vocab])] = torch.arange(len(vocab))
    ids = lookup[torch.tensor([ord(c) for c in text])]
    n_train = int(len(ids) * (1 - val_fraction))
    return ids[:n_train], ids[n_train:], vocab


def random_batch(data: torch.Tensor, batch_size: int, context: int, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` windows at random offsets: inputs `data[i:i+T]`, targets `data[i+1:i+T+1]`."""
    starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)
    windows = data[idx].to(device)
    return windows[:, :-1], windows[:, 1:]


def val_windows(data: torch.Tensor, n: int, context: int) -> torch.Tensor:
    """`n` evenly spaced windows of length `context + 1` over the validation text (the same for every run)."""
    starts = torch.linspace(0, len(data) - context - 1, n).long()
    return data[starts[:, None] + torch.arange(context + 1)]


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean validation cross-entropy (nats/char) over `windows`."""
    model.eval()
    total = 0.0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        total += model.loss(chunk[:, :-1], chunk[:, 1:]).item() * len(chunk)
    model.train()
    return total / len(windows)


def build(run: dict[str, Any], config: dict[str, Any], vocab_size: int, device: torch.device) -> Transformer:
    return Transformer(vocab_size, depth=run["depth"], placement=run["placement"], norm=run["norm"],
                       **config["model"]).to(device)


# ------------------------------------------------------------------------------------------- studies

def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then linear decay to 0 at `total_steps`:
    $\\eta_t = \\eta_{\\max}\\min\\big(t/W,\\ (T - t)/(T - W)\\big)$ for 1-based step $t$ (no warmup: W = 0)."""
    if warmup_steps and step <= warmup_steps:
        return peak * step / warmup_steps
    return peak * max(0.0, (total_steps - step + 1) / (total_steps - warmup_steps))


def grad_at_init(run: dict[str, Any], config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    r"""$\lVert \partial \mathcal{L} / \partial W^2_l \rVert_F$ per layer $l$ (input side first) at initialization,
    averaged over `batches` real training batches; also $W^1$ and the attention output $W^O$."""
    train, _, vocab = char_data(config["val_fraction"])
    gen = seed_all(run["seed"])
    model = build(run, config, len(vocab), device)
    n = config["grad_at_init"]["batches"]
    sums = {"w2": torch.zeros(run["depth"]), "w1": torch.zeros(run["depth"]), "wo": torch.zeros(run["depth"])}
    losses = []
    for _ in range(n):
        x, y = random_batch(train, config["batch_size"], config["model"]["context"], gen, device)
        model.zero_grad(set_to_none=True)
        loss = model.loss(x, y)
        loss.backward()
        losses.append(loss.item())
        for l, block in enumerate(model.blocks):
            sums["w2"][l] += block.ffn.w2.weight.grad.norm().item()
            sums["w1"][l] += block.ffn.w1.weight.grad.norm().item()
            sums["wo"][l] += block.attn.proj.weight.grad.norm().item()
    by_layer = {k: [round(v / n, 6) for v in s.tolist()] for k, s in sums.items()}
    w2 = by_layer["w2"]
    return {"metrics": {"grad_norm_by_layer": w2, "grad_norm_by_layer_w1": by_layer["w1"],
                        "grad_norm_by_layer_wo": by_layer["wo"], "last_over_first": round(w2[-1] / w2[0], 4),
                        "init_loss": round(sum(losses) / n, 4)},
            "history": []}


def train(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool) -> dict[str, Any]:
    """Adam (β = 0.9, 0.98; Xiong et al. 2020) from Xavier init, no dropout, no clipping, no weight decay."""
    study = config["train"] if run["study"] == "train" else config["depth"]
    train_ids, val_ids, vocab = char_data(config["val_fraction"])
    windows = val_windows(val_ids, config["eval_windows"], config["model"]["context"])
    gen = seed_all(run["seed"])
    model = build(run, config, len(vocab), device)
    opt = torch.optim.Adam(model.parameters(), lr=run["lr"], betas=(0.9, 0.98), eps=1e-8)
    steps, eval_every, log_every = study["steps"], study["eval_every"], study["log_every"]
    divergence_threshold = math.log(len(vocab)) + 1.0  # worse than guessing uniformly, by a margin
    history: list[dict[str, Any]] = []
    window_loss, window_n, diverged = 0.0, 0, False
    for step in tqdm(range(1, steps + 1), disable=not progress, desc=f"{run['placement']}-LN lr={run['lr']}",
                     leave=False):
        lr = lr_at(step, run["lr"], run["warmup_steps"], steps)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = random_batch(train_ids, config["batch_size"], config["model"]["context"], gen, device)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            diverged = True
            history.append({"step": step, "lr": lr, "train_loss": None, "val_loss": None, "grad_norm": None})
            break
        window_loss, window_n = window_loss + value, window_n + 1
        if step % log_every == 0 or step == steps:
            entry = {"step": step, "lr": round(lr, 8), "train_loss": round(window_loss / window_n, 4),
                     "grad_norm": round(grad_norm, 4)}
            window_loss, window_n = 0.0, 0
            if step % eval_every == 0 or step == steps:
                entry["val_loss"] = round(evaluate(model, windows, config["batch_size"] * 4, device), 4)
            history.append(entry)
    final = None if diverged else history[-1]["val_loss"]
    diverged = diverged or final is None or final > divergence_threshold
    return {"metrics": {"final_val_loss": final, "diverged": diverged,
                        "best_val_loss": min((h["val_loss"] for h in history if h.get("val_loss") is not None),
                                             default=None)},
            "history": history}


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False) -> dict[str, Any]:
    if run["study"] == "grad_at_init":
        return grad_at_init(run, config, device)
    if run["study"] in ("train", "depth"):
        return train(run, config, device, progress)
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
