r"""What a norm layer costs in parameters, buffers and activation memory (claims C15, C22, C26, C38).

Popular primers say BatchNorm has "4 x C parameters (2048 for 512 channels)", LayerNorm 2C and RMSNorm
C (C22); that GroupNorm "saves 30-40% memory compared with BN" (C15); that RMSNorm "uses less memory"
(C26); and they rank the norms' memory as "medium" or "low" (C38). This experiment counts.

**Parameters and buffers** of one layer for $C$ channels (`part="layers"`), normlab's and `torch.nn`'s
side by side. Trainable parameters are $\gamma, \beta \in \mathbb{R}^C$ where the layer has them;
buffers are state that is saved but not trained: BatchNorm's running mean and variance ($2C$ floats)
and the scalar `num_batches_tracked` (an int64).

**Activation memory** (`part="resnet20"`, `part="transformer"`): the bytes of the tensors autograd
keeps from the forward pass for the backward pass (`torch.autograd.graph.saved_tensors_hooks`). That
is the memory a training step holds at the end of its forward pass on top of the weights, the
gradients and the optimizer state, and for a conv net at a real batch size it is most of the training
memory. Counted exactly as follows (`SavedTensors`):

- each saved tensor is mapped to its storage (`untyped_storage()`), and each storage is counted
  once, with its full size `nbytes()`: an activation saved by two ops (a conv's input is the ReLU's
  output) or a view of a larger tensor costs what the allocator really holds;
- storages of the model's parameters and buffers are counted apart (`saved_param_bytes`): they
  exist whether or not a step runs;
- a storage saved by an op that runs inside a norm module's forward (scoped with module forward
  pre/post hooks) is *norm-attributable* (`norm_bytes`); `norm_only_bytes` are those that no op
  outside a norm saved too, i.e. what the norms add to the graph.

Not counted: temporaries freed during the forward pass, allocator rounding and caching, the forward
output (the logits), and anything the backward pass allocates. Only the forward pass runs (no
backward): what is saved is decided by the forward pass.

The models are the book's CIFAR ResNet-20 (`normlab.models.resnet`, 32 px, batch 128; BN, GN with 8
groups as `gn_batch_size`, LN as Wu & He apply it to conv maps, i.e. GroupNorm with $G=1$, InstanceNorm
with a per-channel affine, and none)
and a GPT-style pre-LN Transformer (`normlab.models.transformer`; LayerNorm, RMSNorm, none). Each norm
is measured twice: normlab's layers (`impl="normlab"`, compositions of tensor ops written from the
formulas, which save their intermediate tensors) and `torch.nn`'s (`impl="torch"`, the layers
practitioners use; their fused kernels save the input and per-group statistics). The claims are about
the latter. A `none` model is the same for both and is run once, as `impl="torch"`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..utils import seed_all

PARTS = ("layers", "resnet20", "transformer")
IMPLS = ("normlab", "torch")
RESNET_NORMS = ("bn", "gn", "ln", "in", "none")
TRANSFORMER_NORMS = ("ln", "rms", "none")

PROFILES: dict[str, dict[str, Any]] = {
    # seconds: the layer table, a ResNet-8 at 16 px and a one-block Transformer
    "smoke": {"channels": 512, "ln_chw": [8, 8],
              "resnet": {"depth": 8, "batch": 8, "image": 16, "gn_groups": 8},
              "transformer": {"d_model": 64, "n_heads": 2, "depth": 1, "context": 32, "batch": 2, "vocab": 65},
              "seeds": [0]},
    # under a minute on one core: ResNet-20 at CIFAR size, a 4-block d=512 Transformer
    "cpu": {"channels": 512, "ln_chw": [8, 8],
            "resnet": {"depth": 20, "batch": 128, "image": 32, "gn_groups": 8},
            "transformer": {"d_model": 512, "n_heads": 8, "depth": 4, "context": 256, "batch": 8, "vocab": 65},
            "seeds": [0]},
}


def runs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer table, then one run per (model, norm, implementation); `none` once."""
    out: list[dict[str, Any]] = [{"part": "layers", "channels": config["channels"], "seed": s} for s in config["seeds"]]
    for part, names in (("resnet20", RESNET_NORMS), ("transformer", TRANSFORMER_NORMS)):
        for norm in names:
            for impl in (("torch",) if norm == "none" else IMPLS):
                out += [{"part": part, "norm": norm, "impl": impl, "seed": s} for s in config["seeds"]]
    return out


# ---------------------------------------------------------------------------------------------------
# Counting saved tensors
# ---------------------------------------------------------------------------------------------------

