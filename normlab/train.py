"""A small, fast image-classification trainer: the dataset as tensors on the device, whole-batch augmentation.

What makes it fast is what it does *not* do: no `DataLoader`, no per-sample Python. The images stay
uint8 on the device, zero-padded once; each step applies the standard CIFAR augmentation (He et al.
{cite}`he2016deep`: pad 4, random 32x32 crop, random horizontal flip) to a whole batch with a single
advanced-indexing gather from the padded set (batching, crop and flip in one op), then converts to
float and normalizes per channel.

The optimizer is SGD with momentum and weight decay, the learning rate follows a per-step schedule
(`"cosine"` {cite}`loshchilov2017sgdr`, `"step"` at epoch milestones, or `"constant"`) after an optional
linear warmup {cite}`goyal2017accurate`. Everything random (initialization is the caller's) is drawn
from one seeded `torch.Generator`, so the same seed gives the same history on CPU.

`Trainer(model, data, config).fit()` returns the per-epoch history; `after_backward(model, step)` is
called between `loss.backward()` and `optimizer.step()` (gradient clipping, logging gradient norms).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

@dataclass
class TrainConfig:
    """Optimization settings of one training run (JSON-able via `dataclasses.asdict`)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine"            # "cosine" | "step" | "constant"
    milestones: Sequence[float] = (0.5, 0.75)  # "step": fractions of training where lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    augment: bool = True                # pad-4 random crop + horizontal flip
    padding: int = 4
    eval_every: int = 1                 # evaluate the test set every k epochs (and always at the end)
    eval_batch_size: int = 1000
    seed: int = 0
    drop_last: bool = True              # per-worker BatchNorm needs equal-sized batches
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the history

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("need lr > 0, weight_decay >= 0 and 0 <= momentum < 1")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.eval_every < 1:
            raise ValueError("eval_every must be >= 1")


# ----------------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------------

