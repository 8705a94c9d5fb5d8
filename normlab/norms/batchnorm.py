r"""BatchNorm and its relatives: normalization with statistics over the batch, and running estimates.

`_NormBase` holds what BatchNorm and InstanceNorm share with torch.nn (parameters, buffers, their
names, initialisation, the running-statistic update and old-checkpoint loading); `_BatchNorm` is the
Batch Normalization of Ioffe & Szegedy {cite}`ioffe2015batch` with torch's train/eval semantics, written
as a few documented hooks (`batch_stats`, `normalize`, `channel_stats`, `update_running_stats`,
`_check_batch`) so that its variants are subclasses that change one step:

- `GhostBatchNorm2d`, per-worker ("ghost") BatchNorm: emulates $k$ data-parallel workers with
  unsynchronized BN on one device. In the Group Normalization paper {cite}`wu2018group` (Section 4.1),
  ResNet-50 is trained on 8 GPUs and "BN's mean and variance are computed within each GPU": with $N$
  images per worker, every BN layer normalizes with statistics over $N \times H \times W$ values, even
  though the SGD batch is $8N$. Hoffer et al. {cite}`hoffer2017train` named the same computation *ghost
  batch normalization*. We split the batch of $kN$ into $k$ consecutive chunks of $N$ (as
  `DataParallel` would) and normalize chunk $g$ with its own statistics,

  $$ \mu_{g,c} = \frac{1}{NHW}\sum_{n \in g,h,w} x_{nchw}, \quad
     \sigma^2_{g,c} = \frac{1}{NHW}\sum_{n \in g,h,w} (x_{nchw}-\mu_{g,c})^2, \quad
     y_{nchw} = \gamma_c \frac{x_{nchw}-\mu_{g,c}}{\sqrt{\sigma^2_{g,c}+\epsilon}} + \beta_c . $$

- `BatchRenorm2d`, Batch Renormalization {cite}`ioffe2017batch` (per worker): BatchNorm that trains
  with what it will test with. It keeps the batch statistics (and their gradients) but corrects them
  towards the running averages $\mu, \sigma$ with a per-channel affine map whose parameters are
  constants for backprop ($\operatorname{sg}$, stop-gradient):

  $$ r = \operatorname{sg}\Big(\operatorname{clip}_{[1/r_{max},\, r_{max}]}\frac{\sigma_B}{\sigma}\Big), \quad
     d = \operatorname{sg}\Big(\operatorname{clip}_{[-d_{max},\, d_{max}]}\frac{\mu_B - \mu}{\sigma}\Big), \quad
     y = \gamma \Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta , $$

  with $\sigma_B = \sqrt{\sigma_B^2 + \epsilon}$ and $\sigma = \sqrt{\text{running\_var} + \epsilon}$.
  Unclipped, $y$ equals the test-time output $\gamma (x - \mu)/\sigma + \beta$; with $r_{max}=1,
  d_{max}=0$ it is BatchNorm. The paper starts as BatchNorm (the running averages are still wrong
  early on) and relaxes the clipping gradually; `renorm_schedule` does that from the trainer's
  `after_backward` hook. The GN paper compares it with $r_{max}=1.5$, $d_{max}=0.5$ at 4 images per
  worker. The running averages are updated as BatchNorm's (mean and unbiased variance, momentum); the
  paper averages $\sigma$ instead of $\sigma^2$, a difference of second order for slowly varying
  statistics.

**Running statistics of the workers.** Each real worker keeps its own running averages and, in the
GN paper's Caffe2 code, worker 0's are the ones saved and used at test time.
`running_stats="worker0"` reproduces that; the default `"mean"` averages the $k$ workers' means and
unbiased variances before one exponential moving-average update per step (what averaging the
workers' buffers after training approximates, with less noise). All keep the `torch.nn.BatchNorm2d`
state_dict (`weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`), so a trained model
loads into a plain BatchNorm2d for testing.

`recompute_batchnorm_stats` is "precise BN": after training, re-estimate the population statistics
with large batches (Wu & Johnson {cite}`wu2021rethinking`; Summers & Dinneen {cite}`summers2020four`).
Comparing test error with the running averages and with recomputed statistics separates the two ways
small batches hurt BN: noisy statistics *during training* and a train/test mismatch of the averages.

Where we deliberately differ from torch: bad inputs raise `ValueError` with a message naming the fix
(torch raises `RuntimeError` from inside its kernels, or only warns for InstanceNorm with a wrong
channel count and `affine=False`).
"""

