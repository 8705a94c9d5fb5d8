"""What the trainer trains on: image classification and character-level language modelling, as tensors.

A task holds its whole dataset as tensors on the training device and turns indices (or a batch size)
into a batch with a few vectorized ops: no `DataLoader`, no per-sample Python. Both tasks draw every
random number from the generator the trainer hands them, so a seed fixes the batches.

- `ImageClassification`: uint8 images (N, C, H, W), zero-padded once; each batch is gathered, cropped
  and flipped in a single advanced-indexing op (the standard CIFAR augmentation of He et al.
  {cite}`he2016deep`: pad 4, random crop, random horizontal flip), then converted to float and
  normalized per channel. The trainer samples it in epochs (a seeded permutation cut into batches).
  Evaluation: `test_loss` and `test_error` (percent) in eval mode, and `val_loss`, `val_error` on
  a validation set if one is given (held out of the training images, for choosing hyperparameters).
- `CharLM`: a token stream split into training and validation text; each batch is `batch_size`
  windows at random offsets (targets shifted by one). Sampled in steps. Evaluation: `val_loss`
  (nats per token) on fixed, evenly spaced validation windows.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
    dy, dx, do_flip = crop_flip_params(images.shape[0], padding, generator, images.device, flip)
    padded = F.pad(images, (padding,) * 4) if padding > 0 else images
    return crop_flip_gather(padded, None, dy, dx, do_flip, padding)


def crop_flip_gather(padded: torch.Tensor, idx: torch.Tensor | None, dy: torch.Tensor, dx: torch.Tensor,
                     do_flip: torch.Tensor, padding: int) -> torch.Tensor:
    """`out[b, c, i, j] = padded[idx[b], c, dy[b] + i, dx[b] + j']`, with `j' = W-1-j` where `do_flip[b]`.

    `padded` holds images padded by `padding` on each side (the whole dataset, padded once);
    `idx=None` means `padded` is already the batch. One gather does crop, flip and batching.
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


def crop_flip_params(b: int, padding: int, generator: torch.Generator | None, device: torch.device,
                     flip: bool = True):
    """Offsets `dy`, `dx` in [0, 2*padding] and flip flags for `b` images, from one RNG call."""
    r = torch.randint(0, 2 * (2 * padding + 1), (3, b), generator=generator)
    dy, dx = r[0] % (2 * padding + 1), r[1] % (2 * padding + 1)
    do_flip = (r[2] % 2 == 1) & flip
    return dy.to(device), dx.to(device), do_flip.to(device)


