"""GN vs BN across images per worker N (Wu & He 2018, Fig. 1 / Table 2) on CIFAR-10 with per-worker BN.

Protocol (the paper's, scaled down; see the chapter `07_gn_vs_bn_batch_size` for every difference):

- k emulated workers (`workers`, 8 in the paper), each with N images: an SGD batch of k*N whose
  BatchNorm statistics are computed per worker (`normlab.norms.GhostBatchNorm2d`), not
  synchronized; the running averages of the k workers are averaged each step (`bn_running_stats`).
- Linear learning-rate scaling {cite}`goyal2017accurate`: lr = `base_lr` * N / 32 (0.1*N/32 in the
  paper, whose k=8 workers make that 0.1 per 256 images), the same number of epochs for every N (so small N takes more steps, as in the paper),
  SGD momentum 0.9, weight decay 1e-4, gamma=0 init of each block's last norm, GN with `gn_groups`
  groups (8 here: CIFAR ResNets have 16 channels in the first stage, so the paper's G=32 cannot divide
  them; 8 groups of 2/4/8 channels).
- BN is evaluated with the running averages (as in the paper) and, additionally, with "precise"
  statistics recomputed after training on `precise_bn_images` training images in batches of
  `precise_bn_batch` (`test_error_precise_bn`): the gap between the two is the train/test mismatch of
  the running averages, what is left is the cost of noisy statistics during training.

One run per (norm, N, seed). Metrics: `test_error` (percent), `train_error` (last epoch, on the
augmented batches in train mode), `test_loss`, `steps`, `lr`, and for BN `test_error_precise_bn`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..norms import batch_renorm, ghost_batch_norm, recompute_batchnorm_stats, renorm_schedule
from ..models.resnet import CIFARResNet
from ..tasks import ImageClassification
from ..train import Trainer, TrainConfig, fastest
from ..utils import seed_all

_COMMON: dict[str, Any] = {
    "dataset": "cifar10",          # or "fashion_mnist"
    "norms": ["bn", "gn"],
    "batch_sizes": [32, 16, 8, 4, 2],   # N, images per worker
    "workers": 8,                  # k
    "base_lr": 0.1,                # the learning rate at N=32, scaled linearly with N (k is fixed)
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "warmup_epochs": 0.0,
    "zero_init_residual": True,
    "gn_groups": 8,
    "bn_momentum": 0.1,
    "bn_running_stats": "mean",    # "mean" over workers, or "worker0" (the paper's Caffe2 checkpoints)
    "norm_impl": "fused",          # "fused": torch kernels (fast, same numbers); "normlab": from-scratch norms
    "shortcut": "A",
    "precise_bn_images": 4096,
    "precise_bn_batch": 256,
    "subset_seed": 1234,           # which training/test subset (fixed across seeds: paired comparisons)
    "image_size": 32,              # 16: CIFAR-10 downsampled 2x (box filter), 3-4x cheaper on a CPU
    "padding": 4,                  # random-crop padding (scaled with the image: 2 at 16x16)
    "batch_size_order": [32, 2, 8, 16, 4],  # run order within a seed: the decisive pair first
}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {**_COMMON, "batch_sizes": [8, 2], "batch_size_order": [8, 2], "workers": 2, "depth": 8,
              "width": 8, "epochs": 1, "train_subset": 128, "test_subset": 128, "seeds": [0],
              "precise_bn_images": 64, "precise_bn_batch": 32, "image_size": 16, "padding": 2},
    "cpu": {**_COMMON, "depth": 8, "width": 16, "workers": 4, "epochs": 5, "train_subset": 10000,
            "test_subset": None, "seeds": [0, 1, 2], "image_size": 16, "padding": 2},
    # `cpu` 6x longer (~75 min on 2 cores, two processes): the networks get closer to convergence,
    # which the paper's claim is about (its ResNet-50s trained 100 ImageNet epochs)
    "cpu_long": {**_COMMON, "depth": 8, "width": 16, "workers": 4, "epochs": 30, "eval_every": 5,
                 "train_subset": 10000, "test_subset": None, "seeds": [0, 1, 2], "image_size": 16,
                 "padding": 2},
    # trained to what the networks can reach on this CPU: ResNet-20, all 50k images, k=8 as in the paper,
    # 16 px (32 px costs 2.8x per epoch: `gn_batch_size_cost`), every run at 30 epochs, and the largest
    # and smallest N again at 60 and at 120 (after the 30-epoch runs), so the record shows whether each
    # doubling of the training moves the verdict where it is drawn (60 epochs at every N would cost
    # ~10 CPU-h more; 120 was added when 30 -> 60 moved GN - BN at N=2 by ~2 points in its first seeds);
    # bf16 where `gn_batch_size_precision` shows it does not move test error beyond the seed spread
    "cpu_converged": {**_COMMON, "depth": 20, "width": 16, "workers": 8, "epochs": 60, "epoch_list": [30, 60, 120],
                      "doubling_batch_sizes": [32, 2],
                      "eval_every": 5, "train_subset": None, "test_subset": None, "seeds": [0, 1, 2],
                      "image_size": 16, "padding": 2, "precise_bn_images": 10000, "precision": "auto",
                      "memory_format": "auto"},
    "full": {**_COMMON, "depth": 20, "width": 16, "epochs": 30, "train_subset": None, "test_subset": None,
             "seeds": [0, 1, 2], "precise_bn_images": 10000},
    # `full` with synchronized BN (`torchrun`: SyncBatchNorm over all workers; one device: BN over k*N)
    "full_sync": {**_COMMON, "norms": ["sbn", "gn"], "depth": 20, "width": 16, "epochs": 30, "train_subset": None,
                  "test_subset": None, "seeds": [0, 1, 2], "precise_bn_images": 10000},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One run per (norm, N, seed) (and per training length in `epoch_list`, shortest first), BN and GN
    interleaved so a partial sweep is still a comparison. The longer lengths of `epoch_list` train only
    the `doubling_batch_sizes` (if given): they check whether the first length's verdict still moves."""
    order = [n for n in config.get("batch_size_order", []) if n in config["batch_sizes"]]
    order += [n for n in config["batch_sizes"] if n not in order]
    lengths = [{"epochs": e} for e in config["epoch_list"]] if config.get("epoch_list") else [{}]
    doubling = config.get("doubling_batch_sizes")
    return [{"norm": norm, "batch_size": n, "seed": seed, **length}
            for i, length in enumerate(lengths) for seed in config["seeds"] for n in order
            if i == 0 or doubling is None or n in doubling for norm in config["norms"]]


