"""Synchronized BatchNorm: what it buys at 2 images per worker, and what it costs in communication.

With N=2 images per worker, per-worker BN normalizes with statistics of 2 images; SyncBatchNorm
(`normlab.norms.SyncBatchNorm`) all-reduces the statistics so every worker normalizes with those of
all k*N images. Two studies:

- `accuracy`: the `gn_batch_size` `cpu` protocol (ResNet-8, 16 px, 10k images, k=4 workers, 5 epochs)
  at N=2 with per-worker BN (`bn`), synchronized BN (`sbn`: on one device, BN over the whole batch of
  k*N images, which is what k synchronized workers compute) and GN, 3 seeds.
- `cost`: two real gloo processes on this machine train ResNet-20 at N=2 per process with per-worker
  BN and with SyncBatchNorm, timed interleaved; the difference per step is what synchronizing costs
  (two all-reduces per BN layer forward and two backward), next to the bytes it moves,
  `sync_bytes_per_step` = sum over BN layers of (4C + 2) float32 values.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

import torch

from . import gn_batch_size as base

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**base.PROFILES["smoke"], "accuracy_norms": ["bn", "sbn", "gn"], "accuracy_batch_size": 2, "seeds": [0, 1],
              "cost": {"depth": 8, "width": 8, "image_size": 16, "batch_size": 2, "steps": 3, "repeats": 3}},
    "cpu": {**base.PROFILES["cpu"], "accuracy_norms": ["bn", "sbn", "gn"], "accuracy_batch_size": 2,
            "cost": {"depth": 20, "width": 16, "image_size": 32, "batch_size": 2, "steps": 20, "repeats": 9}},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    out = [{"study": "accuracy", "norm": norm, "batch_size": config["accuracy_batch_size"], "seed": seed}
           for seed in config["seeds"] for norm in config["accuracy_norms"]]
    return out + [{"study": "cost", "seed": config["seeds"][0]}]


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False,
            checkpoint=None):
    if run["study"] == "cost":
        return {"metrics": measure_cost(config["cost"]), "history": []}
    return base.run_one({k: v for k, v in run.items() if k != "study"}, config, device, progress, checkpoint)


def sync_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes SyncBatchNorm all-reduces per training step: per BN layer of C channels, forward (count and
    C sums, then C centered sums of squares) and backward (the gradients of both), in float32."""
    from ..norms import SyncBatchNorm

    return sum(4 * (4 * m.num_features + 2) for m in model.modules() if isinstance(m, SyncBatchNorm))


def measure_cost(cost: dict[str, Any], world: int = 2) -> dict[str, Any]:
    """Run `world` gloo processes of this module's `_cost_worker` and return rank 0's measurements."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="normlab-sync-") + "/cost.json"
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", __name__, json.dumps(cost), out], env=env))
    if any(p.wait(timeout=1800) for p in procs):
        raise RuntimeError("the SyncBatchNorm cost measurement failed in a worker process (see its stderr)")
    with open(out) as f:
        return json.load(f)


def _cost_worker(cost: dict[str, Any], out: str) -> None:
    from ..bench import compare
    from ..models.resnet import CIFARResNet
    from ..norms import SyncBatchNorm, ghost_batch_norm
    from ..stats import ratio_of_medians
    from ..tasks import ImageClassification
    from ..train import Trainer, TrainConfig, init_distributed

    torch.set_num_threads(1)
    device = init_distributed("cpu")
    world, n, size = torch.distributed.get_world_size(), cost["batch_size"], cost["image_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (world * n * cost["steps"], 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (len(images),), generator=g)
    trainers, models = {}, {}
    for norm in ("bn", "sbn"):
        torch.manual_seed(0)
        model = CIFARResNet(cost["depth"], width=cost["width"], norm_layer=ghost_batch_norm(1, impl="formula"))
        models[norm] = SyncBatchNorm.convert_sync_batchnorm(model) if norm == "sbn" else model
        trainers[norm] = Trainer(models[norm], ImageClassification(images, labels, padding=4 * size // 32),
                                 TrainConfig(epochs=1, batch_size=world * n, lr=0.01), device=device)

    def epoch(trainer):
        def fn():
            trainer.step = 0
            for _ in range(cost["steps"]):
                loss = trainer.train_step()
            loss.item()
        return fn

    stats = compare({k: epoch(t) for k, t in trainers.items()}, repeats=cost["repeats"], warmup=1)
    per_step = {k: s["median"] / cost["steps"] for k, s in stats.items()}
    ratio = ratio_of_medians(stats["sbn"]["times"], stats["bn"]["times"])
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"s_per_step_bn": per_step["bn"], "s_per_step_sbn": per_step["sbn"],
                       "sync_s_per_step": per_step["sbn"] - per_step["bn"],
                       "sbn_over_bn": ratio.estimate, "sbn_over_bn_ci": [ratio.low, ratio.high],
                       "sync_bytes_per_step": sync_bytes_per_step(models["sbn"]),
                       "sync_layers": sum(isinstance(m, SyncBatchNorm) for m in models["sbn"].modules()),
                       "world_size": world, "threads_per_process": 1}, f)
    torch.distributed.barrier()  # leave together (gloo aborts a process torn down while a peer talks to it)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _cost_worker(json.loads(sys.argv[1]), sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown, in which gloo's threads can abort the process