def _norm_types() -> tuple[type, ...]:
    """The module classes that count as norm layers: normlab's and torch.nn's activation norms."""
    from .. import norms

    return (norms._NormBase, norms.LayerNorm, norms.GroupNorm, norms.RMSNorm, nn.modules.batchnorm._NormBase,
            nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


class SavedTensors:
    """Context manager recording the storages of every tensor autograd saves for backward.

    `exclude`: tensors (the parameters and buffers) whose storages are reported apart. `norms`:
    modules inside whose forward a save counts as the norm's (`norm_bytes`). The outputs of the
    forward pass must stay alive until the counts are read: a storage is keyed by its address, which
    is unique only while the graph holds it.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), norms: Iterable[nn.Module] = ()):
        self._exclude = {_key(t) for t in exclude}
        self._norms = list(norms)
        self._depth = 0  # > 0 while a norm module's forward runs
        self.storages: dict[tuple[str, int], dict[str, Any]] = {}
        self.n_saved = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.n_saved += 1
        entry = self.storages.setdefault(_key(t), {"bytes": t.untyped_storage().nbytes(), "in_norm": False,
                                                   "outside": False})
        entry["in_norm" if self._depth else "outside"] = True
        return t  # keep the tensor itself: the step computes exactly what it would without the hooks

    def _enter(self, *_):
        self._depth += 1

    def _leave(self, *_):
        self._depth -= 1

    def __enter__(self) -> "SavedTensors":
        self._handles = [h for m in self._norms for h in (m.register_forward_pre_hook(self._enter),
                                                         m.register_forward_hook(self._leave))]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def summary(self) -> dict[str, int]:
        """Bytes of the distinct saved storages: activations (`saved_bytes`), norm-attributable, parameters."""
        act = {k: v for k, v in self.storages.items() if k not in self._exclude}
        return {
            "saved_bytes": sum(v["bytes"] for v in act.values()),
            "norm_bytes": sum(v["bytes"] for v in act.values() if v["in_norm"]),
            "norm_only_bytes": sum(v["bytes"] for v in act.values() if v["in_norm"] and not v["outside"]),
            "saved_param_bytes": sum(v["bytes"] for k, v in self.storages.items() if k in self._exclude),
            "saved_storages": len(act),
            "saved_tensors": self.n_saved,
        }


def saved_bytes(model: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """`SavedTensors.summary()` of one forward pass of `model` (in training mode) on `inputs`."""
    norms = [m for m in model.modules() if isinstance(m, _norm_types())]
    state = [*model.parameters(), *model.buffers()]
    model.train()
    with SavedTensors(exclude=state, norms=norms) as counter:
        out = model(*inputs)  # held until summary(): the graph keeps every saved storage alive
    summary = counter.summary()
    del out
    return summary


# ---------------------------------------------------------------------------------------------------
# The layers and models
# ---------------------------------------------------------------------------------------------------

def layer_table(channels: int, chw: tuple[int, int]) -> dict[str, nn.Module]:
    """Every layer of the parameter table, keyed `impl.name` (torch's defaults where torch has them)."""
    from .. import norms

    h, w = chw
    c = channels
    table = {}
    for impl, lib in (("normlab", norms), ("torch", nn)):
        table.update({
            f"{impl}.bn": lib.BatchNorm2d(c),
            f"{impl}.gn": lib.GroupNorm(32, c),
            f"{impl}.ln_cnn": lib.GroupNorm(1, c),  # Wu & He's LN of a conv map: (C, H, W), per-channel affine
            f"{impl}.ln": lib.LayerNorm(c),  # a Transformer's / MLP's LN of a d = C feature vector
            f"{impl}.ln_chw": lib.LayerNorm([c, h, w]),  # LN over (C, H, W), elementwise affine
            f"{impl}.in": lib.InstanceNorm2d(c),  # torch's defaults: affine=False, track_running_stats=False
            f"{impl}.in_affine": lib.InstanceNorm2d(c, affine=True),
            f"{impl}.in_stats": lib.InstanceNorm2d(c, affine=True, track_running_stats=True),
            f"{impl}.rms": lib.RMSNorm(c),
            f"{impl}.none": nn.Identity(),
        })
    return table


def count_state(module: nn.Module) -> dict[str, int]:
    """Trainable parameters, buffer elements (floating and integer) and their bytes."""
    params = [p for p in module.parameters() if p.requires_grad]
    buffers = list(module.buffers())
    return {
        "params": sum(p.numel() for p in params),
        "buffers": sum(b.numel() for b in buffers),
        "float_buffers": sum(b.numel() for b in buffers if b.is_floating_point()),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers),
    }


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def resnet_norm_layer(norm: str, impl: str, groups: int):
    """`norm_layer(channels)` of the ResNet: BN, GN(`groups`), LN as GroupNorm(1, C), IN (affine), or None."""
    _check(norm, RESNET_NORMS, "ResNet norm")
    _check(impl, IMPLS, "implementation")
    if norm == "none":
        return None
    from .. import norms

    lib = norms if impl == "normlab" else nn
    if norm == "bn":
        return lib.BatchNorm2d
    if norm == "in":
        return lambda channels: lib.InstanceNorm2d(channels, affine=True)
    g = groups if norm == "gn" else 1
    return lambda channels: lib.GroupNorm(g, channels)


def transformer(norm: str, impl: str, cfg: dict[str, Any]) -> nn.Module:
    """The pre-LN GPT-style Transformer with `norm` layers of `impl` (torch's swapped in for normlab's)."""
    from ..models.transformer import Transformer

    _check(norm, TRANSFORMER_NORMS, "Transformer norm")
    _check(impl, IMPLS, "implementation")
    model = Transformer(cfg["vocab"], d_model=cfg["d_model"], n_heads=cfg["n_heads"], depth=cfg["depth"],
                        context=cfg["context"], placement="pre", norm="ln" if norm == "none" else norm)
    if norm == "none" or impl == "torch":
        d = cfg["d_model"]
        make = {"none": nn.Identity, "ln": lambda: nn.LayerNorm(d), "rms": lambda: nn.RMSNorm(d)}[norm]
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _norm_types()):
                    setattr(parent, name, make())
    return model


