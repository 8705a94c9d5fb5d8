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
several seeds. The trainer is deliberately tiny: the whole dataset is a tensor on the device, batches
are index slices of a per-epoch permutation drawn from the run's own generator.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..norms import RELU_GAMMA
from ..utils import seed_all

VARIANTS = ("plain", "wn", "ws", "sws", "ws_gn", "bn")

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


def conv_block(variant: str, c_in: int, c_out: int, stride: int, groups: int) -> list[nn.Module]:
    """A 3x3 convolution, the variant's normalization, ReLU."""
    from .. import norms

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    kw = {"kernel_size": 3, "stride": stride, "padding": 1}
    if variant == "plain":
        layers: list[nn.Module] = [kaiming(nn.Conv2d(c_in, c_out, bias=True, **kw))]
    elif variant == "wn":
        # initialise first: the reparametrization starts from g = ||v||, v = w, the same function as plain
        layers = [norms.weight_norm(kaiming(nn.Conv2d(c_in, c_out, bias=True, **kw)))]
    elif variant == "ws":
        layers = [kaiming(norms.WSConv2d(c_in, c_out, bias=True, **kw))]
    elif variant == "sws":
        # NF-ResNets' scaled WS: W / (sigma sqrt(fan_in)) times the ReLU gain keeps unit-variance signals
        layers = [kaiming(norms.ScaledStdConv2d(c_in, c_out, bias=True, gamma=RELU_GAMMA, **kw))]
    elif variant == "ws_gn":
        # the bias is redundant before a norm that re-centers
        layers = [kaiming(norms.WSConv2d(c_in, c_out, bias=False, **kw)),
                  norms.GroupNorm(min(groups, c_out), c_out)]
    else:  # bn
        layers = [kaiming(nn.Conv2d(c_in, c_out, bias=False, **kw)), norms.BatchNorm2d(c_out)]
    return layers + [nn.ReLU(inplace=True)]


def kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    """He et al. (2015) init, N(0, 2 / fan_in), zero bias: a plain ReLU net then keeps its signal's scale.

    Every variant starts from it (for WS variants only the direction matters), so differences come from
    the normalization, not from PyTorch's default init, which shrinks the signal ~2.4x per ReLU layer.
    """
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class SmallCNN(nn.Sequential):
    """conv(stride 2) -> conv(stride 2) -> conv(stride 2) -> global average pool -> linear.

    Only the convolutions are normalized; the classifier is a plain `nn.Linear` in every variant.
    """

    def __init__(self, variant: str, widths: list[int], in_channels: int = 1, num_classes: int = 10,
                 groups: int = 8):
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += conv_block(variant, c_in, c_out, stride=2, groups=groups)
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)


def load_data(config: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Float tensors on `device`, standardized with the training set's mean and std; optional subsets."""
    from .. import data

    if config["dataset"] not in ("fashion_mnist", "cifar10"):
        raise ValueError(f"unknown dataset {config['dataset']!r}; choose fashion_mnist or cifar10")
    split = getattr(data, config["dataset"])()
    xtr, ytr = split.train_images[: config["n_train"]], split.train_labels[: config["n_train"]]
    xte, yte = split.test_images[: config["n_test"]], split.test_labels[: config["n_test"]]
    xtr = xtr.to(device=device, dtype=torch.float32).div_(255)
    xte = xte.to(device=device, dtype=torch.float32).div_(255)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True)
    return {"x_train": (xtr - mean) / std, "y_train": ytr.to(device), "x_test": (xte - mean) / std,
            "y_test": yte.to(device), "source": split.source}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return loss / len(x), correct / len(x)


def lr_at(step: int, config: dict[str, Any]) -> float:
    """Linear warmup, then cosine decay to zero (Loshchilov & Hutter, 2017)."""
    if step < config["warmup_steps"]:
        return config["lr"] * (step + 1) / config["warmup_steps"]
    t = (step - config["warmup_steps"]) / max(1, config["steps"] - config["warmup_steps"])
    return 0.5 * config["lr"] * (1 + math.cos(math.pi * t))


def train(model: nn.Module, d: dict[str, torch.Tensor], config: dict[str, Any], gen: torch.Generator,
          progress: bool = False) -> tuple[list[dict[str, float]], bool]:
    """SGD with momentum; returns (history, diverged). History: one entry per `eval_every` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=config["weight_decay"])
    n, bs = len(d["x_train"]), config["batch_size"]
    n_eval = config["n_eval"] or len(d["x_test"])
    x_eval, y_eval = d["x_test"][:n_eval], d["y_test"][:n_eval]
    history: list[dict[str, float]] = []
    perm, pos = torch.randperm(n, generator=gen), 0
    losses, gnorms = [], []
    model.train()
    for step in tqdm(range(config["steps"]), disable=not progress, leave=False):
        if pos + bs > n:  # a new epoch: a new permutation from the run's own generator
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs].to(d["x_train"].device)
        pos += bs
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        loss = F.cross_entropy(model(d["x_train"][idx]), d["y_train"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # the gradient norm is a cheap probe of how rough the loss surface is where we stand
        gnorm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in model.parameters() if p.grad is not None))
        opt.step()
        losses.append(loss.item())
        gnorms.append(gnorm.item())
        if not math.isfinite(losses[-1]):
            history.append({"step": step + 1, "train_loss": float("nan"), "grad_norm": float("nan"),
                            "test_loss": float("nan"), "test_acc": float("nan")})
            return history, True
        if (step + 1) % config["eval_every"] == 0 or step + 1 == config["steps"]:
            test_loss, test_acc = evaluate(model, x_eval, y_eval)
            history.append({"step": step + 1, "train_loss": sum(losses) / len(losses),
                            "grad_norm": sum(gnorms) / len(gnorms), "test_loss": test_loss, "test_acc": test_acc})
            losses, gnorms = [], []
    return history, False


_DATA_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False) -> dict[str, Any]:
    """Train one variant with one seed; final test metrics on the whole (configured) test set."""
    device = torch.device(device)
    key = (config["dataset"], config["n_train"], config["n_test"], str(device))
    if key not in _DATA_CACHE:  # one decode per sweep, not per run
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_data(config, device)
    d = _DATA_CACHE[key]
    gen = seed_all(run["seed"])  # same seed -> same init stream and same batch order for every variant
    model = SmallCNN(run["variant"], config["widths"], in_channels=d["x_train"].shape[1],
                     groups=config["groups"]).to(device)
    history, diverged = train(model, d, config, gen, progress)
    test_loss, test_acc = evaluate(model, d["x_test"], d["y_test"])
    metrics = {"test_acc": test_acc, "test_loss": test_loss,
               "final_train_loss": history[-1]["train_loss"] if history else float("nan"),
               "diverged": diverged, "n_params": sum(p.numel() for p in model.parameters()),
               "n_train": len(d["x_train"]), "n_test": len(d["x_test"]), "data_source": d["source"]}
    return {"metrics": metrics, "history": history}
