"""The trainer: batches, schedules, optimizers, hooks, precision, divergence, checkpoints and resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.models.resnet import CIFARResNet
from normlab.models.transformer import Transformer
from normlab.tasks import CharLM, ImageClassification, random_crop_flip_reference
from normlab.train import FASTEST, TrainConfig, Trainer, clip_grad_norm, fastest, log_grad_norm, lr_at


def _tiny_data(n=64, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _task(n=64, test=32, **kw):
    x, y = _tiny_data(n)
    return ImageClassification(x, y, x[:test], y[:test], **kw) if test else ImageClassification(x, y, **kw)


def _resnet(seed=0, norm=nn.BatchNorm2d):
    torch.manual_seed(seed)
    return CIFARResNet(8, norm_layer=norm, width=4)


def _strip(history):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def _tiny_run(seed, **kw):
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=seed, warmup=0.5, **kw)
    return Trainer(_resnet(seed), _task(), cfg).fit()


# --------------------------------------------------------------------------------------- batches

def test_batches_equal_the_per_sample_reference():
    x, y = _tiny_data(40)
    tr = Trainer(_resnet(), ImageClassification(x, y), TrainConfig(batch_size=8, seed=5))
    idx = torch.tensor([3, 1, 39, 3, 0])
    state = tr.generator.get_state()
    xb, yb = tr.task.batch(idx, tr.generator)
    ref = random_crop_flip_reference(x[idx], torch.Generator().set_state(state), padding=4)
    torch.testing.assert_close(xb, (ref.float() - tr.task.mean) / tr.task.std, rtol=0, atol=0)
    torch.testing.assert_close(yb, y[idx])


def test_an_epoch_visits_every_sample_once_and_drops_the_last_partial_batch():
    x, y = _tiny_data(40)
    y = torch.arange(40)  # labels name the sample
    seen = []

    class Spy(ImageClassification):
        def batch(self, idx, generator, shard=slice(None)):
            seen.append(idx.clone())
            return super().batch(idx, generator, shard)

    task = Spy(x, y % 10, augment=False)
    Trainer(_resnet(), task, TrainConfig(epochs=2, batch_size=16)).fit()
    assert len(seen) == 4  # 40 // 16 = 2 steps per epoch
    for epoch in (seen[:2], seen[2:]):
        flat = torch.cat(epoch)
        assert len(set(flat.tolist())) == 32  # no repeats within an epoch
    assert torch.cat(seen[:2]).tolist() != torch.cat(seen[2:]).tolist()  # a new permutation per epoch


def test_trainer_is_deterministic_and_records_history():
    h1, h2 = _tiny_run(3), _tiny_run(3)
    assert _strip(h1) == _strip(h2)
    assert _strip(h1) != _strip(_tiny_run(4))
    assert [r["epoch"] for r in h1] == [1, 2] and h1[-1]["step"] == 8
    assert {"train_loss", "train_error", "test_loss", "test_error", "lr"} <= set(h1[-1])
    assert h1[0]["lr"] == pytest.approx(0.05 * 1 / 2)  # the first step of a 2-step warmup


def test_sgd_steps_equal_a_plain_torch_loop():
    """No augmentation, constant lr: the trainer's parameters equal torch.optim.SGD's, step by step."""
    x, y = _tiny_data(32)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                      schedule="constant", seed=7)
    trainer = Trainer(_resnet(1), ImageClassification(x, y, augment=False), cfg)
    ref = _resnet(1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(7))
    trainer.fit()
    task = trainer.task
    for i in range(4):
        idx = perm[i * 8:(i + 1) * 8]
        loss = F.cross_entropy(ref(task.normalize(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (n, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_adamw_and_weight_decay_groups():
    x, y = _tiny_data(32)
    model = _resnet(2)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    cfg = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1,
                      schedule="constant")
    tr = Trainer(model, ImageClassification(x, y, augment=False), cfg,
                 param_groups=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": 2e-3}])
    assert isinstance(tr.optimizer, torch.optim.AdamW) and tr.optimizer.defaults["betas"] == (0.9, 0.98)
    tr.fit()
    assert [g["lr"] for g in tr.optimizer.param_groups] == [1e-3, 2e-3]  # each group keeps its own scale


def test_lr_schedules():
    cfg = TrainConfig(epochs=10, lr=1.0, schedule="step", milestones=(0.5,))
    assert lr_at(0, 100, 10, cfg) == pytest.approx(0.1) and lr_at(9, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(50, 100, 10, cfg) == 1.0 and lr_at(60, 100, 10, cfg) == pytest.approx(0.1)
    cos = TrainConfig(epochs=10, lr=1.0, schedule="cosine")
    assert lr_at(0, 100, 0, cos) == 1.0 and lr_at(50, 100, 0, cos) == pytest.approx(0.5)
    lin = TrainConfig(steps=100, epochs=None, lr=2.0, schedule="linear")
    assert [lr_at(s, 100, 20, lin) for s in (0, 19, 20, 60)] == pytest.approx([0.1, 2.0, 2.0, 1.0])
    assert lr_at(99, 100, 20, lin) == pytest.approx(2.0 / 80)
    assert lr_at(5, 100, 0, TrainConfig(lr=0.3, schedule="constant")) == 0.3


def test_hooks_receive_the_trainer_between_backward_and_step():
    seen = []

    def hook(trainer):
        seen.append((trainer.step, trainer.model.fc.weight.grad is not None, trainer.total_steps))
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 0.0)  # zero gradients: the step only decays

    model = _resnet()
    before = copy.deepcopy(model.fc.weight.detach())
    Trainer(model, _task(32, test=0), TrainConfig(epochs=1, batch_size=16, lr=0.1, weight_decay=0.0, momentum=0.0),
            hooks=[hook]).fit()
    assert seen == [(0, True, 2), (1, True, 2)]
    torch.testing.assert_close(model.fc.weight.detach(), before)


def test_clip_and_grad_norm_hooks_log_per_row():
    cfg = TrainConfig(epochs=2, batch_size=16)
    h = Trainer(_resnet(), _task(), cfg, hooks=[log_grad_norm]).fit()
    assert all(r["grad_norm"] > 0 for r in h)
    h2 = Trainer(_resnet(), _task(), cfg, hooks=[clip_grad_norm(1e-3)]).fit()
    assert all(r["grad_norm"] > 1e-3 for r in h2)  # the norm before clipping is what is logged


def test_step_budget_with_token_task():
    ids = torch.arange(3000) * 7 % 11  # a periodic text: the next token is predictable
    task = CharLM(ids[:2500], ids[2500:], context=16, eval_windows=8)
    torch.manual_seed(0)
    model = Transformer(11, d_model=16, n_heads=2, depth=1, context=16)
    cfg = TrainConfig(steps=30, epochs=None, batch_size=8, optimizer="adamw", lr=1e-2, weight_decay=0.0,
                      schedule="linear", warmup=5, eval_every=15, log_every=5)
    h = Trainer(model, task, cfg).fit()
    assert [r["step"] for r in h] == [5, 10, 15, 20, 25, 30]
    assert [("val_loss" in r) for r in h] == [False, False, True, False, False, True]
    assert "epoch" not in h[0] and "train_error" not in h[0]
    assert h[-1]["val_loss"] < h[2]["val_loss"] < math.log(11)
    with pytest.raises(ValueError, match="steps"):
        Trainer(model, task, TrainConfig(epochs=1, batch_size=8))


def test_bf16_autocast_and_channels_last():
    dtypes = []
    model = _resnet()
    model.conv1.register_forward_hook(lambda m, i, o: dtypes.append((o.dtype, o.is_contiguous(
        memory_format=torch.channels_last))))
    cfg = TrainConfig(epochs=1, batch_size=16, precision="bf16", memory_format="channels_last")
    h = Trainer(model, _task(), cfg).fit()
    assert dtypes[0] == (torch.bfloat16, True)
    assert model.conv1.weight.dtype == torch.float32  # master weights stay fp32
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert math.isfinite(h[-1]["test_loss"])
    auto = TrainConfig(precision="auto", memory_format="auto")
    assert (fastest("gn", auto).precision, fastest("gn", auto).memory_format) == FASTEST["gn"]
    kept = fastest("bn", TrainConfig(precision="fp32", memory_format="auto"))  # only "auto" is replaced
    assert kept.precision == "fp32" and kept.memory_format == FASTEST["bn"][1]
    assert (fastest("none", auto).precision, fastest("none", auto).memory_format) == ("fp32", "contiguous")
    with pytest.raises(ValueError, match="resolve 'auto'"):
        Trainer(model, _task(), TrainConfig(precision="auto"))


def test_bf16_on_a_cpu_that_emulates_it_warns_with_the_fix(monkeypatch):
    import warnings

    from normlab.train import native_bf16

    cfg = TrainConfig(epochs=1, batch_size=16, precision="bf16")
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    assert not native_bf16(torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match=r"emulated.*precision='fp32'"):
        Trainer(_resnet(), _task(), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(_resnet(), _task(), TrainConfig(epochs=1, batch_size=16))  # fp32: nothing to say
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert native_bf16(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(_resnet(), _task(), cfg)
    assert native_bf16(torch.device("cuda"))  # GPUs compute bf16 natively (a device object, no GPU needed)


def test_a_non_finite_loss_stops_the_run():
    h = Trainer(_resnet(norm=None), _task(), TrainConfig(epochs=20, batch_size=16, lr=1e6, momentum=0.0)).fit()
    assert h[-1]["diverged"] is True and h[-1]["train_loss"] is None
    assert h[-1]["step"] < 80
    assert all(v is None or not isinstance(v, float) or math.isfinite(v) for r in h for v in r.values())


def test_a_validation_set_is_evaluated_like_the_test_set():
    """`val_error`/`val_loss` are what the test metrics would be on the same images; without a validation
    set the task describes itself as before (old checkpoints keep their fingerprint)."""
    x, y = _tiny_data(64)
    model = _resnet()
    plain = ImageClassification(x, y, x[:16], y[:16])
    both = ImageClassification(x, y, x[:16], y[:16], val_images=x[16:40], val_labels=y[16:40])
    as_test = ImageClassification(x, y, x[16:40], y[16:40]).to(torch.device("cpu")).evaluate(model)
    got = both.to(torch.device("cpu")).evaluate(model)
    assert got["val_error"] == as_test["test_error"] and got["val_loss"] == pytest.approx(as_test["test_loss"], rel=1e-12)
    assert {k: got[k] for k in ("test_error", "test_loss")} == plain.to(torch.device("cpu")).evaluate(model)
    assert "n_val" not in plain.describe() and both.describe()["n_val"] == 24
    assert model.training  # evaluation leaves the mode as it found it
    with pytest.raises(ValueError, match="both val_images and val_labels"):
        ImageClassification(x, y, val_images=x)
    with pytest.raises(ValueError, match="24 validation images but 5 labels"):
        ImageClassification(x, y, val_images=x[16:40], val_labels=y[:5])


def test_bad_input_names_the_fix():
    x, y = _tiny_data(32)
    with pytest.raises(ValueError, match="uint8"):
        ImageClassification(x.float(), y)
    with pytest.raises(ValueError, match="labels"):
        ImageClassification(x, y[:5])
    with pytest.raises(ValueError, match="both test_images and test_labels"):
        ImageClassification(x, y, x)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exponential").validate()
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb").validate()
    with pytest.raises(ValueError, match="exactly one budget"):
        TrainConfig(epochs=1, steps=5).validate()
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(_resnet(), ImageClassification(x, y), TrainConfig(batch_size=64))
    with pytest.raises(TypeError, match="normlab.tasks"):
        Trainer(_resnet(), (x, y), TrainConfig())
    with pytest.raises(ValueError, match="1-D int64"):
        CharLM(torch.zeros(100), torch.zeros(100, dtype=torch.long), context=8)


# ------------------------------------------------------------------------------------ checkpoints

class _Stop(Exception):
    pass


def _stop_at(step):
    def hook(trainer):
        if trainer.step == step:
            raise _Stop
    return hook


@pytest.mark.parametrize("budget", ["epochs", "steps"])
def test_an_interrupted_run_resumes_bit_identically(tmp_path, budget):
    kw = {"epochs": 3} if budget == "epochs" else {"steps": 11, "epochs": None, "eval_every": 4}
    cfg = TrainConfig(batch_size=16, lr=0.05, seed=1, warmup=1, **kw)
    ref = Trainer(_resnet(5), _task(), cfg, hooks=[log_grad_norm])
    h_ref = ref.fit()

    ckpt = tmp_path / "run.pt"
    for stop in (6, 9):  # mid-epoch (a time-based checkpoint after every step), twice
        tr = Trainer(_resnet(5), _task(), TrainConfig(**{**cfg.__dict__, "checkpoint_every_s": 0.0}),
                     hooks=[log_grad_norm, _stop_at(stop)], checkpoint=ckpt)
        with pytest.raises(_Stop):
            tr.fit()
        assert ckpt.exists()
    tr = Trainer(_resnet(99), _task(), cfg, hooks=[log_grad_norm], checkpoint=ckpt)  # another init: overwritten
    h = tr.fit()
    assert _strip(h) == _strip(h_ref)
    for p, q in zip(tr.model.state_dict().values(), ref.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=16)
    ckpt = tmp_path / "run.pt"
    tr = Trainer(_resnet(), _task(), TrainConfig(epochs=2, batch_size=16, checkpoint_every_s=0.0),
                 hooks=[_stop_at(3)], checkpoint=ckpt)
    with pytest.raises(_Stop):
        tr.fit()
    with pytest.raises(ValueError, match=r"run\.pt belongs to another run \(its config differs"):
        Trainer(_resnet(), _task(), TrainConfig(epochs=2, batch_size=16, lr=0.2), checkpoint=ckpt).fit()
    with pytest.raises(ValueError, match="its parameters differs"):
        Trainer(CIFARResNet(8, norm_layer=nn.BatchNorm2d, width=8), _task(), cfg, checkpoint=ckpt).fit()
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"run\.pt is unreadable .*delete it"):
        Trainer(_resnet(), _task(), cfg, checkpoint=ckpt).fit()
    torch.save({"anything": 1}, ckpt)
    with pytest.raises(ValueError, match="not a normlab trainer checkpoint"):
        Trainer(_resnet(), _task(), cfg, checkpoint=ckpt).fit()


def test_compiled_training_matches_eager():
    """`compile` (here the quick `aot_eager` backend) trains the same network to the same numbers."""
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=2)
    eager = Trainer(_resnet(3), _task(), cfg).fit()
    compiled = Trainer(_resnet(3), _task(), TrainConfig(**{**cfg.__dict__, "compile": "aot_eager"})).fit()
    for a, b in zip(eager, compiled):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)


def test_optimizer_steps_only_in_the_one_training_loop():
    # The book has one engine: every experiment trains through normlab.train.Trainer. The only other
    # optimizer is trainer_speed's bare baseline, the loop the trainer is measured against.
    import re
    from pathlib import Path

    import normlab

    root = Path(normlab.__file__).parent
    allowed = {root / "train.py", root / "experiments" / "trainer_speed.py"}
    pattern = re.compile(r"torch\.optim\.|\.zero_grad\(|\bopt\w*\.step\(\)")
    offenders = [f"{p.relative_to(root.parent)}:{i}" for p in sorted(root.rglob("*.py")) if p not in allowed
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line.split("#")[0]) and not line.lstrip().startswith(("\"", "'"))]
    assert not offenders, f"optimizer steps outside normlab/train.py: {offenders}; train with Trainer instead"


def test_trainer_speed_table_prints_each_setting_and_the_defaults_gain():
    from normlab.experiments import trainer_speed

    combos = ["fp32/contiguous", "fp32/channels_last", "bf16/contiguous", "bf16/channels_last", "bare"]
    metrics = {"images_per_s": dict(zip(combos, [100.0, 90.0, 10.0, 12.4, 101.0])), "speedup": 0.1,
               "speedup_ci": [0.09, 0.11], "default": "bf16/contiguous", "fastest": "fp32/contiguous",
               "fp32_over_bare": 0.99}
    record = {"profile": "cpu", "provenance": {"device_name": "Some CPU", "device": "cpu", "num_threads": 2},
              "runs": [{"config": {"norm": "gn", "batch_size": 2, "workers": 8}, "metrics": metrics}]}
    lines = trainer_speed.table(record)
    assert lines[0] == "trainer_speed, cpu profile, Some CPU (cpu, 2 threads)"
    assert lines[1].split() == ["norm", "N", "k", *combos, "default/fp32", "NCHW"]
    assert lines[2].split() == ["gn", "2", "8", "100", "90", "10", "12", "101", "0.10", "[0.09,", "0.11]",
                                "(bf16/contiguous,", "fastest:", "fp32/contiguous)"]
    assert lines[3] == "trainer overhead, fp32 NCHW images/s over the bare loop's: gn N=2 0.99"
    metrics["fastest"] = "bf16/contiguous"
    assert trainer_speed.table(record)[2].endswith("(bf16/contiguous, the fastest)")
