"""Normalizer-free ResNets vs BatchNorm and no normalization: signal propagation at init, training with/without AGC.

Two kinds of runs, after Brock, De & Smith (2021, NF-ResNets) and Brock et al. (2021, NFNets):

- `kind="spp"`: signal propagation plots at initialization, on a batch of real images, for deep
  pre-activation ResNets with BatchNorm (`bn`), without normalization (`none`), and NF-ResNets with
  (`nf`) and without (`nf_nows`) scaled weight standardization. History: one row per block with the
  average channel squared mean, the average channel variance and the residual branch variance.
- `kind="train"`: SGD training of the book's ResNet with BatchNorm (`bn`) and without normalization
  (`none`), and of its NF variant with adaptive gradient clipping (`nf`) and without (`nf_noagc`),
  each at the learning rates listed in the profile. A run whose loss or gradients become NaN/inf stops
  there and is recorded with `metrics.diverged = True`; so is a run whose epoch-mean training loss
  exceeds 10 ln(classes) (exploded without overflowing).

CIFAR-10 by default; `dataset: "fashion_mnist"` in a profile switches to Fashion-MNIST.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from ..nf import NFResNet, PreActResNet, agc_hook, agc_parameters, signal_propagation
from ..tasks import ImageClassification, channel_stats
from ..train import Trainer, TrainConfig
from ..utils import seed_all

_COMMON = {"dataset": "cifar10", "alpha": 0.2, "agc_clip": 0.01, "agc_eps": 1e-3, "momentum": 0.9,
           "nesterov": True, "weight_decay": 5e-4, "warmup_epochs": 0.0, "schedule": "cosine"}

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: proves every code path (tiny models, a few steps); numbers are not results
    "smoke": {**_COMMON, "depth": 8, "width": 8, "train_size": 256, "test_size": 256, "batch_size": 64,
              "epochs": 1, "spp_depth": 8, "spp_batch": 8, "spp_models": ["bn", "none", "nf", "nf_nows"],
              "train": [["bn", 0.1], ["none", 0.1], ["nf", 0.8], ["nf_noagc", 0.8]], "seeds": [0]},
    # a reduced reproduction for one shared CPU core: ResNet-20 on a 5,000-image CIFAR-10 subset
    "cpu": {**_COMMON, "depth": 20, "width": 16, "train_size": 5000, "test_size": 2000, "batch_size": 128,
            "epochs": 4, "spp_depth": 110, "spp_batch": 64, "spp_models": ["bn", "none", "nf", "nf_nows"],
            "train": [["bn", 0.1], ["nf", 0.8], ["nf_noagc", 0.8], ["none", 0.1], ["nf_noagc", 0.1], ["bn", 0.8]],
            "seeds": [0, 1]},
    # for a GPU (sized for <= 15 min on one H100; not measured): the full training set, the paper's 600-layer depth for the
    # signal propagation plots
    "full": {**_COMMON, "depth": 20, "width": 16, "train_size": 50000, "test_size": 10000, "batch_size": 128,
             "epochs": 15, "spp_depth": 602, "spp_batch": 256, "spp_models": ["bn", "none", "nf", "nf_nows"],
             "train": [["bn", 0.1], ["bn", 0.8], ["nf", 0.8], ["nf_noagc", 0.8], ["none", 0.1], ["none", 0.01],
                       ["nf_noagc", 0.1], ["nf", 0.1]],
             "seeds": [0]},
}

SPP_MODELS = ("bn", "none", "nf", "nf_nows")
TRAIN_MODELS = ("bn", "none", "nf", "nf_noagc")


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Signal propagation runs first (cheap, first seed only), then the training runs, seed by seed."""
    out: list[dict[str, Any]] = []
    # signal propagation at init: one seed is enough (a batch of 64+ images, thousands of channels)
    out += [{"kind": "spp", "model": m, "seed": config["seeds"][0]} for m in config["spp_models"]]
    for seed in config["seeds"]:
        out += [{"kind": "train", "model": m, "lr": lr, "seed": seed} for m, lr in config["train"]]
    for r in out:
        allowed = SPP_MODELS if r["kind"] == "spp" else TRAIN_MODELS
        if r["model"] not in allowed:
            raise ValueError(f"unknown {r['kind']} model {r['model']!r}; choose from {allowed}")
    return out


@functools.lru_cache(maxsize=2)
def _dataset(name: str):
    from .. import data

    return data.load(name)


