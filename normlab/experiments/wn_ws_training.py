"""WeightNorm vs weight standardization (alone, scaled, with GroupNorm) vs BatchNorm: a small CNN on Fashion-MNIST.

Weight normalization (Salimans & Kingma, 2016) and weight standardization (Qiao et al., 2019) normalize
the *weights* instead of the activations. This experiment trains the same small CNN (three 3x3
stride-2 convolutions with ReLU, global average pooling, a linear classifier) with

- `plain`: no normalization (He init, as every variant);
- `wn`: every convolution reparametrized as w = g v / ||v|| (`normlab.norms.weight_norm`);
- `ws`: every convolution weight-standardized (`normlab.norms.WSConv2d`), no activation norm;
- `sws`: scaled WS of NF-ResNets (Brock et al., 2021; `normlab.norms.ScaledStdConv2d`), no activation norm;
- `ws_gn`: WS convolutions followed by GroupNorm, Qiao et al.'s recipe;
- `bn`: plain convolutions followed by BatchNorm, the reference.

Same data order, steps, optimizer (SGD with momentum, warmup + cosine) and schedule for every variant,
several seeds, on `normlab.train.Trainer` (no augmentation). The models are `normlab.models.small`'s.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.small import VARIANTS, SmallCNN
from ..tasks import ImageClassification
from ..train import Trainer, TrainConfig, log_grad_norm
from ..utils import seed_all

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: a data subset, a narrow net, a dozen steps; proves the code path, learns little
    "smoke": {"dataset": "fashion_mnist", "variants": list(VARIANTS), "seeds": [0],
              "widths": [8, 16, 16], "groups": 4, "n_train": 512, "n_test": 256, "n_eval": 256,
              "steps": 12, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
              "warmup_steps": 2, "eval_every": 6},
    # ~10 min on one CPU thread: 12 runs x 800 steps of batch 64 (~0.85 epoch), curves on 2000 test images
    "cpu": {"dataset": "fashion_mnist", "variants": list(VARIANTS), "seeds": [0, 1],
            "widths": [16, 32, 64], "groups": 8, "n_train": None, "n_test": None, "n_eval": 2000,
            "steps": 800, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
            "warmup_steps": 40, "eval_every": 50},
    # a GPU: wider, ~8.5 epochs, three seeds, curves on the whole test set
    "full": {"dataset": "fashion_mnist", "variants": list(VARIANTS), "seeds": [0, 1, 2],
             "widths": [32, 64, 128], "groups": 8, "n_train": None, "n_test": None, "n_eval": None,
             "steps": 4000, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
             "warmup_steps": 200, "eval_every": 200},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (seed, variant); seeds outermost so a cut-short sweep still covers every variant."""
    return [{"variant": v, "seed": s} for s in config["seeds"] for v in config["variants"]]


def load_data(config: dict[str, Any]):
    """(train images, train labels, test images, test labels, source): uint8, optional leading subsets."""
    from .. import data

    if config["dataset"] not in ("fashion_mnist", "cifar10"):
        raise ValueError(f"unknown dataset {config['dataset']!r}; choose fashion_mnist or cifar10")
    split = getattr(data, config["dataset"])()
    return (split.train_images[: config["n_train"]], split.train_labels[: config["n_train"]],
            split.test_images[: config["n_test"]], split.test_labels[: config["n_test"]], split.source)


def train_config(run: dict[str, Any], config: dict[str, Any]) -> TrainConfig:
    """SGD with momentum, linear warmup then cosine decay to zero, a step budget; the same for every variant."""
    return TrainConfig(steps=config["steps"], epochs=None, batch_size=config["batch_size"], lr=config["lr"],
                       momentum=config["momentum"], weight_decay=config["weight_decay"], schedule="cosine",
                       warmup=config["warmup_steps"], eval_every=config["eval_every"], seed=run["seed"])


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False, checkpoint=None) -> dict[str, Any]:
    """Train one variant with one seed; curves on the first `n_eval` test images, final metrics on all."""
    xtr, ytr, xte, yte, source = load_data(config)
    n_eval = config["n_eval"] or len(xte)
    task = ImageClassification(xtr, ytr, xte[:n_eval], yte[:n_eval], augment=False)
    seed_all(run["seed"])  # same seed -> same init stream and same batch order for every variant
    model = SmallCNN(run["variant"], config["widths"], in_channels=xtr.shape[1], groups=config["groups"])
    trainer = Trainer(model, task, train_config(run, config), hooks=[log_grad_norm], checkpoint=checkpoint,
                      device=device)
    history = trainer.fit(progress=progress, desc=f"{run['variant']} seed={run['seed']}")
    final = ImageClassification(xtr, ytr, xte, yte, augment=False, mean=task.mean, std=task.std).to(trainer.device)
    test = final.evaluate(trainer.model)
    metrics = {**test, "train_loss": history[-1]["train_loss"], "diverged": trainer.diverged, "steps": trainer.step,
               "n_params": sum(p.numel() for p in model.parameters()), "n_train": len(xtr), "n_test": len(xte),
               "data_source": source}
    return {"metrics": metrics, "history": history}
