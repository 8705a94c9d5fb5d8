"""What a converged GN-vs-BN sweep costs on this machine: seconds per epoch at each N, 16 vs 32 px.

Before recording a sweep of many CPU-hours, measure its price: for the converged protocol (ResNet-20,
all 50,000 CIFAR-10 training images, k=8 workers, lr 0.1*N/32) time training steps of BN and GN at
every N, at 16x16 (CIFAR-10 downsampled 2x) and at 32x32, in fp32 NCHW and in the trainer's fastest
precision for the norm, and extrapolate to one epoch (50,000 / (k*N) steps). One thread per process,
as the sweep runs (one process per core). Random uint8 images of the right shape: the cost of a step
does not depend on the pixels.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from ..models.resnet import CIFARResNet
from ..tasks import ImageClassification
from ..train import Trainer, TrainConfig, fastest
from ..utils import seed_all
from .gn_batch_size import at_length, layer_name, norm_layer
from .trainer_speed import _NORM_CONFIG

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"depth": 8, "width": 8, "workers": 2, "norms": ["bn", "gn"], "batch_sizes": [4, 2],
              "image_sizes": [16], "precisions": ["fp32", "auto"], "images": 64, "train_images": 50000,
              "threads": 1, "seeds": [0]},
    "cpu": {"depth": 20, "width": 16, "workers": 8, "norms": ["bn", "gn"], "batch_sizes": [32, 16, 8, 4, 2],
            "image_sizes": [16, 32], "precisions": ["fp32", "auto"], "images": 1024, "train_images": 50000,
            "threads": 1, "seeds": [0]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"norm": norm, "batch_size": n, "image_size": size, "precision": p, "seed": s}
            for s in config["seeds"] for size in config["image_sizes"] for n in config["batch_sizes"]
            for norm in config["norms"] for p in config["precisions"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False):
    threads = torch.get_num_threads()
    torch.set_num_threads(config["threads"])
    try:
        k, n, size = config["workers"], run["batch_size"], run["image_size"]
        b = k * n
        steps = max(3, config["images"] // b)
        g = seed_all(run["seed"])
        images = torch.randint(0, 256, (b * (steps + 1), 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (len(images),), generator=g)
        model = CIFARResNet(config["depth"], width=config["width"],
                            norm_layer=norm_layer(run["norm"], {**_NORM_CONFIG, "workers": k}))
        tc = TrainConfig(epochs=1, batch_size=b, lr=0.1 * n / 32, seed=run["seed"], precision=run["precision"],
                         memory_format="auto" if run["precision"] == "auto" else "contiguous")
        tc = fastest(layer_name(run["norm"], {**_NORM_CONFIG, "workers": k}), tc)
        trainer = Trainer(model, ImageClassification(images, labels, padding=4 * size // 32), tc, device=device)
        trainer.train_step().item()  # warm-up: allocator, kernels
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = trainer.train_step()
        loss.item()
        per_step = (time.perf_counter() - t0) / steps
    finally:
        torch.set_num_threads(threads)
    epoch_s = per_step * (config["train_images"] // b)
    return {"metrics": {"s_per_step": per_step, "s_per_epoch": epoch_s, "images_per_s": b / per_step,
                        "precision": tc.precision, "memory_format": tc.memory_format, "steps_timed": steps,
                        "threads": config["threads"]},
            "history": []}


def sweep_hours(record: dict[str, Any], image_size: int, precision: str, epochs: int, seeds: int = 3,
                processes: int = 2) -> float:
    """Hours for a sweep of `epochs` epochs, every (norm, N), `seeds` seeds, on `processes` cores."""
    total = sum(r["metrics"]["s_per_epoch"] for r in record["runs"]
                if r["config"]["image_size"] == image_size and r["config"]["precision"] == precision)
    return total * epochs * seeds / processes / 3600


def per_epoch(record: dict[str, Any], precision: str = "auto") -> dict[tuple[int, str, int], float]:
    """`{(image_size, norm, N): estimated seconds per epoch}` in `precision`, as the record timed them."""
    return {(r["config"]["image_size"], r["config"]["norm"], r["config"]["batch_size"]): r["metrics"]["s_per_epoch"]
            for r in record["runs"] if r["config"]["precision"] == precision}


def against(cost: dict[str, Any], sweep: dict[str, Any], epochs: int, precision: str = "auto") -> dict[str, Any]:
    """What the runs of `sweep` trained for `epochs` cost, against this record's estimate for the same
    runs: `{"runs", "measured_s", "estimated_s", "ratio"}` over the runs the estimate covers (its image
    size, norm and N). The estimate times training steps alone; the runs also evaluate, recompute BN's
    statistics and share the memory bus with the other process, so the ratio says what to add."""
    from ..results import compute_s

    estimate, size = per_epoch(cost, precision), sweep["config"]["image_size"]
    keys = [((size, r["config"]["norm"], r["config"]["batch_size"]), r) for r in at_length(sweep, epochs)["runs"]]
    pairs = [(compute_s(r), estimate[key] * epochs) for key, r in keys if key in estimate]
    measured, estimated = sum(m for m, _ in pairs), sum(e for _, e in pairs)
    return {"runs": len(pairs), "measured_s": measured, "estimated_s": estimated,
            "ratio": measured / estimated if estimated else None}