def run_one(run: dict[str, Any], config: dict[str, Any], device: torch.device | str = "cpu",
            progress: bool = False) -> dict[str, Any]:
    _check(run["part"], PARTS, "part")
    device = torch.device(device)
    gen = seed_all(run["seed"])
    if run["part"] == "layers":
        layers = layer_table(run["channels"], tuple(config["ln_chw"]))
        return {"metrics": {"channels": run["channels"], "layers": {k: count_state(m) for k, m in layers.items()}},
                "history": []}
    if run["part"] == "resnet20":
        from ..models.resnet import CIFARResNet

        cfg = config["resnet"]
        model = CIFARResNet(cfg["depth"], norm_layer=resnet_norm_layer(run["norm"], run["impl"], cfg["gn_groups"]))
        inputs = (torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], generator=gen),)
    else:
        cfg = config["transformer"]
        model = transformer(run["norm"], run["impl"], cfg)
        inputs = (torch.randint(cfg["vocab"], (cfg["batch"], cfg["context"]), generator=gen),)
    model = model.to(device)
    metrics: dict[str, Any] = saved_bytes(model, *(x.to(device) for x in inputs))
    norm_modules = [m for m in model.modules() if isinstance(m, _norm_types())]
    metrics.update({"params": sum(p.numel() for p in model.parameters()),
                    "norm_params": sum(p.numel() for m in norm_modules for p in m.parameters()),
                    "norm_layers": len(norm_modules), "device": str(device)})
    return {"metrics": metrics, "history": []}


# ---------------------------------------------------------------------------------------------------
# Readers: the numbers a ledger quotes
# ---------------------------------------------------------------------------------------------------

def param_counts(record: dict[str, Any], impl: str = "torch") -> dict[str, dict[str, int]]:
    """`{layer: count_state}` of the layer table for `impl` ("torch" or "normlab"): for each layer
    (`bn`, `gn`, `ln_cnn`, `ln`, `ln_chw`, `in`, `in_affine`, `in_stats`, `rms`, `none`) its trainable
    `params`, `buffers` (elements, num_batches_tracked included), `float_buffers` and their bytes."""
    _check(impl, IMPLS, "implementation")
    run = next((r for r in record["runs"] if r["config"]["part"] == "layers"), None)
    if run is None:
        raise ValueError("the record has no 'layers' run; record norm_footprint with a profile that includes it")
    return {k.split(".", 1)[1]: v for k, v in run["metrics"]["layers"].items() if k.startswith(impl + ".")}


def saved(record: dict[str, Any], part: str, norm: str, impl: str = "torch") -> dict[str, Any]:
    """The activation-memory metrics of one model (`part`: "resnet20" or "transformer"), `norm` and
    `impl`: `saved_bytes`, `norm_bytes`, `norm_only_bytes`, `saved_param_bytes`, `params`, ...
    (`none` is found whatever `impl` says: it is recorded once)."""
    _check(part, PARTS[1:], "model part")
    for r in record["runs"]:
        c = r["config"]
        if c["part"] == part and c["norm"] == norm and (c["impl"] == impl or norm == "none"):
            return r["metrics"]
    recorded = sorted({r["config"].get("norm") for r in record["runs"] if r["config"]["part"] == part})
    raise ValueError(f"no {part} run with norm={norm!r}, impl={impl!r} in the record; norms recorded: {recorded}")


def memory_ratio(record: dict[str, Any], part: str, norm: str, baseline: str, impl: str = "torch",
                 metric: str = "saved_bytes") -> float:
    """`metric` of `norm` divided by that of `baseline`, same model and `impl`: e.g.
    `memory_ratio(r, "resnet20", "gn", "bn")` is GN's saved activation bytes over BN's (C15 says 0.6-0.7)."""
    return saved(record, part, norm, impl)[metric] / saved(record, part, baseline, impl)[metric]


def norm_share(record: dict[str, Any], part: str, norm: str, impl: str = "torch") -> float:
    """The fraction of the saved activation bytes that only the norm layers saved (`norm_only_bytes /
    saved_bytes`): the most that any norm could save by saving nothing."""
    m = saved(record, part, norm, impl)
    return m["norm_only_bytes"] / m["saved_bytes"]
