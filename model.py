"""
model.py: a GPT language model in one file, in three architectures, and its FP8 health monitor.

  arch="gpt2"   nanoGPT / GPT-2: learned positions, LayerNorm, GELU MLP, biases, LM head tied to wte.
  arch="llama"  RMSNorm, SwiGLU MLP, rotary positions (RoPE), no biases, untied LM head.
  arch="fog"    FOG, the "all GEMMs in FP8" architecture of arXiv 2505.20524: llama without
                pre-norms; each branch output RMS-normalised (small gain) before the residual add; QK RMSNorm
                with frozen gains; embeddings scaled to unit RMS; xIELU MLP widened to llama's size (FogBlock).

FP8 health monitor (arXiv 2505.20524: a rising kurtosis foretells FP8 divergence): hooks that live for one probe
forward (`activation_stats`) and the casts' own counters (`cast_site_stats`), every --monitor_interval steps.

Every projection is a plain nn.Linear, so FP8 is a module swap at build time
(`fp8.convert_to_fp8(model, level)`); the LM head is named `lm_head`, which the swap keeps in BF16
(FP8-LM, arXiv 2310.18313, section 2: embeddings, norms and the head stay in higher precision).

Usage:  model = GPT(PRESETS["tiny"]()); logits, loss = model(idx, targets)   # idx (B, T) int64
"""
import contextlib
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8
import kernels

ARCHS = ("gpt2", "llama", "fog")
INIT_STD = 0.02  # GPT-2's init of every Linear and Embedding weight


@dataclass(frozen=True)
class GPTConfig:
    arch: str = "gpt2"
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64: faster GEMMs, FP8 rows 16-aligned
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    rope_theta: float = 10000.0  # llama and fog

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.arch != "gpt2" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"{self.arch} (RoPE) needs an even head size")

    @property
    def bias(self) -> bool:
        return self.arch == "gpt2"


# ----------------------------------------------------------------------------------------------
# presets: named functions, one per model size


def tiny() -> GPTConfig:
    """~7M parameters (6.4M of them the tied embedding): trains on 2 CPU cores in minutes."""
    return GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128)


def gpt2_124m() -> GPTConfig:
    return GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768)


def gpt2_350m() -> GPTConfig:
    return GPTConfig(block_size=1024, n_layer=24, n_head=16, n_embd=1024)


def gpt_1_3b() -> GPTConfig:
    return GPTConfig(block_size=2048, n_layer=24, n_head=16, n_embd=2048)


PRESETS = {"tiny": tiny, "gpt2-124m": gpt2_124m, "gpt2-350m": gpt2_350m, "gpt-1.3b": gpt_1_3b}


# ----------------------------------------------------------------------------------------------
# blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, gain: float = 1.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), gain))

    def forward(self, x):  # in float32 (a no-op on the float32 residual stream; fog's branch outputs are bf16)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.n_embd) if cfg.arch == "gpt2" else RMSNorm(cfg.n_embd)


class _BF16NormFn(torch.autograd.Function):
    """LayerNorm (bias given) or RMSNorm (bias None) of a float32 input, computed in float32, returned in
    `out_dtype`; the input is kept for the backward in BF16: 2 bytes per element instead of 4. The pre-norms
    read the float32 residual stream, so their two saved inputs are 8 of the ~26 bytes per token and channel
    that a level-2 block keeps; BF16's relative rounding (2^-9) is far below the FP8 gradients' own error."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, op=True):
        C, stats = x.shape[-1], x.shape[:-1] + (1,)
        fwd = fp8.norm_fwd if op else kernels.norm_fwd_ref
        y, x16, mean, rstd = fwd(x.reshape(-1, C).contiguous(), weight, bias, eps, out_dtype)  # one pass
        ctx.save_for_backward(x16.view(x.shape), mean.view(stats) if mean is not None else None, rstd.view(stats),
                              weight)
        ctx.has_bias, ctx.in_dtype = bias is not None, x.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, gy):
        x16, mean, rstd, weight = ctx.saved_tensors
        xf, gy = x16.float(), gy.float()
        if ctx.has_bias:  # the bias's value plays no part in the backward: a stand-in of its shape
            w = weight.float()
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(gy, xf, (xf.shape[-1],), mean, rstd, w, w,
                                                                   (True, True, True))
            gb = gb.to(weight.dtype)
        else:
            xhat = xf * rstd
            g = gy * weight.float()
            gx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
            gw, gb = (gy * xhat).reshape(-1, xf.shape[-1]).sum(0), None
        return gx.to(ctx.in_dtype), gw.to(weight.dtype), gb, None, None, None


class BF16Norm(nn.Module):
    """A pre-norm (nn.LayerNorm or RMSNorm, same parameters and state-dict names) whose training forward keeps
    its input for the backward in BF16 and returns the autocast dtype (what the next GEMM reads anyway); see
    _BF16NormFn. Outside autocast, or without grad, it is the wrapped norm exactly (use_bf16_norms)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, getattr(norm, "bias", None), norm.eps
        self.rms = isinstance(norm, RMSNorm)
        self.op = True  # the forward by fp8.norm_fwd (one kernel, opaque to torch.compile), else by torch ops

    def forward(self, x):
        if not (torch.is_autocast_enabled(x.device.type) and torch.is_grad_enabled()):
            if self.rms:
                return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps)
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return _BF16NormFn.apply(x, self.weight, self.bias, self.eps, torch.get_autocast_dtype(x.device.type), self.op)


