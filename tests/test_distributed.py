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

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=g)
        return x, torch.randint(0, 10, (48,), generator=g)

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
        sys.exit(0)

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
