"""The GPT-style Transformer of the pre-LN vs post-LN chapter, and the `prepost_ln` experiment's smoke profile."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from normlab import norms
from normlab.experiments import prepost_ln
from normlab.models.transformer import (Block, DeepNormBlock, Transformer, describe, flops_per_token, num_params,
                                        param_count_formula)

CASES = [("post", "layernorm"), ("pre", "layernorm"), ("post", "rmsnorm"), ("pre", "rmsnorm")]


def small(placement="pre", norm="layernorm", **kw) -> Transformer:
    args = dict(vocab_size=11, d_model=16, n_heads=2, depth=3, context=12, placement=placement, norm=norm)
    args.update(kw)
    torch.manual_seed(0)
    return Transformer(**args).double()


@pytest.mark.parametrize("placement,norm", CASES)
def test_causal_mask(placement, norm):
    """The logits at position t must not change when tokens after t change."""
    model = small(placement, norm).eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 11, (2, 12), generator=g)
    t = 5
    perturbed = idx.clone()
    perturbed[:, t + 1:] = torch.randint(0, 11, (2, 12 - t - 1), generator=g)
    assert not torch.equal(idx, perturbed)
    a, b = model(idx), model(perturbed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-12)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-6  # the future does reach later positions


def reference_attention(attn, x):
    """Hand-written causal multi-head attention with an explicit -inf mask (no SDPA)."""
    B, T, C = x.shape
    h = attn.n_heads
    q, k, v = attn.qkv(x).split(C, dim=-1)
    q, k, v = (z.view(B, T, h, C // h).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // h)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    y = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, T, C))


def test_attention_matches_hand_written_reference():
    model = small()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn(x), reference_attention(attn, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("placement,norm", CASES)
def test_block_wiring_matches_hand_written_reference(placement, norm):
    """post: x = LN(x + F(x)) for both sublayers; pre: x = x + F(LN(x))."""
    torch.manual_seed(0)
    block = Block(16, 2, 64, placement, norm).double()
    for p in block.parameters():  # non-trivial gains/biases so a swapped norm would show
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    attn = lambda z: reference_attention(block.attn, z)  # noqa: E731
    ffn = lambda z: block.ffn.w2(torch.relu(block.ffn.w1(z)))  # noqa: E731
    if placement == "post":
        h = block.norm1(x + attn(x))
        expected = block.norm2(h + ffn(h))
    else:
        h = x + attn(block.norm1(x))
        expected = h + ffn(block.norm2(h))
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_norm_sees_residual_sum_in_post_and_stream_in_pre(placement):
    """Spy on norm1's input: post-LN normalizes x + Attn(x), pre-LN normalizes x itself (the stream
    bypasses the norm)."""
    block = Block(16, 2, 64, placement, "layernorm").double()
    seen = []
    block.norm1.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    block(x)
    expected = x + block.attn(x) if placement == "post" else x
    torch.testing.assert_close(seen[0], expected, rtol=1e-12, atol=1e-12)


def test_norm_types_and_final_norm():
    """normlab's own layers are used; pre-LN has a final norm before the head, post-LN does not."""
    pre, post = small("pre", "layernorm"), small("post", "rmsnorm")
    assert isinstance(pre.blocks[0].norm1, norms.LayerNorm) and isinstance(pre.final_norm, norms.LayerNorm)
    assert isinstance(post.blocks[0].norm2, norms.RMSNorm) and isinstance(post.final_norm, torch.nn.Identity)
    # post-LN's output is the last block's norm output: per-position unit RMS (gain 1 at init)
    x = post.tok_emb(torch.arange(12)[None] % 11) + post.pos_emb(torch.arange(12))
    for block in post.blocks:
        x = block(x)
    torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(1, 12, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("placement,norm", CASES)
@pytest.mark.parametrize("depth,d_model,d_ff", [(1, 8, 32), (3, 16, 24)])
def test_param_count_formula(placement, norm, depth, d_model, d_ff):
    model = Transformer(13, d_model=d_model, n_heads=2, depth=depth, d_ff=d_ff, context=7,
                        placement=placement, norm=norm)
    assert num_params(model) == param_count_formula(13, d_model, depth, d_ff, 7, placement, norm)


def test_flops_per_token_matches_torch_flop_counter():
    """Our closed form against torch's own FLOP counter (which counts matmuls and attention, as we do)."""
    model = small(context=12).float()
    idx = torch.randint(0, 11, (3, 12))
    flops = flops_per_token(model)
    with FlopCounterMode(display=False) as counter:  # the weight matmuls (SDPA's CPU kernel is not counted)
        model(idx)
    assert counter.get_total_flops() == flops["matmul"] * idx.numel()
    x = torch.randn(3, 12, 16)
    with FlopCounterMode(display=False) as counter:  # QK^T and AV of one layer, written as plain matmuls
        q, k, v = (z.view(3, 12, 2, 8).transpose(1, 2) for z in x.repeat(1, 1, 3).split(16, -1))
        torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    assert counter.get_total_flops() * model.depth == flops["attention"] * idx.numel()
    assert flops["forward"] == flops["matmul"] + flops["attention"] and flops["train"] == 3 * flops["forward"]
    assert "parameters" in describe(model) and "MFLOP/token" in describe(model)


def test_xavier_init():
    """Xavier-uniform bounds for every weight matrix (Q, K, V each as a (d, d) matrix), zero biases."""
    model = Transformer(11, d_model=16, n_heads=2, depth=2, context=8)
    bound = lambda fan_in, fan_out: math.sqrt(6 / (fan_in + fan_out))  # noqa: E731
    for block in model.blocks:
        assert block.attn.qkv.weight.abs().max() <= bound(16, 16)
        assert block.ffn.w2.weight.abs().max() <= bound(64, 16)
        assert block.ffn.w2.weight.abs().max() > 0.8 * bound(64, 16)
        assert torch.count_nonzero(block.ffn.w1.bias) == 0
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.3)
    wide = Transformer(11, d_model=16, n_heads=2, depth=1, context=8, embedding_std=1.0)
    assert wide.pos_emb.weight.std().item() == pytest.approx(1.0, rel=0.3)


