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

The profiles `smoke`, `cpu` and `full` run the three studies above, one seed each. The converged
profiles replace studies 2 and 3 with a design whose every choice is recorded:

- `cpu_converged`: the **grid**, Xiong et al.'s Figure as a sweep: post- and pre-LN (LayerNorm) x peak
  lr x warmup (0 or `WARMUP` steps) at depth 6, plus a pre-RMSNorm line and a DeepNorm line
  {cite}`wang2022deepnet` at every lr (with warmup); 3 seeds per cell, 5 at the lrs where the
  placements' best lie and their differences are small. Each run is trained long enough to reach
  below 1.8 nats/char and evaluated every `STEPS // 20` steps, so `flatness` can say how much the
  curve still moves. And the gradients at init (study 1) for post, pre and DeepNorm, 5 seeds.
- `cpu_converged_depth`: the **depth study**, depths 6, 12, 24 for post, pre and DeepNorm, each
  placement at its best lr (`best_lrs`) of the recorded `cpu_converged` grid with warmup (so it is
  recorded after that grid, which it reads: `depth_lrs`); 3 seeds. And the **budget** check: post and
  pre at depth 6 with twice the steps (`budget_gain`).
- `smoke_converged`: both in seconds, for the tests.

Readers of a converged record (the chapter's cells): `grid_table`, `best_lrs`, `best_cell`, `best_cells`,
`mean_curve`, `post_minus_pre`, `rms_minus_ln`, `depth_table`, `depth_lrs_used`, `flatness`, `budget_gain`,
`budget_shift`, `depth_difference`,
`grad_profiles`, `grad_ratio_difference`, `context_gain`, and `claims` (the verdict table's rows, from the
grid record and the depth record together); differences are `normlab.stats.Interval`s, paired by seed.
`measure_tokens_per_s` and `cost_estimate` size a profile.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any

import torch

from normlab import selection
from normlab.results import band
from normlab.models.transformer import Transformer
from normlab.stats import NOT_TESTED, Interval, paired_difference, seed_verdict
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

# The converged profiles (see the module docstring). Sizes from measured costs (`measure_tokens_per_s`, one
# thread of a shared 2-core AMD EPYC, so pessimistic): at batch 16 x context 64 a depth-6 model trains at
# ~21k tokens/s, depth 12 at ~10.6k, depth 24 at ~5.2k, so a depth-6 run of 3000 steps takes ~2.6 min and
# the two profiles together ~7.4 CPU-hours (`cost_estimate`). Single-seed sizing runs of pre-LN with warmup
# (not recorded: they set only these sizes and where the extra seeds go; the lrs the chapter reads come from
# the recorded grid): batch 16 x 3000 steps at lr 3e-3 ended at 1.695 nats/char, batch 32 x 1500 steps (same
# tokens and time) at 1.738 (lr 3e-3) and 1.691 (lr 1e-2), 1.822 at lr 1e-3 even after 2400 steps; each
# curve still fell ~0.05 over its last 20% (what `flatness` and the budget check measure).
STEPS, WARMUP = 3000, 300
_CONVERGED = {"model": {"d_model": 64, "n_heads": 4, "context": 64}, "batch_size": 16, "val_fraction": 0.1,
              "eval_windows": 512}
_CURVE = {"steps": STEPS, "eval_every": STEPS // 20, "log_every": STEPS // 60}
PROFILES.update({
    # the lr x warmup x placement grid at depth 6 (Xiong et al.'s Figure), pre-RMSNorm and DeepNorm lines,
    # and the gradients at init
    "cpu_converged": {
        **_CONVERGED,
        "grad_at_init": {"depths": [6, 12, 24], "placements": ["post", "pre", "deepnorm"], "seeds": [0, 1, 2, 3, 4],
                         "batches": 8},
        "grid": {"depth": 6, **_CURVE, "placements": ["post", "pre"], "lrs": [1e-3, 3e-3, 1e-2, 3e-2],
                 "warmup_steps": [0, WARMUP], "seeds": [0, 1, 2], "more_seeds": {"lrs": [3e-3, 1e-2], "seeds": [3, 4]},
                 "lines": [{"placement": "pre", "norm": "rmsnorm", "warmup_steps": WARMUP},
                           {"placement": "deepnorm", "norm": "layernorm", "warmup_steps": WARMUP}]},
    },
    # depth 6, 12, 24 for post, pre, DeepNorm, each at its best lr of the recorded cpu_converged grid (so
    # recorded after it), and twice the steps at depth 6: the check that the budget has converged
    "cpu_converged_depth": {
        **_CONVERGED,
        "depth_study": {"depths": [6, 12, 24], "placements": ["post", "pre", "deepnorm"], "warmup_steps": WARMUP,
                        "seeds": [0, 1, 2], "lr_from": "cpu_converged", **_CURVE},
        "budget": {"depth": 6, "placements": ["post", "pre"], "seeds": [0, 1, 2], "steps": 2 * STEPS,
                   "eval_every": STEPS // 10, "log_every": STEPS // 30},
    },
    # both converged profiles in one, in seconds: every code path of theirs (readers included)
    "smoke_converged": {
        "model": {"d_model": 32, "n_heads": 2, "context": 32}, "batch_size": 8, "val_fraction": 0.1, "eval_windows": 64,
        "grad_at_init": {"depths": [2], "placements": ["post", "pre", "deepnorm"], "seeds": [0, 1], "batches": 2},
        "grid": {"depth": 2, "steps": 12, "eval_every": 3, "log_every": 3, "placements": ["post", "pre"],
                 "lrs": [1e-3, 1e-2], "warmup_steps": [0, 4], "seeds": [0, 1], "more_seeds": {"lrs": [1e-3], "seeds": [2]},
                 "lines": [{"placement": "pre", "norm": "rmsnorm", "warmup_steps": 4},
                           {"placement": "deepnorm", "norm": "layernorm", "warmup_steps": 4}]},
        "depth_study": {"depths": [2, 3], "placements": ["post", "pre", "deepnorm"], "warmup_steps": 4, "seeds": [0, 1],
                        "lr": {"post": 1e-3, "pre": 1e-2, "deepnorm": 1e-3}, "steps": 12, "eval_every": 3,
                        "log_every": 3},
        "budget": {"depth": 2, "placements": ["post", "pre"], "seeds": [0, 1], "steps": 24, "eval_every": 6,
                   "log_every": 6},
    },
})


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per run: `study`, `placement`, `norm`, `depth` (+ `lr`, `warmup_steps` for training), `seed`."""
    out: list[dict[str, Any]] = []
    g = config.get("grad_at_init", {"depths": []})
    for depth in g["depths"]:
        for placement in g["placements"]:
            for seed in g["seeds"]:
                out.append({"study": "grad_at_init", "placement": placement, "norm": "layernorm",
                            "depth": depth, "seed": seed})
    if "grid" in config or "depth_study" in config:  # the converged profiles (see `converged_runs`)
        return out + converged_runs(config)
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


TRAINED_STUDIES = ("train", "depth", "grid", "depth_study", "budget")


def converged_runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The converged profiles' trained runs: the `grid`, the `depth_study` and the `budget` check.

    - `grid`: every `lrs` x `warmup_steps` x `placements` cell (LayerNorm) at `depth`, plus each of
      `lines` (a placement and norm at one warmup: pre-RMSNorm, DeepNorm) at every lr; seeds `seeds`,
      and `more_seeds["seeds"]` too at the lrs `more_seeds["lrs"]` (where the differences are small).
    - `depth_study`: `placements` x `depths` at warmup `warmup_steps`, each placement at its lr from
      `depth_lrs(config)` (given, or the best of a recorded grid).
    - `budget`: each of `placements` at its depth-study cell at `depth` with `steps` (more) steps, the
      check that the depth study's budget has converged (`budget_gain`).
    """
    out: list[dict[str, Any]] = []
    g = config.get("grid")
    if g:
        more = g.get("more_seeds", {"lrs": [], "seeds": []})
        lines = [(p, "layernorm", w) for p in g["placements"] for w in g["warmup_steps"]]
        lines += [(line["placement"], line["norm"], line["warmup_steps"]) for line in g.get("lines", [])]
        for lr in g["lrs"]:
            seeds = list(g["seeds"]) + (list(more["seeds"]) if lr in more["lrs"] else [])
            for placement, norm, warmup in lines:
                for seed in seeds:
                    out.append({"study": "grid", "placement": placement, "norm": norm, "depth": g["depth"],
                                "lr": lr, "warmup_steps": warmup, "seed": seed})
    d = config.get("depth_study")
    if d:
        lrs = depth_lrs(config)
        for placement in d["placements"]:
            for depth in d["depths"]:
                for seed in d["seeds"]:
                    out.append({"study": "depth_study", "placement": placement, "norm": "layernorm", "depth": depth,
                                "lr": lrs[placement], "warmup_steps": d["warmup_steps"], "seed": seed})
        b = config.get("budget")
        if b:
            if b["depth"] not in d["depths"]:
                raise ValueError(f"budget depth {b['depth']} is not among the depth study's depths {d['depths']}: "
                                 "the longer runs are compared with the depth study's runs at that depth")
            for placement in b["placements"]:
                for seed in b["seeds"]:
                    out.append({"study": "budget", "placement": placement, "norm": "layernorm", "depth": b["depth"],
                                "lr": lrs[placement], "warmup_steps": d["warmup_steps"], "steps": b["steps"],
                                "seed": seed})
    elif config.get("budget"):
        raise ValueError("a budget check needs a depth_study in the same profile (it reruns its cells for longer)")
    return out


def depth_lrs(config: dict[str, Any]) -> dict[str, float]:
    """`{placement: lr}` of the depth study: `depth_study["lr"]` as given, or, with `depth_study["lr_from"]`
    naming a profile, each placement's best lr (`best_lrs`) at the depth study's warmup in that profile's
    recorded grid (`results/prepost_ln/<lr_from>.json`, which must be complete and of the same model)."""
    d = config["depth_study"]
    if ("lr" in d) == ("lr_from" in d):
        raise ValueError("depth_study needs exactly one of 'lr' ({placement: lr}) or 'lr_from' (the profile whose "
                         "recorded grid picks each placement's lr)")
    if "lr" in d:
        missing = [p for p in d["placements"] if p not in d["lr"]]
        if missing:
            raise ValueError(f"depth_study['lr'] has no lr for {missing}: give one per placement")
        return {p: d["lr"][p] for p in d["placements"]}
    from normlab import results

    path = results.result_path("prepost_ln", d["lr_from"])
    fix = f"record it first: `python -m normlab run prepost_ln --profile {d['lr_from']}`"
    if not path.exists():
        raise ValueError(f"the depth study takes its learning rates from the grid in {path}, which does not exist: {fix}")
    grid = results.load_path(path)
    if not grid.get("complete", True):
        raise ValueError(f"the grid in {path} is still being recorded ({len(grid['runs'])} runs so far): {fix}")
    theirs = {**{k: grid["config"].get(k) for k in ("model", "batch_size", "val_fraction")},
              "steps": grid["config"].get("grid", {}).get("steps")}
    for key, value in theirs.items():
        mine = d["steps"] if key == "steps" else config.get(key)
        if value != mine:
            raise ValueError(f"the grid in {path} was recorded with {key}={value!r}, this profile uses {mine!r}: "
                             "its learning rates belong to another model or budget; record a grid with this "
                             "profile's settings")
    best = best_lrs(grid)
    out = {}
    for p in d["placements"]:
        lr = best.get((p, "layernorm", d["warmup_steps"]))
        if lr is None:
            raise ValueError(f"the grid in {path} has no {p} cell at warmup {d['warmup_steps']} that trained without "
                             "diverging: add the placement (or a smaller lr) to the grid, or give depth_study['lr']")
        out[p] = lr
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
    study = config[run["study"]]
    seed_all(run["seed"])
    vocab = char_data(config["val_fraction"])[2]
    model = build(run, config, len(vocab), device)
    tc = TrainConfig(steps=run.get("steps", study["steps"]), epochs=None, batch_size=config["batch_size"], optimizer="adamw",
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
    if run["study"] in TRAINED_STUDIES:
        if run["study"] not in config:
            raise ValueError(f"run {run!r} is of the {run['study']!r} study, which this profile's config does not "
                             f"have (it has {sorted(k for k in config if k in TRAINED_STUDIES)}): pass the "
                             "config of the profile the run came from")
        return train(run, config, device, progress, checkpoint)
    raise ValueError(f"unknown study {run['study']!r}; expected grad_at_init or one of {', '.join(TRAINED_STUDIES)}")


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


# ------------------------------------------------------------- reading a converged record (the chapter)

CELL = ("placement", "norm", "depth", "lr", "warmup_steps")


def _final(run: dict[str, Any]) -> float | None:
    """The run's final validation loss, or None if it diverged."""
    m = run["metrics"]
    return None if m.get("diverged") or m.get("val_loss") is None else m["val_loss"]


def _cells(record: dict[str, Any], study: str) -> dict[tuple, dict[int, dict[str, Any]]]:
    """`{(placement, norm, depth, lr, warmup_steps): {seed: run}}` of one study, in recorded order."""
    out: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in record["runs"]:
        if r["config"]["study"] == study:
            out.setdefault(tuple(r["config"][k] for k in CELL), {})[r["seed"]] = r
    if not out:
        studies = sorted({r["config"]["study"] for r in record["runs"]})
        raise ValueError(f"the record ({record.get('profile')!r}) has no {study!r} runs (it has {studies}): load a "
                         f"converged profile (cpu_converged for the grid, cpu_converged_depth for the depth study)")
    return out


@functools.lru_cache(maxsize=4)
def unigram_loss(val_fraction: float = 0.1) -> float:
    """Cross-entropy (nats/char) of predicting the training text's character frequencies: a run whose
    validation loss stays there has learned nothing from context."""
    train_ids = char_data(val_fraction)[0]
    freq = torch.bincount(train_ids).double() / len(train_ids)
    freq = freq[freq > 0]
    return float(-(freq * freq.log()).sum())


def grid_table(record: dict[str, Any], study: str = "grid", stuck_above: float | None = None) -> list[dict[str, Any]]:
    """One row per cell of `study` ("grid", "depth_study" or "budget"), sorted by placement, norm, depth, warmup, lr.

    Each row: the cell's `placement`, `norm`, `depth`, `lr`, `warmup_steps`; `n` (seeds), `n_diverged`
    (non-finite loss, or worse than a uniform guess), `n_stuck` (finished but at or above `stuck_above`,
    default the unigram loss minus 0.05: it learned the character frequencies only); and the final
    validation loss over the seeds that did not diverge: `mean`, `sd` (None below 2 seeds), `min`, `max`
    (all None when every seed diverged), `values` (`{seed: loss or None}`).
    """
    stuck_above = unigram_loss(record["config"]["val_fraction"]) - 0.05 if stuck_above is None else stuck_above
    rows = []
    for cell, by_seed in _cells(record, study).items():
        values = {seed: _final(r) for seed, r in sorted(by_seed.items())}
        ok = [v for v in values.values() if v is not None]
        rows.append({**dict(zip(CELL, cell)), "n": len(values), "n_diverged": len(values) - len(ok),
                     "n_stuck": sum(v >= stuck_above for v in ok),
                     "mean": statistics.fmean(ok) if ok else None, "sd": statistics.stdev(ok) if len(ok) > 1 else None,
                     "min": min(ok, default=None), "max": max(ok, default=None), "values": values})
    return sorted(rows, key=lambda r: (r["placement"], r["norm"], r["depth"], r["warmup_steps"], r["lr"]))


def best_lrs(record: dict[str, Any], study: str = "grid") -> dict[tuple[str, str, int], float | None]:
    """`{(placement, norm, warmup_steps): lr}`: each line's lr by `normlab.selection.choose_lr`, the lowest
    median final validation loss over seeds among its cells in which no seed diverged (None if every lr
    diverged somewhere). Ties: the smaller lr.

    The differences read at these lrs (`post_minus_pre`, `rms_minus_ln`) use the same seeds that chose
    them, which favours each side a little, and both sides alike."""
    scores: dict[tuple[str, str, int], dict[float, list[float | None]]] = {}
    for cell, by_seed in _cells(record, study).items():
        c = dict(zip(CELL, cell))
        line = scores.setdefault((c["placement"], c["norm"], c["warmup_steps"]), {})
        line[c["lr"]] = [_final(r) for _, r in sorted(by_seed.items())]
    out: dict[tuple[str, str, int], float | None] = {}
    for key, line in scores.items():
        try:
            out[key] = selection.choose_lr(line)
        except ValueError:  # every lr of the line diverged for some seed
            out[key] = None
    return out


def scored_loss(run: dict[str, Any], unigram: float) -> float:
    """A run's final validation loss with a failure counted as having learned nothing from context: a run
    that diverged, or ended above the unigram loss `unigram`, scores `unigram` (`min(final, unigram)`)."""
    final = _final(run)
    return unigram if final is None else min(final, unigram)


def _paired(record: dict[str, Any], a: tuple, b: tuple, study_a: str = "grid", study_b: str = "grid",
            scored: bool = False, unigram: float | None = None) -> Interval:
    """`paired_difference` of final validation losses, cell `a` minus cell `b`, over their common seeds.
    A diverged seed is refused, or, with `scored`, every run is read as its `scored_loss` against `unigram`
    (default `unigram_loss` of the record's data)."""
    va, vb = _values(record, a, study_a, scored, unigram), _values(record, b, study_b, scored, unigram)
    seeds = [s for s in va if s in vb]
    return paired_difference({s: va[s] for s in seeds}, {s: vb[s] for s in seeds})


def _values(record: dict[str, Any], cell: tuple, study: str, scored: bool, unigram: float | None) -> dict[int, float]:
    """`{seed: final validation loss}` of one cell of `study`, as `_paired` reads it: a diverged seed is
    refused, or, with `scored`, every run is its `scored_loss` against `unigram` (default: the record's)."""
    runs_ = _cells(record, study).get(cell)
    if runs_ is None:
        raise ValueError(f"no {study} cell {dict(zip(CELL, cell))} in the record: it was not part of the profile")
    bad = [seed for seed, r in runs_.items() if _final(r) is None]
    if bad and not scored:
        raise ValueError(f"{study} cell {dict(zip(CELL, cell))} diverged at seeds {bad}: a difference of final "
                         "losses needs every seed to finish; report the divergence instead (or pass scored=True)")
    if not scored:
        return {s: _final(r) for s, r in runs_.items()}
    unigram = unigram_loss(record["config"]["val_fraction"]) if unigram is None else unigram
    return {s: scored_loss(r, unigram) for s, r in runs_.items()}


def post_minus_pre(record: dict[str, Any], scored: bool = False) -> dict[int, Interval]:
    """`{warmup_steps: Interval}`: post-LN minus pre-LN final validation loss (nats/char), paired by seed,
    each placement at its own best lr (`best_lrs`) for that warmup. Positive: pre-LN is better. `scored`:
    read each run as its `scored_loss` (see `_paired`)."""
    g, best = record["config"]["grid"], best_lrs(record)
    out = {}
    for w in g["warmup_steps"]:
        lrs = {p: best.get((p, "layernorm", w)) for p in ("post", "pre")}
        if None in lrs.values():
            raise ValueError(f"at warmup {w} no lr trained {[p for p, v in lrs.items() if v is None]} without "
                             "divergence: there is no best lr to compare at")
        out[w] = _paired(record, ("post", "layernorm", g["depth"], lrs["post"], w),
                         ("pre", "layernorm", g["depth"], lrs["pre"], w), scored=scored)
    return out


def rms_minus_ln(record: dict[str, Any], scored: bool = False) -> Interval:
    """Pre-RMSNorm minus pre-LayerNorm final validation loss, paired by seed, at pre-LayerNorm's best lr
    at the RMSNorm line's warmup (claim C25, "RMSNorm matches LayerNorm": judge it with
    `verdict(iv, direction="equivalent", margin=...)`, a margin chosen before looking: `EQUIVALENCE_MARGIN`).
    `scored`: read each run as its `scored_loss` (see `_paired`)."""
    g = record["config"]["grid"]
    lines = [line for line in g.get("lines", []) if (line["placement"], line["norm"]) == ("pre", "rmsnorm")]
    if not lines:
        raise ValueError("this grid has no pre-RMSNorm line (grid['lines']): it cannot compare RMSNorm with LayerNorm")
    w = lines[0]["warmup_steps"]
    lr = best_lrs(record).get(("pre", "layernorm", w))
    if lr is None:
        raise ValueError(f"pre-LN diverged at every lr with warmup {w}: no best lr to compare RMSNorm at")
    return _paired(record, ("pre", "rmsnorm", g["depth"], lr, w), ("pre", "layernorm", g["depth"], lr, w),
                   scored=scored)


def depth_table(record: dict[str, Any], stuck_above: float | None = None) -> list[dict[str, Any]]:
    """The depth study, one row per (placement, depth), sorted so: `grid_table`'s rows (final validation
    loss `mean`/`sd`/`min`/`max` over seeds, `n`, `n_diverged`, `n_stuck`, the `lr` used)."""
    rows = grid_table(record, "depth_study", stuck_above)
    return sorted(rows, key=lambda r: (PLACEMENT_ORDER.get(r["placement"], 9), r["depth"]))


PLACEMENT_ORDER = {"post": 0, "pre": 1, "deepnorm": 2}


def flatness(record: dict[str, Any], study: str = "grid", fraction: float = 0.2) -> list[dict[str, Any]]:
    """Has training stopped moving? Per cell of `study`, the change of validation loss over the last
    `fraction` of training: the final value minus the one at the last evaluation at or before step
    (1 - fraction) * steps, as an `Interval` over the seeds that did not diverge (paired t; None with
    fewer than 2). Rows: the cell's keys, `from_step`, `n`, `change`. Negative: still falling.

    With the linear decay to zero the curve flattens at the end partly because the lr does; `budget_gain`
    (twice the steps) is the direct test of convergence."""
    rows = []
    for cell, by_seed in _cells(record, study).items():
        start, final, from_step = {}, {}, None
        for seed, r in by_seed.items():
            if _final(r) is None:
                continue
            from_step, delta = selection.tail_change(r["history"], "val_loss", fraction, "step")
            start[seed], final[seed] = _final(r) - delta, _final(r)
        change = paired_difference(final, start) if len(final) >= 2 else None
        rows.append({**dict(zip(CELL, cell)), "from_step": from_step, "n": len(final), "change": change})
    return sorted(rows, key=lambda r: (r["placement"], r["norm"], r["depth"], r["warmup_steps"], r["lr"]))


def budget_gain(record: dict[str, Any]) -> dict[str, Interval]:
    """`{placement: Interval}`: final validation loss with the budget check's steps minus with the depth
    study's, same cell (depth, lr, warmup), paired by seed. Near 0: the depth study's budget has
    converged; negative: more steps still help, by that much."""
    out = {}
    for cell in _cells(record, "budget"):
        out[cell[0]] = _paired(record, cell, cell, "budget", "depth_study")
    return out


def depth_difference(record: dict[str, Any], a: str = "deepnorm", b: str = "pre") -> dict[int, Interval]:
    """`{depth: Interval}`: placement `a` minus placement `b` in the depth study, final validation loss read
    as `scored_loss`, paired by seed, each at its own lr; only the depths both placements have."""
    cells = _cells(record, "depth_study")
    by = {(c[0], c[2]): c for c in cells}
    placements = sorted({c[0] for c in cells})
    for p in (a, b):
        if p not in placements:
            raise ValueError(f"no {p!r} runs in the depth study (it has {placements}): name one of those")
    depths = sorted({dep for p, dep in by if p == a} & {dep for p, dep in by if p == b})
    return {dep: _paired(record, by[(a, dep)], by[(b, dep)], "depth_study", "depth_study", scored=True)
            for dep in depths}


def budget_shift(record: dict[str, Any], unigram: float | None = None) -> dict[str, Interval]:
    """Does the compared quantity move with the budget? Post-LN minus pre-LN final validation loss at the
    budget check's depth, each at its lr there, read as `scored_loss` and paired by seed: `"short"` with
    the depth study's steps, `"long"` with the budget check's, and `"change"` = long minus short, the
    difference of the per-seed differences. Near 0: the budget moves both placements alike, so a verdict
    on post minus pre stands even where the losses themselves still fall (`budget_gain`)."""
    cells = {cell[0]: cell for cell in _cells(record, "budget")}
    if not {"post", "pre"} <= set(cells):
        raise ValueError(f"the budget check has placements {sorted(cells)}: post minus pre needs both 'post' and "
                         "'pre' in the profile's budget placements")

    def diff(study: str) -> dict[int, float]:
        post, pre = (_values(record, cells[p], study, True, unigram) for p in ("post", "pre"))
        return {s: post[s] - pre[s] for s in post if s in pre}

    short, long = diff("depth_study"), diff("budget")
    seeds = [s for s in long if s in short]
    return {"short": paired_difference(short, {s: 0.0 for s in short}),
            "long": paired_difference(long, {s: 0.0 for s in long}),
            "change": paired_difference({s: long[s] for s in seeds}, {s: short[s] for s in seeds})}



# --------------------------------------------------------- the chapter: protocol, curves, gradients, claims

#: What the converged budget is sized for: the grid's best pre-LN cell ends at or below this validation
#: loss (nats/char) at every seed (`best_cell` says whether it does).
TARGET_LOSS = 1.8
#: "matches" in the equivalence claims: a difference of final validation loss inside +-0.02 nats/char (2% in
#: perplexity), fixed before the converged records were made.
EQUIVALENCE_MARGIN = 0.02
#: "trains" / "fails" in the depth claims: ends more / less than this far below the unigram loss
#: (nats/char). A run that learned only the character frequencies gains about 0; the 300-step runs of the
#: `cpu` profile that trained gained 0.76-0.97.
TRAINS_GAIN = 0.5


def best_cell(record: dict[str, Any], placement: str = "pre", norm: str = "layernorm",
              target: float = TARGET_LOSS) -> dict[str, Any]:
    """The grid's best cell of one line (placement, norm) over every lr and warmup: the lowest median final
    validation loss over seeds among the cells in which no seed diverged (`selection.choose_lr`'s rule;
    ties: the smaller lr, then the shorter warmup). Its `grid_table` row, with `median`, `target` and
    `meets` (every seed ended at or below `target`)."""
    rows = [r for r in grid_table(record) if (r["placement"], r["norm"]) == (placement, norm) and not r["n_diverged"]]
    if not rows:
        raise ValueError(f"no {placement}-LN ({norm}) cell of the grid trained without divergence at every seed")
    rows = [{**r, "median": statistics.median(r["values"].values())} for r in rows]
    best = min(rows, key=lambda r: (r["median"], r["lr"], r["warmup_steps"]))
    return {**best, "target": target, "meets": best["max"] <= target}


def best_cells(record: dict[str, Any], study: str = "grid") -> dict[tuple[str, str, int], tuple]:
    """`{(placement, norm, warmup_steps): cell}`: each line's cell (a `CELL` tuple) at its best lr
    (`best_lrs`); a line whose every lr diverged somewhere is left out."""
    depth = record["config"][study]["depth"]
    return {(p, n, w): (p, n, depth, lr, w) for (p, n, w), lr in best_lrs(record, study).items() if lr is not None}


def mean_curve(record: dict[str, Any], cell: tuple, study: str = "grid", metric: str = "val_loss") -> dict[str, Any]:
    """One cell's curve of `metric` over its seeds that did not diverge: `step` (the evaluations all of them
    have), `mean`, `min`, `max` per step, and `n` (seeds)."""
    by_seed = _cells(record, study).get(cell)
    if by_seed is None:
        raise ValueError(f"no {study} cell {dict(zip(CELL, cell))} in the record: it was not part of the profile")
    curve = band([r for r in by_seed.values() if _final(r) is not None], metric, "step")
    return curve or {"step": [], "mean": [], "min": [], "max": [], "n": 0}


def grad_profiles(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The gradients at initialization, one row per (depth, placement), sorted by depth, then post, pre,
    DeepNorm: `depth`, `placement`, `n` (seeds), per layer (input side first) the `mean` and `sd`
    (population) over seeds of the W2 gradient norm, `ratio` (last / first layer of the seed-averaged
    profile), `seed_ratios` (`{seed: last / first}`) and `layer_mean` (the mean over layers)."""
    groups: dict[tuple[int, str], dict[int, list[float]]] = {}
    for r in record["runs"]:
        if r["config"]["study"] == "grad_at_init":
            key = (r["config"]["depth"], r["config"]["placement"])
            groups.setdefault(key, {})[r["seed"]] = r["metrics"]["grad_norm_by_layer"]
    if not groups:
        raise ValueError(f"the record ({record.get('profile')!r}) has no grad_at_init runs: load cpu_converged")
    rows = []
    order = lambda kv: (kv[0][0], PLACEMENT_ORDER.get(kv[0][1], 9))  # noqa: E731
    for (depth, placement), by_seed in sorted(groups.items(), key=order):
        layers = list(zip(*by_seed.values()))
        mean = [statistics.fmean(v) for v in layers]
        rows.append({"depth": depth, "placement": placement, "n": len(by_seed), "mean": mean,
                     "sd": [statistics.pstdev(v) for v in layers], "ratio": mean[-1] / mean[0],
                     "seed_ratios": {s: g[-1] / g[0] for s, g in sorted(by_seed.items())},
                     "layer_mean": statistics.fmean(mean)})
    return rows


def grad_ratio_difference(record: dict[str, Any], depth: int, a: str = "post", b: str = "pre") -> Interval:
    """`a` minus `b` of the last / first layer ratio of the W2 gradient norm at initialization, at `depth`,
    paired by seed. Positive: `a`'s profile rises more toward the output (Xiong et al.'s Figure 3)."""
    rows = {r["placement"]: r for r in grad_profiles(record) if r["depth"] == depth}
    missing = [p for p in (a, b) if p not in rows]
    if missing:
        raise ValueError(f"no gradients at init of {missing} at depth {depth} in the record")
    ra, rb = rows[a]["seed_ratios"], rows[b]["seed_ratios"]
    seeds = [s for s in ra if s in rb]
    return paired_difference({s: ra[s] for s in seeds}, {s: rb[s] for s in seeds})


def context_gain(record: dict[str, Any], cell: tuple, study: str = "depth_study",
                 unigram: float | None = None) -> Interval:
    """What one cell learned beyond the character frequencies: the unigram loss minus each seed's
    `scored_loss` (nats/char; 0 for a run that diverged or ended above the unigram loss), the mean over
    seeds with its t interval."""
    by_seed = _cells(record, study).get(cell)
    if by_seed is None:
        raise ValueError(f"no {study} cell {dict(zip(CELL, cell))} in the record: it was not part of the profile")
    unigram = unigram_loss(record["config"]["val_fraction"]) if unigram is None else unigram
    gains = {s: unigram - scored_loss(r, unigram) for s, r in by_seed.items()}
    return paired_difference(gains, {s: 0.0 for s in gains})


def depth_lrs_used(grid_record: dict[str, Any], depth_record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{placement: {"lr", "grid_best"}}`: the lr of each placement's depth-study runs, and its best lr
    (`best_lrs`) in `grid_record` at the depth study's warmup (None where it has none). When the depth study
    took its lrs from a recorded grid (`lr_from`), they must be `grid_record`'s: a ValueError says the depth
    record was made from another grid."""
    d = depth_record["config"]["depth_study"]
    best = best_lrs(grid_record)
    used: dict[str, set] = {}
    for cell in _cells(depth_record, "depth_study"):
        used.setdefault(cell[0], set()).add(cell[3])
    out = {}
    for placement, lrs in sorted(used.items(), key=lambda kv: PLACEMENT_ORDER.get(kv[0], 9)):
        (lr,) = lrs
        out[placement] = {"lr": lr, "grid_best": best.get((placement, "layernorm", d["warmup_steps"]))}
    stale = [p for p, v in out.items() if v["lr"] != v["grid_best"]]
    if "lr_from" in d and stale:
        raise ValueError(f"the depth record's lrs of {stale} are not the best lrs of this grid record: it was made "
                         f"from another recording of {d['lr_from']!r}; re-record it after the grid")
    return out


def claims(grid_record: dict[str, Any], depth_record: dict[str, Any], margin: float = EQUIVALENCE_MARGIN,
           trains_gain: float = TRAINS_GAIN, unigram: float | None = None) -> list[tuple[str, Interval | None, str]]:
    """The chapter's claims as `(claim, Interval, verdict)` rows for `normlab.stats.verdict_table`, each
    judged by `normlab.stats.verdict`. W is the grid's warmup, D the depth study's largest depth; losses
    are final validation losses read as `scored_loss` (a failed seed counts at the unigram loss), paired
    by seed, each line at its best lr (`best_lrs`) unless said otherwise:

    1. post-LN's W2 gradient at init rises more toward the output than pre-LN's (Xiong et al.): post minus
       pre of the last / first layer ratio at the grid record's deepest gradient depth, > 0.
    2. post-LN needs warmup (Xiong et al.): post-LN without minus with warmup, both at post-LN's best lr
       with warmup, > 0.
    3. pre-LN trains without warmup where post-LN does not (Xiong et al.): post-LN minus pre-LN, no warmup,
       both at pre-LN's best lr without warmup, > 0.
    4. pre-LN needs no warmup (Xiong et al.): pre-LN without minus with warmup, within +-`margin`.
    5. with warmup post-LN ends below pre-LN (Liu et al.): post minus pre at W, < 0.
    6. pre-RMSNorm matches pre-LayerNorm (Zhang & Sennrich): `rms_minus_ln`, within +-`margin`.
    7-9. post-LN fails, pre-LN and DeepNorm train at depth D (Liu et al.; Wang et al.): the `context_gain`
       of the depth study's cell, < `trains_gain` (post) or > `trains_gain` (pre, DeepNorm).

    A row whose line has no best lr (every lr diverged somewhere) says `NOT_TESTED`, interval None; a
    claim the records have no cells for (no warmup-free column, no RMSNorm line, a placement missing from
    the depth study) is left out."""
    rows: list[tuple[str, Interval | None, str]] = []
    g = grid_record["config"]["grid"]
    best, depth, warm = best_lrs(grid_record), g["depth"], max(g["warmup_steps"])
    paired = functools.partial(_paired, grid_record, scored=True, unigram=unigram)

    def add(text, make, direction, threshold=0.0, needs=()):
        if any(lr is None for lr in needs):
            rows.append((text, None, NOT_TESTED))
            return
        iv = make()
        rows.append((text, iv, seed_verdict(iv, direction=direction, threshold=threshold,
                                       margin=margin if direction == "equivalent" else None)))

    grads = [r for r in grid_record["runs"] if r["config"]["study"] == "grad_at_init"]
    if grads:
        deepest = max(r["config"]["depth"] for r in grads)
        add(f"at init (depth {deepest}), post-LN's W2 gradient rises more toward the output (Xiong)",
            lambda: grad_ratio_difference(grid_record, deepest), "greater")
    cell = lambda p, lr, w, n="layernorm": (p, n, depth, lr, w)  # noqa: E731
    post_w, pre_0, pre_w = (best.get((p, "layernorm", w)) for p, w in (("post", warm), ("pre", 0), ("pre", warm)))
    if 0 in g["warmup_steps"] and warm:
        add("post-LN needs warmup: worse without it, at its best lr with it (Xiong)",
            lambda: paired(cell("post", post_w, 0), cell("post", post_w, warm)), "greater", needs=[post_w])
        add("pre-LN trains without warmup where post-LN does not (Xiong)",
            lambda: paired(cell("post", pre_0, 0), cell("pre", pre_0, 0)), "greater", needs=[pre_0])
        add(f"pre-LN needs no warmup: best without = best with ±{margin:g} (Xiong)",
            lambda: paired(cell("pre", pre_0, 0), cell("pre", pre_w, warm)), "equivalent", needs=[pre_0, pre_w])
    add("with warmup, post-LN beats pre-LN, each at its best lr (Liu)",
        lambda: paired(cell("post", post_w, warm), cell("pre", pre_w, warm)), "less", needs=[post_w, pre_w])
    rms = [line for line in g.get("lines", []) if (line["placement"], line["norm"]) == ("pre", "rmsnorm")]
    if rms:
        w = rms[0]["warmup_steps"]
        lr = best.get(("pre", "layernorm", w))
        add(f"pre-RMSNorm matches pre-LayerNorm ±{margin:g} (Zhang & Sennrich)",
            lambda: paired(cell("pre", lr, w, "rmsnorm"), cell("pre", lr, w)), "equivalent", needs=[lr])
    table = depth_table(depth_record)
    deepest = max(r["depth"] for r in table)
    for placement, direction, text in (("post", "less", "post-LN fails at depth {} (Liu)"),
                                       ("pre", "greater", "pre-LN trains at depth {} (Liu)"),
                                       ("deepnorm", "greater", "DeepNorm trains at depth {} (Wang)")):
        row = next((r for r in table if (r["placement"], r["depth"]) == (placement, deepest)), None)
        if row is not None:
            key = tuple(row[k] for k in CELL)
            add(text.format(deepest), lambda: context_gain(depth_record, key, unigram=unigram), direction,
                threshold=trains_gain)
    return rows

# ------------------------------------------------------------------------------------------- the cost

def measure_tokens_per_s(config: dict[str, Any], depth: int, placement: str = "pre", steps: int = 100,
                         skip: int = 10) -> float:
    """Training tokens per second (forward, backward, AdamW step) of `config`'s model at `depth` on this
    machine, timed over `steps` steps after `skip` untimed ones. Set the thread count first
    (`torch.set_num_threads(1)` for the recordings' single-thread processes)."""
    import time

    seed_all(0)
    run = {"placement": placement, "norm": "layernorm", "depth": depth}
    model = build(run, config, len(char_data(config["val_fraction"])[2]), torch.device("cpu"))
    tc = TrainConfig(steps=steps + skip, epochs=None, batch_size=config["batch_size"], optimizer="adamw", lr=1e-3,
                     betas=(0.9, 0.98), weight_decay=0.0, schedule="linear", eval_every=steps + skip)
    trainer = Trainer(model, lm_task(config), tc)
    for _ in range(skip):
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps * config["batch_size"] * config["model"]["context"] / (time.perf_counter() - t0)


def cost_estimate(config: dict[str, Any], tokens_per_s: dict[int, float]) -> dict[str, float]:
    """The profile's training cost from measured throughputs `{depth: training tokens/s}`: `runs`, `tokens`
    (training tokens) and `cpu_hours` (one thread each), counting each evaluation's forward pass as a
    third of a training step per token. Learning rates do not change the cost, so a depth study that takes
    its lrs from a grid (`lr_from`) is counted without reading it. The gradients at init are left out
    (seconds)."""
    if "depth_study" in config and "lr_from" in config["depth_study"]:
        d = {k: v for k, v in config["depth_study"].items() if k != "lr_from"}
        config = {**config, "depth_study": {**d, "lr": {p: 0.0 for p in d["placements"]}}}
    trained = [r for r in runs(config) if r["study"] != "grad_at_init"]
    missing = sorted({r["depth"] for r in trained} - set(tokens_per_s))
    if missing:
        raise ValueError(f"no throughput for depths {missing}: measure them with measure_tokens_per_s(config, depth)")
    seconds = tokens = 0.0
    per_step = config["batch_size"] * config["model"]["context"]
    for r in trained:
        study = config[r["study"]]
        steps = r.get("steps", study["steps"])
        evals = steps // study["eval_every"] + (steps % study["eval_every"] > 0)
        work = steps * per_step + evals * config["eval_windows"] * config["model"]["context"] / 3
        tokens += steps * per_step
        seconds += work / tokens_per_s[r["depth"]]
    return {"runs": len(trained), "tokens": tokens, "cpu_hours": seconds / 3600}
