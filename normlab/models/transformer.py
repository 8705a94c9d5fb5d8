"""A small decoder-only (GPT-style) Transformer for character-level language modelling, with the
normalization's *placement* (post-LN or pre-LN) and *type* (LayerNorm or RMSNorm) as arguments.

Post-LN, the original Transformer {cite}`vaswani2017attention`, normalizes after the residual add:

    x_{l+1/2} = LN(x_l + Attn(x_l)),          x_{l+1} = LN(x_{l+1/2} + FFN(x_{l+1/2}))

Pre-LN (GPT-2, {cite}`xiong2020layer`) normalizes only the input of each sublayer, so the residual
stream itself is never normalized:

    x_{l+1/2} = x_l + Attn(LN(x_l)),          x_{l+1} = x_{l+1/2} + FFN(LN(x_{l+1/2}))

and therefore needs one more norm before the output head (`final_norm`). Post-LN's last sublayer
already ends in an LN, so there `final_norm` is the identity. Xiong et al. (2020), "On Layer
Normalization in the Transformer Architecture", ICML.

DeepNorm (`placement="deepnorm"`; Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers",
arXiv:2203.00555, {cite}`wang2022deepnet`) keeps post-LN's placement but up-weights the residual and
down-scales part of the initialization:

    x_{l+1} = LN(alpha * x_l + G_l(x_l))     for every sublayer G_l (attention and FFN),

with the FFN's two weights and the attention's value and output projections initialized Xavier times
beta (query and key keep gain 1). For a decoder-only (or encoder-only) model of N layers the paper's
Figure 2 (its pseudocode and table of constants) gives alpha = (2N)^{1/4} and beta = (8N)^{-1/4};
the authors' torchscale `Decoder` does the same (residual times (2N)^{1/4}; fc1, fc2, v_proj and
out_proj divided by (8N)^{1/4}). N counts layers (blocks), each of two sublayers. See `deepnorm_constants`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from normlab.norms import LayerNorm, RMSNorm, canonical_norm_name, create_norm

PLACEMENTS = ("post", "pre", "deepnorm")
NORMS = ("ln", "rms")


def make_norm(norm: str, d_model: int) -> nn.Module:
    """normlab's `LayerNorm(d_model)` {cite}`ba2016layer` for `"ln"` or `RMSNorm(d_model)`
    {cite}`zhang2019root` for `"rms"`, over the last dim of the `(B, T, d_model)` tokens (`create_norm`).

    The spellings `"layernorm"` and `"rmsnorm"` are accepted too: the recorded prepost_ln runs use them.
    """
    try:
        name = canonical_norm_name(norm)
    except ValueError:
        name = None
    if name not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return create_norm(name, d_model)


def deepnorm_constants(depth: int) -> tuple[float, float]:
    r"""DeepNorm's $(\alpha, \beta)$ for a decoder-only (or encoder-only) model of `depth` layers:
    $\alpha = (2N)^{1/4}$ (residual weight), $\beta = (8N)^{-1/4}$ (gain of the FFN, value and output
    projections' initialization). Wang et al. (2022), DeepNet, Figure 2 (arXiv:2203.00555).

    Example:
        >>> [round(v, 4) for v in deepnorm_constants(6)]
        [1.8612, 0.3799]
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int (the number of layers N), got {depth!r}")
    return (2 * depth) ** 0.25, (8 * depth) ** -0.25


class CausalSelfAttention(nn.Module):
    r"""Multi-head self-attention with a causal mask (Vaswani et al., 2017):

    $\mathrm{Attn}(x) = \mathrm{concat}_h\big(\mathrm{softmax}(Q_h K_h^\top/\sqrt{d_h} + M)\,V_h\big)\,W^O$,
    with $M_{ts} = -\infty$ for $s > t$, so position $t$ only sees positions $\le t$.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)  # W^Q, W^K, W^V stacked: one matmul instead of three
        self.proj = nn.Linear(d_model, d_model)  # W^O

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d_h)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    r"""Position-wise FFN: $\mathrm{FFN}(x) = \mathrm{ReLU}(x W^1 + b^1)\,W^2 + b^2$.

    `w2` is the $W^2$ whose gradient Xiong et al. (2020, Figure 3 and Theorem 1) analyse.
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)))


