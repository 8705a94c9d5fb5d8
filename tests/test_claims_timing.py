"""The whole-model timing experiments of claims C21/C38 (`inference_overhead`) and C23 (`llama_step`):
their models, the BN fold they time, their readers on hand-built records, and their error messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.experiments import _timing, inference_overhead as io, llama_step as ls
from normlab.fold import count_batchnorms, fold_batchnorm
from normlab.models.llama import Llama, Rotary, make_norm, param_count_formula, swiglu_hidden

SMOKE = io.PROFILES["smoke"]


# --- inference_overhead's models -------------------------------------------------------------------------


@pytest.mark.parametrize("impl", io.IMPLS)
@pytest.mark.parametrize("variant", ("none",) + io.VARIANTS["resnet"])
def test_resnet_variants_give_logits_of_the_same_shape(variant, impl):
    net = io.build("resnet", variant, impl, SMOKE["resnet"], seed=0)
    assert not net.training
    with torch.inference_mode():
        assert net(torch.randn(3, 3, 16, 16)).shape == (3, 10)


@pytest.mark.parametrize("impl", io.IMPLS)
@pytest.mark.parametrize("variant", ("none",) + io.VARIANTS["gpt"])
def test_gpt_variants_give_logits_of_the_same_shape(variant, impl):
    cfg = SMOKE["gpt"]
    net = io.build("gpt", variant, impl, cfg, seed=0)
    kinds = {type(b.norm1) for b in net.blocks} | {type(net.final_norm)}
    assert len(kinds) == 1 and (variant != "none") == (kinds != {nn.Identity})  # every norm swapped
    with torch.inference_mode():
        assert net(torch.randint(0, cfg["vocab_size"], (2, cfg["context"]))).shape == (2, cfg["context"], 11)


def test_variants_share_the_weights_of_everything_but_the_norm():
    cfg = SMOKE["resnet"]
    none, gn = io.build("resnet", "none", "torch", cfg, 0), io.build("resnet", "gn", "torch", cfg, 0)
    torch.testing.assert_close(none.blocks[1].conv2.weight, gn.blocks[1].conv2.weight, rtol=0, atol=0)


@pytest.mark.parametrize("impl", io.IMPLS)
def test_folded_resnet_gives_the_unfolded_logits(impl):
    cfg = {**SMOKE["resnet"], "depth": 14}
    bn, folded = io.build("resnet", "bn", impl, cfg, 0), io.build("resnet", "bn_fold", impl, cfg, 0)
    assert count_batchnorms(bn) == 1 + 2 * 6 and count_batchnorms(folded) == 0  # depth 14: 3 stages x 2 blocks
    assert sum(isinstance(m, nn.Identity) for m in folded.modules()) >= 13  # the none net's tree, plus biases
    x = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        ref = bn(x)
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(folded(x), fold_batchnorm(bn)(x), rtol=1e-4, atol=1e-5)
        assert (ref - io.build("resnet", "none", impl, cfg, 0)(x)).abs().max() > 1e-2  # BN is not a no-op here


def test_variant_keys_name_bn_fold_once():
    assert io.variant_keys("resnet", ["torch", "normlab"]) == [
        "none", "torch/bn", "torch/bn_fold", "torch/gn", "torch/ln", "torch/in",
        "normlab/bn", "normlab/gn", "normlab/ln", "normlab/in"]
    assert io.split_key("normlab/gn") == ("gn", "normlab") and io.split_key("none") == ("none", "torch")


# --- the LLaMA-style model -------------------------------------------------------------------------------


def llama(norm="rms", impl="torch", **kw) -> Llama:
    torch.manual_seed(0)
    return Llama(**{"vocab_size": 13, "d_model": 32, "n_heads": 4, "depth": 2, "context": 10, "norm": norm,
                    "impl": impl, **kw})


@pytest.mark.parametrize("impl", ("torch", "normlab"))
@pytest.mark.parametrize("norm,ln_bias", [("rms", True), ("ln", True), ("ln", False), ("none", True)])
def test_llama_shapes_and_parameter_count_formula(norm, ln_bias, impl):
    model = llama(norm, impl, ln_bias=ln_bias)
    assert model(torch.randint(0, 13, (2, 7))).shape == (2, 7, 13)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_count_formula(13, 32, 2, model.d_ff, norm, ln_bias)
    # by hand for rms: 2 blocks x (4*32^2 + 3*32*128 + 2*32) + 13*32 + 32 + 32*13
    assert model.d_ff == swiglu_hidden(32) == 128
    if norm == "rms":
        assert n == 2 * (4 * 32 * 32 + 3 * 32 * 128 + 64) + 13 * 32 + 32 + 32 * 13
    assert not any(k.endswith("cos") or k.endswith("sin") for k in model.state_dict())  # RoPE: no state


@pytest.mark.parametrize("norm", ("rms", "ln"))
def test_llama_torch_and_normlab_norms_compute_the_same_model(norm):
    a, b = llama(norm, "torch").double(), llama(norm, "normlab").double()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 13, (2, 10))
    torch.testing.assert_close(a(idx), b(idx), rtol=1e-10, atol=1e-10)


def test_llama_is_causal():
    model = llama().double().eval()
    idx = torch.randint(0, 13, (2, 10))
    later = idx.clone()
    later[:, 6:] = (later[:, 6:] + 1) % 13
    a, b = model(idx), model(later)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6


def test_rotary_scores_depend_on_relative_position_only():
    rope = Rotary(8, context=12)
    q, k = torch.randn(8), torch.randn(8)

    def score(t: int, s: int) -> float:
        x = torch.zeros(1, 1, 12, 8)
        y = torch.zeros(1, 1, 12, 8)
        x[0, 0, t], y[0, 0, s] = q, k
        return float(rope(x)[0, 0, t] @ rope(y)[0, 0, s])

    assert score(5, 2) == pytest.approx(score(9, 6), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
    assert score(3, 3) == pytest.approx(float(q @ k), rel=1e-5)  # no rotation between equal positions


# --- readers on hand-built records -----------------------------------------------------------------------

BASE = [1.00, 1.10, 0.90, 1.05, 0.95]


def fake_inference_record() -> dict:
    times = {"none": BASE, "torch/bn": [1.02 * t for t in BASE], "torch/gn": [1.25 * t for t in BASE],
             "normlab/gn": [2.0 * t for t in BASE]}
    run = {"config": {"model": "resnet", "batch": 64, "seed": 0}, "metrics": {"times_s": times}}
    return {"experiment": "inference_overhead", "runs": [run]}


def fake_llama_record() -> dict:
    times = {"torch/ln": BASE, "torch/rms": [0.8 * t for t in BASE], "none": [0.9 * t for t in BASE]}
    run = {"config": {"d_model": 256, "precision": "bf16", "seed": 0}, "metrics": {"times_s": times}}
    return {"experiment": "llama_step", "runs": [run]}


def test_overhead_reader_gives_the_known_ratio():
    rec = fake_inference_record()
    bn = io.overhead(rec, "bn", model="resnet", batch=64)
    assert (bn.estimate, bn.low, bn.high) == pytest.approx((1.02, 1.02, 1.02))
    assert io.overhead(rec, "gn", batch=64, impl="normlab").estimate == pytest.approx(2.0)
    table = io.overhead_table(rec)
    assert set(table) == {("resnet", 64)} and set(table[("resnet", 64)]) == {"bn", "gn"}
    assert table[("resnet", 64)]["gn"].estimate == pytest.approx(1.25)


def test_llama_readers_give_the_known_ratio_and_share():
    rec = fake_llama_record()
    r = ls.rms_over_ln(rec, 256, "bf16")
    assert (r.estimate, r.low, r.high) == pytest.approx((0.8, 0.8, 0.8))
    share = ls.norm_share(rec, "ln", 256, "bf16")
    assert (share.estimate, share.low, share.high) == pytest.approx((0.1, 0.1, 0.1))
    assert ls.norm_share(rec, "rms", 256, "bf16").estimate == pytest.approx(1 - 0.9 / 0.8)  # negative: none slower


def test_share_interval_bounds_swap():
    rec = fake_llama_record()
    rec["runs"][0]["metrics"]["times_s"]["none"] = [0.9, 1.0, 0.7, 1.0, 0.9]  # noisy: a real interval
    ratio = _timing.ratio(rec["runs"][0]["metrics"]["times_s"], "none", "torch/ln")
    share = ls.norm_share(rec, "ln", 256, "bf16")
    assert share.low == pytest.approx(1 - ratio.high) and share.high == pytest.approx(1 - ratio.low)
    assert share.low < share.estimate < share.high


# --- clear errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,message", [
    (lambda: io.overhead(fake_inference_record(), "rms", model="resnet", batch=64), "use 'none' or one of bn"),
    (lambda: io.overhead(fake_inference_record(), "bn", model="vit", batch=64), "use one of resnet, gpt"),
    (lambda: io.overhead(fake_inference_record(), "bn", batch=64, impl="apex"), "use 'torch'"),
    (lambda: io.overhead(fake_inference_record(), "none", batch=64), "ask for a norm variant"),
    (lambda: io.overhead(fake_inference_record(), "bn", batch=1), "the record has: model='resnet', batch=64"),
    (lambda: io.overhead(fake_inference_record(), "ln", batch=64), "record a profile whose impls include it"),
    (lambda: io.overhead(fake_llama_record(), "bn", batch=64), "normlab.results.load('inference_overhead')"),
    (lambda: ls.rms_over_ln(fake_llama_record(), 512, "bf16"), "the record has: d_model=256"),
    (lambda: ls.rms_over_ln(fake_llama_record(), 256, "fp16"), "use one of fp32, bf16"),
    (lambda: ls.rms_over_ln(fake_llama_record(), 256, "bf16", impl="normlab"), "timed: torch/ln"),
    (lambda: ls.norm_share(fake_llama_record(), "gn", 256, "bf16"), "use 'ln' or 'rms'"),
    (lambda: io.build("resnet", "rms", "torch", SMOKE["resnet"], 0), "use 'none' or one of bn, bn_fold"),
    (lambda: io.build("gpt", "gn", "torch", SMOKE["gpt"], 0), "use 'none' or one of ln, rms"),
    (lambda: Llama(13, norm="layernorm"), "norm must be one of ('rms', 'ln', 'none')"),
    (lambda: make_norm("rms", 8, impl="apex"), "'torch' for torch.nn's layers"),
    (lambda: Llama(13, d_model=30, n_heads=4), "divisible by n_heads"),
    (lambda: ls.train_step(llama(), torch.zeros(1, 3, dtype=torch.long), "fp16", 1e-3), "use one of fp32, bf16"),
    (lambda: _timing.num_threads(0).__enter__(), "threads must be a positive int"),
])
def test_bad_inputs_name_the_fix(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value), str(err.value)


def test_norm_share_needs_the_none_variant():
    rec = fake_llama_record()
    del rec["runs"][0]["metrics"]["times_s"]["none"]
    with pytest.raises(ValueError, match='"none": true'):
        ls.norm_share(rec, "ln", 256, "bf16")


def test_num_threads_is_restored():
    before = torch.get_num_threads()
    with _timing.num_threads(1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# --- profiles --------------------------------------------------------------------------------------------


def test_profiles_time_what_the_claims_need():
    cpu = io.PROFILES["cpu"]
    assert cpu["resnet"]["depth"] == 20 and cpu["resnet"]["image_size"] == 32 and cpu["resnet"]["batches"] == [1, 64]
    assert {r["model"] for r in io.runs(cpu)} == {"resnet", "gpt"} and cpu["threads"] == 2
    lcpu = ls.PROFILES["cpu"]
    assert lcpu["d_models"] == [256, 512] and set(lcpu["precisions"]) == {"fp32", "bf16"} and lcpu["none"]
    assert len(ls.runs(lcpu)) == 4 and ls.variant_keys(lcpu)[:2] == ["torch/ln", "torch/rms"]
    assert {"smoke", "cpu", "full"} <= set(io.PROFILES) & set(ls.PROFILES)
