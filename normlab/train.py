"""The book's one training loop: images and tokens, budgets, schedules, hooks, precision, checkpoints.

`Trainer(model, task, config, hooks=...).fit()` trains `model` on a task of `normlab.tasks`
(`ImageClassification` or `CharLM`) and returns its history, one row per epoch (a budget in epochs) or
per `log_every` steps (a budget in steps). What it does per step, in order:

1. the batch: the next slice of a seeded per-epoch permutation (images) or random windows (tokens),
   gathered and augmented on the device by the task;
2. the learning rate of `lr_at`: a linear warmup {cite}`goyal2017accurate`, then `"cosine"`
   {cite}`loshchilov2017sgdr`, `"linear"` decay to zero, `"step"` (times `gamma` at fractions of
   training) or `"constant"`, for every parameter group in proportion to its own base rate;
3. forward and cross-entropy under the configured precision (`"fp32"`, or `"bf16"` autocast) and
   memory format (`"channels_last"` for convolutional nets);
4. `backward()`, then every hook `hook(trainer)` (gradient clipping, AGC, limits schedules, probes:
   a hook reads `trainer.model`, `trainer.step`, `trainer.total_steps`, and adds to the current history
   row with `trainer.log_mean(name, value)`), then the optimizer step (SGD with momentum and optional
   Nesterov, or AdamW).

A non-finite training loss stops the run; its last row says `"diverged": True` and every non-finite
number in it is `None`. Everything random is drawn from one seeded `torch.Generator` (initialization
is the caller's), so the same seed gives the same history on CPU.

**Checkpoints.** With `checkpoint=PATH`, the trainer saves model, optimizer, schedule position, the
epoch's permutation and position in it, RNG states and history atomically (temporary file + rename)
at the end of every row and every `checkpoint_every_s` seconds, and `fit()` resumes from `PATH` when
it exists. A run killed at any point and resumed gives, in fp32 on CPU, the same metrics bit for bit
as one never interrupted. Checkpoints load with `torch.load(weights_only=True)`; one that is
unreadable or belongs to another run raises an error naming the file.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .tasks import CharLM, ImageClassification

Hook = Callable[["Trainer"], None]

#: The fastest (precision, memory format) per norm for the book's conv nets on a CPU with AVX-512 BF16
#: (ResNet-20, 32x32, fwd+bwd+SGD; recorded by the `trainer_speed` experiment): plain BN runs fastest
#: channels_last in bf16; per-worker BN (`gbn`, `brn`: the batch is reshaped per worker, which
#: channels_last turns into copies) and GN (whose channels_last reductions are strided) in bf16 NCHW.
#: `precision="auto"` / `memory_format="auto"` pick from here; fp32 NCHW is the reference. On a CPU
#: without native bf16 (`native_bf16`) fp32 is fastest instead (results/trainer_speed/cpu_avx2.json),
#: but the table stays: a record's precision is part of its protocol. The trainer warns there.
FASTEST: dict[str, tuple[str, str]] = {
    "bn": ("bf16", "channels_last"), "gbn": ("bf16", "contiguous"), "brn": ("bf16", "contiguous"),
    "gn": ("bf16", "contiguous"),
}
PRECISIONS = ("fp32", "bf16")
MEMORY_FORMATS = ("contiguous", "channels_last")
SCHEDULES = ("cosine", "linear", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Optimization settings of one training run (JSON-able via `TrainConfig.to_dict`).

    The budget is `epochs` or `steps` (exactly one); `eval_every` and `warmup` count in the budget's
    unit. `log_every` (steps) sets the history rows of a step budget (default: `eval_every`).
    """

    epochs: int | None = 10
    steps: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"              # "sgd" | "adamw"
    lr: float = 0.1
    momentum: float = 0.9               # SGD
    nesterov: bool = False              # SGD
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    adam_eps: float = 1e-8              # AdamW
    weight_decay: float = 1e-4
    schedule: str = "cosine"            # "cosine" | "linear" | "step" | "constant"
    milestones: Sequence[float] = (0.5, 0.75)  # "step": fractions of training where lr *= gamma
    gamma: float = 0.1
    warmup: float = 0.0                 # linear warmup, in epochs (epoch budget) or steps (step budget)
    eval_every: int = 1                 # evaluate every k epochs / steps, and always at the end
    log_every: int | None = None        # step budget: a history row every k steps
    seed: int = 0
    precision: str = "fp32"             # "fp32" | "bf16" (autocast)
    memory_format: str = "contiguous"   # "contiguous" | "channels_last" (4-D inputs)
    compile: bool | str = False         # torch.compile the model (True: inductor; or a backend name)
    checkpoint_every_s: float = 300.0   # and at the end of every history row

    def validate(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(f"give exactly one budget, epochs or steps (got epochs={self.epochs}, steps={self.steps})")
        if (self.epochs or self.steps) < 1 or self.batch_size < 1:
            raise ValueError(f"the budget and batch_size must be >= 1 "
                             f"(got {self.epochs or self.steps}, {self.batch_size})")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("need lr > 0, weight_decay >= 0 and 0 <= momentum < 1")
        for name, value, allowed in (("schedule", self.schedule, SCHEDULES), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("precision", self.precision, PRECISIONS),
                                     ("memory_format", self.memory_format, MEMORY_FORMATS)):
            if value not in allowed:
                hint = " (resolve 'auto' with train.fastest(norm, config))" if value == "auto" else ""
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}{hint}")
        if not 0 <= self.warmup <= (self.epochs or self.steps):
            raise ValueError(f"warmup must be in [0, budget], got {self.warmup}")
        if self.eval_every < 1 or (self.log_every is not None and self.log_every < 1):
            raise ValueError("eval_every and log_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"], d["betas"] = list(d["milestones"]), list(d["betas"])
        return d


