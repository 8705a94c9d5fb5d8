"""Side by side with torch.nn: the same layer from normlab and from torch, trained and evaluated together.

`compare_with_torch(ours, ref, make_input)` is how the book shows that a normlab layer is a drop-in
for torch's: both start from the same state, see the same inputs and the same output gradient, take
the same plain SGD updates ($p \\leftarrow p - \\eta\\,\\partial\\ell/\\partial p$), and at every step
their outputs, input gradients, parameter gradients and buffers are collected in pairs, so a chapter
can print whether they agree and a test can `torch.testing.assert_close` every pair.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn


def twin(ours_cls: type, ref_cls: type, *args, seed: int = 0, ours_kw: dict | None = None,
         **kwargs) -> tuple[nn.Module, nn.Module]:
    """`ours_cls(*args, **kwargs)` and `ref_cls(*args, **kwargs)` in the same state: the reference's
    parameters set to $1 + 0.5\\,\\mathcal{N}(0, 1)$ (not the trivial ones and zeros), loaded into ours
    with `strict=True` (so the state_dicts must match). `ours_kw` goes to normlab's layer only."""
    torch.manual_seed(seed)
    ours = ours_cls(*args, **kwargs, **(ours_kw or {}))
    ref = ref_cls(*args, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _forward_backward(layer: nn.Module, x: Tensor, probe: Tensor, guard) -> dict[str, Tensor]:
    """Output, input gradient and parameter gradients of $\\ell = \\sum y \\odot \\text{probe}$."""
    x = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    with guard() if guard else contextlib.nullcontext():
        y = layer(x)
        (y * probe).sum().backward()
    out = {"output": y.detach(), "input_grad": x.grad}
    out.update({f"grad/{n}": p.grad for n, p in layer.named_parameters()})
    return out


@torch.no_grad()
def _sgd(layer: nn.Module, lr: float) -> None:
    for p in layer.parameters():
        if p.grad is not None:
            p.sub_(lr * p.grad)


def compare_with_torch(ours: nn.Module, ref: nn.Module, make_input: Callable[[int], Tensor], steps: int = 4,
                       lr: float = 0.1, guard: Callable[[], contextlib.AbstractContextManager] | None = None,
                       ) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Train `ours` and `ref` side by side for `steps` steps, then evaluate both once.

    Step $t$ feeds `make_input(t)` to both, backpropagates the same random projection of the output,
    updates both by SGD with learning rate `lr`, and records `(ours, ref)` pairs: `output`,
    `input_grad`, `grad/<parameter>`, then `buffer/<name>` after the update. The last row is an eval-mode
    forward/backward on `make_input(steps)`. `guard` wraps normlab's forward (the tests forbid torch's
    fused kernels there). Returns one dict per row (`mode` and `step` are in `row["_"]`).

    Example:
        >>> from normlab.norms import BatchNorm2d
        >>> ours, ref = twin(BatchNorm2d, torch.nn.BatchNorm2d, 3)
        >>> rows = compare_with_torch(ours, ref, lambda t: torch.randn(4, 3, 2, 2))
        >>> all(torch.allclose(a, b, atol=1e-5) for row in rows for k, (a, b) in row.items() if k != "_")
        True
    """
    rows = []
    for step in range(steps + 1):
        evaluating = step == steps
        if evaluating:
            ours.eval(), ref.eval()
        x = make_input(step)
        probe = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1000 + step))
        a, b = _forward_backward(ours, x, probe, guard), _forward_backward(ref, x, probe, None)
        if a.keys() != b.keys():
            raise ValueError(f"the layers differ in their parameters: {sorted(a)} vs {sorted(b)}")
        row = {"_": ("eval" if evaluating else "train", step), **{k: (a[k], b[k]) for k in a}}
        if not evaluating:
            _sgd(ours, lr), _sgd(ref, lr)
        buffers_a, buffers_b = dict(ours.named_buffers()), dict(ref.named_buffers())
        if buffers_a.keys() != buffers_b.keys():
            raise ValueError(f"the layers differ in their buffers: {sorted(buffers_a)} vs {sorted(buffers_b)}")
        row.update({f"buffer/{n}": (buffers_a[n], buffers_b[n]) for n in buffers_a})
        rows.append(row)
    return rows


def agree(rows: list[dict[str, tuple[Tensor, Tensor]]], rtol: float = 2e-5, atol: float = 2e-5) -> bool:
    """Whether every pair of `compare_with_torch` is close (`torch.allclose`; buffers compared exactly
    in dtype, e.g. `num_batches_tracked`)."""
    return all(torch.allclose(a.to(torch.float64), b.to(torch.float64), rtol=rtol, atol=atol)
               for row in rows for k, (a, b) in row.items() if k != "_")
