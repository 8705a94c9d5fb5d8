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
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..utils import seed_all

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"widths": [8, 16, 16], "hidden": 32, "n_train": 1024, "n_test": 256, "epochs": 1,
              "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seeds": [0],
              "eval_batch_sizes": [1, 2, 8, 256], "log_every": 4},
    "cpu": {"widths": [16, 32, 64], "hidden": 64, "n_train": None, "n_test": None, "epochs": 2,
            "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seeds": [0, 1],
            "eval_batch_sizes": [1, 2, 8, 32, 256], "log_every": 50},
    "full": {"widths": [32, 64, 128], "hidden": 128, "n_train": None, "n_test": None, "epochs": 10,
             "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seeds": [0, 1, 2],
             "eval_batch_sizes": [1, 2, 8, 32, 256], "log_every": 100},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"seed": s} for s in config["seeds"]]


class BNConvNet(nn.Sequential):
    """Three conv-BN-ReLU blocks (two max-pools), global average pool, linear-BN1d-ReLU, linear."""

    def __init__(self, widths: list[int], hidden: int, in_channels: int = 1, num_classes: int = 10):
        from ..norms import BatchNorm1d, BatchNorm2d

        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            # no conv bias: BatchNorm's mean subtraction would cancel it
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, hidden, bias=False), BatchNorm1d(hidden),
                   nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
        super().__init__(*layers)


def _load(config: dict[str, Any], device: torch.device):
    from ..data import fashion_mnist

    split = fashion_mnist()
    xtr, ytr, xte, yte = split.train_images, split.train_labels, split.test_images, split.test_labels
    if config["n_train"]:
        xtr, ytr = xtr[: config["n_train"]], ytr[: config["n_train"]]
    if config["n_test"]:
        xte, yte = xte[: config["n_test"]], yte[: config["n_test"]]
    mean, std = xtr.float().mean() / 255, xtr.float().std() / 255

    def prep(x):
        return ((x.float() / 255 - mean) / std).to(device)

    return prep(xtr), ytr.to(device), prep(xte), yte.to(device), split.source


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


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False):
    g = seed_all(run["seed"])
    xtr, ytr, xte, yte, source = _load(config, device)
    model = BNConvNet(config["widths"], config["hidden"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=config["weight_decay"], nesterov=True)
    bs = config["batch_size"]
    steps_per_epoch = len(xtr) // bs
    total = steps_per_epoch * config["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    history = []
    step = 0
    model.train()
    with tqdm(total=total, disable=not progress, desc=f"bn_eval_mode seed {run['seed']}") as bar:
        for _ in range(config["epochs"]):
            perm = torch.randperm(len(xtr), generator=g).to(device)
            for i in range(steps_per_epoch):
                idx = perm[i * bs:(i + 1) * bs]
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step % config["log_every"] == 0 or step == total:
                    history.append({"step": step, "loss": round(loss.item(), 5)})
                bar.update()

    metrics: dict[str, Any] = {"dataset": source, "n_train": len(xtr), "n_test": len(xte), "train_steps": total}
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