_DATA_CACHE: dict[tuple, tuple] = {}


def load_data(config: dict[str, Any]):
    """(train_x, train_y, test_x, test_y, source): uint8 images, fixed random subsets (cached per process)."""
    key = (config["dataset"], config["train_subset"], config["test_subset"], config["subset_seed"],
           config["image_size"])
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = _load_data(config)
    return _DATA_CACHE[key]


def _load_data(config: dict[str, Any]):
    from .. import data

    split = data.load(config["dataset"])
    split = data.resize(data.subset(split, config["train_subset"], config["test_subset"], config["subset_seed"]),
                        config["image_size"])
    return split.train_images, split.train_labels, split.test_images, split.test_labels, split.source


def local_workers(config: dict[str, Any]) -> int:
    """The workers each process emulates: all k of them, or k / P under torchrun with P processes
    (each real process is then k / P workers; with P = k, one real worker each)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if config["workers"] % world:
        raise ValueError(f"workers={config['workers']} cannot be split over the {world} processes of this torchrun "
                         f"job; use --nproc-per-node {config['workers']} or a divisor of it")
    return config["workers"] // world


def layer_name(norm: str, config: dict[str, Any]) -> str:
    """The canonical name of the layer `norm_layer` builds (what `normlab.train.FASTEST` is keyed by):
    this experiment's "bn" is per-worker BN ("gbn") unless each process is one worker, and "sbn" on one
    device is BN over the whole batch."""
    return {"bn": "gbn" if local_workers(config) > 1 else "bn", "sbn": "bn"}.get(norm, norm)


def norm_layer(norm: str, config: dict[str, Any]):
    """`norm_layer(channels)` for the ResNet: per-worker BN over `workers` chunks, GroupNorm, or per-worker
    Batch Renorm ("brn", needs `brn_r_max`, `brn_d_max`, `brn_hold`, `brn_ramp` in the config)."""
    impl = config["norm_impl"]
    if impl not in ("fused", "normlab"):
        raise ValueError(f"norm_impl must be 'fused' or 'normlab', got {impl!r}")
    if norm == "bn":
        return ghost_batch_norm(local_workers(config), momentum=config["bn_momentum"],
                                running_stats=config["bn_running_stats"],
                                impl="fused" if impl == "fused" else "formula")
    if norm == "sbn":  # synchronized BN: statistics of all k workers' images; under torchrun, really synced
        if torch.distributed.is_initialized():
            from ..norms import SyncBatchNorm

            return lambda channels: SyncBatchNorm(channels, momentum=config["bn_momentum"])
        return ghost_batch_norm(1, momentum=config["bn_momentum"], impl="fused" if impl == "fused" else "formula")
    if norm == "brn":  # starts as BN (r_max=1, d_max=0); `run_one` relaxes the limits on a schedule
        return batch_renorm(local_workers(config), r_max=1.0, d_max=0.0, momentum=config["bn_momentum"],
                            running_stats=config["bn_running_stats"])
    if norm == "gn":
        groups = config["gn_groups"]
        if impl == "normlab":
            from ..norms import GroupNorm
        else:
            GroupNorm = nn.GroupNorm

        def gn(channels: int) -> nn.Module:
            if channels % groups:
                raise ValueError(f"gn_groups={groups} does not divide {channels} channels")
            return GroupNorm(groups, channels)
        return gn
    raise ValueError(f"norm must be 'bn', 'sbn', 'gn' or 'brn', got {norm!r}")


def precise_bn_sample(n_train: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the `n` training images whose statistics precise BN averages: a seeded random sample."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:n]


def train_config(run: dict[str, Any], config: dict[str, Any]) -> TrainConfig:
    """SGD at lr = base_lr * N/32 for a batch of k*N; precision and memory format from the config
    ("auto": the fastest measured for the norm, `normlab.train.FASTEST`; fp32 NCHW by default), and
    `compile` (a `torch.compile` backend, e.g. for GPUs, where small batches are launch-bound)."""
    k, n = config["workers"], run["batch_size"]
    return fastest(layer_name(run["norm"], config), TrainConfig(
        epochs=config["epochs"], batch_size=k * n, lr=config["base_lr"] * n / 32, momentum=config["momentum"],
        weight_decay=config["weight_decay"], schedule=config["schedule"], warmup=config["warmup_epochs"],
        eval_every=config.get("eval_every", config["epochs"]), seed=run["seed"],
        precision=config.get("precision", "fp32"), memory_format=config.get("memory_format", "contiguous"),
        compile=config.get("compile", False)))


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device, progress: bool = False,
            checkpoint=None):
    config = {**config, "epochs": run.get("epochs", config["epochs"])}
    trx, try_, tex, tey, source = load_data(config)
    seed_all(run["seed"])  # model initialization
    model = CIFARResNet(config["depth"], num_classes=10, norm_layer=norm_layer(run["norm"], config),
                        width=config["width"], shortcut=config["shortcut"],
                        zero_init_residual=config["zero_init_residual"], in_channels=trx.shape[1])
    tc = train_config(run, config)
    task = ImageClassification(trx, try_, tex, tey, padding=config["padding"])
    hooks = [renorm_schedule(config["brn_r_max"], config["brn_d_max"], hold=config["brn_hold"],
                             ramp=config["brn_ramp"])] if run["norm"] == "brn" else []
    trainer = Trainer(model, task, tc, hooks=hooks, checkpoint=checkpoint, device=device)
    history = trainer.fit(progress=progress, desc=f"{run['norm']} N={run['batch_size']} seed={run['seed']}")
    metrics = {**trainer.summary(), "lr": tc.lr, "total_batch": tc.batch_size, "data_source": source,
               "n_train": len(trx), "n_test": len(tex),
               "precision": tc.precision, "memory_format": tc.memory_format}
    if run["norm"] in ("bn", "brn", "sbn"):  # precise BN: population statistics recomputed after training
        # A random sample: the training set may be stored class by class (CIFAR's image folders are), and
        # the first images would then be one or two classes only, whose statistics are not the population's.
        n = min(config["precise_bn_images"], len(trx))
        pick = precise_bn_sample(len(trx), n, config["subset_seed"]).to(task.x.device)
        batches = (task.normalize(task.x[pick[i: i + config["precise_bn_batch"]]])
                   for i in range(0, n, config["precise_bn_batch"]))
        recompute_batchnorm_stats(trainer.model, batches)
        metrics["test_error_precise_bn"] = trainer.evaluate()["test_error"]
    return {"metrics": metrics, "history": history}


# ----------------------------------------------------------------------------------------------------
# reading the results (used by the chapter)
# ----------------------------------------------------------------------------------------------------

#: Wu & He (2018), Table 2 / Figure 1: ResNet-50 on ImageNet, top-1 *error* (%) by images per worker N.
PAPER_IMAGENET = {
    "batch_sizes": [32, 16, 8, 4, 2],
    "bn": [23.6, 23.7, 24.8, 27.3, 34.7],
    "gn": [24.1, 24.2, 24.0, 24.2, 24.1],
}


def summary(record: dict[str, Any], metric: str = "test_error") -> dict[str, dict[int, dict[str, float]]]:
    """`{norm: {N: {"median", "min", "max", "n"}}}` of `metric` over seeds (runs without it are skipped)."""
    import statistics

    out: dict[str, dict[int, dict[str, float]]] = {}
    for r in record["runs"]:
        v = r["metrics"].get(metric)
        if v is None:
            continue
        out.setdefault(r["config"]["norm"], {}).setdefault(r["config"]["batch_size"], []).append(v)
    return {norm: {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
                   for n, v in sorted(by_n.items(), reverse=True)}
            for norm, by_n in out.items()}


def verdict(record: dict[str, Any]) -> dict[str, Any]:
    """The short sweeps' three numbers (BN's rise from the largest to the smallest N, GN's spread across N,
    GN minus BN at the smallest N), from the medians over seeds."""
    s = summary(record)
    bn, gn = s.get("bn", {}), s.get("gn", {})
    small, large = min(bn), max(bn)
    gn_medians = [v["median"] for v in gn.values()]
    return {
        "N_small": small, "N_large": large,
        "bn_small_minus_large": bn[small]["median"] - bn[large]["median"],
        "gn_spread": max(gn_medians) - min(gn_medians),
        "gn_minus_bn_at_small": gn[small]["median"] - bn[small]["median"],
    }


def paired_gap(record: dict[str, Any], metric: str = "test_error") -> dict[int, dict[str, float]]:
    """BN minus GN at each N, paired by seed: `{N: {"median", "min", "max", "n"}}`.

    Both norms see the same N, learning rate, number of steps, data order (seed) and initialization
    scheme, so the difference isolates the normalization from the optimization effects of N.
    """
    import statistics

    by: dict[tuple[int, int], dict[str, float]] = {}
    for r in record["runs"]:
        by.setdefault((r["config"]["batch_size"], r["seed"]), {})[r["config"]["norm"]] = r["metrics"][metric]
    gaps: dict[int, list[float]] = {}
    for (n, _seed), v in by.items():
        if "bn" in v and "gn" in v:
            gaps.setdefault(n, []).append(v["bn"] - v["gn"])
    return {n: {"median": statistics.median(g), "min": min(g), "max": max(g), "n": len(g)}
            for n, g in sorted(gaps.items(), reverse=True)}


# ----------------------------------------------------------------------------------------------------
# statistics for the converged record: paired differences with intervals, the epoch-doubling check
# ----------------------------------------------------------------------------------------------------


def _cell(record: dict[str, Any], norm: str, n: int, epochs: int | None, metric: str) -> dict[int, float]:
    """`{seed: metric}` of (norm, N), at `epochs` when the record trains several lengths (`epoch_list`)."""
    return {r["seed"]: r["metrics"][metric] for r in record["runs"]
            if r["config"]["norm"] == norm and r["config"]["batch_size"] == n
            and (epochs is None or _epochs(record, r) == epochs)
            and r["metrics"].get(metric) is not None}


def _paired(a: dict[int, float], b: dict[int, float]):
    """`paired_difference` of a - b over the seeds both have; None with fewer than 2 of them."""
    from ..stats import paired_difference

    seeds = sorted(set(a) & set(b))
    return paired_difference({s: a[s] for s in seeds}, {s: b[s] for s in seeds}) if len(seeds) >= 2 else None


def lengths(record: dict[str, Any]) -> list[int]:
    """The training lengths (epochs) of the record, shortest first."""
    return sorted({_epochs(record, r) for r in record["runs"]})


def _epochs(record: dict[str, Any], run: dict[str, Any]) -> int:
    return run["config"].get("epochs", record["config"]["epochs"])


def headline_epochs(record: dict[str, Any]) -> int:
    """The longest training recorded at every N: the length the chapter's verdicts are read at (a
    profile may train the longer lengths only at some N: `doubling_batch_sizes`)."""
    ns = {r["config"]["batch_size"] for r in record["runs"]}
    return max(e for e in lengths(record) if {r["config"]["batch_size"] for r in record["runs"]
                                               if _epochs(record, r) == e} == ns)


def at_length(record: dict[str, Any], epochs: int | None = None) -> dict[str, Any]:
    """The record with only the runs trained for `epochs` (default `headline_epochs`): one run per
    (norm, N, seed), as readers that pair by seed need."""
    epochs = headline_epochs(record) if epochs is None else epochs
    return {**record, "runs": [r for r in record["runs"] if _epochs(record, r) == epochs]}


def differences(record: dict[str, Any], epochs: int | None = None, metric: str = "test_error"):
    """The chapter's four measurements, each a `normlab.stats.Interval` (points; paired by seed):

    `bn_small_minus_large` (BN at the smallest N minus the largest), `gn_small_minus_large`,
    `gn_minus_bn` `{N: Interval}` at every N. `epochs=None`: `headline_epochs`. Each difference pairs
    the seeds both cells have; with fewer than 2 of them it is None (a record still being recorded),
    and `gn_minus_bn` leaves that N out.
    """
    ns = sorted({r["config"]["batch_size"] for r in record["runs"]}, reverse=True)
    epochs = headline_epochs(record) if epochs is None else epochs
    cell = lambda norm, n: _cell(record, norm, n, epochs, metric)
    gaps = {n: _paired(cell("gn", n), cell("bn", n)) for n in ns}
    return {"epochs": epochs, "N_large": ns[0], "N_small": ns[-1],
            "bn_small_minus_large": _paired(cell("bn", ns[-1]), cell("bn", ns[0])),
            "gn_small_minus_large": _paired(cell("gn", ns[-1]), cell("gn", ns[0])),
            "gn_minus_bn": {n: iv for n, iv in gaps.items() if iv is not None}}


def epoch_doubling(record: dict[str, Any], n: int, metric: str = "test_error",
                   between: tuple[int, int] | None = None) -> dict[str, Any]:
    """Does doubling the training move the paired GN - BN difference at N = `n`?

    For two lengths L and 2L of the record (`between`, default the two longest): `short` and `long` (GN - BN at each, paired by
    seed), `per_seed` (`{"short": {seed: GN - BN}, "long": ...}`), `change` (the per-seed change of that difference, long minus short, as an Interval), and
    `spread` (max - min over seeds of the difference at 2L). The verdict is stable when
    |change.estimate| < spread: the extra training moved the difference by less than the seeds do.
    While the record is incomplete, an interval with fewer than 2 seeds is None, `spread` is None
    below 2 seeds at 2L, and `stable` is None when either is.
    """
    ls = lengths(record)
    if len(ls) < 2:
        raise ValueError(f"the record trains one length ({ls}); epoch_doubling needs a profile with epoch_list")
    short_len, long_len = between or (ls[-2], ls[-1])
    if short_len not in ls or long_len not in ls:
        raise ValueError(f"epoch_doubling between {short_len} and {long_len} epochs: the record trains {ls}")
    short, long = (gn_minus_bn(record, n, metric, epochs=e) for e in (short_len, long_len))
    d_short, d_long = short["per_seed"], long["per_seed"]
    change = _paired(d_long, d_short)
    spread = max(d_long.values()) - min(d_long.values()) if len(d_long) >= 2 else None
    stable = None if change is None or spread is None else abs(change.estimate) < spread
    return {"epochs": (short_len, long_len), "short": short["interval"], "long": long["interval"],
            "per_seed": {"short": d_short, "long": d_long}, "change": change, "spread": spread, "stable": stable}


def doubling_checks(record: dict[str, Any], n: int, metric: str = "test_error") -> list[dict[str, Any]]:
    """`epoch_doubling` for each pair of consecutive lengths the record trains at N = `n`, shortest first:
    how the verdict moved at each doubling of the training (30 -> 60, 60 -> 120, ...)."""
    at_n = sorted({_epochs(record, r) for r in record["runs"] if r["config"]["batch_size"] == n})
    return [epoch_doubling(record, n, metric, between=pair) for pair in zip(at_n, at_n[1:])]


# ----------------------------------------------------------------------------------------------------
# the converged record's headline section: per-N means, training curves, GN's flatness, the verdicts
# ----------------------------------------------------------------------------------------------------

#: The band within which two test errors count as equal (points) for the chapter's two equivalence
#: claims: GN is flat across N, and GN matches BN at the largest N. On ImageNet the paper's GN spans
#: 0.2 points across N and trails BN by 0.5 at N=32 (`PAPER_IMAGENET`): both inside the band, so the
#: paper's own table passes; a gap of a point or more is one its readers would call a difference.
EQUIVALENCE_MARGIN = 1.0


def progress(record: dict[str, Any]) -> dict[str, Any]:
    """`{"recorded", "planned", "complete"}`: the runs in the record, the runs its profile trains
    (`runs(record["config"])`), and whether it is complete."""
    return {"recorded": len(record["runs"]), "planned": len(runs(record["config"])),
            "complete": bool(record.get("complete", True))}


def seed_stats(record: dict[str, Any], metric: str = "test_error", epochs: int | None = None):
    """`{norm: {N: {"mean", "min", "max", "n"}}}` of `metric` over seeds at `epochs` (default
    `headline_epochs`), N from large to small; cells without any run are absent."""
    import statistics

    epochs = headline_epochs(record) if epochs is None else epochs
    out: dict[str, dict[int, dict[str, float]]] = {}
    for norm in sorted({r["config"]["norm"] for r in record["runs"]}):
        for n in sorted({r["config"]["batch_size"] for r in record["runs"]}, reverse=True):
            v = list(_cell(record, norm, n, epochs, metric).values())
            if v:
                out.setdefault(norm, {})[n] = {"mean": statistics.mean(v), "min": min(v), "max": max(v), "n": len(v)}
    return out


def curve(record: dict[str, Any], norm: str, n: int, metric: str = "train_error", epochs: int | None = None):
    """`metric` against epoch for (norm, N), from the runs' history rows, over seeds: `{"epoch", "mean",
    "min", "max"}` (lists over the epochs every seed has a value at) and `"n"` (seeds); None without runs."""
    from ..results import band

    epochs = headline_epochs(record) if epochs is None else epochs
    return band([r for r in record["runs"] if r["config"]["norm"] == norm and r["config"]["batch_size"] == n
                 and _epochs(record, r) == epochs], metric)


def gn_minus_bn(record: dict[str, Any], n: int, metric: str = "test_error", epochs: int | None = None):
    """GN minus BN at N = `n`, paired by seed: `{"per_seed": {seed: GN - BN}, "interval"}` (a t interval,
    None with fewer than 2 seeds). `metric="train_error"`: the last epoch's training error, the
    numerical form of "does GN fit the training set better than BN" (Wu & He's Figure 4)."""
    epochs = headline_epochs(record) if epochs is None else epochs
    gn, bn = _cell(record, "gn", n, epochs, metric), _cell(record, "bn", n, epochs, metric)
    return {"per_seed": {s: gn[s] - bn[s] for s in sorted(set(gn) & set(bn))}, "interval": _paired(gn, bn)}


def gn_flatness(record: dict[str, Any], epochs: int | None = None, metric: str = "test_error"):
    """How flat GN is across N: `spread` (max - min over N of GN's mean over seeds; None without GN
    runs), `means` `{N: mean}`, and `small_minus_large` (GN at the smallest N minus the largest,
    paired by seed: an Interval, None with fewer than 2 seeds)."""
    gn = seed_stats(record, metric, epochs).get("gn", {})
    means = {n: c["mean"] for n, c in gn.items()}
    d = differences(record, epochs, metric)
    return {"epochs": d["epochs"], "N_large": d["N_large"], "N_small": d["N_small"], "means": means,
            "spread": max(means.values()) - min(means.values()) if means else None,
            "small_minus_large": d["gn_small_minus_large"]}


def length_curve(records: list[dict[str, Any]], n: int, metric: str = "test_error"):
    """GN minus BN at N = `n` against training length, over every length of every record given:
    one row `{"experiment", "profile", "epochs", "per_seed", "mean", "min", "max", "interval"}` per
    (record, length) with at least one seed of both norms, in the order of `records`, shortest first."""
    out = []
    for record in records:
        for e in lengths(record):
            g = gn_minus_bn(record, n, metric, epochs=e)
            d = list(g["per_seed"].values())
            if d:
                out.append({"experiment": record.get("experiment"), "profile": record["profile"], "epochs": e,
                            "per_seed": g["per_seed"], "mean": sum(d) / len(d), "min": min(d), "max": max(d),
                            "interval": g["interval"]})
    return out


def verdicts(record: dict[str, Any], margin: float = EQUIVALENCE_MARGIN, epochs: int | None = None):
    """The chapter's four claims, each as a `(claim, interval, verdict)` row for `stats.verdict_table`, at
    `epochs` (default `headline_epochs`), with N_large and N_small the record's largest and smallest N:

    1. BN degrades at small N: BN(N_small) - BN(N_large) > 0 (`direction="greater"`);
    2. GN is flat across N: GN(N_small) - GN(N_large) within +-`margin` (`"equivalent"`);
    3. GN matches BN at N_large: GN - BN within +-`margin` (`"equivalent"`);
    4. GN beats BN at N_small: GN - BN < 0 (`"less"`).

    A row whose difference has fewer than `stats.MIN_SEEDS` seeds says `stats.NOT_TESTED` (the record is
    still being recorded); its interval, if there is one yet, is shown. Returns `{"epochs", "margin", "N_large", "N_small", "rows",
    "doubling"}`; `doubling` is `{N: epoch_doubling(record, N)}` for the profile's
    `doubling_batch_sizes` (default: N_large and N_small) when the record trains two lengths, else {}.
    """
    from ..stats import seed_verdict

    d = differences(record, epochs)
    large, small = d["N_large"], d["N_small"]

    def row(claim, iv, **rule):
        return (claim, iv, seed_verdict(iv, **rule))

    rows = [row(f"BN degrades: BN(N={small}) - BN(N={large}) > 0", d["bn_small_minus_large"], direction="greater"),
            row(f"GN is flat: GN(N={small}) - GN(N={large}) within +-{margin:g}", d["gn_small_minus_large"],
                direction="equivalent", margin=margin),
            row(f"GN matches BN at N={large}: GN - BN within +-{margin:g}", d["gn_minus_bn"].get(large),
                direction="equivalent", margin=margin),
            row(f"GN beats BN at N={small}: GN - BN < 0", d["gn_minus_bn"].get(small), direction="less")]
    ns = record["config"].get("doubling_batch_sizes") or [large, small]
    doubling = {n: epoch_doubling(record, n) for n in ns} if len(lengths(record)) >= 2 else {}
    return {"epochs": d["epochs"], "margin": margin, "N_large": large, "N_small": small, "rows": rows,
            "doubling": doubling}


def interval_text(iv, digits: int = 2) -> str:
    """An Interval as the chapter prints it, or the note that says why there is none yet."""
    if iv is None:
        return "no interval yet: fewer than 2 seeds with both cells"
    return f"{iv.format(digits)} ({iv.confidence:.0%} {iv.method}, {iv.n} seeds)"


def paper_differences() -> dict[str, Any]:
    """The four measurements on the paper's ImageNet numbers (`PAPER_IMAGENET`, one run per cell, so no
    intervals): `bn_small_minus_large`, `gn_small_minus_large`, `gn_spread`, `gn_minus_bn` `{N: points}`."""
    p = dict(zip(PAPER_IMAGENET["batch_sizes"], zip(PAPER_IMAGENET["bn"], PAPER_IMAGENET["gn"])))
    large, small = max(p), min(p)
    return {"bn_small_minus_large": p[small][0] - p[large][0], "gn_small_minus_large": p[small][1] - p[large][1],
            "gn_spread": max(PAPER_IMAGENET["gn"]) - min(PAPER_IMAGENET["gn"]),
            "gn_minus_bn": {n: g - b for n, (b, g) in p.items()}}