def fastest(norm: str, config: TrainConfig) -> TrainConfig:
    """`config` with `precision`/`memory_format` "auto" replaced by `FASTEST[norm]` (fp32 NCHW if unknown)."""
    precision, memory_format = FASTEST.get(norm, ("fp32", "contiguous"))
    return replace(config, precision=precision if config.precision == "auto" else config.precision,
                   memory_format=memory_format if config.memory_format == "auto" else config.memory_format)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: always on CUDA; on a CPU only with AVX-512 BF16 or
    AMX. Elsewhere (AVX2, plain AVX-512) torch emulates bf16 through fp32 conversions, so bf16
    autocast is slower than fp32 there, not faster. True where torch cannot tell."""
    if device.type != "cpu":
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is None for p in probes):
        return True
    return any(p() for p in probes)


def lr_at(step: int, total_steps: int, warmup_steps: int, config: TrainConfig) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup, then the schedule.

    $\\eta_t = \\eta\\,(t+1)/W$ for $t < W$; then, with progress $p = (t - W)/(T - W)$: cosine
    $\\tfrac{\\eta}{2}(1 + \\cos \\pi p)$, linear $\\eta(1 - p)$, step $\\eta\\,\\gamma^{\\#\\{m \\le p\\}}$.
    """
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    if config.schedule == "step":
        return config.lr * config.gamma ** sum(progress >= m for m in config.milestones)
    return config.lr


def clip_grad_norm(max_norm: float) -> Hook:
    """A hook: rescale all gradients to a global L2 norm of at most `max_norm` (logs `grad_norm`)."""
    def hook(trainer: "Trainer") -> None:
        trainer.log_mean("grad_norm", nn.utils.clip_grad_norm_(trainer.model.parameters(), max_norm))
    return hook