def random_crop_flip(images: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Pad by `padding` zeros, take a random HxW window per image, flip half the images left-right.

    Vectorized: one `F.pad` of the batch, then `crop_flip_gather` (a single advanced-indexing gather
    that does crop and flip at once). Random numbers come from `generator` on the CPU, so results do
    not depend on the device's RNG.
    """
    if images.dim() != 4:
        raise ValueError(f"random_crop_flip expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    b = images.shape[0]
    dy, dx, do_flip = _crop_flip_params(b, padding, generator, images.device, flip)
    padded = F.pad(images, (padding,) * 4) if padding > 0 else images
    return crop_flip_gather(padded, None, dy, dx, do_flip, padding)


def crop_flip_gather(padded: torch.Tensor, idx: torch.Tensor | None, dy: torch.Tensor, dx: torch.Tensor,
                     do_flip: torch.Tensor, padding: int) -> torch.Tensor:
    """`out[b, c, i, j] = padded[idx[b], c, dy[b] + i, dx[b] + j']`, with `j' = W-1-j` where `do_flip[b]`.

    `padded` holds images padded by `padding` on each side (the whole dataset, padded once, in the
    trainer); `idx=None` means `padded` is already the batch. One gather does crop, flip and batching.
    """
    n, c, hp, wp = padded.shape
    h, w = hp - 2 * padding, wp - 2 * padding
    dev = padded.device
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = (dy[:, None] + ar_h)[:, None, :, None]                                      # (B,1,H,1)
    cols = (dx[:, None] + torch.where(do_flip[:, None], w - 1 - ar_w, ar_w))[:, None, None, :]  # (B,1,1,W)
    bidx = (torch.arange(len(dy), device=dev) if idx is None else idx)[:, None, None, None]
    cidx = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bidx, cidx, rows, cols]


def _crop_flip_params(b: int, padding: int, generator: torch.Generator | None, device: torch.device,
                      flip: bool = True):
    r = torch.randint(0, 2 * (2 * padding + 1), (3, b), generator=generator)  # one RNG call per batch
    dy, dx = r[0] % (2 * padding + 1), r[1] % (2 * padding + 1)
    do_flip = (r[2] % 2 == 1) & flip
    return dy.to(device), dx.to(device), do_flip.to(device)


def random_crop_flip_reference(images: torch.Tensor, generator: torch.Generator | None = None,
                               padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-sample loop with the same random draws as `random_crop_flip` (for tests only; slow)."""
    b, c, h, w = images.shape
    dy, dx, do_flip = _crop_flip_params(b, padding, generator, images.device, flip)
    out = []
    for i in range(b):
        img = F.pad(images[i], (padding,) * 4)[:, int(dy[i]): int(dy[i]) + h, int(dx[i]): int(dx[i]) + w]
        out.append(img.flip(2) if bool(do_flip[i]) else img)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------
# learning-rate schedule and evaluation
# ----------------------------------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup, then the schedule."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return config.lr * config.gamma ** sum(progress >= m for m in config.milestones)
    return config.lr


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
             std: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Test loss and error (percent) in eval mode; `images` uint8 (B, C, H, W) on the model's device."""
    was_training = model.training
    model.eval()
    loss_sum, wrong = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = (images[i: i + batch_size].float() - mean) / std
        y = labels[i: i + batch_size]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        wrong += (logits.argmax(1) != y).sum().item()
    model.train(was_training)
    n = max(1, len(images))
    return {"loss": loss_sum / n, "error": 100.0 * wrong / n}


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images (B, C, H, W) as (1, C, 1, 1) float32 tensors.

    Two passes in float64 over chunks, so the whole set is never converted to float at once.
    """
    n = images.shape[0] * images.shape[2] * images.shape[3]
    total = sum(x.double().sum(dim=(0, 2, 3)) for x in images.split(chunk))
    mean = total / n
    sq = sum((x.double() - mean[None, :, None, None]).square().sum(dim=(0, 2, 3)) for x in images.split(chunk))
    std = (sq / max(1, n - 1)).sqrt()
    return mean.float().reshape(1, -1, 1, 1), std.float().reshape(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------

class Trainer:
    """Train `model` on uint8 image tensors with SGD; see the module docstring.

    Args:
        model: any `nn.Module` mapping (B, C, H, W) floats to logits; moved to `device`.
        train_images, train_labels: uint8 (N, C, H, W) and int64 (N,), any device (moved once).
        config: `TrainConfig`.
        test_images, test_labels: optional evaluation set (evaluated every `config.eval_every` epochs).
        mean, std: per-channel normalization (uint8 scale); default: the training set's statistics.
        param_groups: optional optimizer parameter groups (e.g. no weight decay on gains); default all.
        after_backward: `fn(model, step)` called after `backward()` and before `optimizer.step()`.
        device: default: the model's device.
    """

    def __init__(self, model: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                 config: TrainConfig, test_images: torch.Tensor | None = None,
                 test_labels: torch.Tensor | None = None, mean: Sequence[float] | torch.Tensor | None = None,
                 std: Sequence[float] | torch.Tensor | None = None, param_groups: list[dict] | None = None,
                 after_backward: Callable[[nn.Module, int], None] | None = None,
                 device: str | torch.device | None = None):
        config.validate()
        if train_images.dtype != torch.uint8 or train_images.dim() != 4:
            raise ValueError("train_images must be a uint8 tensor (N, C, H, W); convert with .to(torch.uint8)")
        if len(train_images) != len(train_labels):
            raise ValueError(f"{len(train_images)} images but {len(train_labels)} labels")
        if config.drop_last and len(train_images) < config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train_images)} training images")
        if (test_images is None) != (test_labels is None):
            raise ValueError("give both test_images and test_labels, or neither")
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.config = config
        self.x = train_images.to(self.device)
        self.y = train_labels.to(self.device)
        # pad the whole training set once, so each step's crop+flip+batching is a single gather
        self.x_padded = F.pad(self.x, (config.padding,) * 4) if config.augment else None
        self.test = None if test_images is None else (test_images.to(self.device), test_labels.to(self.device))
        if mean is None or std is None:
            m, s = channel_stats(self.x)
            mean = m if mean is None else mean
            std = s if std is None else std
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).reshape(1, -1, 1, 1)
        self.after_backward = after_backward
        self.optimizer = torch.optim.SGD(param_groups if param_groups is not None else model.parameters(),
                                         lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                         weight_decay=config.weight_decay)
        for g in self.optimizer.param_groups:  # schedules scale each group's own base lr
            g.setdefault("base_lr", g["lr"])
            g["lr_scale"] = g["base_lr"] / config.lr
        self.generator = torch.Generator().manual_seed(config.seed)
        n = len(self.x)
        self.steps_per_epoch = n // config.batch_size if config.drop_last else math.ceil(n / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.step_count = 0
        self.history: list[dict[str, Any]] = []

    def batches(self) -> Iterator[torch.Tensor]:
        """Index tensors of one epoch: a seeded permutation cut into batches."""
        perm = torch.randperm(len(self.x), generator=self.generator).to(self.device)
        for i in range(self.steps_per_epoch):
            yield perm[i * self.config.batch_size: (i + 1) * self.config.batch_size]

    def prepare(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather, augment (on uint8, so padding is black as in torchvision) and normalize a batch."""
        if self.config.augment:
            dy, dx, flip = _crop_flip_params(len(idx), self.config.padding, self.generator, self.device)
            x = crop_flip_gather(self.x_padded, idx, dy, dx, flip, self.config.padding)
        else:
            x = self.x[idx]
        return (x.float() - self.mean) / self.std, self.y[idx]

    def train_step(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on the samples `idx`; returns (summed loss, number wrong) as 0-d tensors (no sync)."""
        lr = lr_at(self.step_count, self.total_steps, self.steps_per_epoch, self.config)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = self.prepare(idx)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(self.model, self.step_count)
        self.optimizer.step()
        self.step_count += 1
        with torch.no_grad():
            return loss.detach() * len(y), (logits.argmax(1) != y).sum()

    def train_epoch(self, max_steps: int | None = None, bar=None) -> dict[str, float]:
        """One pass over the (permuted) training set; returns mean train loss and train error (%)."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        wrong = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        for i, idx in enumerate(self.batches()):
            if max_steps is not None and i >= max_steps:
                break
            loss, w = self.train_step(idx)
            loss_sum += loss
            wrong += w
            seen += len(idx)
            if bar is not None:
                bar.update(1)
        train_loss = loss_sum.item() / max(1, seen)
        return {"train_loss": train_loss, "train_error": 100.0 * wrong.item() / max(1, seen)}

    def evaluate(self) -> dict[str, float]:
        if self.test is None:
            return {}
        r = evaluate(self.model, *self.test, self.mean, self.std, self.config.eval_batch_size)
        return {"test_loss": r["loss"], "test_error": r["error"]}

    def fit(self, progress: bool = False, desc: str = "train") -> list[dict[str, Any]]:
        """Train for `config.epochs`; returns the per-epoch history (also kept in `self.history`).

        Stops early (recording `"diverged": True`) if the training loss becomes NaN or infinite.
        """
        from tqdm import tqdm  # not tqdm.auto: no widget warnings in notebooks (bars are off there)

        t0 = time.perf_counter()
        with tqdm(total=self.total_steps, desc=desc, disable=not progress, leave=False) as bar:
            for epoch in range(1, self.config.epochs + 1):
                row: dict[str, Any] = {"epoch": epoch, "step": 0,
                                       "lr": lr_at(self.step_count, self.total_steps, self.steps_per_epoch, self.config)}
                row.update(self.train_epoch(bar=bar))
                row["step"] = self.step_count
                diverged = not math.isfinite(row["train_loss"])
                if diverged or epoch % self.config.eval_every == 0 or epoch == self.config.epochs:
                    row.update(self.evaluate())
                row["time_s"] = round(time.perf_counter() - t0, 2)
                if diverged:
                    row["diverged"] = True
                self.history.append(row)
                bar.set_postfix({k: round(v, 3) for k, v in row.items() if k in ("train_loss", "test_error")})
                if diverged:
                    break
        return self.history


def fit(model: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor, config: TrainConfig,
        test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
        progress: bool = False, **kwargs) -> list[dict[str, Any]]:
    """Shortcut: `Trainer(model, ..., config, ...).fit(progress)`; returns the history."""
    trainer = Trainer(model, train_images, train_labels, config, test_images, test_labels, **kwargs)
    return trainer.fit(progress=progress)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """`TrainConfig` as a JSON-able dict (tuples become lists)."""
    d = asdict(config)
    d["milestones"] = list(d["milestones"])
    return d
