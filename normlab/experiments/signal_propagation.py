"""Signal propagation at initialization through a deep plain MLP, with and without normalization.

For a stack of `Linear -> [norm] -> ReLU` blocks (no skip connections) and a few weight inits, measure on a
batch of real Fashion-MNIST images, at initialization:

- the standard deviation and mean of each block's output (post-ReLU activations),
- the norm of the loss gradient with respect to each block's weight.

Mean-field theory for ReLU nets (He et al., 2015): with weights drawn with variance sigma_w^2 / fan_in and
no normalization, the second moment of the pre-activations is multiplied by sigma_w^2 / 2 per layer, so
it vanishes for sigma_w^2 < 2 (Xavier's 1 on square layers; PyTorch's default 1/3) and explodes for
sigma_w^2 > 2. A normalization layer resets the scale at every block, whatever the init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import fashion_mnist
from ..models.small import PlainMLP
from ..utils import seed_all

#: Weight inits, as the variance multiplier sigma_w^2 in Var(W_ij) = sigma_w^2 / fan_in.
INITS = {
    "pytorch_default": 1.0 / 3.0,  # nn.Linear's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    "xavier": 1.0,  # Glorot & Bengio (2010) on square layers: 2 / (fan_in + fan_out)
    "kaiming": 2.0,  # He et al. (2015): preserves the second moment through ReLU
    "kaiming_x1.5": 4.5,  # (1.5 x Kaiming's std)^2: the second moment grows 2.25x per layer
}
NORMS = ("none", "batchnorm", "layernorm")

PROFILES = {
    "smoke": {"depth": 8, "width": 64, "batch": 128, "seeds": [0], "inits": ["xavier", "kaiming"], "norms": list(NORMS)},
    "cpu": {"depth": 50, "width": 256, "batch": 1024, "seeds": [0, 1, 2], "inits": list(INITS), "norms": list(NORMS)},
    "full": {"depth": 100, "width": 1024, "batch": 4096, "seeds": [0, 1, 2, 3, 4], "inits": list(INITS), "norms": list(NORMS)},
}


def runs(config: dict) -> list[dict]:
    return [{"init": i, "norm": n, "seed": s} for i in config["inits"] for n in config["norms"] for s in config["seeds"]]


def input_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of Fashion-MNIST test images, flattened and standardized per pixel set."""
    data = fashion_mnist()
    idx = torch.randperm(len(data.test_labels), generator=generator)[:batch]
    x = data.test_images[idx].flatten(1).double() / 255.0
    x = (x - x.mean()) / x.std()  # unit scale at the input: any later drift is the network's doing
    return x.float(), data.test_labels[idx]


def run_one(run: dict, config: dict, device: torch.device, progress: bool = False) -> dict:
    gen = seed_all(run["seed"])
    x, y = input_batch(config["batch"], gen)
    x, y = x.to(device), y.to(device)
    model = PlainMLP(x.shape[1], config["width"], config["depth"], 10, run["norm"], INITS[run["init"]]).to(device)
    model.train()  # batch statistics, as in the first training step
    logits, acts = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    finite = lambda v: v if math.isfinite(v) else None  # JSON has no inf/nan; None marks an overflow
    return {
        "metrics": {
            "act_std": [finite(a.std().item()) for a in acts],
            "act_mean": [finite(a.mean().item()) for a in acts],
            "grad_norm": [finite(b[0].weight.grad.norm().item()) for b in model.blocks],
            "loss_at_init": finite(loss.item()),
        },
        "history": [],
    }