def rope_tables(cfg: GPTConfig):
    """cos, sin tables (T, hs/2) of the rotary embedding, float32."""
    hs = cfg.n_embd // cfg.n_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))  # (hs/2,)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs) rotated pairwise (first half, second half) by the angles of its position."""
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)  # (T, hs/2)
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSDPA(nn.Module):
    """Causal softmax(q k^T / sqrt(hs)) v of (B, nh, T, hs) tensors: a module so that FP8 attention is a swap."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                              is_causal=True)  # (B, nh, T, hs)


def _swap_children(model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module],
                   keep_in: tuple = ()):
    """Replace every submodule for which match(child) holds by make(child), except the direct children of
    modules of the types keep_in; returns model."""
    for mod in list(model.modules()):
        if isinstance(mod, keep_in):
            continue
        for name, child in list(mod.named_children()):
            if match(child):
                setattr(mod, name, make(child))
    return model


def use_fp8_attention(model: nn.Module) -> nn.Module:
    """Swap every CausalSDPA for fp8.FP8Attention: QK^T and PV (and their backward GEMMs) in FP8 (arXiv
    2505.20524); at fp8 levels >= 1 (train.py --fp8_attention=1)."""
    device = next(model.parameters()).device

    def make(child):
        if child.dropout:
            raise ValueError("FP8 attention has no dropout; use dropout=0 or --fp8_attention=0")
        return fp8.FP8Attention(model.config.n_embd, device=device)
    return _swap_children(model, lambda c: isinstance(c, CausalSDPA), make)


def use_fp8_gelu(model: nn.Module, recompute: bool = False, fused_cast: bool = False, delayed: bool = False) -> nn.Module:
    """Swap every tanh-GELU for fp8.FP8SavedGELU: its input is kept for the backward in FP8 (1 byte per element
    instead of 2); at fp8 levels >= 1 (train.py --fp8_gelu=1). recompute (--fp8_gelu=2): instead, each MLP's
    FP8 c_proj applies the GELU itself (fp8.FP8Linear.gelu_in) and keeps only the FP8 GELU input, recomputing
    the FP8 GELU output its wgrad needs in the backward: 1 byte per hidden element instead of 2. fused_cast
    (--fp8_gelu=3, speed): c_proj applies the GELU inside its input's FP8 cast (fp8.FP8Linear.gelu_cast) and keeps
    what the plain path keeps: no BF16 GELU output is written and read again. delayed (with recompute:
    --fp8_gelu=4, memory at =3's speed): h's FP8 copy takes a delayed scale of its own (fp8.FP8Linear.h_meta)
    instead of a just-in-time one, so no pass over h for its amax."""
    if delayed and not recompute:
        raise ValueError("use_fp8_gelu: delayed (--fp8_gelu=4) goes with recompute")
    if not (recompute or fused_cast):
        return _swap_children(model, lambda c: isinstance(c, nn.GELU) and c.approximate == "tanh",
                              lambda c: fp8.FP8SavedGELU())
    for mod in model.modules():
        if isinstance(mod, MLP) and isinstance(mod.act, nn.GELU) and mod.act.approximate == "tanh" \
                and isinstance(mod.c_proj, fp8.FP8Linear):
            mod.act, mod.c_proj.gelu_in, mod.c_proj.gelu_cast = nn.Identity(), True, fused_cast
            if delayed:
                mod.c_proj.h_meta = _site_like(mod.c_proj, mod.c_proj.in_features)
    return model


def _site_like(lin: fp8.FP8Linear, features: int) -> fp8.ScalingMeta:
    """A new E4M3 delayed-scaling site with the amax history length, margin and device of lin's input site: for a
    tensor lin's backward keeps in FP8 besides its input (h_meta of --fp8_gelu=4, qkv_meta of --fp8_saved_attn).
    features: the values per token it casts (saturation statistics)."""
    x_meta = lin.x_meta
    meta = fp8.ScalingMeta(fp8.E4M3, len(x_meta.amax_history), x_meta.margin, x_meta.scale.device)
    meta.features = features
    return meta


def use_recompute_attn(model: nn.Module) -> nn.Module:
    """Activation checkpointing of each attention up to c_proj (train.py --recompute_attn=1): keep its input (the
    pre-norm's output: 2 bytes per token and channel with --bf16_norms, else 4) instead of q, k, v and the attention
    output (8 bytes, BF16) and c_attn's FP8 input copy (1 byte at levels >= 1); the backward re-runs c_attn and the
    attention forward (about a third of the block's forward FLOPs at T = 2048, C = 2048)."""
    for mod in model.modules():
        if isinstance(mod, Attention):
            if getattr(mod.c_proj, "qkv_meta", None) is not None:
                raise ValueError("--recompute_attn=1 goes without --fp8_saved_attn")
            mod.recompute = True
    return model


def use_fp8_saved_attn(model: nn.Module) -> nn.Module:
    """Each attention's FP8 c_proj applies the attention itself and keeps q, k, v for the backward in E4M3 with a
    delayed scale of their own (c_proj.qkv_meta), and the attention output only as its own FP8 input copy (train.py
    --fp8_saved_attn=1, levels >= 1; fp8._FP8AttnLinearFn): 3 bytes per token and channel instead of 8. The
    attention itself is the fused op F.scaled_dot_product_attention would run (cuDNN's on an H100), in BF16; only its
    backward reads the FP8 copies (dequantized), so only the attention's input gradients change."""
    device = next(model.parameters()).device
    for mod in model.modules():
        if not isinstance(mod, Attention):
            continue
        if not isinstance(mod.c_proj, fp8.FP8Linear):
            raise ValueError("--fp8_saved_attn=1 needs FP8 linears: use --fp8_level >= 1 (or --fp8_saved_attn=0)")
        if not isinstance(mod.sdpa, CausalSDPA) or mod.recompute:
            raise ValueError("--fp8_saved_attn=1 goes without --fp8_attention and --recompute_attn")
        if mod.dropout:
            raise ValueError("--fp8_saved_attn=1 has no attention dropout; use dropout=0 or --fp8_saved_attn=0")
        C = mod.c_proj.in_features
        mod.c_proj.qkv_meta = _site_like(mod.c_proj, 3 * C)
        mod.c_proj.attn_backend = fp8.sdpa_backend(device, C // mod.n_head)
    return model


def use_bf16_norms(model: nn.Module) -> nn.Module:
    """Swap every norm that reads the float32 residual stream (the pre-norms and ln_f; not fog's post-norms,
    which read BF16 branch outputs and write the stream) for BF16Norm (train.py --bf16_norms=1). Each block's ln_2
    is left to torch ops (BF16Norm.op False): it reads x + attn(...), an add inductor fuses into the norm, and its
    partitioner then keeps the BF16 copy; ln_1 and ln_f read their compiled region's input, which it would keep
    in float32 instead (a graph input looks free to it), so they run fp8.norm_fwd, an op it cannot see through."""
    _swap_children(model, lambda c: isinstance(c, (nn.LayerNorm, RMSNorm)), BF16Norm, keep_in=(FogBlock,))
    for mod in model.modules():
        if isinstance(mod, Block) and isinstance(mod.ln_2, BF16Norm):
            mod.ln_2.op = False
    return model


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one GEMM
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.sdpa = CausalSDPA(cfg.dropout)  # fp8.FP8Attention after use_fp8_attention
        # fog: each head's q and k RMS-normalised with the gain frozen at 1 (so: no parameter), and the softmax
        # scale left at sdpa's fixed 1/sqrt(hs). Then |q_i|, |k_i| <= sqrt(hs) (each head's squares sum to hs)
        # and |logit| <= sqrt(hs) whatever the weights: no trainable gain or temperature can sharpen the
        # softmax (the paper's entropy regularisation) or grow q and k past a bound that FP8 attention could
        # cast with a fixed scale. Normalised before RoPE: a rotation keeps the bound.
        self.qk_norm = cfg.arch == "fog"
        self.q_tap, self.k_tap = nn.Identity(), nn.Identity()  # hook points of the health monitor
        # True (use_recompute_attn): keep only x for the backward and recompute qkv and the attention from it
        self.recompute = False
        self.rope = cfg.arch != "gpt2"
        if self.rope:
            cos, sin = rope_tables(cfg)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x, residual=None):
        """c_proj(attention(x)), plus residual when given."""
        if self.recompute and torch.is_grad_enabled():
            return project(self.c_proj, recompute_in_backward(self._mix, x, self.dropout), residual)
        if getattr(self.c_proj, "qkv_meta", None) is not None and torch.is_grad_enabled():
            return self.c_proj(self._heads(x), residual=residual)  # it applies the attention (use_fp8_saved_attn)
        return project(self.c_proj, self._mix(x), residual)

    def _mix(self, x):
        """x (B, T, C) -> the heads' attention outputs side by side (B, T, C): c_proj's input."""
        B, T, C = x.size()
        y = self.sdpa(*self._heads(x))  # (B, nh, T, hs)
        return y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side

    def _heads(self, x):
        """x (B, T, C) -> the attention's q, k, v (B, nh, T, hs)."""
        B, T, C = x.size()
        if FUSED_IO and isinstance(self.c_attn, fp8.FP8Linear) and torch.is_grad_enabled():
            q, k, v = self.c_attn(x, n_split=3)  # its backward casts dq, dk, dv without concatenating them first
        else:
            q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # (B, nh, T, hs), over hs; type_as: autocast may run rms_norm in float32
            q, k = F.rms_norm(q, (q.size(-1),), eps=1e-6).type_as(v), F.rms_norm(k, (k.size(-1),), eps=1e-6).type_as(v)
        if self.rope:
            q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        return self.q_tap(q), self.k_tap(k), v  # identity (the monitor hooks them): what the QK^T GEMM reads


# the FP8 linears' fused branch ends (project; Attention._mix's split c_attn): 0 = the plain ops, same numbers (A/B)
FUSED_IO = os.environ.get("NANOFP8_FUSED_IO", "1") != "0"


def project(proj: nn.Module, y: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """proj(y) + residual (None: proj(y)). A branch's last FP8 linear adds the residual itself while autograd records
    (fp8.FP8Linear.forward): its backward then casts the float32 stream's gradient as it comes, where autograd
    would first write a BF16 copy of it for proj's BF16 output (a full pass over the stream's gradient per branch).
    Same numbers either way; eval forwards (the monitor's hooks read proj's own output) take the plain path."""
    if residual is None:
        return proj(y)
    if FUSED_IO and isinstance(proj, fp8.FP8Linear) and torch.is_grad_enabled():
        return proj(y, residual=residual)
    return residual + proj(y)


def recompute_in_backward(fn: Callable, x: torch.Tensor, dropout: float) -> torch.Tensor:
    """fn(x), keeping only x for the backward, which re-runs fn (torch.utils.checkpoint, non-reentrant). Eager, the
    re-run is inside fp8.recomputing(): its FP8 casts record nothing twice. Compiled, the backward graph recomputes
    the ops (the buffers' amax updates stay in the forward graph). The RNG state is saved and restored only with
    dropout: nothing else in fn is random."""
    from torch.utils.checkpoint import checkpoint as ckpt
    if torch.compiler.is_compiling():
        return ckpt(fn, x, use_reentrant=False, preserve_rng_state=dropout > 0)
    return ckpt(fn, x, use_reentrant=False, preserve_rng_state=dropout > 0,
                context_fn=lambda: (contextlib.nullcontext(), fp8.recomputing()))


def swiglu_hidden(C: int) -> int:
    """llama's MLP width: 8/3 C, rounded up to a multiple of 64 (keeps FP8 GEMMs aligned)."""
    return (8 * C // 3 + 63) // 64 * 64


class XIELU(nn.Module):
    """xIELU (arXiv 2411.13010), trainable: alpha_p x^2 + beta x for x > 0, alpha_n (expm1(min(x, eps)) - x) + beta x
    for x <= 0; alpha_p = softplus(a_p) > 0 and alpha_n = beta + softplus(a_n) > beta keep the shape valid."""

    def __init__(self, alpha_p: float = 0.8, alpha_n: float = 0.8, beta: float = 0.5, eps: float = -1e-6):
        super().__init__()
        self.beta, self.eps = beta, eps
        self.a_p = nn.Parameter(torch.tensor([alpha_p]).expm1().log())  # softplus^-1(alpha_p)
        self.a_n = nn.Parameter(torch.tensor([alpha_n - beta]).expm1().log())

    def forward(self, x):
        # (1,) parameters cast to x's dtype: a float32 (1,) tensor would promote the whole (B, T, H) to float32
        alpha_p, alpha_n = F.softplus(self.a_p).to(x.dtype), (self.beta + F.softplus(self.a_n)).to(x.dtype)
        neg = alpha_n * (torch.expm1(x.clamp(max=self.eps)) - x)
        return torch.where(x > 0, alpha_p * x * x, neg) + self.beta * x


class MLP(nn.Module):
    """Non-gated MLP. gpt2: GELU, 4C wide. fog: xIELU, 3/2 * llama's width, so that its two matrices hold as
    many parameters as SwiGLU's three. Non-gated because the product of SwiGLU's two branches is what
    grows outliers in long FP8 runs (Fishman et al., arXiv 2409.12517); xIELU (trainable) is one of the
    paper's non-gated choices, GELU the other."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = 4 * cfg.n_embd if cfg.arch == "gpt2" else 3 * swiglu_hidden(cfg.n_embd) // 2
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh") if cfg.arch == "gpt2" else XIELU()
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, residual=None):
        return project(self.c_proj, self.act(self.c_fc(x)), residual)  # (B, T, C)


class SwiGLU(nn.Module):
    """SwiGLU MLP (llama), swiglu_hidden(C) wide."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = swiglu_hidden(cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=False)  # gate and up in one GEMM
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x, residual=None):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return project(self.c_proj, F.silu(gate) * up, residual)  # (B, T, C)


def make_mlp(cfg: GPTConfig) -> nn.Module:
    return SwiGLU(cfg) if cfg.arch == "llama" else MLP(cfg)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), Attention(cfg)
        self.ln_2, self.mlp = make_norm(cfg), make_mlp(cfg)

    def forward(self, x):
        x = self.attn(self.ln_1(x), residual=x)  # x + attn(ln_1(x))
        return self.mlp(self.ln_2(x), residual=x)


class FogBlock(nn.Module):
    """FOG block: x + norm_attn(attn(x)), then x + norm_mlp(mlp(x)). No pre-norm: the QKV and MLP GEMMs read
    the residual stream itself, as a pre-norm's trainable per-channel gain, right before those GEMMs, is
    where outlier channels get amplified. What keeps the stream bounded instead is normalising what each
    branch adds: RMSNorm with its gain initialised at 1/sqrt(2 n_layer) (LayerScale-like), so that the
    2 n_layer adds take the stream from RMS 1 (the scaled embedding) to ~sqrt(2) at init at any depth,
    and no branch can add more than its gain, however large its own activations grow."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        gain = 1.0 / math.sqrt(2 * cfg.n_layer)
        self.attn, self.norm_attn = Attention(cfg), RMSNorm(cfg.n_embd, gain=gain)
        self.mlp, self.norm_mlp = make_mlp(cfg), RMSNorm(cfg.n_embd, gain=gain)

    def forward(self, x):
        x = x + self.norm_attn(self.attn(x))
        return x + self.norm_mlp(self.mlp(x))


_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")  # addmm(..., out_dtype=): BF16 inputs, float32 sum


class _ChunkedHeadLossFn(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ w^T (targets of -100 ignored, as F.cross_entropy) that never holds
    the (M, V) logits: `chunk` rows at a time, the loss and both gradients are computed in the forward (the
    loss is a scalar: its backward only scales them, in place). Peak extra memory: one chunk's logits (their
    gradient is written over them), the float32 (V, C) weight gradient and a BF16 copy of the weight. The
    plain head keeps the BF16 logits, their float32 copy and the float32 log-softmax alive at once, ~10 bytes
    per logit (8 GB for a (16384, 50304) batch). Each chunk is what the plain head computes: BF16 logits
    under autocast, float32 softmax, BF16 logit gradient, BF16 GEMMs; the softmax and its gradient are one kernel
    (kernels.ce_chunk). Runs eagerly even in a compiled head (chunked_head_loss): inductor, planning the unrolled
    chunk loop as one graph, kept several chunks' float32 logits alive at once (+3 GB at the 1.3B peak)."""

    @staticmethod
    def forward(ctx, x, w, targets, chunk):
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xc, wc = x.to(dt), w.to(dt)  # (M, C), (V, C)
        inv_n = 1.0 / (targets != -100).sum().clamp_min(1).float().reshape(1)
        gx, gw = torch.empty_like(xc), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], chunk):
            logits = xc[s:s + chunk] @ wc.t()  # (m, V), in dt
            # g: d loss / d logits, written over the logits (one (chunk, V) buffer, not two)
            rows, g = kernels.ce_chunk(logits, targets[s:s + chunk].contiguous(), inv_n, in_place=True)
            loss += rows.sum()
            _logit_grad_matmul(g, wc, out=gx[s:s + chunk])
            if gw.is_cuda and g.dtype != torch.float32 and _ADDMM_OUT_DTYPE:  # cuBLAS adds the BF16 product to gw in float32, in place
                torch.addmm(gw, g.t(), xc[s:s + chunk], out_dtype=torch.float32, out=gw)
            else:  # (the CPU has no mixed-dtype addmm): the product rounded to dt, then added
                gw += g.t() @ xc[s:s + chunk]
        ctx.save_for_backward(gx, gw)
        ctx.x_dtype, ctx.w_dtype, ctx.consumed = x.dtype, w.dtype, False
        return (loss * inv_n).squeeze(0)

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place: a scaled copy of the float32 (V, C) gw would be the step's peak (the head's backward runs
        # first, with every activation still kept); so the graph cannot be run backward twice
        if ctx.consumed:
            raise RuntimeError("the chunked head loss scales its saved gradients in place: no second backward "
                               "through the same graph (retain_graph)")
        ctx.consumed = True
        gx, gw = ctx.saved_tensors
        return gx.mul_(grad_loss.to(gx.dtype)).to(ctx.x_dtype), gw.mul_(grad_loss).to(ctx.w_dtype), None, None


class _CPUHeadFn(torch.autograd.Function):
    """The LM head x @ w^T under CPU autocast (BF16), as F.linear computes it, with the input gradient's GEMM fed
    a column-major copy of the logits' gradient: the CPU's BF16 GEMM (oneDNN, without AVX512-BF16) runs
    (M, V) @ (V, C) ~13x slower with a row-major left operand (0.65 vs 0.05 s at M=128, V=50304, C=64 on CI's 2
    cores; the copy takes 0.01 s). It was most of a tiny model's CPU training step (python train.py on a laptop,
    the trainer tests)."""

    @staticmethod
    def forward(ctx, x, w, dt):
        xc, wc = x.to(dt), w.to(dt)
        ctx.save_for_backward(xc, wc)
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return xc @ wc.t()

    @staticmethod
    def backward(ctx, g):
        xc, wc = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (M, V)
        gx = _logit_grad_matmul(g2, wc)
        gw = g2.t() @ xc.reshape(-1, xc.shape[-1])  # (V, M) @ (M, C): already fast
        return gx.view(xc.shape).to(ctx.x_dtype), gw.to(ctx.w_dtype), None


def _logit_grad_matmul(g: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The LM head's input gradient g (M, V) @ w (V, C) (into out). A 16-bit g on the CPU is copied column-major
    first: oneDNN's BF16 GEMM without AVX512-BF16 runs a row-major (M, V) left operand ~13x slower (_CPUHeadFn)."""
    if g.device.type == "cpu" and g.dtype in (torch.bfloat16, torch.float16):
        g = g.t().contiguous().t()
    return torch.matmul(g, w, out=out)


@torch.compiler.disable
def chunked_head_loss(x, w, targets, chunk):
    """_ChunkedHeadLossFn, eager also inside a compiled head (a graph break): one chunk's buffers at a time."""
    return _ChunkedHeadLossFn.apply(x, w, targets, chunk)


# ----------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([(FogBlock if cfg.arch == "fog" else Block)(cfg) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        ))
        if cfg.arch == "gpt2":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # name kept: convert_to_fp8 skips it
        if cfg.arch == "gpt2":
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (GPT-2)
        # fog: the embedding (init RMS INIT_STD) scaled to RMS 1: without pre-norms the stream's scale is real,
        # and each post-normed branch adds RMS ~1/sqrt(2 n_layer); at 0.02 the token identity would drown
        # under the first branches. A multiplier, not a std-1 init: Adam's steps (~lr) keep their size
        # relative to the weights, so the embedding learns at the pace of llama's.
        self.emb_scale = 1.0 / INIT_STD if cfg.arch == "fog" else 1.0
        self.head_chunk = 0  # > 0: the training loss in chunks of this many rows (train.py --head_chunk)
        self.apply(self._init_weights)
        # GPT-2 init: residual projections scaled by 1/sqrt(2 * n_layer), two residual adds per block; not
        # fog, whose post-norm divides the scale out (smaller weights would only inflate their gradients)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and cfg.arch != "fog":
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position table is left out by default (as nanoGPT: it does no GEMM)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T: int) -> float:
        """Training FLOPs per token (fwd + bwd): 6N for the weights + 12 L T C for attention (PaLM, app. B)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * T * cfg.n_embd

    def forward(self, idx, targets=None):
        """idx (B, T) int64 -> logits (B, T, V) and the mean cross-entropy (float32) when targets given;
        without targets only the last position's logits (B, 1, V), for generation."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens, block_size is {self.config.block_size}"
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.emb_scale != 1.0:
            x = x * self.emb_scale  # fog: unit RMS
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))  # (T, C) broadcast over B
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        return self.head(x, targets)

    def head(self, x, targets=None):
        """(B, T, C) -> the final norm, LM head and loss, as forward returns them (its own unit, so that
        train.py --compile_blocks=1 compiles it apart from the blocks)."""
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        if self.head_chunk and torch.is_grad_enabled():  # training: no (B, T, V) logits (chunked loss)
            B, T, C = x.shape
            return None, chunked_head_loss(x.reshape(B * T, C), self.lm_head.weight, targets.reshape(-1),
                                           self.head_chunk)
        if x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu") \
                and self.lm_head.bias is None:
            logits = _CPUHeadFn.apply(x, self.lm_head.weight, torch.get_autocast_dtype("cpu"))  # (B, T, V)
        else:
            logits = self.lm_head(x)  # (B, T, V)
        # loss in float32: a BF16 log-softmax over 50k classes loses the small probabilities
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0):
        """idx (B, T) -> (B, T + max_new_tokens), sampling one token at a time."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # (B, <= block_size)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / max(temperature, 1e-5)  # (B, V)
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def build(cfg: GPTConfig, **overrides) -> GPT:
    """GPT from a config, with field overrides (`build(tiny(), arch="llama")`)."""
    return GPT(replace(cfg, **overrides))


# ----------------------------------------------------------------------------------------------
# FP8 health monitor (arXiv 2505.20524): per-layer activation statistics and per-cast-site counters.
# Kurtosis mean(x^4) / mean(x^2)^2 is 3 for a normal tensor and grows with the weight of its outliers;
# a per-tensor FP8 scale is set by the amax, so a rising kurtosis means the bulk of the values sinks
# towards E4M3's underflow while the outliers ride at its maximum. Nothing here runs unless called:
# the hooks exist only during `activation_stats`, and the cast counters are kept by the casts anyway.

TAPS = ("resid", "qkv_in", "q", "k", "mlp_pre", "mlp_post", "mlp_out")  # per layer, in forward order
STATS = ("kurtosis", "rms", "amax")


def tensor_stats(x: torch.Tensor) -> torch.Tensor:
    """(kurtosis, rms, amax) of the whole tensor x (any shape and float dtype), float32 (3,), on x's device.
    Raw moments (not centred): an FP8 cast sees |x|, not x - mean. Computed on x / amax, where every
    value is <= 1: no overflow of x^4 in float32 for any bf16 input; kurtosis is scale-free anyway."""
    x = x.detach().float()
    amax = x.abs().amax()
    y2 = (x / amax.clamp_min(torch.finfo(torch.float32).tiny)).square()  # (x / amax)^2 in [0, 1]
    m2, m4 = y2.mean(), y2.square().mean()
    kurt = m4 / m2.square().clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero tensor: 0, not NaN
    return torch.stack([kurt, amax * m2.sqrt(), amax])


def _tap_points(block: nn.Module):
    """(tap name, module, reads the module's input (pre-hook) instead of its output) for one block."""
    a, m = block.attn, block.mlp
    return (("resid", block, False), ("qkv_in", a.c_attn, True), ("q", a.q_tap, False), ("k", a.k_tap, False),
            ("mlp_pre", m.c_fc, False), ("mlp_post", m.c_proj, True), ("mlp_out", m.c_proj, False))


@torch.no_grad()
def activation_stats(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """One forward of idx (B, T) with statistics hooks on every tap -> (n_layer, len(TAPS), len(STATS))
    float32 on device, no host sync. The hooks are removed before returning. Call it in eval mode (FP8
    casts then record nothing): the FP8 weight copies are restored after, so a cached copy that a CUDA
    graph or an FP8 all-gather keeps up to date is not replaced by this forward's own."""
    blocks = model.transformer.h
    out = torch.zeros(len(blocks), len(TAPS), len(STATS), device=idx.device)
    cached = [(m, m._weight_fp8_t) for m in model.modules() if isinstance(m, fp8.FP8Linear)]

    def hook(layer: int, tap: int, pre: bool):
        def fn(module, args, output=None):
            x = args[0] if pre else output
            if pre and getattr(module, "gelu_in", False):  # --fp8_gelu=2, 3: c_proj reads h and applies the GELU itself
                x = F.gelu(x, approximate="tanh")
            out[layer, tap] = tensor_stats(x)
        return fn

    handles = [(mod.register_forward_pre_hook if pre else mod.register_forward_hook)(hook(layer, TAPS.index(name), pre))
               for layer, block in enumerate(blocks) for name, mod, pre in _tap_points(block)]
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
        for m, w_t in cached:
            m._weight_fp8_t = w_t
    return out


def cast_site_stats(model: nn.Module, n_tokens: int):
    """The FP8 cast sites' counters of the current step: (names, (n_sites, 2) float32 fractions of the
    values cast that saturated / flushed to zero), device tensor. n_tokens: tokens this rank cast in the
    step (each site casts n_tokens * features values). Read before train.read_saturation resets them."""
    sites = [(n.removeprefix("transformer."), m) for n, m in model.named_modules() if isinstance(m, fp8.ScalingMeta)]
    if not sites:
        return [], torch.zeros(0, 2)
    counts = torch.stack([m.stats for _, m in sites]).float()  # (n_sites, 2)
    numel = torch.tensor([max(n_tokens * m.features, 1) for _, m in sites], dtype=torch.float32)
    return [n for n, _ in sites], counts / numel.to(counts.device)[:, None]


class KurtosisWatch:
    """Remembers each (tap, layer)'s kurtosis over the monitor steps; `rising` names those that rose at each
    of the last `rises` readings and now exceed `threshold`: an outlier build-up under way, which the paper
    found to precede FP8 divergences by far, long before the loss shows it."""

    def __init__(self, threshold: float, rises: int = 3):
        self.threshold, self.rises, self.hist = threshold, rises, {}

    def rising(self, kurtosis: dict) -> list:
        """kurtosis: {tap: [per layer]} of this monitor step -> ["tap[layer]", ...] rising past the threshold."""
        out = []
        for tap, per_layer in kurtosis.items():
            for layer, k in enumerate(per_layer):
                h = self.hist.setdefault((tap, layer), [])
                h.append(k)
                del h[:-(self.rises + 1)]
                if len(h) > self.rises and k > self.threshold and all(a < b for a, b in zip(h, h[1:])):
                    out.append(f"{tap}[{layer}]")
        return out