def random_crop_flip_reference(images: torch.Tensor, generator: torch.Generator | None = None,
                               padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-sample loop with the same random draws as `random_crop_flip` (for tests only; slow)."""
    b, c, h, w = images.shape
    dy, dx, do_flip = crop_flip_params(b, padding, generator, images.device, flip)
    out = []
    for i in range(b):
        img = F.pad(images[i], (padding,) * 4)[:, int(dy[i]): int(dy[i]) + h, int(dx[i]): int(dx[i]) + w]
        out.append(img.flip(2) if bool(do_flip[i]) else img)
    return torch.stack(out)


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
# tasks
# ----------------------------------------------------------------------------------------------------

class ImageClassification:
    """Images and labels as tensors; batches by index, augmented on the device; error in percent.

    Args:
        train_images, train_labels: uint8 (N, C, H, W) and int64 (N,).
        test_images, test_labels: optional evaluation set (both or neither).
        val_images, val_labels: optional validation set (both or neither), evaluated like the test set.
        augment: pad-`padding` random crop + horizontal flip of every training batch.
        mean, std: per-channel normalization on the uint8 scale; default: the training set's.
        eval_batch_size: images per forward pass when evaluating.
    """

    num_train: int
    train_metrics = ("train_loss", "train_error")

    def __init__(self, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor | None = None, test_labels: torch.Tensor | None = None, *,
                 augment: bool = True, padding: int = 4, mean: Sequence[float] | torch.Tensor | None = None,
                 std: Sequence[float] | torch.Tensor | None = None, eval_batch_size: int = 1000,
                 val_images: torch.Tensor | None = None, val_labels: torch.Tensor | None = None):
        if train_images.dtype != torch.uint8 or train_images.dim() != 4:
            raise ValueError("train_images must be a uint8 tensor (N, C, H, W); convert with .to(torch.uint8)")
        if len(train_images) != len(train_labels):
            raise ValueError(f"{len(train_images)} images but {len(train_labels)} labels")
        if (test_images is None) != (test_labels is None):
            raise ValueError("give both test_images and test_labels, or neither")
        if (val_images is None) != (val_labels is None):
            raise ValueError("give both val_images and val_labels, or neither")
        if val_images is not None and len(val_images) != len(val_labels):
            raise ValueError(f"{len(val_images)} validation images but {len(val_labels)} labels")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.x, self.y = train_images, train_labels
        self.test = None if test_images is None else (test_images, test_labels)
        self.val = None if val_images is None else (val_images, val_labels)
        self.augment, self.padding, self.eval_batch_size = augment, padding, eval_batch_size
        if mean is None or std is None:
            m, s = channel_stats(train_images)
            mean = m if mean is None else mean
            std = s if std is None else std
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.num_train = len(train_images)
        self.x_padded = None
        self.memory_format = torch.contiguous_format

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        """Move the data to `device` once; batches come out in `memory_format`."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        if self.test is not None:
            self.test = (self.test[0].to(device), self.test[1].to(device))
        if self.val is not None:
            self.val = (self.val[0].to(device), self.val[1].to(device))
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        # pad the whole training set once, so each step's crop+flip+batching is a single gather
        self.x_padded = F.pad(self.x, (self.padding,) * 4) if self.augment else None
        self.memory_format = memory_format
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float, $(x - \\mu_c) / \\sigma_c$ per channel, in the task's memory format."""
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def batch(self, idx: torch.Tensor, generator: torch.Generator,
              shard: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather, augment (on uint8, so padding is black as in torchvision) and normalize a batch.

        `shard` keeps part of it (a data-parallel worker's): the random draws are those of the whole
        batch, so k workers together see exactly the batch one process would.
        """
        if self.augment:
            dy, dx, flip = crop_flip_params(len(idx), self.padding, generator, self.x.device)
            idx, dy, dx, flip = idx[shard], dy[shard], dx[shard], flip[shard]
            x = crop_flip_gather(self.x_padded, idx, dy, dx, flip, self.padding)
        else:
            idx = idx[shard]
            x = self.x[idx]
        return self.normalize(x), self.y[idx]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """`test_loss` and `test_error` (percent) in eval mode, and `val_loss`, `val_error` with a
        validation set; empty without either."""
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        for name, split in (("test", self.test), ("val", self.val)):
            if split is None:
                continue
            images, labels = split
            loss_sum, wrong = 0.0, 0
            for i in range(0, len(images), self.eval_batch_size):
                logits = model(self.normalize(images[i: i + self.eval_batch_size])).float()
                y = labels[i: i + self.eval_batch_size]
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                wrong += (logits.argmax(1) != y).sum().item()
            n = max(1, len(images))
            out.update({f"{name}_loss": loss_sum / n, f"{name}_error": 100.0 * wrong / n})
        model.train(was_training)
        return out

    def describe(self) -> dict:
        d = {"task": "images", "n_train": self.num_train, "n_test": 0 if self.test is None else len(self.test[1]),
             "shape": list(self.x.shape[1:])}
        if self.val is not None:  # only then: checkpoints of runs without one keep their fingerprint
            d["n_val"] = len(self.val[1])
        return d


class CharLM:
    """Next-token prediction on a token stream: random training windows, fixed validation windows.

    Args:
        train_ids, val_ids: int64 token ids (1-D), e.g. from `normlab.data.char_split`.
        context: window length T (inputs `ids[i:i+T]`, targets `ids[i+1:i+T+1]`).
        eval_windows: number of evenly spaced validation windows (the same for every run).
        eval_batch_size: windows per forward pass when evaluating.
    """

    num_train = None  # sampled in steps, not epochs
    train_metrics = ("train_loss",)

    def __init__(self, train_ids: torch.Tensor, val_ids: torch.Tensor, context: int, eval_windows: int = 256,
                 eval_batch_size: int = 64):
        for name, t in (("train_ids", train_ids), ("val_ids", val_ids)):
            if t.dim() != 1 or t.dtype != torch.int64:
                raise ValueError(f"{name} must be a 1-D int64 tensor of token ids, got {t.dtype} {tuple(t.shape)}")
            if len(t) < context + 2:
                raise ValueError(f"{name} has {len(t)} tokens, fewer than context + 2 = {context + 2}")
        self.train_ids, self.context, self.eval_batch_size = train_ids, context, eval_batch_size
        starts = torch.linspace(0, len(val_ids) - context - 1, eval_windows).long()
        self.val = val_ids[starts[:, None] + torch.arange(context + 1)]
        self.device = torch.device("cpu")

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        self.train_ids, self.val, self.device = self.train_ids.to(device), self.val.to(device), device
        return self

    def batch(self, batch_size: int, generator: torch.Generator,
              shard: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` windows at random offsets: inputs `ids[i:i+T]`, targets `ids[i+1:i+T+1]`
        (`shard`: a data-parallel worker's part of them)."""
        starts = torch.randint(0, len(self.train_ids) - self.context - 1, (batch_size,), generator=generator)[shard]
        windows = self.train_ids[starts.to(self.device)[:, None] + torch.arange(self.context + 1, device=self.device)]
        return windows[:, :-1], windows[:, 1:]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean validation cross-entropy `val_loss` (nats per token) over the fixed windows."""
        was_training = model.training
        model.eval()
        total = 0.0
        for chunk in self.val.split(self.eval_batch_size):
            logits = model(chunk[:, :-1]).float()
            total += F.cross_entropy(logits.flatten(0, -2), chunk[:, 1:].flatten(), reduction="sum").item()
        model.train(was_training)
        return {"val_loss": total / self.val[:, 1:].numel()}

    def describe(self) -> dict:
        return {"task": "tokens", "n_train": len(self.train_ids), "n_val_windows": len(self.val),
                "context": self.context}
