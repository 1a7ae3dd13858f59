"""
model.py: a GPT language model in one file, in two architectures (and a place for a third).

  arch="gpt2"   nanoGPT / GPT-2: learned positions, LayerNorm, GELU MLP, biases, LM head tied to wte.
  arch="llama"  RMSNorm, SwiGLU MLP, rotary positions (RoPE), no biases, untied LM head.
  arch="fog"    the "all GEMMs in FP8" architecture of arXiv 2505.20524 (added by its issue: a new
                branch in `make_norm` / `make_mlp` / `Attention`, nothing else changes).

Every projection is a plain nn.Linear, so FP8 is a module swap at build time
(`fp8.convert_to_fp8(model, level)`); the LM head is named `lm_head`, which the swap keeps in BF16
(FP8-LM, arXiv 2310.18313, section 2: embeddings, norms and the head stay in higher precision).

Usage:  model = GPT(PRESETS["tiny"]()); logits, loss = model(idx, targets)   # idx (B, T) int64
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("gpt2", "llama")  # "fog" joins here with its issue


@dataclass(frozen=True)
class GPTConfig:
    arch: str = "gpt2"
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64: faster GEMMs, FP8 rows 16-aligned
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    rope_theta: float = 10000.0  # llama only

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.arch == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError("llama (RoPE) needs an even head size")

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
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.n_embd) if cfg.arch == "gpt2" else RMSNorm(cfg.n_embd)


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


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one GEMM
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.rope = cfg.arch == "llama"
        if self.rope:
            cos, sin = rope_tables(cfg)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.rope:
            q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    """GELU MLP, 4x wide (gpt2)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, C)


class SwiGLU(nn.Module):
    """SwiGLU MLP (llama): hidden 8/3 C, rounded up to a multiple of 64 (keeps FP8 GEMMs aligned)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = (8 * cfg.n_embd // 3 + 63) // 64 * 64
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=False)  # gate and up in one GEMM
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.c_proj(F.silu(gate) * up)  # (B, T, C)


def make_mlp(cfg: GPTConfig) -> nn.Module:
    return MLP(cfg) if cfg.arch == "gpt2" else SwiGLU(cfg)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), Attention(cfg)
        self.ln_2, self.mlp = make_norm(cfg), make_mlp(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=make_norm(cfg),
        ))
        if cfg.arch == "gpt2":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # name kept: convert_to_fp8 skips it
        if cfg.arch == "gpt2":
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (GPT-2)
        self.apply(self._init_weights)
        # GPT-2 init: residual projections scaled by 1/sqrt(2 * n_layer), two residual adds per block
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

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
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))  # (T, C) broadcast over B
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
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