from __future__ import annotations

import numbers
from typing import Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from .normalization import _HALF, _affine, _opmath, _register_affine, _reset_affine, _shape, mean_var

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "InstanceNorm2d", "GhostBatchNorm2d", "BatchRenorm2d", "SyncBatchNorm",
    "ghost_batch_norm", "batch_renorm", "renorm_schedule", "recompute_batchnorm_stats", "per_worker_reference",
]


def _channel_view(x: Tensor) -> list[int]:
    """Shape that broadcasts a per-channel `(C,)` tensor against `x` with channels at dim 1."""
    return [1, -1] + [1] * (x.dim() - 2)


class _NormBase(nn.Module):
    """Parameters and buffers shared by BatchNorm and InstanceNorm, named and initialised as torch's.

    `weight` ($\\gamma$, ones) and `bias` ($\\beta$, zeros) if `affine`; buffers `running_mean` (zeros),
    `running_var` (ones) and `num_batches_tracked` (long 0) if `track_running_stats`, else registered
    as `None` so the state_dict has exactly torch's keys.
    """

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(num_features, numbers.Integral) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive int "
                             f"(the channel count C of the input), got {num_features!r}")
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        _register_affine(self, num_features, affine, bias, factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean to 0, running variance to 1, batch counter to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset; $\\gamma = 1$, $\\beta = 0$."""
        self.reset_running_stats()
        _reset_affine(self)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Checkpoints older than torch 0.4.1 (state_dict version < 2) lack num_batches_tracked: keep the
        # module's current count (torch >= 2.1 does the same), or 0 if it has none.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                current = self.num_batches_tracked
                keep = current is not None and current.device != torch.device("meta")
                state_dict[key] = current if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_channels(self, x: Tensor, channel_dim: int) -> None:
        if x.shape[channel_dim] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input of shape {_shape(x)} with "
                f"{x.shape[channel_dim]} channels at dim {channel_dim}; set num_features="
                f"{x.shape[channel_dim]} or fix the layer before it")

    @torch.no_grad()
    def update_running_stats(self, mean: Tensor, var: Tensor, n: int, factor: float) -> None:
        r"""$\hat\mu \leftarrow (1-f)\hat\mu + f\mu_B$, $\hat\sigma^2 \leftarrow (1-f)\hat\sigma^2 + f\,\frac{n}{n-1}\sigma_B^2$.

        `mean`, `var`: per-channel batch mean and *biased* variance, shape `(C,)`; `n`: the number of
        values each statistic was computed from (the unbiased correction $n/(n-1)$ is applied here,
        as torch does); `factor` $f$: `momentum`, or $1/t$ for the cumulative average.
        """
        unbiased = var * (n / (n - 1)) if n > 1 else var
        self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var.dtype), alpha=factor)


class _BatchNorm(_NormBase):
    r"""Batch Normalization (Ioffe & Szegedy 2015, arXiv:1502.03167).

    $$y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\,\gamma + \beta,$$

    with $\mu_B, \sigma_B^2$ the mean and biased variance of each channel over the batch (and the
    spatial positions). In training the running estimates move towards the batch statistics,
    $\hat\mu \leftarrow (1-m)\hat\mu + m\mu_B$ and $\hat\sigma^2 \leftarrow (1-m)\hat\sigma^2 +
    m\frac{n}{n-1}\sigma_B^2$ (unbiased, $n$ values per channel); `momentum=None` uses the cumulative
    average $m = 1/t$ at the $t$-th batch. In eval mode the running estimates replace the batch
    statistics, unless the buffers are `None`. As torch: with `track_running_stats` switched off after
    construction, training no longer updates the buffers but eval mode still uses them; an empty batch
    returns an empty output and only advances `num_batches_tracked`; `eps` must be positive when batch
    statistics are used and non-negative otherwise.

    Hooks for variants (`GhostBatchNorm2d`, `BatchRenorm2d` use them): `_check_batch(x)` (what a
    training batch must satisfy), `batch_stats(x)` (the `(mean, var)` of a batch, in any shape
    `normalize` understands), `normalize(x, mean, var)`, `channel_stats(mean, var)` (the per-channel
    `(C,)` statistics that move the running estimates) and `update_running_stats`.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def _check_batch(self, x: Tensor) -> None:
        """torch's rule: a batch with exactly one value per channel has no variance to normalize by."""
        if x.numel() == x.shape[1]:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input of shape "
                f"{_shape(x)}; use a batch of >=2 samples, eval mode, or GroupNorm/LayerNorm")

    def _check_eps(self, use_batch: bool) -> None:
        if use_batch and not self.eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be positive when normalizing with batch "
                             f"statistics (training), got {self.eps}")
        if not self.eps >= 0:
            raise ValueError(f"{type(self).__name__}: eps must be non-negative, got {self.eps}")

    def _check_forward(self, x: Tensor) -> bool:
        """Validate before touching any state; return whether batch statistics are used (as torch:
        in training, and in eval mode when there are no running buffers)."""
        self._check_input_dim(x)
        self._check_channels(x, 1)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        if use_batch:
            self._check_batch(x)
        self._check_eps(use_batch)
        return use_batch

    def _factor(self) -> float:
        """Advance `num_batches_tracked` when training and return the averaging factor (as torch)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel batch mean and biased variance, shape `(1, C, 1, ...)` (two-pass `mean_var`)."""
        return mean_var(x, [0] + list(range(2, x.dim())), keepdim=True)

    def normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        r"""$\gamma\,(x-\mu)/\sqrt{\sigma^2+\epsilon} + \beta$ for channels at dim 1 of `x`."""
        return _affine(self, (x - mean) * torch.rsqrt(var + self.eps), _channel_view(x))

    def channel_stats(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """The per-channel `(C,)` statistics of this batch that move the running estimates."""
        return mean.reshape(-1), var.reshape(-1)

    def _track(self, x: Tensor, mean: Tensor, var: Tensor, factor: float) -> None:
        """Move the running estimates (unless the batch is empty: torch leaves them unchanged)."""
        if x.numel() > 0:
            self.update_running_stats(*self.channel_stats(mean, var), x.numel() // mean.numel(), factor)

    def _tracking(self) -> bool:
        return self.training and self.track_running_stats and self.running_mean is not None

    def forward(self, x: Tensor) -> Tensor:
        use_batch = self._check_forward(x)
        factor = self._factor()
        xf = _opmath(x)
        if use_batch:
            # μ_B = 1/m Σᵢ xᵢ,  σ²_B = 1/m Σᵢ (xᵢ - μ_B)²   per channel, over the batch and positions
            mean, var = self.batch_stats(xf)
        else:
            # μ, σ² = the running estimates μ̂, σ̂²
            mean = self.running_mean.reshape(_channel_view(x)).to(xf.dtype)
            var = self.running_var.reshape(_channel_view(x)).to(xf.dtype)
        # y = γ (x - μ) / √(σ² + ε) + β
        y = self.normalize(xf, mean, var)
        if use_batch and self._tracking():
            # μ̂ ← (1 - m) μ̂ + m μ_B,  σ̂² ← (1 - m) σ̂² + m n/(n-1) σ²_B
            self._track(xf, mean, var, factor)
        return y.to(x.dtype)



class BatchNorm1d(_BatchNorm):
    r"""Batch Normalization over `(N, C)` or `(N, C, L)` inputs (Ioffe & Szegedy 2015).

    $y = \gamma\,(x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon} + \beta$, statistics per channel over $N$
    (and $L$). Same signature, defaults, state_dict and semantics as `torch.nn.BatchNorm1d`.

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(N, C)` or `(N, C, L)`
        - Output: same shape as the input

    Example:
        >>> bn = BatchNorm1d(16)
        >>> bn(torch.randn(8, 16, 20)).shape
        torch.Size([8, 16, 20])
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            hint = "; for (N, C, H, W) use BatchNorm2d" if x.dim() == 4 else ""
            raise ValueError(f"{type(self).__name__} expects (N, C) or (N, C, L) input, got {x.dim()}-D "
                             f"of shape {_shape(x)}{hint}")


class BatchNorm2d(_BatchNorm):
    r"""Batch Normalization over `(N, C, H, W)` inputs (Ioffe & Szegedy 2015).

    $y = \gamma\,(x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon} + \beta$, statistics per channel over
    $N, H, W$. Same signature, defaults, state_dict and semantics as `torch.nn.BatchNorm2d`.

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(N, C, H, W)`
        - Output: same shape as the input

    Example:
        >>> bn = BatchNorm2d(16)
        >>> bn(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            hint = "; for (N, C, L) or (N, C) use BatchNorm1d" if x.dim() in (2, 3) else ""
            raise ValueError(f"{type(self).__name__} expects (N, C, H, W) input, got {x.dim()}-D "
                             f"of shape {_shape(x)}{hint}")


class InstanceNorm2d(_NormBase):
    r"""Instance Normalization (Ulyanov et al. 2016, arXiv:1607.08022).

    $$y_{nchw} = \frac{x_{nchw} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}}\,\gamma_c + \beta_c,$$

    statistics per sample *and* channel over $H, W$: each image's own contrast is removed, which is
    what style transfer wanted. Defaults as torch: `affine=False`, `track_running_stats=False`.
    With `track_running_stats=True`, training updates the running estimates with the batch average of
    the per-instance means and unbiased variances, eval mode uses them, and - unlike BatchNorm -
    `num_batches_tracked` never advances and `momentum=None` leaves the running estimates unchanged
    (torch passes a factor of 0).

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(N, C, H, W)` or unbatched `(C, H, W)`
        - Output: same shape as the input

    Example:
        >>> inorm = InstanceNorm2d(3, affine=True)
        >>> inorm(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (3, 4):
            hint = "; for (N, C, L) inputs use GroupNorm(C, C) or LayerNorm" if x.dim() == 2 else ""
            raise ValueError(f"InstanceNorm2d expects (N, C, H, W) or unbatched (C, H, W) input, "
                             f"got {x.dim()}-D of shape {_shape(x)}{hint}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        self._check_channels(x, x.dim() - 3)
        if x.dim() == 3:
            return self._instance_norm(x.unsqueeze(0)).squeeze(0)
        return self._instance_norm(x)

    def _instance_norm(self, x: Tensor) -> Tensor:
        xf = _opmath(x)
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats:
            hw = x.shape[2] * x.shape[3]
            if hw == 1:
                raise ValueError(f"Expected more than 1 spatial element when training, got input of shape "
                                 f"{_shape(x)}; InstanceNorm of a 1x1 map is 0 - use BatchNorm or GroupNorm")
            # μ_nc = 1/HW Σ_hw x_nchw,  σ²_nc = 1/HW Σ_hw (x_nchw - μ_nc)²   per sample and channel
            mean, var = mean_var(xf, (2, 3), keepdim=True)
            if self.running_mean is not None:  # torch updates the buffers whenever they exist
                factor = self.momentum if self.momentum is not None else 0.0
                # μ̂ ← (1 - m) μ̂ + m mean_n(μ_nc),  σ̂² ← (1 - m) σ̂² + m mean_n(HW/(HW-1) σ²_nc)
                self.update_running_stats(mean.mean(dim=(0, 2, 3)), var.mean(dim=(0, 2, 3)), hw, factor)
        else:
            # μ, σ² = the running estimates μ̂, σ̂²
            mean = self.running_mean.reshape(1, -1, 1, 1).to(xf.dtype)
            var = self.running_var.reshape(1, -1, 1, 1).to(xf.dtype)
        # y = γ_c (x - μ) / √(σ² + ε) + β_c
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return _affine(self, y, (1, -1, 1, 1)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Per-worker BatchNorm and Batch Renormalization: the same forward, other statistics
# ---------------------------------------------------------------------------------------------------


class GhostBatchNorm2d(BatchNorm2d):
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

    Everything else - eval mode, attribute changes, empty batches, half-precision inputs, state_dict -
    is normlab's `BatchNorm2d`, whose `batch_stats`, `normalize` and `channel_stats` hooks this class
    overrides.

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(k N, C, H, W)`
        - Output: same shape as the input

    Example:
        >>> gbn = GhostBatchNorm2d(16, num_workers=4)
        >>> gbn(torch.randn(8, 16, 5, 5)).shape  # 4 workers of 2 images
        torch.Size([8, 16, 5, 5])
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

    def precise_bn_overrides(self) -> dict:
        """Attributes under which this layer normalizes a batch as one plain BatchNorm2d would
        (`recompute_batchnorm_stats` sets them while it re-estimates the statistics)."""
        return {"num_workers": 1}

    def _check_batch(self, x: Tensor) -> None:
        b, k = x.shape[0], self.num_workers
        if b % k != 0:
            raise ValueError(f"batch of {b} cannot be split over {k} workers; use a multiple of num_workers "
                             "(the trainer drops the last incomplete batch)")
        if x.numel() == k * x.shape[1]:
            raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                             f"{_shape(x)}: each of the {k} workers sees 1 value per channel; use batches of "
                             f">=2 samples per worker, eval mode, or GroupNorm")

    def _workers(self, x: Tensor) -> Tensor:
        """`x` viewed as `(k, N, C, H, W)`: worker g holds images g*N .. (g+1)*N - 1."""
        return x.reshape(self.num_workers, x.shape[0] // self.num_workers, *x.shape[1:])

    def batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-worker mean and biased variance of `x` viewed as (k, N, C, H, W); shapes (k, 1, C, 1, 1).

        Two-pass (centered) variance, as every normlab norm computes it (`normlab.norms.mean_var`).
        """
        return mean_var(self._workers(x), (1, 3, 4))

    def normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        if mean.dim() == x.dim():  # the running averages: plain BatchNorm2d
            return super().normalize(x, mean, var)
        # x̂ = (x - μ_g) / √(σ²_g + ε)   with worker g's own statistics
        x_hat = ((self._workers(x) - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        # y = γ_c x̂ + β_c
        return _affine(self, x_hat, _channel_view(x))

    def channel_stats(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """"mean": average the workers' statistics; "worker0": the first worker's (shapes (C,))."""
        mean, var = mean.reshape(mean.shape[0], -1), var.reshape(var.shape[0], -1)  # (k, C)
        if self.running_stats == "worker0":
            return mean[0], var[0]
        return mean.mean(0), var.mean(0)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "fused" and self.training:
            return self._forward_fused(x)
        return super().forward(x)

    def _forward_fused(self, x: Tensor) -> Tensor:
        self._check_forward(x)
        factor = self._factor()
        b, c, h, w = x.shape
        k, n = self.num_workers, x.shape[0] // self.num_workers
        xr = x if k == 1 else self._workers(x).transpose(0, 1).reshape(n, k * c, h, w)
        weight = bias = None
        if self.weight is not None:
            weight = self.weight.repeat(k)
        if self.bias is not None:
            bias = self.bias.repeat(k)
        track = self._tracking() and x.numel() > 0
        # momentum=1 makes the kernel write this batch's per-(worker, channel) mean and *unbiased*
        # variance into the scratch buffers, which `_track` then combines over workers
        stat_dtype = torch.float32 if x.dtype in _HALF else x.dtype
        mean_buf = torch.zeros(k * c, device=x.device, dtype=stat_dtype) if track else None
        var_buf = torch.ones(k * c, device=x.device, dtype=stat_dtype) if track else None
        y = torch.nn.functional.batch_norm(xr, mean_buf, var_buf, weight, bias, True, 1.0, self.eps)
        if track:
            count = x.numel() // (k * c)  # undo the unbiasing: `update_running_stats` applies it again
            self._track(x, mean_buf.view(k, c), var_buf.view(k, c) * ((count - 1) / count), factor)
        return y if k == 1 else y.view(n, k, c, h, w).transpose(0, 1).reshape(b, c, h, w)


class BatchRenorm2d(GhostBatchNorm2d):
    """Per-worker Batch Renormalization; `r_max`, `d_max` may be changed during training.

    Args:
        num_features: channels C.
        num_workers: k (a batch of k*N is normalized as k chunks of N); 1 is single-device.
        r_max: clip of the scale correction r to [1/r_max, r_max]; must be >= 1.
        d_max: clip of the shift correction d to [-d_max, d_max]; must be >= 0.
        other arguments: as in `GhostBatchNorm2d` (the "formula" implementation is always used).

    Only `normalize` differs from `GhostBatchNorm2d`, and only in training with running averages.

    Under `torch.compile` (torch 2.14, the default min-cut partitioner) training gives the right output
    and buffers but a wrong gradient for `weight`: the backward recomputes $d$ from `running_mean`
    after this step's in-place update. Train it eagerly (or compile with
    `backend="aot_eager_default_partitioner"`, which saves $d$); eval mode compiles correctly.

    Not scriptable by `torch.jit.script`; `torch.compile(layer, fullgraph=True)` is the supported compiler.

    Shape:
        - Input: `(k N, C, H, W)`
        - Output: same shape as the input

    Example:
        >>> brn = BatchRenorm2d(16, num_workers=2, r_max=1.5, d_max=0.5)
        >>> brn(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
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

    def normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        if mean.dim() == x.dim() or self.running_mean is None:  # eval, or nothing to renormalize towards
            return super().normalize(x, mean, var)
        c = x.shape[1]
        # σ_B = √(σ²_B + ε), per worker
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():  # r and d are constants for backprop
            run_mean = self.running_mean.view(1, 1, c, 1, 1).to(x.dtype)
            # σ = √(σ̂² + ε)
            run_std = torch.sqrt(self.running_var.view(1, 1, c, 1, 1).to(x.dtype) + self.eps)
            # r = sg(clip(σ_B / σ, 1/r_max, r_max))
            r = (std / run_std).clamp(1.0 / self.r_max, self.r_max)
            # d = sg(clip((μ_B - μ) / σ, -d_max, d_max))
            d = ((mean - run_mean) / run_std).clamp(-self.d_max, self.d_max)
        # x̂ = (x - μ_B) / σ_B · r + d
        x_hat = ((self._workers(x) - mean) / std * r + d).reshape(x.shape)
        # y = γ x̂ + β
        return _affine(self, x_hat, _channel_view(x))


class _AllReduceSum(torch.autograd.Function):
    r"""$y = \sum_p x_p$ on every process; backward: $\partial\ell/\partial x_p = \sum_q \partial\ell_q/\partial y$
    (every process's loss depends on the sum, so the gradient terms are all-reduced as well)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(_BatchNorm):
    r"""BatchNorm whose statistics are those of the whole process group's batch (torch.nn.SyncBatchNorm).

    With $P$ data-parallel processes holding $m_p$ values of a channel each, the statistics are those
    of the concatenated batch, computed in two passes, each one all-reduce:

    $$ m = \sum_p m_p, \quad \mu = \frac{1}{m}\sum_p \sum_{i \in p} x_i, \qquad
       \sigma^2 = \frac{1}{m} \sum_p \sum_{i \in p} (x_i - \mu)^2 $$

    (centered sums of squares, never $\mathbb{E}[x^2] - \mu^2$). The all-reduces are autograd
    functions (`_AllReduceSum`), so the backward pass all-reduces the
    gradient terms $\sum \partial\ell/\partial\mu$ and $\sum \partial\ell/\partial\sigma^2$ as well: every
    process gets the input gradient that BatchNorm on the global batch would give its slice. Uneven
    per-process batches and a process with an empty batch are fine; the running estimates move with
    the global statistics, identically on every process. Eval mode uses the running estimates and
    communicates nothing. Unlike torch's, it runs on CPU (gloo) as well as CUDA (NCCL); without an
    initialized process group it is plain `BatchNorm` over the local batch.

    Shape:
        - Input: $(N, C, *)$, output the same.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> SyncBatchNorm.convert_sync_batchnorm(model)[1]  # every BatchNorm, before wrapping in DDP
        SyncBatchNorm(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self._global_count = 0

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, *) input with at least 2 dims, got shape {_shape(x)}")

    def _check_batch(self, x: Tensor) -> None:
        pass  # only the global batch can be judged: batch_stats checks it

    def _all_reduce(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return t
        return _AllReduceSum.apply(t, self.process_group or dist.group.WORLD)

    def batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and biased variance over the whole group's batch, shape `(1, C, 1, ...)`: two all-reduces."""
        dims = [0] + list(range(2, x.dim()))
        view = _channel_view(x)
        # m = Σ_p m_p  and  Σ_p Σ_i x_i   in one all-reduce
        local = torch.cat([x.new_full((1,), x.numel() // x.shape[1]), x.sum(dims)])
        total = self._all_reduce(local)
        count = int(total[0].item())
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} over the whole "
                             f"process group (this process: input of shape {_shape(x)}); use larger batches")
        self._global_count = count
        # μ = Σ x / m
        mean = (total[1:] / count).reshape(view)
        # σ² = Σ_p Σ_i (x_i - μ)² / m
        var = (self._all_reduce((x - mean).square().sum(dims)) / count).reshape(view)
        return mean, var

    def _track(self, x: Tensor, mean: Tensor, var: Tensor, factor: float) -> None:
        """Every process moves its running estimates with the global statistics (even with an empty batch)."""
        self.update_running_stats(*self.channel_stats(mean, var), self._global_count, factor)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """`module` with every BatchNorm (torch's or normlab's, 1-D/2-D/3-D) replaced by a `SyncBatchNorm`
        holding the same parameters and buffers (torch.nn.SyncBatchNorm.convert_sync_batchnorm)."""
        out = module
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm)) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


def ghost_batch_norm(num_workers: int, **kwargs) -> Callable[[int], GhostBatchNorm2d]:
    """A `norm_layer` factory for `CIFARResNet`: `GhostBatchNorm2d(channels, num_workers, **kwargs)`."""
    def norm_layer(num_features: int) -> GhostBatchNorm2d:
        return GhostBatchNorm2d(num_features, num_workers=num_workers, **kwargs)
    return norm_layer


def batch_renorm(num_workers: int, **kwargs) -> Callable[[int], BatchRenorm2d]:
    """A `norm_layer` factory for `CIFARResNet`: `BatchRenorm2d(channels, num_workers, **kwargs)`."""
    def norm_layer(num_features: int) -> BatchRenorm2d:
        return BatchRenorm2d(num_features, num_workers=num_workers, **kwargs)
    return norm_layer


def renorm_schedule(r_max: float, d_max: float, hold: float = 0.05, ramp: float = 0.2) -> Callable:
    """A trainer hook (`Trainer(hooks=[renorm_schedule(...)])`): BatchNorm (r_max=1, d_max=0) for the
    first `hold` of the steps, then both limits grow linearly to `r_max`, `d_max` over the next `ramp`
    of the steps (the paper's gradual relaxation, as fractions of training). Called between backward
    and the optimizer step, it sets the limits for the *next* step of every `BatchRenorm2d`."""
    if not (hold >= 0 and ramp >= 0 and hold + ramp <= 1):
        raise ValueError(f"need hold, ramp >= 0 and hold + ramp <= 1, got {hold}, {ramp}")

    def limits(step: int, total_steps: int) -> tuple[float, float]:
        t = (step / total_steps - hold) / ramp if ramp > 0 else float(step / total_steps >= hold)
        t = min(max(t, 0.0), 1.0)
        return 1.0 + t * (r_max - 1.0), t * d_max

    def hook(trainer) -> None:
        r, d = limits(trainer.step + 1, trainer.total_steps)
        for m in trainer.model.modules():
            if isinstance(m, BatchRenorm2d):
                m.set_limits(r, d)

    hook.limits = limits  # for tests and plots
    return hook


# ---------------------------------------------------------------------------------------------------
# Precise BN
# ---------------------------------------------------------------------------------------------------

#: Norms that keep torch.nn's running statistics, buffers and momentum: torch's BatchNorms and normlab's.
_RUNNING_STAT_NORMS = (nn.modules.batchnorm._BatchNorm, _NormBase)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _RUNNING_STAT_NORMS)]


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, batches: Iterable[Tensor]) -> int:
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


def per_worker_reference(x: Tensor, bns: Sequence[nn.Module]) -> Tensor:
    """Reference for tests and the chapter: k separate `nn.BatchNorm2d` calls on k chunks of the batch."""
    return torch.cat([bn(chunk) for bn, chunk in zip(bns, x.chunk(len(bns)))])