@pytest.mark.parametrize("kwargs,match", [
    ({"placement": "middle"}, "placement"),
    ({"norm": "batchnorm"}, "norm must be one of"),
    ({"d_model": 10, "n_heads": 3}, "divisible"),
    ({"depth": 0}, "depth"),
])
def test_bad_arguments(kwargs, match):
    args = dict(vocab_size=11, d_model=16, n_heads=2, depth=1, context=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Transformer(**args)


def test_bad_inputs():
    model = small()
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.zeros(12, dtype=torch.long))


# ------------------------------------------------------------------------------------- the experiment

def test_lr_schedule_is_xiong_et_al_warmup_then_linear_decay():
    from normlab.train import TrainConfig, lr_at

    cfg = TrainConfig(steps=12, epochs=None, lr=1.0, schedule="linear", warmup=4)
    lr = [lr_at(s, 12, 4, cfg) for s in range(12)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[-1] == pytest.approx(1 / 8) and all(a >= b for a, b in zip(lr[3:], lr[4:]))
    assert lr_at(0, 10, 0, cfg) == 1.0


def test_char_data_split():
    train, val, vocab = prepost_ln.char_data(0.1)
    assert len(vocab) == 65 and len(train) + len(val) == 1_115_394
    assert len(val) == pytest.approx(0.1 * 1_115_394, abs=1)
    assert "".join(vocab[i] for i in train[:14].tolist()) == "First Citizen:"
    with pytest.raises(ValueError, match="val_fraction"):
        prepost_ln.char_data(1.5)


def test_smoke_profile_records_the_keys(tmp_path):
    from normlab.results import runs_where
    from normlab.sweep import sweep

    config = prepost_ln.PROFILES["smoke"]
    record = sweep("prepost_ln", "smoke", out=tmp_path / "smoke.json", device="cpu", progress=False, log=None)
    assert len(record["runs"]) == len(prepost_ln.runs(config))
    for run in runs_where(record, study="grad_at_init"):
        g = run["metrics"]["grad_norm_by_layer"]
        assert len(g) == run["config"]["depth"] and all(v > 0 for v in g)
        assert run["config"]["placement"] in ("post", "pre")
    trained = runs_where(record, study="train")
    assert {r["config"]["warmup_steps"] for r in trained} == set(config["train"]["warmup_steps"])
    assert {r["config"]["lr"] for r in trained} == set(config["train"]["lrs"])
    assert runs_where(record, study="train", norm="rmsnorm")
    for run in trained + runs_where(record, study="depth"):
        m = run["metrics"]
        assert isinstance(m["diverged"], bool)
        assert m["diverged"] or 0 < m["val_loss"] < 6
        assert run["history"] and "train_loss" in run["history"][0]
    assert {r["config"]["depth"] for r in runs_where(record, study="depth")} == set(config["depth"]["depths"])
    # the depth series borrows the train study's runs at its depth (same lr, no warmup)
    series = prepost_ln.depth_runs(record)
    assert sorted({r["config"]["depth"] for r in series}) == sorted({*config["depth"]["depths"], config["train"]["depth"]})
    assert all(r["config"]["lr"] == config["depth"]["lr"] and r["config"]["warmup_steps"] == 0 for r in series)
    assert len(series) == 2 * len({r["config"]["depth"] for r in series})
    with pytest.raises(ValueError, match="unknown study"):
        prepost_ln.run_one({"study": "nope"}, config, torch.device("cpu"))


def test_char_split_is_contiguous_and_complete():
    from normlab.data import char_split, tiny_shakespeare

    train, val, vocab = char_split(0.1)
    text = tiny_shakespeare()
    assert len(train) + len(val) == len(text) and len(vocab) == 65
    assert "".join(vocab[i] for i in train[:50].tolist()) == text[:50]
    assert "".join(vocab[i] for i in val[-20:].tolist()) == text[-20:]
    with pytest.raises(ValueError, match="val_fraction"):
        char_split(1.0)


# ------------------------------------------------------------------------------------------- DeepNorm

def test_deepnorm_constants_are_the_papers_decoder_only_values():
    """Wang et al. (2022), Figure 2: decoder-only alpha = (2N)^(1/4), beta = (8N)^(-1/4)."""
    from normlab.models.transformer import deepnorm_constants

    assert deepnorm_constants(1) == pytest.approx((2 ** 0.25, 8 ** -0.25))
    alpha, beta = deepnorm_constants(6)
    assert alpha == pytest.approx(1.861209718) and beta == pytest.approx(0.379917843)
    assert deepnorm_constants(24) == pytest.approx((48 ** 0.25, 192 ** -0.25))
    model = small("deepnorm", depth=12)
    assert (model.deepnorm_alpha, model.deepnorm_beta) == deepnorm_constants(12)
    assert all(b.alpha == model.deepnorm_alpha for b in model.blocks)
    with pytest.raises(ValueError, match="number of layers"):
        deepnorm_constants(0)


def test_deepnorm_init_scales_ffn_value_and_output_by_beta():
    """W^1, W^2, W^V, W^O are post-LN's Xavier draws times beta; W^Q, W^K, embeddings, head unchanged."""
    post, deep = small("post", "layernorm").float(), small("deepnorm", "layernorm").float()  # as drawn
    beta, d = deep.deepnorm_beta, 16
    assert 0 < beta < 1
    for bp, bd in zip(post.blocks, deep.blocks):
        for name in ("w1", "w2"):
            assert torch.equal(getattr(bd.ffn, name).weight, getattr(bp.ffn, name).weight * beta)
        assert torch.equal(bd.attn.proj.weight, bp.attn.proj.weight * beta)
        assert torch.equal(bd.attn.qkv.weight[2 * d:], bp.attn.qkv.weight[2 * d:] * beta)  # W^V
        assert torch.equal(bd.attn.qkv.weight[:2 * d], bp.attn.qkv.weight[:2 * d])  # W^Q, W^K
    for name in ("tok_emb.weight", "pos_emb.weight", "head.weight"):
        assert torch.equal(deep.state_dict()[name], post.state_dict()[name])


def test_deepnorm_with_alpha_beta_one_is_post_ln():
    """Same state_dict keys and values and the same logits, bit for bit."""
    post = small("post", "layernorm")
    deep = small("deepnorm", "layernorm", deepnorm_alpha=1.0, deepnorm_beta=1.0)
    sp, sd = post.state_dict(), deep.state_dict()
    assert list(sp) == list(sd) and all(torch.equal(sp[k], sd[k]) for k in sp)
    idx = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(post(idx), deep(idx))
    # and with the paper's alpha the output does change
    assert not torch.allclose(post(idx), small("deepnorm", deepnorm_beta=1.0)(idx))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_deepnorm_block_matches_hand_written_reference(norm):
    """x = LN(alpha x + Attn(x)), then LN(alpha x + FFN(x))."""
    torch.manual_seed(0)
    alpha = 1.7
    block = DeepNormBlock(16, 2, 64, norm, alpha=alpha).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    h = block.norm1(alpha * x + reference_attention(block.attn, x))
    expected = block.norm2(alpha * h + block.ffn.w2(torch.relu(block.ffn.w1(h))))
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_existing_placements_keep_their_state_dict_keys():
    """DeepNorm adds no parameters or buffers, and post/pre keep the keys the recorded runs were saved with."""
    block_keys = [f"blocks.0.{m}.{p}" for m in ("attn.qkv", "attn.proj", "ffn.w1", "ffn.w2") for p in ("weight", "bias")]
    block_keys += [f"blocks.0.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")]
    head = ["head.weight", "head.bias"]
    for placement, extra in (("post", []), ("pre", ["final_norm.weight", "final_norm.bias"]), ("deepnorm", [])):
        keys = set(small(placement, depth=1).state_dict())
        assert keys == {"tok_emb.weight", "pos_emb.weight", *block_keys, *extra, *head}, placement
    model = small("deepnorm", depth=2)
    assert num_params(model) == param_count_formula(11, 16, 2, 64, 12, "deepnorm", "layernorm")
    assert "DeepNorm (post-LN, alpha 1.41, beta 0.5)" in describe(model)
    assert describe(small("post")).startswith("post-LN with LayerNorm")


@pytest.mark.parametrize("kwargs,match", [
    ({"placement": "post", "deepnorm_alpha": 2.0}, "only apply to placement='deepnorm'"),
    ({"placement": "deepnorm", "deepnorm_beta": 0.0}, "deepnorm_beta must be a positive"),
    ({"placement": "deepnorm", "deepnorm_alpha": -1.0}, "alpha must be a positive"),
    ({"placement": "middle"}, r"one of \('post', 'pre', 'deepnorm'\)"),
])
def test_deepnorm_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Transformer(11, d_model=16, n_heads=2, depth=2, context=8, **kwargs)
    with pytest.raises(ValueError, match="DeepNorm's layer is DeepNormBlock"):
        Block(16, 2, 64, "deepnorm")
    with pytest.raises(ValueError, match="alpha must be a positive"):
        DeepNormBlock(16, 2, 64, alpha=0.0)