def _split(config: dict[str, Any], seed: int):
    """A seeded training subset and a fixed test subset (the same for every run and seed)."""
    from .. import data

    d = data.subset(_dataset(config["dataset"]), config["train_size"], config["test_size"], seed, test_seed=12345)
    return d.train_images, d.train_labels, d.test_images, d.test_labels


def build_model(kind: str, model: str, config: dict[str, Any], in_channels: int, depth: int | None = None) -> nn.Module:
    """The network of a run (initialized from the global RNG, which the caller seeds)."""
    from ..models.resnet import CIFARResNet

    depth = depth or config["depth"]
    width = config["width"]
    if model in ("nf", "nf_noagc", "nf_nows"):
        return NFResNet(depth=depth, width=width, in_channels=in_channels, alpha=config["alpha"], ws=model != "nf_nows")
    norm = "bn" if model == "bn" else None
    if kind == "spp":  # the paper's plots are of pre-activation ResNets with projection shortcuts
        return PreActResNet(depth=depth, width=width, in_channels=in_channels, norm_layer=norm)
    return CIFARResNet(depth=depth, width=width, in_channels=in_channels, norm_layer=norm)


def _run_spp(run: dict[str, Any], config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    gen = seed_all(run["seed"])
    x_train, _, x_test, _ = _split(config, run["seed"])
    mean, std = channel_stats(x_train)
    idx = torch.randperm(len(x_test), generator=gen)[: config["spp_batch"]]
    x = ((x_test[idx].float() - mean) / std).to(device)
    model = build_model("spp", run["model"], config, x.shape[1], depth=config["spp_depth"]).to(device).train()
    stats = signal_propagation(model, x)
    # very deep unnormalized nets overflow float32: JSON has no inf/NaN, so those become null
    history = [{"block": i + 1, **{k: _finite(v[i]) for k, v in stats.items()}} for i in range(len(stats["avg_var"]))]
    return {"metrics": {"blocks": len(history), "final_avg_var": _finite(stats["avg_var"][-1]),
                        "final_avg_sq_mean": _finite(stats["avg_sq_mean"][-1]),
                        "max_avg_var": _finite(max(stats["avg_var"])),
                        "mean_res_var": _finite(sum(stats["res_var"]) / len(history))},
            "history": history}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _run_train(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool,
               checkpoint=None) -> dict[str, Any]:
    seed_all(run["seed"])
    x_train, y_train, x_test, y_test = _split(config, run["seed"])
    model = build_model("train", run["model"], config, x_train.shape[1]).to(device)
    tc = TrainConfig(epochs=config["epochs"], batch_size=config["batch_size"], lr=run["lr"],
                     momentum=config["momentum"], nesterov=config["nesterov"],
                     weight_decay=config["weight_decay"], schedule=config["schedule"],
                     warmup=config["warmup_epochs"], seed=run["seed"])
    hooks = [agc_hook(agc_parameters(model), clip=config["agc_clip"], eps=config["agc_eps"])] \
        if run["model"] == "nf" else []
    trainer = Trainer(model, ImageClassification(x_train, y_train, x_test, y_test), tc, hooks=hooks,
                      checkpoint=checkpoint, device=device)
    history = trainer.fit(progress=progress, desc=f"{run['model']} lr={run['lr']}")
    exploded = 10 * math.log(int(y_train.max()) + 1)  # 10x the loss of a uniform guess
    blown = next((r["step"] for r in history if r.get("train_loss") is not None and not r["train_loss"] < exploded), None)
    metrics = {**trainer.summary(), "epochs_done": len(history), "n_train": len(x_train), "n_test": len(x_test),
               "data_source": _dataset(config["dataset"]).source}
    metrics["diverged"] = trainer.diverged or blown is not None
    metrics["diverged_step"] = history[-1]["step"] if trainer.diverged else blown
    clipped = [r["agc_clip_fraction"] for r in history if r.get("agc_clip_fraction") is not None]
    if clipped:
        metrics["agc_clip_fraction"] = sum(clipped) / len(clipped)
    return {"metrics": metrics, "history": history}


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False, checkpoint=None) -> dict[str, Any]:
    device = torch.device(device)
    if run["kind"] == "spp":
        return _run_spp(run, config, device)
    if run["kind"] == "train":
        return _run_train(run, config, device, progress, checkpoint)
    raise ValueError(f"run kind must be 'spp' or 'train', got {run['kind']!r}")
