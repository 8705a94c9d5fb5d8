"""Trainer speed: the default precision and memory format vs the fp32 NCHW trainer, and vs a bare loop.

The trainer trains BN networks channels_last in bf16 autocast and GN networks NCHW in bf16 by default
(`normlab.train.FASTEST`), where earlier it trained everything in fp32 NCHW. This benchmark measures
what that buys on the machine it runs on, for the networks the book trains: a CIFAR ResNet with
per-worker BatchNorm (k emulated workers, `GhostBatchNorm2d`) or GroupNorm, at N=32 and N=2 images
per worker (SGD batches of k*N), on 32x32 images. Three candidates per run, timed interleaved by
`normlab.bench.compare` (every repeat times each once, in rotating order):

- `default`: `Trainer` with the norm's fastest precision and memory format;
- `fp32`: `Trainer` in fp32 NCHW (the reference numerics, and the trainer as it was);
- `bare`: a bare forward/backward/SGD-step loop in fp32 on pre-normalized, un-augmented slices of
  the same tensors: the cheapest possible input pipeline, so `fp32 / bare` is the trainer's overhead.

Metrics: images/s of each, and the ratios `default/fp32` and `fp32/bare` of throughput with 95%
bootstrap intervals over the repeats (`normlab.stats.ratio_of_medians`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..bench import compare
from ..models.resnet import CIFARResNet
from ..stats import ratio_of_medians
from ..tasks import ImageClassification
from ..train import Trainer, TrainConfig, fastest
from ..utils import seed_all
from .gn_batch_size import norm_layer

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"depth": 8, "width": 8, "image_size": 16, "workers": 2, "norms": ["bn", "gn"], "batch_sizes": [2],
              "steps": {"2": 3}, "repeats": 3, "warmup": 1, "seeds": [0]},
    # ResNet-20 on 32x32, k=8 workers: the GN paper's setting and the book's converged sweeps
    "cpu": {"depth": 20, "width": 16, "image_size": 32, "workers": 8, "norms": ["bn", "gn"], "batch_sizes": [32, 2],
            "steps": {"32": 3, "2": 40}, "repeats": 9, "warmup": 1, "seeds": [0]},
    "full": {"depth": 20, "width": 16, "image_size": 32, "workers": 8, "norms": ["bn", "gn"], "batch_sizes": [32, 2],
             "steps": {"32": 100, "2": 300}, "repeats": 15, "warmup": 2, "seeds": [0]},
}
#: What every network here shares with `gn_batch_size`'s norm layers (per-worker BN, GN with 8 groups).
_NORM_CONFIG = {"norm_impl": "fused", "bn_momentum": 0.1, "bn_running_stats": "mean", "gn_groups": 8}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"norm": norm, "batch_size": n, "seed": s}
            for s in config["seeds"] for norm in config["norms"] for n in config["batch_sizes"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False):
    k, n, size = config["workers"], run["batch_size"], config["image_size"]
    b, steps = k * n, config["steps"][str(n)]
    g = seed_all(run["seed"])
    images = torch.randint(0, 256, (b * steps, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (b * steps,), generator=g)

    def model() -> torch.nn.Module:
        seed_all(run["seed"])
        layer = norm_layer(run["norm"], {**_NORM_CONFIG, "workers": k})
        return CIFARResNet(config["depth"], width=config["width"], norm_layer=layer).to(device)

    base = TrainConfig(epochs=1, batch_size=b, lr=0.01, seed=run["seed"])
    default = fastest(run["norm"], replace(base, precision="auto", memory_format="auto"))
    trainers = {name: Trainer(model(), ImageClassification(images, labels), tc, device=device)
                for name, tc in (("default", default), ("fp32", base))}
    bare_model = model()
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.01, momentum=base.momentum, weight_decay=base.weight_decay)
    xs, ys = trainers["fp32"].task.normalize(images.to(device)), labels.to(device)  # pre-normalized once

    def bare_epoch() -> None:
        for i in range(steps):
            loss = F.cross_entropy(bare_model(xs[i * b: (i + 1) * b]), ys[i * b: (i + 1) * b])
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()
        loss.item()  # one sync per repeat, like the trainer's

    def epoch_of(trainer: Trainer):
        def fn() -> None:
            trainer.step = 0  # keep the schedule in range across repeats
            for _ in range(steps):
                loss = trainer.train_step()
            loss.item()
        return fn

    stats = compare({"default": epoch_of(trainers["default"]), "fp32": epoch_of(trainers["fp32"]), "bare": bare_epoch},
                    repeats=config["repeats"], warmup=config["warmup"], device=device)
    images_per_s = {name: b * steps / s["median"] for name, s in stats.items()}
    speedup = ratio_of_medians(stats["fp32"]["times"], stats["default"]["times"])  # time ratio = throughput ratio
    overhead = ratio_of_medians(stats["bare"]["times"], stats["fp32"]["times"])
    metrics = {
        **{f"{name}_images_per_s": v for name, v in images_per_s.items()},
        "default_precision": default.precision, "default_memory_format": default.memory_format,
        "speedup": speedup.estimate, "speedup_ci": [speedup.low, speedup.high],
        "fp32_over_bare": overhead.estimate, "fp32_over_bare_ci": [overhead.low, overhead.high],
        "iqr_s": {name: [s["q25"], s["q75"]] for name, s in stats.items()},
        "batch": b, "steps_per_repeat": steps, "threads": torch.get_num_threads(),
    }
    return {"metrics": metrics, "history": []}
