"""Real `python -m normlab run` processes: SIGKILLed mid-run and resumed (bit-identical in fp32 on CPU),
and `--parallel K` sharing one sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# A training experiment outside the package (a dotted module path): a small ResNet on random images,
# long enough (400 steps) to be killed in the middle however fast the machine, checkpointing after
# every step.
TRAIN_EXPERIMENT = textwrap.dedent('''
    """A test experiment: a small ResNet trained with the book's trainer on fixed random images."""
    import torch
    from torch import nn
    from normlab.models.resnet import CIFARResNet
    from normlab.tasks import ImageClassification
    from normlab.train import Trainer, TrainConfig, log_grad_norm

    PROFILES = {"cpu": {"epochs": 100, "n": 64, "batch_size": 16}}

    def runs(config):
        return [{"seed": 0}]

    def run_one(run, config, device, progress=False, checkpoint=None):
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 256, (config["n"], 3, 16, 16), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (config["n"],), generator=g)
        torch.manual_seed(run["seed"])
        model = CIFARResNet(8, width=4, norm_layer=nn.BatchNorm2d)
        tc = TrainConfig(epochs=config["epochs"], batch_size=config["batch_size"], lr=0.05, seed=run["seed"],
                         checkpoint_every_s=0.0)
        trainer = Trainer(model, ImageClassification(x, y, x[:32], y[:32], padding=2), tc,
                          hooks=[log_grad_norm], checkpoint=checkpoint, device=device)
        history = trainer.fit()
        return {"metrics": trainer.summary(), "history": history}
''')


def _untimed(record):
    run = record["runs"][0]
    return run["metrics"], [{k: v for k, v in h.items() if k != "time_s"} for h in run["history"]]


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "killexp").mkdir(parents=True)
    (pkg / "killexp" / "__init__.py").write_text("")
    (pkg / "killexp" / "train.py").write_text(TRAIN_EXPERIMENT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "normlab", "run", "killexp.train", "--profile", "cpu", "--no-progress", "--device", "cpu"]

    def run(out):
        return subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)

    reference = tmp_path / "reference" / "cpu.json"
    assert run(reference).returncode == 0

    out = tmp_path / "killed" / "cpu.json"
    ckpt_dir = out.parent / ".checkpoints" / "cpu"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (ckpt_dir.exists() and any(ckpt_dir.glob("*.pt"))):  # wait for the first checkpoint
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.05)  # a few more steps: the kill lands mid-epoch, mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() or not json.loads(out.read_text())["runs"], "the run finished before it was killed"
    (ckpt,) = ckpt_dir.glob("*.pt")

    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from checkpoint {ckpt}" in resumed.stdout
    assert _untimed(json.loads(out.read_text())) == _untimed(json.loads(reference.read_text()))
    assert not ckpt.exists()  # recorded: the checkpoint is gone
    # the run's compute counts the killed process's training too, and the run says it was resumed
    (recorded,) = json.loads(out.read_text())["runs"]
    assert recorded["provenance"]["resumed"] is True
    assert recorded["wall_s"] >= recorded["history"][-1]["time_s"] - 0.01
    assert "resumed" not in json.loads(reference.read_text())["runs"][0]["provenance"]


@pytest.mark.slow
def test_gn_batch_size_parallel_smoke_equals_a_sequential_sweep(tmp_path):
    """The GPU command (`--parallel K`) on CPU with the smoke profile: every run once, same numbers."""
    from normlab.experiments import gn_batch_size

    out = tmp_path / "parallel" / "smoke.json"
    cmd = [sys.executable, "-m", "normlab", "run", "gn_batch_size", "--profile", "smoke", "--device", "cpu",
           "--threads", "1"]  # one thread each: the same reduction order in both sweeps
    done = subprocess.run(cmd + ["--parallel", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    parallel = json.loads(out.read_text())
    expected = gn_batch_size.runs(gn_batch_size.PROFILES["smoke"])
    assert sorted(r["key"] for r in parallel["runs"]) == sorted(json.dumps(r, sort_keys=True, separators=(",", ":"))
                                                               for r in expected)
    seq = tmp_path / "seq" / "smoke.json"
    done = subprocess.run(cmd + ["--out", str(seq)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    by_key = {r["key"]: r["metrics"] for r in json.loads(seq.read_text())["runs"]}
    assert all(r["metrics"] == by_key[r["key"]] for r in parallel["runs"])
