"""Trainer speed: every precision x memory format, the default's gain over fp32 NCHW, and a bare loop.

The trainer can run in bf16 autocast and with channels_last tensors; `normlab.train.FASTEST` names
the fastest combination per norm, which `precision="auto"` picks. This benchmark is where that
table comes from: for the networks the book trains (a CIFAR ResNet with per-worker BatchNorm,
`gbn`, or GroupNorm, `gn`, with k=8 emulated workers at N=32 and N=2 images per worker, and plain BN,
`bn`, at batch 128; 32x32 images) it times one training step in each of the four combinations,
interleaved by `normlab.bench.compare` (every repeat times each candidate once, in rotating order),
plus `bare`: a bare forward/backward/SGD-step loop in fp32 on pre-normalized, un-augmented slices of
the same tensors, the cheapest possible input pipeline, so `fp32/contiguous` over `bare` is the
trainer's own overhead.

Metrics: images/s of every candidate, the fastest one, and `speedup` (the default's throughput over
fp32 NCHW's, the trainer as it was) and `fp32_over_bare`, each with a 95% bootstrap interval over
the repeats (`normlab.stats.ratio_of_medians`).
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
    "smoke": {"depth": 8, "width": 8, "image_size": 16, "settings": [["gbn", 2, 2], ["gn", 2, 2], ["bn", 4, 1]],
              "images_per_repeat": 12, "repeats": 3, "warmup": 1, "seeds": [0]},
    # ResNet-20 on 32x32: per-worker BN and GN with k=8 workers at N=32 and N=2 (the GN paper's setting
    # and the book's sweeps), and plain BN at batch 128
    "cpu": {"depth": 20, "width": 16, "image_size": 32,
            "settings": [["gbn", 32, 8], ["gbn", 2, 8], ["gn", 32, 8], ["gn", 2, 8], ["bn", 128, 1]],
            "images_per_repeat": 512, "repeats": 9, "warmup": 1, "seeds": [0]},
    "full": {"depth": 20, "width": 16, "image_size": 32,
             "settings": [["gbn", 32, 8], ["gbn", 2, 8], ["gn", 32, 8], ["gn", 2, 8], ["bn", 128, 1]],
             "images_per_repeat": 8192, "repeats": 15, "warmup": 2, "seeds": [0]},
}
#: What every network here shares with `gn_batch_size`'s norm layers (per-worker BN, GN with 8 groups).
_NORM_CONFIG = {"norm_impl": "fused", "bn_momentum": 0.1, "bn_running_stats": "mean", "gn_groups": 8}
#: The trainer settings timed: every precision x memory format.
COMBOS = [("fp32", "contiguous"), ("fp32", "channels_last"), ("bf16", "contiguous"), ("bf16", "channels_last")]


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"norm": norm, "batch_size": n, "workers": k, "seed": s}
            for s in config["seeds"] for norm, n, k in config["settings"]]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False):
    k, n, size = run["workers"], run["batch_size"], config["image_size"]
    b = k * n
    steps = max(2, config["images_per_repeat"] // b)
    g = seed_all(run["seed"])
    images = torch.randint(0, 256, (b * steps, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (b * steps,), generator=g)

    def model() -> torch.nn.Module:
        seed_all(run["seed"])
        layer = norm_layer("gn" if run["norm"] == "gn" else "bn", {**_NORM_CONFIG, "workers": k})
        return CIFARResNet(config["depth"], width=config["width"], norm_layer=layer).to(device)

    base = TrainConfig(epochs=1, batch_size=b, lr=0.01, seed=run["seed"])
    default = fastest(run["norm"], replace(base, precision="auto", memory_format="auto"))
    fns = {}
    for precision, memory_format in COMBOS:
        tc = replace(base, precision=precision, memory_format=memory_format)
        fns[f"{precision}/{memory_format}"] = _epoch(Trainer(model(), ImageClassification(images, labels), tc,
                                                             device=device), steps)
    bare_model = model()
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.01, momentum=base.momentum, weight_decay=base.weight_decay)
    xs, ys = ImageClassification(images, labels).normalize(images).to(device), labels.to(device)  # once

    def bare_epoch() -> None:
        for i in range(steps):
            loss = F.cross_entropy(bare_model(xs[i * b: (i + 1) * b]), ys[i * b: (i + 1) * b])
            bare_opt.zero_grad(set_to_none=True)
            loss.backward()
            bare_opt.step()
        loss.item()  # one sync per repeat, like the trainer's

    fns["bare"] = bare_epoch
    stats = compare(fns, repeats=config["repeats"], warmup=config["warmup"], device=device)
    chosen, reference = f"{default.precision}/{default.memory_format}", "fp32/contiguous"
    speedup = ratio_of_medians(stats[reference]["times"], stats[chosen]["times"])  # time ratio = throughput ratio
    overhead = ratio_of_medians(stats["bare"]["times"], stats[reference]["times"])
    metrics = {
        "images_per_s": {name: b * steps / s["median"] for name, s in stats.items()},
        "iqr_s": {name: [s["q25"], s["q75"]] for name, s in stats.items()},
        "fastest": max((c for c in stats if c != "bare"), key=lambda c: -stats[c]["median"]),
        "default": chosen, "speedup": speedup.estimate, "speedup_ci": [speedup.low, speedup.high],
        "fp32_over_bare": overhead.estimate, "fp32_over_bare_ci": [overhead.low, overhead.high],
        "batch": b, "steps_per_repeat": steps, "threads": torch.get_num_threads(),
    }
    return {"metrics": metrics, "history": []}


def _epoch(trainer: Trainer, steps: int):
    def fn() -> None:
        trainer.step = 0  # keep the schedule in range across repeats
        for _ in range(steps):
            loss = trainer.train_step()
        loss.item()
    return fn


def table(record: dict[str, Any]) -> list[str]:
    """The record as its chapter prints it: the machine, images/s of every setting per network, the
    default's gain over fp32 NCHW with its interval (and whether it is the fastest), and the trainer's
    overhead over the bare loop."""
    prov = record["provenance"]
    combos = [f"{p}/{m}" for p, m in COMBOS] + ["bare"]
    lines = [f"trainer_speed, {record['profile']} profile, {prov['device_name']} ({prov['device']}, "
             f"{prov['num_threads']} threads)",
             f"{'norm':5s} {'N':>3s} {'k':>2s}  " + " ".join(f"{c:>18s}" for c in combos) + "   default/fp32 NCHW"]
    for r in record["runs"]:
        c, m = r["config"], r["metrics"]
        ips = " ".join(f"{m['images_per_s'][k]:18.0f}" for k in combos)
        lo, hi = m["speedup_ci"]
        lines.append(f"{c['norm']:5s} {c['batch_size']:3d} {c['workers']:2d}  {ips}   {m['speedup']:.2f} [{lo:.2f}, {hi:.2f}]"
                     f" ({m['default']}{', the fastest' if m['default'] == m['fastest'] else ', fastest: ' + m['fastest']})")
    lines.append("trainer overhead, fp32 NCHW images/s over the bare loop's: "
                 + ", ".join(f"{r['config']['norm']} N={r['config']['batch_size']} {r['metrics']['fp32_over_bare']:.2f}"
                             for r in record["runs"]))
    return lines
