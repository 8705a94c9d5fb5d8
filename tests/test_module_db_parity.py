"""Parity sweep: PyTorch's own module test samples (`common_modules.module_db`) run through normlab.

For each of BatchNorm1d/2d, LayerNorm, GroupNorm, InstanceNorm2d and RMSNorm, every sample of torch's
`module_inputs_func` (constructor arguments and inputs, in training and in eval mode) builds
`torch.nn.X(*args, **kwargs)` and normlab's `X(*args, **kwargs)`, gives them the same random state
(normlab loads torch's state_dict), runs one forward and backward on the same input, and compares the
output, the gradients w.r.t. the input and every parameter, and the buffers afterwards. normlab runs
under the fused-kernel guard, so it cannot pass by calling torch's kernels.

Samples normlab deliberately rejects (torch only warns) belong in `REJECTED`, with the error normlab
must raise; there are none in torch 2.14's samples for these modules, and the test fails if a sample
is neither equal nor listed.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing._internal.common_modules import module_db

from normlab import norms

MODULES = ("BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm", "InstanceNorm2d", "RMSNorm")
INFOS = {info.module_cls.__name__: info for info in module_db if info.module_cls.__name__ in MODULES}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}
#: (module, sample desc) -> regex of the ValueError normlab raises where torch accepts (or warns).
REJECTED: dict[tuple[str, str], str] = {}


def samples(name: str, dtype: torch.dtype, training: bool):
    info = INFOS[name]
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Parameters away from 1/0 and running statistics away from 0/1, so every term is exercised."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)


def _step(module, args, kwargs, probe_seed: int):
    """Forward on fresh copies of the inputs, backward of a fixed random projection of the output."""
    inputs = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = module(*inputs, **kwargs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=out.dtype)
    (out * probe).sum().backward()
    grads = [a.grad for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    return out.detach(), grads, {n: p.grad for n, p in module.named_parameters()}


def _cases():
    for name in MODULES:
        for training in (True, False):
            for dtype in (torch.float64, torch.float32):
                yield pytest.param(name, training, dtype, id=f"{name}-{'train' if training else 'eval'}-"
                                                              f"{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("name,training,dtype", list(_cases()))
def test_module_db_samples_match_torch(name, training, dtype, no_fused):
    tol = TOL[dtype]
    checked = 0
    for i, sample in enumerate(samples(name, dtype, training)):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        where = f"{name} sample {i} {sample.desc!r} args={args} kwargs={kwargs} training={training}"
        ref = getattr(torch.nn, name)(*args, **kwargs).to(dtype).train(training)
        _randomize(ref, torch.Generator().manual_seed(i))
        ours = getattr(norms, name)(*args, **kwargs).to(dtype).train(training)
        ours.load_state_dict(ref.state_dict(), strict=True)
        fwd_args, fwd_kwargs = sample.forward_input.args, sample.forward_input.kwargs
        if (name, sample.desc) in REJECTED:
            with no_fused(), pytest.raises(ValueError, match=REJECTED[name, sample.desc]):
                ours(*fwd_args, **fwd_kwargs)
            continue
        with no_fused():
            y, gx, gp = _step(ours, fwd_args, fwd_kwargs, probe_seed=i)
        y_ref, gx_ref, gp_ref = _step(ref, fwd_args, fwd_kwargs, probe_seed=i)
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape, where
        torch.testing.assert_close(y, y_ref, **tol, msg=lambda m: f"output, {where}: {m}")
        for a, b in zip(gx, gx_ref, strict=True):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"input grad, {where}: {m}")
        assert gp.keys() == gp_ref.keys(), where
        for p in gp:
            torch.testing.assert_close(gp[p], gp_ref[p], **tol, msg=lambda m: f"grad {p}, {where}: {m}")
        buffers, buffers_ref = dict(ours.named_buffers()), dict(ref.named_buffers())
        assert buffers.keys() == buffers_ref.keys(), where
        for b in buffers:
            torch.testing.assert_close(buffers[b], buffers_ref[b], **tol, msg=lambda m: f"buffer {b}, {where}: {m}")
        checked += 1
    assert checked + sum(key[0] == name for key in REJECTED) >= 5, f"only {checked} samples for {name}"


def test_the_sweep_sees_every_module_and_its_samples():
    """The sweep is only as good as torch's sample list: it must cover every module, with its edge cases."""
    assert set(INFOS) == set(MODULES)
    descs = {name: {s.desc for s in samples(name, torch.float64, True)} for name in MODULES}
    assert {"zero_batch", "not_tracking_stats", "2d_simple_average"} <= descs["BatchNorm2d"]
    assert "1d_empty_elementwise_affine" in descs["LayerNorm"] and "no_batch_dim" in descs["InstanceNorm2d"]
    assert all(key[1] in descs[key[0]] for key in REJECTED)
