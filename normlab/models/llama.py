r"""A small LLaMA-style decoder {cite}`touvron2023llama`, with the norm as an argument (RMSNorm, LayerNorm, none).

What makes it "LLaMA-style" rather than GPT-style (`normlab.models.transformer`): pre-norm blocks with
RMSNorm {cite}`zhang2019root` by default, a SwiGLU feed-forward network (Shazeer, 2020, "GLU Variants
Improve Transformer"), rotary position embeddings (Su et al., 2021, "RoFormer") instead of learned
positions, no biases in any linear layer, and an output head not tied to the embedding. It exists to time
a whole training step with LayerNorm vs RMSNorm (`normlab.experiments.llama_step`, the RMSNorm paper's
"7%~64%" is a whole-model figure), so the norm is the *only* thing that changes between variants:

- `"rms"`: $\mathrm{RMSNorm}(x) = g \odot x / \sqrt{\tfrac1d \sum_i x_i^2 + \epsilon}$, $d$ parameters;
- `"ln"`: $\mathrm{LN}(x) = g \odot (x - \mu) / \sqrt{\sigma^2 + \epsilon} + b$, $2d$ parameters
  (`ln_bias=False`: $d$);
- `"none"`: the identity (a different function: only for timing what the norms cost).

`impl="torch"` builds `torch.nn.RMSNorm` / `torch.nn.LayerNorm` (what practitioners run), `impl="normlab"`
the from-scratch layers of `normlab.norms`. The parameter count has a closed form,
`param_count_formula`, which the tests check.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

NORMS = ("rms", "ln", "none")
IMPLS = ("torch", "normlab")


def make_norm(norm: str, d_model: int, impl: str = "torch", eps: float = 1e-5, ln_bias: bool = True) -> nn.Module:
    """The norm layer over the last dim of `(B, T, d_model)` tokens: see the module docstring."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r} (LLaMA uses 'rms')")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}: 'torch' for torch.nn's layers, "
                         "'normlab' for the from-scratch ones")
    if norm == "none":
        return nn.Identity()
    if impl == "torch":
        return nn.RMSNorm(d_model, eps=eps) if norm == "rms" else nn.LayerNorm(d_model, eps=eps, bias=ln_bias)
    from normlab import norms

    return norms.RMSNorm(d_model, eps=eps) if norm == "rms" else norms.LayerNorm(d_model, eps=eps, bias=ln_bias)


def swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's FFN width: $\\tfrac23 \\cdot 4d$ (so SwiGLU's three matrices cost what a 4d MLP's two do),
    rounded up to a multiple of `multiple_of` (LLaMA uses 256; 64 keeps small models near 8d/3)."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """$(x_1, x_2) \\mapsto (-x_2, x_1)$ on the two halves of the last dim (GPT-NeoX / Hugging Face layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    r"""Rotary position embedding (RoPE): rotate each pair of query/key features by an angle $t\,\theta_i$.

    With $\theta_i = \text{base}^{-2i/d_h}$ for $i < d_h/2$, position $t$ rotates feature pair
    $(x_i, x_{i + d_h/2})$ by $t\theta_i$:

    $$\mathrm{RoPE}(x)_t = x_t \cos(t\theta) + \mathrm{rotate\_half}(x_t) \sin(t\theta),$$

    so $\langle \mathrm{RoPE}(q)_t, \mathrm{RoPE}(k)_s \rangle$ depends on $t - s$ only. No parameters:
    `cos` and `sin` are non-persistent buffers (not in the state_dict).
    """

    def __init__(self, d_head: int, context: int, base: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {d_head}")
        # θ_i = base^(-2i/d_h), i = 0 .. d_h/2 - 1
        theta = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
        # angle[t, i] = t θ_i, repeated for both halves of the head dim
        angle = torch.outer(torch.arange(context, dtype=torch.float64), theta).repeat(1, 2)
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: (B, heads, T, d_head)."""
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        # x cos(tθ) + rotate_half(x) sin(tθ)
        return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    r"""Causal multi-head attention with rotary queries and keys and no biases:
    $\mathrm{Attn}(x) = \mathrm{concat}_h\big(\mathrm{softmax}(\tilde Q_h \tilde K_h^\top/\sqrt{d_h} + M)V_h\big)W^O$,
    $\tilde Q = \mathrm{RoPE}(x W^Q)$, $\tilde K = \mathrm{RoPE}(x W^K)$, $M$ the causal mask."""

    def __init__(self, d_model: int, n_heads: int, context: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.wqkv = nn.Linear(d_model, 3 * d_model, bias=False)  # W^Q, W^K, W^V stacked: one matmul
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(d_model // n_heads, context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d_h)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    r"""$\mathrm{FFN}(x) = \big(\mathrm{SiLU}(x W_1) \odot x W_3\big) W_2$, no biases (LLaMA's `w1`, `w3`, `w2`)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    """Pre-norm: $x \\leftarrow x + \\mathrm{Attn}(\\mathrm{norm}_1(x))$, then
    $x \\leftarrow x + \\mathrm{FFN}(\\mathrm{norm}_2(x))$."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, context: int, norm: str, impl: str, eps: float,
                 ln_bias: bool):
        super().__init__()
        self.norm1 = make_norm(norm, d_model, impl, eps, ln_bias)
        self.attn = Attention(d_model, n_heads, context)
        self.norm2 = make_norm(norm, d_model, impl, eps, ln_bias)
        self.ffn = SwiGLU(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Llama(nn.Module):
    """Token embedding, `depth` pre-norm blocks, a final norm and an untied linear head to next-token logits.

    Initialization: N(0, 0.02²) for every linear weight and the embedding (GPT-2's and LLaMA's scale),
    norms at identity. `d_ff=None` is `swiglu_hidden(d_model)`.
    """

    def __init__(self, vocab_size: int, d_model: int = 256, n_heads: int = 4, depth: int = 4,
                 d_ff: int | None = None, context: int = 256, norm: str = "rms", impl: str = "torch",
                 eps: float = 1e-5, ln_bias: bool = True):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_heads", n_heads),
                            ("depth", depth), ("context", context)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        make_norm(norm, 1, impl)  # validates `norm` and `impl` before building anything
        d_ff = swiglu_hidden(d_model) if d_ff is None else d_ff
        self.vocab_size, self.d_model, self.n_heads, self.depth, self.d_ff, self.context = (
            vocab_size, d_model, n_heads, depth, d_ff, context)
        self.norm, self.impl, self.ln_bias = norm, impl, ln_bias
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(LlamaBlock(d_model, n_heads, d_ff, context, norm, impl, eps, ln_bias)
                                    for _ in range(depth))
        self.final_norm = make_norm(norm, d_model, impl, eps, ln_bias)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """`idx`: int64 (batch, time) with time ≤ context → logits (batch, time, vocab)."""
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, time), got {tuple(idx.shape)}")
        if idx.shape[1] > self.context:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the context {self.context}; crop the input "
                             "or build the model with a larger `context`")
        x = self.tok_emb(idx)  # no position embedding: positions enter through RoPE in every attention
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per token)."""
        logits = self.forward(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def param_count_formula(vocab_size: int, d_model: int, depth: int, d_ff: int, norm: str,
                        ln_bias: bool = True) -> int:
    r"""The parameter count in closed form (there are no biases outside LayerNorm):

    per block $4d^2$ (attention: $W^Q, W^K, W^V, W^O$) $+ 3\,d\,d_{ff}$ (SwiGLU) $+ 2\,n_{norm}$, with
    $n_{norm} = d$ for RMSNorm, $2d$ for LayerNorm ($d$ without its bias), 0 for none; plus $Vd$
    (embedding), $n_{norm}$ (final norm) and $dV$ (untied head). Rotary embeddings have no parameters.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    n_norm = {"rms": d_model, "ln": 2 * d_model if ln_bias else d_model, "none": 0}[norm]
    block = 4 * d_model**2 + 3 * d_model * d_ff + 2 * n_norm
    return depth * block + vocab_size * d_model + n_norm + d_model * vocab_size


def train_flops_per_token(model: Llama, context: int | None = None) -> int:
    r"""Training FLOPs per token, $3\times$ the forward's $2N_{\text{matmul}} + 4\,L\,T\,d$ (multiply-add = 2;
    dense attention work at context $T$; norms, RoPE and the embedding look-up are O(d) and not counted)."""
    T = model.context if context is None else context
    L, d, dff, V = model.depth, model.d_model, model.d_ff, model.vocab_size
    return 3 * (2 * (L * (4 * d * d + 3 * d * dff) + d * V) + 4 * L * T * d)