class Block(nn.Module):
    """One Transformer layer: attention and FFN sublayers, each with a residual connection and a norm
    placed after the add (`"post"`) or at the sublayer's input (`"pre"`). DeepNorm's layer is `DeepNormBlock`."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, placement: str = "pre", norm: str = "ln"):
        super().__init__()
        if placement not in ("post", "pre"):
            hint = ": DeepNorm's layer is DeepNormBlock(d_model, n_heads, d_ff, norm, alpha)" if placement == "deepnorm" else ""
            raise ValueError(f"placement must be 'post' or 'pre', got {placement!r}{hint}")
        self.placement = placement
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ffn = FeedForward(d_model, d_ff)
        self.norm1 = make_norm(norm, d_model)
        self.norm2 = make_norm(norm, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post":  # x = LN(x + F(x)): the residual stream itself is normalized
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.ffn(x))
        # x = x + F(LN(x)): an identity path runs from the embedding to the head
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class DeepNormBlock(Block):
    """DeepNorm's layer (Wang et al. 2022): post-LN with the residual weighted by `alpha`,
    $x \\leftarrow \\mathrm{LN}(\\alpha x + F(x))$ for both sublayers. `alpha` is a constant, not a parameter,
    so the state_dict is post-LN's; DeepNorm's init (beta) is the model's (`Transformer.reset_parameters`)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm: str = "ln", alpha: float = 1.0):
        super().__init__(d_model, n_heads, d_ff, "post", norm)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.placement, self.alpha = "deepnorm", float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.alpha * x + self.attn(x))
        return self.norm2(self.alpha * x + self.ffn(x))


