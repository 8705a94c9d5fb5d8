"""The claim-measuring experiments: norm_footprint (C15, C22, C26, C38), norm_numerics (C26), norm_identities
(C10, C13, C20). Each test states a fact the ledger relies on and would fail if the measurement broke."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.experiments import norm_footprint as fp
from normlab.experiments import norm_identities as ident
from normlab.experiments import norm_numerics as num


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record(module, config, runs=None):
    """A record as `normlab.results.load` returns it, from `run_one` of `runs` (default: all)."""
    runs = module.runs(config) if runs is None else runs
    return {"runs": [{"config": r, "seed": r["seed"], **module.run_one(r, config, "cpu")} for r in runs]}


# ------------------------------------------------------------------------------------------------
# norm_footprint
# ------------------------------------------------------------------------------------------------

def test_footprint_param_and_buffer_counts_are_the_formulas():
    c = 512
    config = {**fp.PROFILES["smoke"], "channels": c, "ln_chw": [4, 2]}
    rec = record(fp, config, [{"part": "layers", "channels": c, "seed": 0}])
    for impl in fp.IMPLS:
        t = fp.param_counts(rec, impl)
        # BN: γ, β trainable (2C); running mean and variance (2C floats) + num_batches_tracked (1 int64)
        assert (t["bn"]["params"], t["bn"]["buffers"], t["bn"]["float_buffers"]) == (2 * c, 2 * c + 1, 2 * c)
        assert t["bn"]["buffer_bytes"] == 2 * c * 4 + 8
        for name in ("gn", "ln_cnn", "ln", "in_affine"):
            assert (t[name]["params"], t[name]["buffers"]) == (2 * c, 0), name
        assert t["ln_chw"]["params"] == 2 * c * 4 * 2  # elementwise affine over (C, H, W)
        assert (t["in"]["params"], t["in"]["buffers"]) == (0, 0)  # torch's defaults: no affine, no stats
        assert (t["in_stats"]["params"], t["in_stats"]["buffers"]) == (2 * c, 2 * c + 1)
        assert (t["rms"]["params"], t["rms"]["buffers"]) == (c, 0)
        assert (t["none"]["params"], t["none"]["buffers"]) == (0, 0)
    assert fp.param_counts(rec, "normlab") == fp.param_counts(rec, "torch")


def test_saved_tensors_counts_a_linear_layers_input_once_and_not_its_weight():
    lin = nn.Linear(10, 5)
    x = torch.randn(7, 10)
    s = fp.saved_bytes(lin, x)
    assert s["saved_bytes"] == 7 * 10 * 4  # the input, for the weight's gradient
    assert s["saved_param_bytes"] == 0  # the input needs no gradient, so the weight is not kept
    assert s["norm_bytes"] == 0
    s = fp.saved_bytes(lin, x.requires_grad_())
    assert s["saved_bytes"] == 7 * 10 * 4
    assert s["saved_param_bytes"] == 10 * 5 * 4  # now it is (as a transposed view), and counted apart


def test_saved_tensors_count_each_storage_once_with_its_full_size():
    x = torch.randn(6, 8, requires_grad=True)
    with fp.SavedTensors() as c:
        y = x.exp()  # saves its result y
        z = y * y  # saves y twice: the same storage
        w = x[:, :2].sin()  # saves a view of x: x's whole storage is held
    assert c.n_saved == 4 and len(c.storages) == 2
    assert c.summary()["saved_bytes"] == 2 * 6 * 8 * 4
    del z, w


def test_saved_tensors_attribute_what_a_norm_saves():
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))
    s = fp.saved_bytes(model, torch.randn(7, 10))
    # torch's batch_norm keeps its input (7 x 5) and the batch mean and inverse std (5 each);
    # the running buffers it also saves are buffers, counted apart
    assert s["norm_only_bytes"] == s["norm_bytes"] == (7 * 5 + 5 + 5) * 4
    assert s["saved_bytes"] == 7 * 10 * 4 + s["norm_bytes"]


def test_footprint_smoke_models_norm_bytes_are_what_the_norm_adds():
    config = fp.PROFILES["smoke"]
    rec = record(fp, config, [r for r in fp.runs(config) if r["part"] != "layers"])
    for part, norms in (("resnet20", ("bn", "gn", "ln", "in")), ("transformer", ("ln", "rms"))):
        none = fp.saved(rec, part, "none")
        assert none["norm_bytes"] == 0 and none["saved_bytes"] > 0
        for norm in norms:
            for impl in fp.IMPLS:
                m = fp.saved(rec, part, norm, impl)
                assert m["norm_layers"] > 0 and m["norm_only_bytes"] > 0, (part, norm, impl)
                if part == "resnet20":  # a norm's output replaces the conv output the ReLU saved
                    assert m["saved_bytes"] == none["saved_bytes"] + m["norm_only_bytes"], (norm, impl)
            ours, torchs = (fp.saved(rec, part, norm, impl)["saved_bytes"] for impl in ("normlab", "torch"))
            assert ours >= torchs, (part, norm)  # compositions keep their intermediates
    # torch's fused kernels keep the input plus per-group statistics: BN and GN cost about the same
    assert fp.memory_ratio(rec, "resnet20", "gn", "bn") == pytest.approx(1.0, abs=0.02)
    assert 0 < fp.norm_share(rec, "resnet20", "bn") < 1


def test_footprint_bad_names_say_what_to_use():
    config = fp.PROFILES["smoke"]
    with pytest.raises(ValueError, match="unknown part 'model'; choose one of layers, resnet20, transformer"):
        fp.run_one({"part": "model", "seed": 0}, config)
    with pytest.raises(ValueError, match="unknown ResNet norm 'rms'; choose one of bn, gn, ln, in, none"):
        fp.run_one({"part": "resnet20", "norm": "rms", "impl": "torch", "seed": 0}, config)
    with pytest.raises(ValueError, match="unknown implementation 'timm'; choose one of normlab, torch"):
        fp.run_one({"part": "transformer", "norm": "ln", "impl": "timm", "seed": 0}, config)
    with pytest.raises(ValueError, match="no resnet20 run with norm='gn'"):
        fp.saved({"runs": []}, "resnet20", "gn")
    with pytest.raises(ValueError, match="no 'layers' run"):
        fp.param_counts({"runs": []})


# ------------------------------------------------------------------------------------------------
# norm_numerics
# ------------------------------------------------------------------------------------------------

def test_lowp_mean_rounds_every_addition_in_the_low_dtype():
    assert num.lowp_mean(torch.tensor([2048.0, 1.0], dtype=torch.float16)).item() == 1024.0  # 2049 -> 2048
    x = torch.randn(3, 64, dtype=torch.float64)
    assert torch.allclose(num.lowp_mean(x), x.mean(-1, keepdim=True), atol=1e-15)
    with pytest.raises(ValueError, match="power-of-two last dim.*use hidden = 256"):
        num.lowp_mean(torch.ones(2, 12))


def test_numerics_float64_low_precision_variants_match_the_reference():
    config = {"hidden": 256, "rows": 2, "offsets": [0, 1000], "dtypes": ["float64"], "seeds": [0]}
    for run in num.runs(config):
        m = num.run_one(run, config)["metrics"]
        for impl in ("ln_twopass_lowp", "ln_twopass_fp32", "rms_lowp", "ln_native", "rms_native"):
            assert m[f"{impl}_max_err"] < 1e-12, (run, impl)
        assert m["input_noise"] == 0


def test_numerics_fp16_offset_1000_onepass_breaks_twopass_does_not():
    config = {"hidden": 1024, "rows": 4, "offsets": [0, 1000], "dtypes": ["float16"], "seeds": [0]}
    rec = record(num, config)
    at = num.error_table(rec, "float16")[1000]
    floor = at["ln_rounded"]
    assert at["ln_onepass_lowp"] is None or at["ln_onepass_lowp"] > 1  # cancellation (or inf - inf)
    assert at["ln_onepass_fp32"] > 0.05  # E[x²] - E[x]² loses ~20 bits even in float32
    assert at["ln_twopass_fp32"] <= 1.01 * floor  # fp32 statistics: the output's own rounding, no more
    assert at["ln_native"] < 2 * floor  # torch's CPU kernel computes in float32: about one rounding
    # all-float16 two-pass: only the mean's rounding error (float16's spacing at 1000 is 0.5), and
    # still better than the one-pass form with float32 statistics
    assert at["ln_twopass_lowp"] < min(0.25, at["ln_onepass_fp32"])
    assert at["rms_lowp"] > 0.9  # x² = 1e6 overflows float16: rsqrt(inf) = 0, every output 0
    assert num.error_table(rec, "float16", "stat_err")[1000]["rms_lowp"] is None
    assert num.breakdown_offset(rec, "float16", "ln_onepass_fp32") == 1000
    assert num.breakdown_offset(rec, "float16", "ln_twopass_fp32") is None


def test_numerics_rmsnorm_signal_error_grows_with_the_offset():
    # at mu >> sigma RMSNorm's output is ~1 plus a sigma/mu ripple: float16 rounding eats the ripple
    config = {"hidden": 256, "rows": 2, "offsets": [0, 1000], "dtypes": ["float16"], "seeds": [0]}
    rec = record(num, config)
    small, large = (num.error_table(rec, "float16", "signal_err")[o]["rms_fp32"] for o in (0, 1000))
    assert small < 0.01 and large > 0.1


def test_numerics_bad_inputs_name_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'float8'; choose one of float16, bfloat16"):
        num.run_one({"dtype": "float8", "offset": 0, "seed": 0}, num.PROFILES["smoke"])
    with pytest.raises(ValueError, match="unknown \\(norm, impl\\)"):
        num.compute("rms", "twopass_lowp", torch.ones(1, 4))
    rec = record(num, num.PROFILES["smoke"])
    with pytest.raises(ValueError, match="no runs at dtype 'bfloat16'; recorded: \\['float16', 'float64'\\]"):
        num.error_table(rec, "bfloat16")
    with pytest.raises(ValueError, match="unknown implementation 'ln_welford'"):
        num.breakdown_offset(rec, "float16", "ln_welford")


# ------------------------------------------------------------------------------------------------
# norm_identities
# ------------------------------------------------------------------------------------------------

def test_identities_group_norm_special_cases_in_float64():
    rec = record(ident, ident.PROFILES["smoke"], [{"claim": "C13", "seed": 0}])
    for impl in ident.IMPLS:
        g = ident.group_identities(rec, impl)
        assert g["gn1_vs_ln"] < 1e-12 and g["gn1_vs_ln_affine"] < 1e-12 and g["gnC_vs_in"] < 1e-12, impl
        assert g["bn_vs_gn_min"] > 0.1 and g["bn_vs_gn_G_equals_N"] > 0.1, impl  # no G is BatchNorm
        c = ident.PROFILES["smoke"]["channels"]
        assert (g["gn1_params"], g["ln_chw_params"]) == (2 * c, 2 * c * ident.PROFILES["smoke"]["size"] ** 2)


def test_identities_batch_one_is_instance_norm_on_maps_and_refused_on_vectors():
    rec = record(ident, ident.PROFILES["smoke"], [{"claim": "C10", "seed": 0}])
    for impl in ident.IMPLS:
        b = ident.batch_one(rec, impl)
        assert b["conv_defined"] and b["conv_vs_in"] < 1e-12 and b["fc_eval_ok"] and b["resnet_b1_finite"]
        assert "more than 1 value per channel" in b["fc_error"]
        assert "more than 1 value per channel" in b["fc_1x1_error"]


def test_identities_folding_keeps_the_logits():
    rec = record(ident, ident.PROFILES["smoke"], [{"claim": "C20", "seed": 0}])
    for impl in ident.IMPLS:
        f = ident.fold_errors(rec, impl)
        assert f["bn_layers"] == 7 and f["bn_layers_after_fold"] == 0  # ResNet-8: stem + 3 blocks x 2
        assert f["float64_max_rel"] < 1e-12
        assert f["float32_max_rel"] < 1e-5 and f["float32_folded_vs_f64"] < 1e-5


def test_identities_bad_inputs_name_the_choices():
    with pytest.raises(ValueError, match="unknown claim 'C99'; choose one of C13, C10, C20"):
        ident.run_one({"claim": "C99", "seed": 0}, ident.PROFILES["smoke"])
    with pytest.raises(ValueError, match="the record has no C20 runs"):
        ident.fold_errors({"runs": []})
    with pytest.raises(ValueError, match="unknown implementation 'jax'; choose one of normlab, torch"):
        ident.group_identities({"runs": []}, "jax")
