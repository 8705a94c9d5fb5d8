"""Two controls for `gn_batch_size`: Batch Renormalization at N=4, and one device instead of k workers.

Same data subset, model, learning-rate rule and seeds as `gn_batch_size`; each variant is compared
with the runs of the profile named in `compare_with`, paired by seed.

- **Batch Renorm at N=4** (`variant="brn"`, the `cpu_long` protocol): Wu & He {cite}`wu2018group`
  (Section 4.1) measured BR at 26.3% against BN's 27.3% and GN's 24.2% (ResNet-50, ImageNet, 4 images
  per worker), with $r_{max}=1.5$, $d_{max}=0.5$. BR trains with the running averages folded in, so it
  attacks the train/test mismatch of small-batch BN but not the noise of its statistics. Here BR is
  plain BN for the first 5% of the steps (the running averages are meaningless at first, as in
  Ioffe's schedule {cite}`ioffe2017batch`), then its limits grow linearly to 1.5 and 0.5 over 20%.
- **A single device** (`variant="single_device"`, k=1, the 5-epoch `cpu` protocol at N=32 and N=2): the
  SGD batch is N itself rather than k*N. To change nothing else, the learning rate per image is kept:
  lr = 0.1 * (k*N) / 128, as k=4 workers of N images have at lr = 0.1*N/32; the BN statistics are
  over N images in both. What differs is only how many images each SGD step averages, so comparing
  with the k=4 runs separates BN's small-*statistics* problem from small-*SGD-batch* effects, which
  GN shares.
"""

from __future__ import annotations

from typing import Any

import torch

from . import gn_batch_size as base

_BRN = {"brn_r_max": 1.5, "brn_d_max": 0.5, "brn_hold": 0.05, "brn_ramp": 0.2}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**base.PROFILES["smoke"], **_BRN, "reference_workers": 2,
              "compare_with": {"brn": "smoke", "single_device": "smoke"},
              "brn": {"batch_size": 2, "epochs": 1}, "single_device": {"batch_sizes": [8, 2], "epochs": 1}},
    "cpu": {**base.PROFILES["cpu"], **_BRN, "reference_workers": 4,
            "compare_with": {"brn": "cpu_long", "single_device": "cpu"},
            "brn": {"batch_size": 4, "epochs": base.PROFILES["cpu_long"]["epochs"],
                    "eval_every": base.PROFILES["cpu_long"]["eval_every"]},
            "single_device": {"batch_sizes": [32, 2], "epochs": base.PROFILES["cpu"]["epochs"]}},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    brn, single = config["brn"], config["single_device"]
    out = []
    for seed in config["seeds"]:
        out.append({"variant": "brn", "norm": "brn", "batch_size": brn["batch_size"],
                    "workers": config["workers"], "seed": seed})
        out += [{"variant": "single_device", "norm": norm, "batch_size": n, "workers": 1, "seed": seed}
                for n in single["batch_sizes"] for norm in ("bn", "gn")]
    return out


def run_config(run: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The `gn_batch_size` configuration of one run: the variant's epochs, k and learning rate."""
    variant = config[run["variant"]]
    k = run["workers"]
    return {**config, "workers": k, "epochs": variant["epochs"],
            "eval_every": variant.get("eval_every", variant["epochs"]),
            # the same learning rate per image for every k: lr = base_lr * N/32 * k/k_ref
            "base_lr": config["base_lr"] * k / config["reference_workers"]}


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False, checkpoint=None):
    return base.run_one(run, run_config(run, config), device, progress, checkpoint)


#: Wu & He (2018), Section 4.1: ResNet-50 on ImageNet at 4 images per worker, top-1 error (%).
PAPER_IMAGENET_N4 = {"bn": 27.3, "brn": 26.3, "gn": 24.2}