class Transformer(nn.Module):
    """A GPT-style decoder-only language model: token + learned position embeddings, `depth` blocks,
    a final norm (pre-LN only), and a linear head to next-token logits.

    Initialization follows Xiong et al. (2020): Xavier-uniform {cite}`glorot2010understanding` for every
    linear weight, zero biases, norms at identity; embeddings N(0, `embedding_std`²), 0.02 as in GPT-2
    (Vaswani et al. scale theirs to unit variance: `embedding_std=1`).

    `placement="deepnorm"` (Wang et al. 2022): post-LN wiring with residual weight `deepnorm_alpha` and
    the FFN's $W^1$, $W^2$ and attention's $W^V$, $W^O$ initialized Xavier-uniform times
    `deepnorm_beta`; both default to `deepnorm_constants(depth)`. (DeepNet's pseudocode draws from
    Xavier-*normal*; uniform has the same variance and keeps `alpha=beta=1` exactly post-LN.)
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_heads: int = 4,
        depth: int = 6,
        d_ff: int | None = None,
        context: int = 128,
        placement: str = "pre",
        norm: str = "ln",
        embedding_std: float = 0.02,
        deepnorm_alpha: float | None = None,
        deepnorm_beta: float | None = None,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_heads", n_heads),
                            ("depth", depth), ("context", context)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if placement != "deepnorm" and (deepnorm_alpha is not None or deepnorm_beta is not None):
            raise ValueError(f"deepnorm_alpha/deepnorm_beta only apply to placement='deepnorm', not {placement!r}")
        alpha, beta = deepnorm_constants(depth) if placement == "deepnorm" else (1.0, 1.0)
        alpha = alpha if deepnorm_alpha is None else deepnorm_alpha
        beta = beta if deepnorm_beta is None else deepnorm_beta
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"deepnorm_beta must be a positive finite number, got {beta!r}")
        make_norm(norm, 1)  # validates `norm` before building anything
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.vocab_size, self.d_model, self.n_heads, self.depth, self.d_ff, self.context = (
            vocab_size, d_model, n_heads, depth, d_ff, context)
        self.placement, self.norm, self.embedding_std = placement, norm, embedding_std
        self.deepnorm_alpha, self.deepnorm_beta = float(alpha), float(beta)  # 1, 1 unless DeepNorm
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(DeepNormBlock(d_model, n_heads, d_ff, norm, self.deepnorm_alpha)
                                    if placement == "deepnorm" else Block(d_model, n_heads, d_ff, placement, norm)
                                    for _ in range(depth))
        # Pre-LN's residual stream grows with depth and is never normalized: normalize it once before the
        # head (GPT-2; Xiong et al. 2020). Post-LN's (and DeepNorm's) last block already ends in a norm.
        self.final_norm = make_norm(norm, d_model) if placement == "pre" else nn.Identity()
        self.head = nn.Linear(d_model, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=self.embedding_std)
            elif isinstance(m, (LayerNorm, RMSNorm)):
                m.reset_parameters()  # gain 1, bias 0
        for m in self.modules():
            if isinstance(m, CausalSelfAttention):
                # W^Q, W^K, W^V are three (d, d) matrices stored as one: Xavier on each, as if separate
                with torch.no_grad():
                    for w in m.qkv.weight.chunk(3, dim=0):
                        nn.init.xavier_uniform_(w)
        if self.placement == "deepnorm":  # DeepNet: W^1, W^2, W^V, W^O times beta; W^Q, W^K unchanged
            with torch.no_grad():
                for block in self.blocks:
                    d = self.d_model
                    for w in (block.ffn.w1.weight, block.ffn.w2.weight, block.attn.qkv.weight[2 * d:],
                              block.attn.proj.weight):
                        w.mul_(self.deepnorm_beta)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """`idx`: int64 (batch, time) with time ≤ context → logits (batch, time, vocab)."""
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, time), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.context}; crop the input or "
                             "build the model with a larger `context`")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats per character."""
        logits = self.forward(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_count_formula(vocab_size: int, d_model: int, depth: int, d_ff: int, context: int,
                        placement: str, norm: str) -> int:
    r"""The parameter count in closed form (biases included):

    per block $4d^2 + 4d$ (attention) $+ 2 d\,d_{ff} + d_{ff} + d$ (FFN) $+ 2\,n_{norm}$, with
    $n_{norm} = 2d$ for LayerNorm (gain and bias) and $d$ for RMSNorm (gain only); plus $Vd + Td$
    (embeddings), $dV + V$ (head) and one more norm for pre-LN.
    """
    n_norm = 2 * d_model if canonical_norm_name(norm) == "ln" else d_model
    block = 4 * d_model**2 + 4 * d_model + 2 * d_model * d_ff + d_ff + d_model + 2 * n_norm
    return (depth * block + vocab_size * d_model + context * d_model + d_model * vocab_size + vocab_size
            + (n_norm if placement == "pre" else 0))


def flops_per_token(model: Transformer, context: int | None = None) -> dict[str, int]:
    r"""Forward FLOPs per token, counting a multiply-add as 2 (Kaplan et al., 2020):
    $2N_{\text{matmul}}$ for the weight matrices (embeddings are look-ups, norms are O(d)) plus
    $2 \cdot 2\,L\,T\,d$ for $QK^\top$ and $AV$ at context $T$ (causal masking halves the useful part;
    we count the dense work that is done). Training costs about 3× the forward pass.
    """
    T = model.context if context is None else context
    L, d, dff, V = model.depth, model.d_model, model.d_ff, model.vocab_size
    matmul = 2 * (L * (4 * d * d + 2 * d * dff) + d * V)
    attention = 4 * L * T * d
    return {"matmul": matmul, "attention": attention, "forward": matmul + attention,
            "train": 3 * (matmul + attention)}


def describe(model: Transformer) -> str:
    """One line: architecture, parameter count and FLOPs per token."""
    f = flops_per_token(model)
    norm = {"ln": "LayerNorm", "rms": "RMSNorm"}[canonical_norm_name(model.norm)]
    where = (f"DeepNorm (post-LN, alpha {model.deepnorm_alpha:.3g}, beta {model.deepnorm_beta:.3g})"
             if model.placement == "deepnorm" else f"{model.placement}-LN")
    return (f"{where} with {norm}, depth {model.depth}, d_model {model.d_model}, "
            f"{model.n_heads} heads, d_ff {model.d_ff}, context {model.context}: "
            f"{num_params(model):,} parameters, {f['forward'] / 1e6:.2f} MFLOP/token forward "
            f"({f['train'] / 1e6:.2f} MFLOP/token for a training step)")
