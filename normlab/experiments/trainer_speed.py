"""Trainer overhead: normlab.train's steps/s vs a bare forward+backward+step loop on the same tensors.

The trainer does more per step than the bare loop — gather a batch by index, pad-crop-flip it on the
device, convert uint8 to float and normalize, set the scheduled learning rate, accumulate the loss
without a device sync — and the question is what that costs. Both loops train a ResNet (BatchNorm) on
the same images with the same SGD settings; `normlab.bench.compare` interleaves the repeats so drift
and other processes hit both alike. The bare loop gets its batches pre-normalized, un-augmented, as
contiguous slices: the cheapest possible input pipeline. Metric: `ratio` = trainer steps/s divided by
bare steps/s (1.0 = no overhead).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import compare
from ..models.resnet import CIFARResNet
from ..tasks import ImageClassification
from ..train import Trainer, TrainConfig
from ..utils import seed_all

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"depth": 8, "width": 8, "batch_sizes": [2, 16], "steps": {"2": 4, "16": 2}, "repeats": 3,
              "warmup": 1, "seeds": [0]},
    "cpu": {"depth": 20, "width": 16, "batch_sizes": [2, 128], "steps": {"2": 30, "128": 3}, "repeats": 7,
            "warmup": 1, "seeds": [0]},
    "full": {"depth": 20, "width": 16, "batch_sizes": [2, 128], "steps": {"2": 200, "128": 100}, "repeats": 15,
             "warmup": 2, "seeds": [0]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"batch_size": b, "seed": s} for s in config["seeds"] for b in config["batch_sizes"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False):
    b = run["batch_size"]
    steps = config["steps"][str(b)]
    g = seed_all(run["seed"])
    images = torch.randint(0, 256, (b * steps, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (b * steps,), generator=g).to(device)

    def model() -> nn.Module:
        seed_all(run["seed"])
        return CIFARResNet(config["depth"], width=config["width"], norm_layer=nn.BatchNorm2d).to(device)

    tc = TrainConfig(epochs=1, batch_size=b, lr=0.01, schedule="cosine", seed=run["seed"])
    trainer = Trainer(model(), ImageClassification(images, labels), tc, device=device)

    bare_model = model()
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.01, momentum=tc.momentum, weight_decay=tc.weight_decay)
    xs = trainer.task.normalize(images)  # pre-normalized once: the bare loop's best case

    def bare_epoch() -> None:
        for i in range(steps):
            x, y = xs[i * b: (i + 1) * b], labels[i * b: (i + 1) * b]
            loss = F.cross_entropy(bare_model(x), y)
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()
        loss.item()  # the trainer syncs once per epoch too

    def trainer_epoch() -> None:
        trainer.step = 0  # keep the schedule in range across repeats
        for _ in range(steps):
            loss = trainer.train_step()
        loss.item()

    stats = compare({"trainer": trainer_epoch, "bare": bare_epoch}, repeats=config["repeats"],
                    warmup=config["warmup"], device=device)
    sps = {name: steps / s["median"] for name, s in stats.items()}
    metrics = {
        "trainer_steps_per_s": sps["trainer"], "bare_steps_per_s": sps["bare"],
        "ratio": sps["trainer"] / sps["bare"],
        "trainer_images_per_s": sps["trainer"] * b, "bare_images_per_s": sps["bare"] * b,
        "trainer_iqr_s": [stats["trainer"]["q25"], stats["trainer"]["q75"]],
        "bare_iqr_s": [stats["bare"]["q25"], stats["bare"]["q75"]],
        "steps_per_repeat": steps, "threads": torch.get_num_threads(),
    }
    return {"metrics": metrics, "history": []}
