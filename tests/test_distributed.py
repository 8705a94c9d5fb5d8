"""Data-parallel training on torch.distributed (gloo, localhost processes spawned by the test).

The book emulates k workers with per-worker BatchNorm on one device (`GhostBatchNorm2d`). Here k real
processes train under DDP with their own BatchNorm, each on its shard of every batch, and must end
with the parameters the emulation computes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    from normlab.models.resnet import CIFARResNet
    from normlab.norms import ghost_batch_norm
    from normlab.tasks import ImageClassification
    from normlab.train import Trainer, TrainConfig, init_distributed

    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    device = init_distributed("cpu")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def finish():  # leave together, then skip the interpreter's teardown, in which gloo's threads can
        torch.distributed.barrier()  # abort the process ("terminate called without an active exception")
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=g)
        return x, torch.randint(0, 10, (48,), generator=g)

    if mode == "sync":  # SyncBatchNorm on uneven slices (one empty with 4 processes) of one global batch
        from normlab.norms import SyncBatchNorm
        sizes = [3, 5] if world == 2 else [3, 0, 5, 2]
        saved = {}
        for dtype in (torch.float64, torch.float32):
            g = torch.Generator().manual_seed(1)
            x = (torch.randn(sum(sizes), 4, 3, 2, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
            gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            xr = x[lo:hi].clone().requires_grad_()
            sbn = SyncBatchNorm(4, momentum=0.3).to(dtype)
            with torch.no_grad():
                sbn.weight.copy_(torch.linspace(0.5, 2, 4)), sbn.bias.copy_(torch.linspace(-1, 1, 4))
            for _ in range(2):  # two steps: the running estimates move twice
                y = sbn(xr)
            (y * gy[lo:hi]).sum().backward()
            grads = [sbn.weight.grad.clone(), sbn.bias.grad.clone()]
            for t in grads:
                torch.distributed.all_reduce(t)  # the global batch's parameter gradient is the sum of the slices'
            parts = [None] * world
            torch.distributed.all_gather_object(parts, (y.detach(), xr.grad))
            sbn.eval()
            saved[str(dtype)] = {"y": torch.cat([p[0] for p in parts]), "dx": torch.cat([p[1] for p in parts]),
                                 "dw": grads[0], "db": grads[1], "mean": sbn.running_mean.clone(),
                                 "var": sbn.running_var.clone(), "count": sbn.num_batches_tracked.clone(),
                                 "eval": sbn(x[lo:hi]).detach(), "x": x, "gy": gy, "lo": lo, "hi": hi}
        torch.save(saved, out.replace(".pt", f".{rank}.pt"))
        finish()

    if mode == "mismatch":
        from normlab.experiments.gn_batch_size import local_workers
        try:
            local_workers({"workers": 3})
        except ValueError as e:
            print("ERROR", e)
        x, y = data()
        try:
            Trainer(CIFARResNet(8, width=4), ImageClassification(x, y), TrainConfig(batch_size=5))
        except ValueError as e:
            print("ERROR", e)
        finish()

    torch.manual_seed(0)
    model = CIFARResNet(8, width=4, norm_layer=ghost_batch_norm(1, impl="formula"))  # this process's own BN
    x, y = data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3, seed=3)
    hooks = []
    if mode == "die":
        def die(trainer):
            if rank == 1 and trainer.step == 2:
                os._exit(17)  # a worker killed mid-run
        hooks.append(die)
    trainer = Trainer(model, ImageClassification(x, y, padding=2), cfg, hooks=hooks, device=device)
    history = trainer.fit()
    if rank == 0:
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "history": history}, out)
    finish()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, world: int, mode: str, timeout: float = 120):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
               "NORMLAB_DIST_TIMEOUT": "15"}
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(tmp_path / "out.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a {world}-process job hung (mode {mode})")
        outs.append((p.returncode, stdout, stderr))
    return outs


def _emulated(world: int):
    """The same training on one process: GhostBatchNorm2d with k = world on the whole batch."""
    from normlab.models.resnet import CIFARResNet
    from normlab.norms import ghost_batch_norm
    from normlab.tasks import ImageClassification
    from normlab.train import Trainer, TrainConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    torch.manual_seed(0)
    model = CIFARResNet(8, width=4, norm_layer=ghost_batch_norm(world, impl="formula"))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3, seed=3)
    history = Trainer(model, ImageClassification(x, y, padding=2), cfg).fit()
    return {n: p.detach() for n, p in model.named_parameters()}, history


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_with_per_worker_bn_equals_the_emulation(tmp_path, world):
    outs = _launch(tmp_path, world, "train")
    assert all(code == 0 for code, _, _ in outs), outs
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    params, history = _emulated(world)
    for name, p in params.items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert len(got["history"]) == len(history) == 2
    for a, b in zip(got["history"], history):  # the logged losses are the whole batch's, all processes summed
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_error"] == pytest.approx(b["train_error"])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path, world):
    """Forward, input and parameter gradients, running statistics: as BatchNorm2d on the concatenated
    batch, with uneven per-process batches (and, with 4 processes, one empty)."""
    outs = _launch(tmp_path, world, "sync")
    assert all(code == 0 for code, _, _ in outs), outs
    for rank in range(world):
        got = torch.load(tmp_path / f"out.{rank}.pt", weights_only=True)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            g = got[str(dtype)]
            x = g["x"].clone().requires_grad_()
            bn = torch.nn.BatchNorm2d(4, momentum=0.3).to(dtype)
            with torch.no_grad():
                bn.weight.copy_(torch.linspace(0.5, 2, 4)), bn.bias.copy_(torch.linspace(-1, 1, 4))
            for _ in range(2):
                y = bn(x)
            (y * g["gy"]).sum().backward()
            close = dict(rtol=tol, atol=tol)
            torch.testing.assert_close(g["y"], y.detach(), **close)
            torch.testing.assert_close(g["dx"], x.grad, **close)
            torch.testing.assert_close(g["dw"], bn.weight.grad, **close)
            torch.testing.assert_close(g["db"], bn.bias.grad, **close)
            torch.testing.assert_close(g["mean"], bn.running_mean, **close)  # every process, the same estimates
            torch.testing.assert_close(g["var"], bn.running_var, **close)
            assert int(g["count"]) == int(bn.num_batches_tracked) == 2
            bn.eval()
            torch.testing.assert_close(g["eval"], bn(g["x"][g["lo"]:g["hi"]]).detach(), **close)


@pytest.mark.slow
def test_a_killed_worker_is_an_error_not_a_hang(tmp_path):
    outs = _launch(tmp_path, 2, "die", timeout=90)
    assert outs[1][0] == 17
    code, _, stderr = outs[0]
    assert code != 0 and stderr.strip(), "rank 0 finished although its peer died"


@pytest.mark.slow
def test_a_mismatched_world_size_says_what_to_do(tmp_path):
    outs = _launch(tmp_path, 2, "mismatch")
    for code, stdout, stderr in outs:
        assert code == 0, stderr
        assert "workers=3 cannot be split over the 2 processes" in stdout
        assert "batch_size 5 is not divisible by the 2 processes" in stdout


@pytest.mark.slow
def test_torchrun_records_one_result_file(tmp_path):
    """`torchrun --nproc-per-node 2 -m normlab run gn_batch_size --profile smoke`: real per-worker BN, rank 0 writes."""
    from normlab.experiments import gn_batch_size

    out = tmp_path / "smoke.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "normlab", "run", "gn_batch_size", "--profile", "smoke", "--device", "cpu", "--no-progress",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NORMLAB_DIST_TIMEOUT": "60"})
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    record = json.loads(out.read_text())
    assert record["provenance"]["world_size"] == 2
    assert len(record["runs"]) == len(gn_batch_size.runs(gn_batch_size.PROFILES["smoke"]))
    assert all(0 <= r["metrics"]["test_error"] <= 100 for r in record["runs"])
    assert done.stdout.count("gn_batch_size / smoke") == 1  # one summary: rank 0's


def test_sync_batchnorm_is_a_drop_in_for_torchs():
    """torch.nn.SyncBatchNorm's constructor, state_dict and convert_sync_batchnorm; plain BN without a group."""
    from torch import nn

    from normlab.norms import BatchNorm2d, SyncBatchNorm

    ours, theirs = SyncBatchNorm(5, eps=1e-3, momentum=0.2), nn.SyncBatchNorm(5, eps=1e-3, momentum=0.2)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    ref = nn.BatchNorm2d(5, eps=1e-3, momentum=0.2).double()
    ours = ours.double()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.Sequential(BatchNorm2d(5)))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    model.eval()
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m).__name__ for m in converted.modules()].count("SyncBatchNorm") == 2
    assert converted[1].weight is model[1].weight and not converted[1].training
    torch.testing.assert_close(converted[1].running_mean, torch.full((5,), 0.5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SyncBatchNorm(5)(torch.randn(1, 5, 1, 1))


def test_sync_bytes_per_step_counts_what_is_all_reduced(tmp_path, monkeypatch):
    """The chapter's computed cost, (4C + 2) float32 values per BN layer per step, against the all-reduces
    SyncBatchNorm really issues in a training step (a one-process gloo group, calls counted)."""
    import torch.distributed as dist
    from torch import nn

    from normlab.experiments.gn_batch_size_sync import sync_bytes_per_step
    from normlab.models.resnet import CIFARResNet
    from normlab.norms import SyncBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sent = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (sent.append(t.numel() * t.element_size()),
                                                                     real(t, *a, **k))[1])
        model = SyncBatchNorm.convert_sync_batchnorm(CIFARResNet(8, width=4, norm_layer=nn.BatchNorm2d))
        model(torch.randn(4, 3, 16, 16)).sum().backward()
        layers = sum(isinstance(m, SyncBatchNorm) for m in model.modules())
        assert len(sent) == 4 * layers  # two all-reduces forward, two backward, per layer
        assert sum(sent) == sync_bytes_per_step(model)
    finally:
        dist.destroy_process_group()