def log_grad_norm(trainer: "Trainer") -> None:
    """A hook: the global gradient L2 norm, averaged over each history row (`grad_norm`)."""
    grads = [p.grad.detach() for p in trainer.model.parameters() if p.grad is not None]
    trainer.log_mean("grad_norm", torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def init_distributed(device: str | torch.device | None = None, timeout_s: float | None = None) -> torch.device:
    """Join the process group of a `torchrun` job (a no-op without one); returns this process's device.

    CUDA processes use NCCL on `cuda:LOCAL_RANK`, CPU processes gloo. Every collective times out after
    `timeout_s` (default `$NORMLAB_DIST_TIMEOUT` or 120 s), so a dead worker is an error, never a hang.
    """
    from datetime import timedelta

    from .utils import default_device

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return default_device(device)
    cuda = default_device(device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("NORMLAB_DIST_TIMEOUT", "120")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Trainer:
    """Train `model` on `task` with `config`; see the module docstring.

    Args:
        model: maps the task's inputs to logits ((B, classes) or (B, T, vocab)); moved to `device`.
        task: `ImageClassification` or `CharLM` (moved to `device` here).
        config: `TrainConfig`.
        hooks: `hook(trainer)` called after `backward()` and before the optimizer step, in order.
        param_groups: optimizer parameter groups (e.g. no weight decay on gains); default all parameters.
        checkpoint: file to save checkpoints to and resume from (None: no checkpoints).
        device: default: the model's device.
    """

    def __init__(self, model: nn.Module, task: ImageClassification | CharLM, config: TrainConfig,
                 hooks: Sequence[Hook] = (), param_groups: list[dict] | None = None,
                 checkpoint: str | Path | None = None, device: str | torch.device | None = None):
        config.validate()
        if not hasattr(task, "batch") or not hasattr(task, "evaluate"):
            raise TypeError("task must be a normlab.tasks task (ImageClassification, CharLM), "
                            f"got {type(task).__name__}")
        if config.steps is None and task.num_train is None:
            raise ValueError(f"{type(task).__name__} is sampled in steps: give TrainConfig(steps=..., epochs=None)")
        if task.num_train is not None and task.num_train < config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {task.num_train} training samples")
        if device is None:
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.config = config
        if config.precision == "bf16" and not native_bf16(self.device):
            # FASTEST (and so precision="auto") was measured on a CPU with AVX-512 BF16; a record's
            # precision is part of its protocol, so the trainer says so rather than switching to fp32
            warnings.warn(f"bf16 autocast on this CPU (torch {torch.backends.cpu.get_cpu_capability()} kernels, "
                          "no AVX-512 BF16 or AMX) is emulated and several times slower than fp32. To train "
                          "faster here, use precision='fp32' (a different protocol from a bf16 record's), or a "
                          "CPU with AVX-512 BF16 / AMX, or a GPU", RuntimeWarning, stacklevel=2)
        self.memory_format = torch.channels_last if config.memory_format == "channels_last" else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.task = task.to(self.device, self.memory_format)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
        # under torchrun: each of the `world` processes trains on its shard of every batch (DDP)
        self.world, self.rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {self.world} processes "
                             "(torchrun --nproc-per-node); choose a multiple")
        self.forward = self.model
        if config.compile:
            backend = "inductor" if config.compile is True else config.compile
            self.forward = torch.compile(self.model, backend=backend)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # buffers (BN running averages) come from rank 0 at every forward: worker 0's, as in the GN paper
            self.forward = DistributedDataParallel(self.forward, device_ids=[self.device.index]
                                                   if self.device.type == "cuda" else None)
        self.hooks = list(hooks)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.optimizer = self._make_optimizer(param_groups if param_groups is not None else model.parameters())
        self.generator = torch.Generator().manual_seed(config.seed)
        # one epoch = every training sample once, in batches of batch_size (the last partial batch
        # dropped: per-worker BatchNorm needs equal-sized batches)
        self.steps_per_epoch = task.num_train // config.batch_size if task.num_train is not None else None
        self.total_steps = config.steps if config.steps is not None else self.steps_per_epoch * config.epochs
        per = self.steps_per_epoch if config.epochs is not None else 1
        self.warmup_steps = int(round(config.warmup * per))
        self.row_steps = per if config.epochs is not None else (config.log_every or config.eval_every)
        self.eval_steps = config.eval_every * per
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.diverged = False
        self._perm: torch.Tensor | None = None   # the current epoch's order, and the position in it
        self._pos = 0
        self._window: dict[str, list] = {}       # sums and counts of the current row
        self._row_start = 0                      # the step the current row began at
        self._elapsed = 0.0

    # ----------------------------------------------------------------------------------- pieces

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                  weight_decay=c.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps, weight_decay=c.weight_decay)
        for g in opt.param_groups:  # schedules scale each group's own base lr
            g.setdefault("base_lr", g["lr"])
            g["lr_scale"] = g["base_lr"] / c.lr
        return opt

    def autocast(self):
        """The configured precision as a context manager (bf16 autocast, or nothing for fp32)."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def lr(self) -> float:
        return lr_at(self.step, self.total_steps, self.warmup_steps, self.config)

    def log_mean(self, name: str, value: torch.Tensor | float, count: int = 1) -> None:
        """Add `value` (a sum over `count` items) to the current row's mean of `name` (no device sync)."""
        s = self._window.setdefault(name, [0.0, 0])
        s[0] = s[0] + (value.detach().double() if torch.is_tensor(value) else float(value))
        s[1] += count

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        per = self.config.batch_size // self.world  # this process's shard of the global batch
        shard = slice(self.rank * per, (self.rank + 1) * per)
        if self.task.num_train is None:
            return self.task.batch(self.config.batch_size, self.generator, shard)
        whole = self.task.num_train - self.task.num_train % self.config.batch_size  # whole batches only
        if self._perm is None or self._pos + self.config.batch_size > whole:
            self._perm, self._pos = torch.randperm(self.task.num_train, generator=self.generator).to(self.device), 0
        idx = self._perm[self._pos: self._pos + self.config.batch_size]
        self._pos += self.config.batch_size
        return self.task.batch(idx, self.generator, shard)

    def train_step(self) -> torch.Tensor:
        """One optimizer step on the next batch; returns the mean loss (0-d tensor, no device sync)."""
        lr = self.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = self._next_batch()
        with self.autocast():
            logits = self.forward(x)
        logits = logits.float().flatten(0, -2)
        y = y.flatten()
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for hook in self.hooks:
            hook(self)
        self.optimizer.step()
        self.step += 1
        with torch.no_grad():
            self.log_mean("train_loss", loss.detach() * len(y), len(y))
            if "train_error" in self.task.train_metrics:
                self.log_mean("train_error", 100.0 * (logits.argmax(1) != y).sum(), len(y))
        return loss

    def evaluate(self) -> dict[str, float]:
        with self.autocast():
            return self.task.evaluate(self.forward)

    def _end_row(self, t0: float, final: bool) -> dict[str, Any]:
        c = self.config
        row: dict[str, Any] = {}
        if c.epochs is not None:  # a row cut short by divergence belongs to the epoch in progress
            row["epoch"] = math.ceil(self.step / self.steps_per_epoch)
        row["step"] = self.step
        row["lr"] = lr_at(self._row_start, self.total_steps, self.warmup_steps, c)  # at the row's first step
        self._row_start = self.step
        for name, (total, count) in self._window.items():
            if self.world > 1:  # every process's share of the row
                both = torch.stack([torch.as_tensor(total, dtype=torch.float64, device=self.device),
                                    torch.tensor(float(count), dtype=torch.float64, device=self.device)])
                dist.all_reduce(both)
                total, count = both[0], int(both[1])
            row[name] = float(total) / max(1, count)
        self._window = {}
        if final or self.diverged or self.step % self.eval_steps == 0:
            row.update(self.evaluate())
        row["time_s"] = round(self._elapsed + time.perf_counter() - t0, 2)
        if self.diverged:
            row["diverged"] = True
        row = {k: _finite_or_none(v) for k, v in row.items()}
        self.history.append(row)
        return row

    # ------------------------------------------------------------------------------- checkpoints

    def _fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to belong to this run."""
        config = {k: v for k, v in self.config.to_dict().items() if k != "checkpoint_every_s"}
        return {"config": config, "task": self.task.describe(), "model": type(self.model).__name__,
                "parameters": [[n, list(p.shape)] for n, p in self.model.named_parameters()]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "fingerprint": self._fingerprint(), "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "perm": self._perm.cpu() if self._perm is not None else None, "pos": self._pos,
            "row_start": self._row_start,
            "window": {k: [v[0].item() if torch.is_tensor(v[0]) else v[0], v[1]] for k, v in self._window.items()},
            "history": self.history, "elapsed_s": self._elapsed, "diverged": self.diverged,
        }

    def save_checkpoint(self, elapsed: float) -> None:
        """Write the checkpoint atomically: readers see the previous one or this one, never a partial file."""
        if self.checkpoint is None or self.rank != 0:  # every process holds the same state: rank 0 saves it
            return
        self._elapsed, saved = elapsed, self._elapsed
        state = self.state_dict()
        self._elapsed = saved
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(f".{self.checkpoint.name}.{os.getpid()}.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from `path`; raises `ValueError` naming the file if it is unreadable or another run's."""
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                             "delete it to start the run afresh") from e
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            raise ValueError(f"checkpoint {path} is not a normlab trainer checkpoint (format {found!r}); "
                             "delete it to start afresh")
        mine, theirs = self._fingerprint(), state["fingerprint"]
        for key in mine:
            if mine[key] != theirs.get(key):
                raise ValueError(f"checkpoint {path} belongs to another run (its {key} differs: "
                                 f"{theirs.get(key)!r} vs {mine[key]!r}); delete it to start afresh")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self._pos, self._row_start = state["step"], state["pos"], state["row_start"]
        self._perm = None if state["perm"] is None else state["perm"].to(self.device)
        self._window = {k: [torch.tensor(v[0], dtype=torch.float64, device=self.device), v[1]]
                        for k, v in state["window"].items()}
        self.history, self._elapsed, self.diverged = state["history"], state["elapsed_s"], state["diverged"]

    # ----------------------------------------------------------------------------------- the loop

    def fit(self, progress: bool = False, desc: str = "train") -> list[dict[str, Any]]:
        """Train to the budget (resuming from the checkpoint if one exists); returns the history."""
        from tqdm import tqdm  # not tqdm.auto: no widget warnings in notebooks (bars are off there)

        if self.checkpoint is not None and self.checkpoint.exists():
            self.load_checkpoint(self.checkpoint)
        self.model.train()
        t0 = last_save = time.perf_counter()
        # a non-finite loss is checked every step on CPU (free) and every 20 steps on GPUs (a sync)
        check_every = 1 if self.device.type == "cpu" else 20
        nonfinite = torch.zeros((), device=self.device)  # 1.0 once a loss was NaN/inf (float: gloo reduces it)
        with tqdm(total=self.total_steps, initial=self.step, desc=desc, disable=not progress, leave=False) as bar:
            while self.step < self.total_steps and not self.diverged:
                loss = self.train_step()
                nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss.detach())).float())
                if self.step % check_every == 0 or self.step % self.row_steps == 0:
                    if self.world > 1:  # one process's NaN stops them all, at the same step
                        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
                    self.diverged = bool(nonfinite)
                bar.update(1)
                final = self.step == self.total_steps
                if self.diverged or final or self.step % self.row_steps == 0:
                    row = self._end_row(t0, final)
                    bar.set_postfix({k: round(v, 3) for k, v in row.items()
                                     if k in ("train_loss", "test_error", "val_loss") and v is not None})
                if time.perf_counter() - last_save >= self.config.checkpoint_every_s or (
                        self.step % self.row_steps == 0 and not final):
                    self.save_checkpoint(self._elapsed + time.perf_counter() - t0)
                    last_save = time.perf_counter()
        self._elapsed += time.perf_counter() - t0
        return self.history

    def summary(self) -> dict[str, Any]:
        """The last row's numbers as run metrics (the book's record keys), plus `steps` and `diverged`."""
        last = self.history[-1] if self.history else {}
        keys = ("test_error", "test_loss", "val_loss", "train_loss", "train_error")
        out = {k: last.get(k) for k in keys if k in last}
        out.update(steps=self.step, diverged=self.diverged)
        return out
