"""BatchNorm's classic mistake: a trained Fashion-MNIST convnet evaluated in train mode vs eval mode, by batch size.

BatchNorm {cite}`ioffe2015batch` normalizes with the statistics of the current batch while training
and with its running averages in eval mode. Forgetting `model.eval()` at test time makes every
prediction depend on the other images in the batch: harmless at a large random batch, harmful at a
small or non-random one. This experiment trains one small BN convnet (`normlab.norms.BatchNorm2d` in
the trunk, a `BatchNorm1d` in the head) and then measures test accuracy

- in eval mode at every batch size (identical predictions whatever the batch size);
- in train mode at batch sizes 1, 2, 8, 32, 256 (batch size 1 is refused by the head's BatchNorm1d:
  one value per channel; the error message is recorded), on a copy of the model so the evaluation
  itself does not move the running statistics;
- in train mode with batches that each hold a single class (a sorted, non-i.i.d. test stream).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..models.small import BNConvNet
from ..tasks import ImageClassification
from ..train import Trainer, TrainConfig
from ..utils import seed_all

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"widths": [8, 16, 16], "hidden": 32, "n_train": 1024, "n_test": 256, "epochs": 1,
              "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seeds": [0],
              "eval_batch_sizes": [1, 2, 8, 256]},
    "cpu": {"widths": [16, 32, 64], "hidden": 64, "n_train": None, "n_test": None, "epochs": 2,
            "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seeds": [0, 1, 2],
            "eval_batch_sizes": [1, 2, 8, 32, 256]},
    "full": {"widths": [32, 64, 128], "hidden": 128, "n_train": None, "n_test": None, "epochs": 10,
             "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seeds": [0, 1, 2],
             "eval_batch_sizes": [1, 2, 8, 32, 256]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"seed": s} for s in config["seeds"]]


def load_data(config: dict[str, Any]):
    """Fashion-MNIST as uint8 tensors, optional leading subsets: (train x, train y, test x, test y, source)."""
    from ..data import fashion_mnist

    split = fashion_mnist()
    n_train, n_test = config["n_train"], config["n_test"]
    return (split.train_images[:n_train], split.train_labels[:n_train], split.test_images[:n_test],
            split.test_labels[:n_test], split.source)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, train_mode: bool,
             order: torch.Tensor | None = None) -> float:
    """Test accuracy with `batch_size` and BN in train or eval mode, on a copy of `model`.

    The copy keeps the caller's running statistics untouched (train-mode forwards update them).
    """
    model = copy.deepcopy(model)
    model.train(train_mode)
    if order is not None:
        x, y = x[order], y[order]
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False,
            checkpoint=None):
    xtr, ytr, xte, yte, source = load_data(config)
    task = ImageClassification(xtr, ytr, augment=False)
    g = seed_all(run["seed"])
    model = BNConvNet(config["widths"], config["hidden"])
    tc = TrainConfig(epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"],
                     momentum=config["momentum"], nesterov=True, weight_decay=config["weight_decay"],
                     schedule="cosine", seed=run["seed"])
    trainer = Trainer(model, task, tc, checkpoint=checkpoint, device=device)
    history = trainer.fit(progress=progress, desc=f"bn_eval_mode seed {run['seed']}")
    xte, yte, total = task.normalize(xte.to(trainer.device)), yte.to(trainer.device), trainer.step
    metrics: dict[str, Any] = {"data_source": source, "n_train": len(xtr), "n_test": len(xte), "steps": total,
                               "train_loss": history[-1]["train_loss"], "diverged": trainer.diverged}
    for b in config["eval_batch_sizes"]:
        metrics[f"acc_eval_b{b}"] = accuracy(model, xte, yte, b, train_mode=False)
        try:
            metrics[f"acc_train_b{b}"] = accuracy(model, xte, yte, b, train_mode=True)
        except ValueError as e:  # BatchNorm1d refuses one value per channel
            metrics[f"acc_train_b{b}"] = None
            metrics[f"error_train_b{b}"] = str(e)
    # A non-i.i.d. stream: test images sorted by class, so most batches hold a single class.
    order = torch.argsort(yte.cpu() * len(yte) + torch.randperm(len(yte), generator=g)).to(device)
    big = max(config["eval_batch_sizes"])
    metrics[f"acc_train_sorted_b{big}"] = accuracy(model, xte, yte, big, train_mode=True, order=order)
    metrics[f"acc_eval_sorted_b{big}"] = accuracy(model, xte, yte, big, train_mode=False, order=order)
    return {"metrics": metrics, "history": history}
