"""Batch Renormalization (Ioffe 2017), per worker: BatchNorm that trains with what it will test with.

BatchNorm trains with the statistics of the batch and tests with running averages; with small
batches the two differ, and the network never saw at training time what it sees at test time.
Batch Renormalization {cite}`ioffe2017batch` keeps the batch statistics (and their gradients) but
corrects them towards the running averages $\\mu, \\sigma$ with a per-channel affine map whose
parameters are treated as constants ($\\operatorname{sg}$, stop-gradient):

$$ r = \\operatorname{sg}\\Big(\\operatorname{clip}_{[1/r_{max},\\, r_{max}]}\\frac{\\sigma_B}{\\sigma}\\Big), \\quad
   d = \\operatorname{sg}\\Big(\\operatorname{clip}_{[-d_{max},\\, d_{max}]}\\frac{\\mu_B - \\mu}{\\sigma}\\Big), \\quad
   y = \\gamma \\Big(\\frac{x - \\mu_B}{\\sigma_B}\\, r + d\\Big) + \\beta , $$

with $\\sigma_B = \\sqrt{\\sigma_B^2 + \\epsilon}$ and $\\sigma = \\sqrt{\\text{running\\_var} + \\epsilon}$. Unclipped,
$y$ equals the test-time output $\\gamma (x - \\mu)/\\sigma + \\beta$; with $r_{max}=1, d_{max}=0$ it is
BatchNorm. The paper starts as BatchNorm (the running averages are still wrong early on) and relaxes
the clipping gradually; `renorm_schedule` does that from the trainer's `after_backward` hook. The
Group Normalization paper {cite}`wu2018group` (Section 4.1) compares it with $r_{max}=1.5$ and
$d_{max}=0.5$ at 4 images per worker.

`BatchRenorm2d` extends the per-worker `GhostBatchNorm2d` (statistics over chunks of N images of a
batch of k*N) and keeps torch's BatchNorm2d state_dict. The running averages are updated as in
`GhostBatchNorm2d` (mean and unbiased variance, momentum); the paper averages $\\sigma$ instead of
$\\sigma^2$, a difference of second order for slowly varying statistics.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .ghost_bn import GhostBatchNorm2d


class BatchRenorm2d(GhostBatchNorm2d):
    """Per-worker Batch Renormalization; `r_max`, `d_max` may be changed during training.

    Args:
        num_features: channels C.
        num_workers: k (a batch of k*N is normalized as k chunks of N); 1 is single-device.
        r_max: clip of the scale correction r to [1/r_max, r_max]; must be >= 1.
        d_max: clip of the shift correction d to [-d_max, d_max]; must be >= 0.
        other arguments: as in `GhostBatchNorm2d` (the "formula" implementation is always used).
    """

    def __init__(self, num_features: int, num_workers: int = 1, r_max: float = 3.0, d_max: float = 5.0,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 running_stats: str = "mean", device=None, dtype=None):
        super().__init__(num_features, num_workers=num_workers, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, running_stats=running_stats, impl="formula",
                         device=device, dtype=dtype)
        self.set_limits(r_max, d_max)

    def set_limits(self, r_max: float, d_max: float) -> None:
        if not r_max >= 1.0 or not d_max >= 0.0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        self.r_max, self.d_max = float(r_max), float(d_max)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"

    def precise_bn_overrides(self) -> dict:
        return {**super().precise_bn_overrides(), "r_max": 1.0, "d_max": 0.0}  # r=1, d=0: BatchNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)  # the running averages, exactly as BatchNorm
        self._check_input(x)
        b, c, h, w = x.shape
        k, n = self.num_workers, self._images_per_worker(x)
        xg = x.view(k, n, c, h, w)
        mean, var = self.batch_stats(xg)                      # (k, 1, C, 1, 1), with gradients
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():                                # r and d are constants for backprop
            run_mean = self.running_mean.view(1, 1, c, 1, 1).to(x.dtype)
            run_std = torch.sqrt(self.running_var.view(1, 1, c, 1, 1).to(x.dtype) + self.eps)
            r = (std / run_std).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean - run_mean) / run_std).clamp(-self.d_max, self.d_max)
        y = (xg - mean) / std * r + d
        if self.affine:
            y = y * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        self._update_running_stats(mean.detach(), var.detach(), n * h * w)
        return y.view(b, c, h, w)


def batch_renorm(num_workers: int, **kwargs) -> Callable[[int], BatchRenorm2d]:
    """A `norm_layer` factory for `CIFARResNet`: `BatchRenorm2d(channels, num_workers, **kwargs)`."""
    def norm_layer(num_features: int) -> BatchRenorm2d:
        return BatchRenorm2d(num_features, num_workers=num_workers, **kwargs)
    return norm_layer


def renorm_schedule(total_steps: int, r_max: float, d_max: float, hold: float = 0.05,
                    ramp: float = 0.2) -> Callable[[nn.Module, int], None]:
    """An `after_backward(model, step)` hook: BatchNorm (r_max=1, d_max=0) for the first `hold` of the
    steps, then both limits grow linearly to `r_max`, `d_max` over the next `ramp` of the steps (the
    paper's gradual relaxation, as fractions of training). It sets the limits for the *next* step."""
    if not (hold >= 0 and ramp >= 0 and hold + ramp <= 1):
        raise ValueError(f"need hold, ramp >= 0 and hold + ramp <= 1, got {hold}, {ramp}")

    def limits(step: int) -> tuple[float, float]:
        t = (step / total_steps - hold) / ramp if ramp > 0 else float(step / total_steps >= hold)
        t = min(max(t, 0.0), 1.0)
        return 1.0 + t * (r_max - 1.0), t * d_max

    def hook(model: nn.Module, step: int) -> None:
        r, d = limits(step + 1)
        for m in model.modules():
            if isinstance(m, BatchRenorm2d):
                m.set_limits(r, d)

    hook.limits = limits  # for tests and plots
    return hook


__all__ = ["BatchRenorm2d", "batch_renorm", "renorm_schedule"]
