"""Per-worker ("ghost") BatchNorm: emulate k data-parallel workers with unsynchronized BN on one device.

In the Group Normalization paper {cite}`wu2018group` (Section 4.1), ResNet-50 is trained on 8 GPUs and
"BN's mean and variance are computed within each GPU": with $N$ images per worker, every BN layer
normalizes with statistics over $N \\times H \\times W$ values, even though the SGD batch is $8N$.
Hoffer et al. {cite}`hoffer2017train` named the same computation *ghost batch normalization*. On one
device we split the batch of $kN$ into $k$ consecutive chunks of $N$ (as `DataParallel` would) and
normalize chunk $g$ with its own statistics (Ioffe & Szegedy {cite}`ioffe2015batch`, Algorithm 1):

$$ \\mu_{g,c} = \\frac{1}{NHW}\\sum_{n \\in g,h,w} x_{nchw}, \\quad
   \\sigma^2_{g,c} = \\frac{1}{NHW}\\sum_{n \\in g,h,w} (x_{nchw}-\\mu_{g,c})^2, \\quad
   y_{nchw} = \\gamma_c \\frac{x_{nchw}-\\mu_{g,c}}{\\sqrt{\\sigma^2_{g,c}+\\epsilon}} + \\beta_c . $$

**Running statistics.** Each real worker keeps its own running averages and, in the paper's Caffe2
code, worker 0's are the ones saved and used at test time. `running_stats="worker0"` reproduces that;
the default `"mean"` averages the $k$ workers' means and unbiased variances before one exponential
moving-average update per step (what averaging the workers' buffers after training approximates,
with less noise). Both keep the `torch.nn.BatchNorm2d` state_dict (`weight`, `bias`, `running_mean`,
`running_var`, `num_batches_tracked`), so a trained model loads into a plain BatchNorm2d for testing.

`recompute_batchnorm_stats` is "precise BN": after training, re-estimate the population statistics
with large batches (Wu & Johnson {cite}`wu2021rethinking`; Summers & Dinneen {cite}`summers2020four`). Comparing test
error with the running averages and with recomputed statistics separates the two ways small batches
hurt BN: noisy statistics *during training* and a train/test mismatch of the averages.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import nn

from . import norms
from .norms import mean_var


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed per worker, over chunks of the batch.

    Args:
        num_features: channels C.
        num_workers: k; a training batch of k*N samples is normalized as k chunks of N. `1` is plain
            BatchNorm2d. The batch size must be a multiple of k.
        running_stats: "mean" (average the k workers' statistics, then one EMA update per step) or
            "worker0" (update with the first chunk's statistics only, like the paper's worker 0).
        impl: "formula" computes the equations above with tensor ops (the readable reference);
            "fused" gives the same numbers 2-3x faster on CPU by running torch's fused batch-norm
            kernel on the batch rearranged to (N, k*C, H, W), i.e. worker g's channel c becomes
            channel g*C + c (tested equal to "formula").
        eps, momentum, affine, track_running_stats: as in `torch.nn.BatchNorm2d` (momentum=None is a
            cumulative moving average).
    """

    def __init__(self, num_features: int, num_workers: int = 1, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 running_stats: Literal["mean", "worker0"] = "mean", impl: Literal["formula", "fused"] = "formula",
                 device=None, dtype=None):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if running_stats not in ("mean", "worker0"):
            raise ValueError(f"running_stats must be 'mean' or 'worker0', got {running_stats!r}")
        if impl not in ("formula", "fused"):
            raise ValueError(f"impl must be 'formula' or 'fused', got {impl!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.num_workers = num_workers
        self.running_stats = running_stats
        self.impl = impl

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_workers={self.num_workers}, running_stats={self.running_stats}"

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-worker mean and biased variance of `x` viewed as (k, N, C, H, W); shapes (k, 1, C, 1, 1).

        Two-pass (centered) variance, as every normlab norm computes it (`normlab.norms.mean_var`).
        """
        return mean_var(x, (1, 3, 4))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {x.shape[1]}")

    def _images_per_worker(self, x: torch.Tensor) -> int:
        """N for a training batch of k*N images; each worker needs at least 2 values per channel."""
        b, _, h, w = x.shape
        k = self.num_workers
        if b % k != 0:
            raise ValueError(f"batch of {b} cannot be split over {k} workers; use a multiple of num_workers "
                             "(the trainer drops the last incomplete batch)")
        n = b // k
        if n * h * w < 2:
            raise ValueError(f"each worker sees {n * h * w} value(s) per channel; BatchNorm needs at least 2")
        return n

    def precise_bn_overrides(self) -> dict:
        """Attributes under which this layer normalizes a batch as one plain BatchNorm2d would
        (`recompute_batchnorm_stats` sets them while it re-estimates the statistics)."""
        return {"num_workers": 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:  # evaluation with the running averages: a per-channel affine map
            scale = torch.rsqrt(self.running_var + self.eps)
            shift = -self.running_mean * scale
            if self.affine:
                scale, shift = scale * self.weight, shift * self.weight + self.bias
            return x * scale[None, :, None, None] + shift[None, :, None, None]

        b, c, h, w = x.shape
        k, n = self.num_workers, self._images_per_worker(x)
        if self.impl == "fused":
            return self._forward_fused(x, k, n)
        xg = x.view(k, n, c, h, w)
        mean, var = self.batch_stats(xg)
        y = (xg - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)

        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n * h * w)
        return y.view(b, c, h, w)

    def _forward_fused(self, x: torch.Tensor, k: int, n: int) -> torch.Tensor:
        b, c, h, w = x.shape
        xr = x if k == 1 else x.view(k, n, c, h, w).transpose(0, 1).reshape(n, k * c, h, w)
        weight = bias = None
        if self.affine:
            weight, bias = self.weight.repeat(k), self.bias.repeat(k)
        update = self.training and self.track_running_stats
        # momentum=1 makes the kernel write this batch's per-(worker, channel) mean and *unbiased*
        # variance into the scratch buffers, which we then combine over workers ourselves
        mean_buf = torch.zeros(k * c, device=x.device, dtype=x.dtype) if update else None
        var_buf = torch.ones(k * c, device=x.device, dtype=x.dtype) if update else None
        y = torch.nn.functional.batch_norm(xr, mean_buf, var_buf, weight, bias, True, 1.0, self.eps)
        if update:
            count = n * h * w  # undo the unbiasing so _update_running_stats sees the biased variance
            self._update_running_stats(mean_buf.view(k, c), var_buf.view(k, c) * ((count - 1) / count), count)
        return y if k == 1 else y.view(n, k, c, h, w).transpose(0, 1).reshape(b, c, h, w)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        # torch.nn's convention: normalize with the biased variance, track the unbiased one
        mean, var = mean.flatten(1), var.flatten(1) * (count / (count - 1))  # (k, C)
        if self.running_stats == "worker0":
            mean, var = mean[0], var[0]
        else:
            mean, var = mean.mean(0), var.mean(0)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(var.to(self.running_var.dtype), factor)


def ghost_batch_norm(num_workers: int, **kwargs):
    """A `norm_layer` factory for `CIFARResNet`: `GhostBatchNorm2d(channels, num_workers, **kwargs)`."""
    def norm_layer(num_features: int) -> GhostBatchNorm2d:
        return GhostBatchNorm2d(num_features, num_workers=num_workers, **kwargs)
    return norm_layer


#: Norms that keep torch.nn's running statistics, buffers and momentum: torch's BatchNorms and normlab's.
_RUNNING_STAT_NORMS = (nn.modules.batchnorm._BatchNorm, norms.BatchNorm1d, norms.BatchNorm2d, norms.InstanceNorm2d)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _RUNNING_STAT_NORMS)]


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Precise BN: replace every BatchNorm's running averages by an exact average over `batches`.

    Each BN layer's statistics are computed on whole batches (per-worker splitting, and Batch
    Renormalization's corrections, are switched off, so pass large batches), averaged with equal
    weights (`momentum=None`, a cumulative average).
    Returns the number of batches used. The model is left in eval mode.
    """
    bns = _batchnorms(model)
    if not bns:
        return 0
    overrides = [{"momentum": None, **(bn.precise_bn_overrides() if hasattr(bn, "precise_bn_overrides") else {})}
                 for bn in bns]
    saved = [{name: getattr(bn, name) for name in o} for bn, o in zip(bns, overrides)]
    for bn, o in zip(bns, overrides):
        bn.reset_running_stats()
        for name, value in o.items():
            setattr(bn, name, value)
    model.train()
    count = 0
    try:
        for x in batches:
            model(x)
            count += 1
    finally:
        for bn, attrs in zip(bns, saved):
            for name, value in attrs.items():
                setattr(bn, name, value)
        model.eval()
    if count == 0:
        raise ValueError("recompute_batchnorm_stats got no batches")
    return count


def per_worker_reference(x: torch.Tensor, bns: list[nn.BatchNorm2d]) -> torch.Tensor:
    """Reference for tests and the chapter: k separate `nn.BatchNorm2d` calls on k chunks of the batch."""
    return torch.cat([bn(chunk) for bn, chunk in zip(bns, x.chunk(len(bns)))])


__all__ = ["GhostBatchNorm2d", "ghost_batch_norm", "recompute_batchnorm_stats", "per_worker_reference"]
