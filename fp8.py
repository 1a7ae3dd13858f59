"""
fp8.py: FP8 formats, delayed scaling, the FP8 tensor type and the FP8 linear layer.

FP8-LM (arXiv 2310.18313) section 2 / DESIGN.md "Numerics conventions":
  - E4M3 (max 448) for weights and activations, E5M2 (max 57344) for output gradients.
  - x_fp8 = sat(x * scale), x ~= x_fp8 * scale_inv; scales are powers of two.
  - Delayed scaling: the cast at step t uses the scale from the amax history up to step t-1 and
    records step t's amax in the same pass (kernels.cast_to_fp8). `update_scaling(model)` once per
    optimizer step turns the history into the next scale. Weights and weight gradients are scaled
    by their own amax ("just in time").
  - A linear's weight gradient is an FP8 E4M3 tensor + scale, kept in the layer's buffers
    (`fp8_grad(p)` returns it) instead of p.grad, which autograd would force to p's dtype.

Usage:  model = convert_to_fp8(model, level=1); loss.backward(); update_scaling(model)
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

import kernels
from kernels import E4M3, E5M2

FP8_LEVELS = (0, 1, 2, 3)
# which of a linear's GEMMs (fwd, dgrad, wgrad) sum in FP32 beyond one K tile on sm_90 (kernels.fp8_gemm
# precise). "wgrad" promotes only the GEMM whose K is the token count (16k at B=16, T=1024), "bwd" is
# torchao's choice (fast accumulation in the forward only), "all" DeepSeek-V3's
PRECISE_ACC = {"none": (False, False, False), "wgrad": (False, False, True), "bwd": (False, True, True),
               "all": (True, True, True)}
DEFAULT_PRECISE_ACC = "wgrad"
MIN_FP8_FEATURES = 16  # both GEMM operands are K-major over in/out features: 16-byte rows (kernels.K_ALIGN)
PAD_TOKENS = 16  # token dim of the transposed copies (the K of the weight-gradient GEMM) padded to this


_recomputing = False  # True while activation checkpointing re-runs a forward for the backward (recomputing())


@contextlib.contextmanager
def recomputing():
    """Around a forward that activation checkpointing re-runs in the backward (model.Attention.recompute): its FP8
    casts use the scales they used the first time and record no amax or statistics (the first run did)."""
    global _recomputing
    prev, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = prev


# ----------------------------------------------------------------------------------------------
# scaling


def amax_to_scale(amax: torch.Tensor, fp8_dtype: torch.dtype, margin: int, prev_scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale 2^(floor(log2(fmax / amax)) - margin), float32 (1,), exponent clamped to
    [-126, 126]; amax 0 or non-finite keeps prev_scale. Exact: computed on the fp32 bits of amax
    (the ratio fmax/amax is never rounded), bit-identical to the kernels' in-kernel version."""
    a = amax.float().reshape(1)
    ok = torch.isfinite(a) & (a > 0)
    return torch.where(ok, kernels.pow2_scale_ref(a, fp8_dtype, margin), prev_scale.float().reshape(1))


@torch.no_grad()
def _update_rows(hist, scale, scale_inv, n_nonfinite, fmax_exp, fmax_mant, margin):
    """Delayed-scaling update of n metas at once. hist (n, H) with column 0 = this step's amax;
    scale, scale_inv, n_nonfinite (n, 1); fmax_exp, fmax_mant, margin (n, 1) int32 per row."""
    cur = hist[:, :1]
    bad = ~torch.isfinite(cur)
    n_nonfinite += bad.long()
    hist[:, :1] = torch.where(bad, torch.zeros_like(cur), cur)  # a NaN/Inf amax never enters the history
    amax = hist.amax(dim=1, keepdim=True)
    new = kernels.pow2_scale_bits(amax, fmax_exp, fmax_mant, margin)  # same integer recipe as the kernels
    keep = bad | ~(torch.isfinite(amax) & (amax > 0))
    scale.copy_(torch.where(keep, scale, new))
    scale_inv.copy_(1.0 / scale)
    hist.copy_(hist.roll(1, dims=1))
    hist[:, 0] = 0.0


class ScalingMeta(nn.Module):
    """Delayed-scaling state of one cast site: amax history (slot 0 = the current step), the scale
    in use and its inverse, counts of non-finite amaxes and of saturated / flushed values."""

    def __init__(self, fp8_dtype: torch.dtype, history_len: int = 16, margin: int = 0, device=None):
        super().__init__()
        if fp8_dtype not in (E4M3, E5M2):
            raise ValueError(f"fp8_dtype must be E4M3 or E5M2, got {fp8_dtype}")
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        self.fp8_dtype, self.margin = fp8_dtype, margin
        self.register_buffer("amax_history", torch.zeros(history_len, device=device))
        self.register_buffer("scale", torch.ones(1, device=device))
        self.register_buffer("scale_inv", torch.ones(1, device=device))
        self.register_buffer("n_nonfinite", torch.zeros(1, dtype=torch.int64, device=device))
        self.register_buffer("stats", torch.zeros(2, dtype=torch.int32, device=device))  # this step: saturated, flushed to 0
        self.primed = False  # the very first cast scales by its own amax (no history yet)
        self.features = 0  # elements cast per token (set by the layer): stats are per token * features
        # counting saturated / flushed values costs a cast about half its bandwidth (bench.py cast: 89% of
        # copy bandwidth -> 41-53%), so it is on only while monitoring (count_cast_stats)
        self.count_stats = False

    def cast_args(self, record: bool = True) -> tuple:
        """(scale, scale_inv, amax slot or None, stats or None) for a cast at this site; eval casts (record
        False) leave the history alone; stats only while count_stats is on."""
        return (self.scale, self.scale_inv, self.amax_history[:1] if record else None,
                self.stats if record and self.count_stats else None)

    def get_extra_state(self):
        return {"primed": self.primed}

    def set_extra_state(self, state):
        self.primed = bool(state["primed"])

    @torch.no_grad()
    def prime(self, x: torch.Tensor) -> None:
        """First use: a just-in-time scale from x itself, so step 0 does not saturate."""
        amax = amax_into(x.detach().reshape(-1).contiguous(), torch.zeros_like(self.scale))  # op when compiled
        self.scale.copy_(amax_to_scale(amax, self.fp8_dtype, self.margin, self.scale))
        self.scale_inv.copy_(1.0 / self.scale)
        self.primed = True

    def consts(self):
        fe, fm = kernels.fmax_bits(self.fp8_dtype)
        return fe, fm, self.margin

    @torch.no_grad()
    def update(self) -> None:
        """End of a step: next scale from the history (this step included), then open a new slot."""
        fe, fm, mg = (torch.tensor([[c]], dtype=torch.int32, device=self.scale.device) for c in self.consts())
        _update_rows(self.amax_history[None], self.scale[None], self.scale_inv[None], self.n_nonfinite[None],
                     fe, fm, mg)


@dataclass
class FP8Tensor:
    """FP8 data with its per-tensor scale_inv (float32, 1 element): value ~= data * scale_inv."""
    data: torch.Tensor
    scale_inv: torch.Tensor

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale_inv).to(dtype)

    @classmethod
    def quantize(cls, x: torch.Tensor, fp8_dtype: torch.dtype = E4M3, margin: int = 0) -> "FP8Tensor":
        """Just-in-time: scale from x's own amax (two passes: amax, then cast)."""
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        amax = kernels.amax_into(x2, torch.zeros(1, device=x.device))
        scale_inv = torch.empty(1, device=x.device)
        x_fp8, _ = kernels.cast_to_fp8(x2, fp8_dtype, None, amax, scale_inv_out=scale_inv, margin=margin)
        return cls(x_fp8.view(x.shape), scale_inv)


# ----------------------------------------------------------------------------------------------
# the FP8 ops as torch.library custom ops: torch.compile traces them as opaque nodes. Eager code
# calls the kernels directly (the dispatcher costs ~10 us a call, which small models feel).


@torch.library.custom_op("nanofp8::cast", mutates_args=("amax", "stats"))
def _cast_op(x: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor, stats: torch.Tensor, fp8_dtype: torch.dtype,
             transpose: bool, pad_t: int, colsum: bool, count: bool, x_more: list[torch.Tensor],
             round_to: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cs = x.new_empty(x.shape[1] * (1 + len(x_more)), dtype=torch.float32) if colsum else None
    y, y_t = kernels.cast_to_fp8((x, *x_more) if x_more else x, fp8_dtype, scale, amax, transpose, pad_t,
                                 stats if count else None, colsum_out=cs, round_to=round_to)
    return y, (y_t if y_t is not None else y.new_empty(0)), (cs if colsum else x.new_empty(0, dtype=torch.float32))


@_cast_op.register_fake
def _(x, scale, amax, stats, fp8_dtype, transpose, pad_t, colsum, count, x_more, round_to):
    M, N = x.shape[0], x.shape[1] * (1 + len(x_more))
    y_t = x.new_empty((N, kernels.round_up(M, pad_t)) if transpose else (0,), dtype=fp8_dtype)
    return x.new_empty((M, N), dtype=fp8_dtype), y_t, x.new_empty(N if colsum else 0, dtype=torch.float32)


@torch.library.custom_op("nanofp8::cast_jit", mutates_args=("out", "scale_inv_out"))
def _cast_jit_op(x: torch.Tensor, amax: torch.Tensor, out: torch.Tensor, scale_inv_out: torch.Tensor,
                 transpose: bool) -> torch.Tensor:
    _, y_t = kernels.cast_to_fp8(x, out.dtype, None, amax, transpose, 1, None, out, scale_inv_out)
    return y_t if y_t is not None else out.new_empty(0)


@_cast_jit_op.register_fake
def _(x, amax, out, scale_inv_out, transpose):
    return out.new_empty((x.shape[1], x.shape[0]) if transpose else (0,))


@torch.library.custom_op("nanofp8::amax", mutates_args=("amax",))
def _amax_op(x: torch.Tensor, amax: torch.Tensor) -> None:
    kernels.amax_into(x, amax)


@_amax_op.register_fake
def _(x, amax):
    return None


@torch.library.custom_op("nanofp8::gemm", mutates_args=())
def _gemm_op(a: torch.Tensor, b: torch.Tensor, a_scale_inv: torch.Tensor, b_scale_inv: torch.Tensor,
             out_dtype: torch.dtype, bias: Optional[torch.Tensor], precise: bool) -> torch.Tensor:
    return kernels.fp8_gemm(a, b, a_scale_inv, b_scale_inv, out_dtype, bias, precise=precise)


@_gemm_op.register_fake
def _(a, b, a_scale_inv, b_scale_inv, out_dtype, bias, precise):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# (optional mutable arguments confuse inductor's re-inplacing in torch 2.11: the weight gradient's GEMM, which
# adds the running FP8 sum and re-quantizes it, is its own op with required arguments)
@torch.library.custom_op("nanofp8::grad_accumulate", mutates_args=("grad_fp8", "grad_scale_inv", "grad_amax"))
def _grad_acc_op(grad_fp8: torch.Tensor, grad_scale_inv: torch.Tensor, grad_amax: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, a_scale_inv: torch.Tensor, b_scale_inv: torch.Tensor, precise: bool) -> None:
    kernels.fp8_grad_accumulate(grad_fp8, grad_scale_inv, grad_amax, a, b, a_scale_inv, b_scale_inv, precise)


@_grad_acc_op.register_fake
def _(grad_fp8, grad_scale_inv, grad_amax, a, b, a_scale_inv, b_scale_inv, precise):
    return None


@torch.library.custom_op("nanofp8::gelu_fwd", mutates_args=("a_amax", "a_stats"))
def _gelu_fwd_op(h: torch.Tensor, a_scale: torch.Tensor, a_amax: torch.Tensor, a_stats: torch.Tensor, a_fp8: bool,
                 record: bool, count: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.gelu_fp8_fwd(h, a_scale if a_fp8 else None, a_amax if a_fp8 and record else None,
                                a_stats if a_fp8 and count else None)


@_gelu_fwd_op.register_fake
def _(h, a_scale, a_amax, a_stats, a_fp8, record, count):
    return h.new_empty(h.shape, dtype=E4M3), h.new_empty(1, dtype=torch.float32), \
        h.new_empty(h.shape, dtype=E4M3 if a_fp8 else h.dtype)


@torch.library.custom_op("nanofp8::gelu_fwd_delayed", mutates_args=("h_amax", "h_stats", "a_amax", "a_stats"))
def _gelu_fwd_delayed_op(h: torch.Tensor, h_scale: torch.Tensor, h_si: torch.Tensor, h_amax: torch.Tensor,
                         h_stats: torch.Tensor, a_scale: torch.Tensor, a_amax: torch.Tensor, a_stats: torch.Tensor,
                         record: bool, count: bool) -> tuple[torch.Tensor, torch.Tensor]:
    h8, _, a8 = kernels.gelu_fp8_fwd(h, a_scale, a_amax if record else None, a_stats if count else None,
                                     (h_scale, h_si, h_amax if record else None, h_stats if count else None))
    return h8, a8


@_gelu_fwd_delayed_op.register_fake
def _(h, h_scale, h_si, h_amax, h_stats, a_scale, a_amax, a_stats, record, count):
    return h.new_empty(h.shape, dtype=E4M3), h.new_empty(h.shape, dtype=E4M3)


@torch.library.custom_op("nanofp8::gelu_bwd", mutates_args=())
def _gelu_bwd_op(h8: torch.Tensor, h_si: torch.Tensor, grad: torch.Tensor, x_dtype: torch.dtype,
                 a_scale: torch.Tensor, want_a_t: bool, pad_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gh, a_t = kernels.gelu_fp8_bwd(h8, h_si, grad, x_dtype, a_scale if want_a_t else None, pad_t)
    return gh, (a_t if a_t is not None else h8.new_empty(0))


@_gelu_bwd_op.register_fake
def _(h8, h_si, grad, x_dtype, a_scale, want_a_t, pad_t):
    M, N = h8.shape
    return grad.new_empty(grad.shape), h8.new_empty((N, kernels.round_up(M, pad_t)) if want_a_t else (0,))


@torch.library.custom_op("nanofp8::gelu_cast", mutates_args=("a_amax", "a_stats"))
def _gelu_cast_op(h: torch.Tensor, a_scale: torch.Tensor, a_amax: torch.Tensor, a_stats: torch.Tensor, record: bool,
                  count: bool, pad_t: int, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a8, a8_t = kernels.gelu_cast_fwd(h, a_scale, a_amax if record else None, a_stats if count else None, pad_t,
                                     transpose)
    return a8, a8_t if transpose else a8.new_empty((0,))  # an op returns tensors: empty for "none"


@_gelu_cast_op.register_fake
def _(h, a_scale, a_amax, a_stats, record, count, pad_t, transpose):
    M, N = h.shape
    return h.new_empty((M, N), dtype=E4M3), h.new_empty((N, kernels.round_up(M, pad_t)) if transpose else (0,),
                                                        dtype=E4M3)


@torch.library.custom_op("nanofp8::gelu_bwd_hp", mutates_args=())
def _gelu_bwd_hp_op(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return kernels.gelu_bwd(h, grad)


@_gelu_bwd_hp_op.register_fake
def _(h, grad):
    return grad.new_empty(grad.shape)


@torch.library.custom_op("nanofp8::norm_fwd", mutates_args=())
def _norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, x16, mean, rstd = kernels.norm_fwd(x, weight, bias, eps, out_dtype)
    return y, x16, (mean if mean is not None else rstd.new_empty(0)), rstd


@_norm_fwd_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    M = x.shape[0]
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=torch.bfloat16), \
        x.new_empty((M,) if bias is not None else (0,), dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


# NANOFP8_NORM_OP=0: the BF16 norms' forward by torch ops (inductor fuses them with the residual add, and its
# partitioner may keep the float32 stream instead of the BF16 copy): for A/B measurements
NORM_OP = os.environ.get("NANOFP8_NORM_OP", "1") != "0"


def norm_fwd(x2, weight, bias, eps, out_dtype):
    """kernels.norm_fwd: (y, x in BF16, mean or None, rstd). A custom op under torch.compile: an op the
    partitioner cannot recompute, so the compiled block keeps this BF16 copy for the norm's backward rather
    than the float32 residual stream it was made from (2 bytes per element less; model._BF16NormFn)."""
    if not NORM_OP:
        return kernels.norm_fwd_ref(x2, weight, bias, eps, out_dtype)
    if torch.compiler.is_compiling():
        y, x16, mean, rstd = _norm_fwd_op(x2, weight, bias, eps, out_dtype)
        return y, x16, (mean if bias is not None else None), rstd
    return kernels.norm_fwd(x2, weight, bias, eps, out_dtype)


def gelu_cast(h2, scale, amax, stats, pad_t, transpose=True):
    """kernels.gelu_cast_fwd of (M, K) rows: (FP8(GELU(h)), its transposed copy or None without transpose). Custom
    op under torch.compile."""
    if torch.compiler.is_compiling():
        a8, a8_t = _gelu_cast_op(h2, scale, *_op_slots(scale, amax, stats), pad_t, transpose)
        return a8, a8_t if transpose else None
    return kernels.gelu_cast_fwd(h2, scale, amax, stats, pad_t, transpose)


def gelu_bwd_hp(h2, grad):
    """kernels.gelu_bwd: grad * GELU'(h). Custom op under torch.compile."""
    if torch.compiler.is_compiling():
        return _gelu_bwd_hp_op(h2, grad)
    return kernels.gelu_bwd(h2, grad)


def _op_slots(scale, amax, stats):
    """(amax, stats, record, count) for a custom op under torch.compile: an Optional mutable argument would confuse
    inductor, so a missing amax slot (not recording: eval) or stats pair becomes a scratch tensor, and a flag says
    whether the op writes it."""
    dummy = scale.new_zeros(1)
    return (amax if amax is not None else dummy, stats if stats is not None else dummy.new_zeros(2, dtype=torch.int32),
            amax is not None, stats is not None)


def cast(x, fp8_dtype, scale, amax, stats, transpose=False, pad_t=1, colsum_out=None, round_to=None):
    """Delayed-scaling cast (records amax); custom op under torch.compile, direct call in eager. x: a tensor, or a
    tuple of parts cast as their column-wise concatenation (kernels.cast_to_fp8, as round_to)."""
    if torch.compiler.is_compiling():
        amax, stats, _, count = _op_slots(scale, amax, stats)  # the op records into the scratch slot: harmless
        x, x_more = (x[0], list(x[1:])) if isinstance(x, (tuple, list)) else (x, [])
        y, y_t, cs = _cast_op(x, scale, amax, stats, fp8_dtype, transpose, pad_t, colsum_out is not None, count,
                              x_more, round_to)
        if colsum_out is not None:
            colsum_out.copy_(cs)
        return y, (y_t if transpose else None)
    return kernels.cast_to_fp8(x, fp8_dtype, scale, amax, transpose, pad_t, stats, colsum_out=colsum_out,
                               round_to=round_to)


def cast_jit(x, amax, out, scale_inv_out, transpose=False):
    """Just-in-time cast into out (FP8) with the scale derived from amax = max|x|."""
    if torch.compiler.is_compiling():
        y_t = _cast_jit_op(x, amax, out, scale_inv_out, transpose)
        return out, (y_t if transpose else None)
    return kernels.cast_to_fp8(x, out.dtype, None, amax, transpose, 1, None, out, scale_inv_out)


def amax_into(x, amax):
    if torch.compiler.is_compiling():
        _amax_op(x, amax)
        return amax
    return kernels.amax_into(x, amax)


def gelu_fwd(h2, a_meta_t=None, h_meta_t=None):
    """kernels.gelu_fp8_fwd of (M, K) rows: (h8, h_scale_inv, a); a_meta_t (scale, amax slot or None, stats or
    None) given: a is GELU(h)'s E4M3 copy with that delayed scale; h_meta_t (scale, scale_inv, amax slot or None,
    stats or None; with a_meta_t) given: h8 with that delayed scale too (--fp8_gelu=4). Custom op under
    torch.compile."""
    if h_meta_t is not None:
        assert a_meta_t is not None, "gelu_fwd: a delayed h scale goes with an FP8 GELU output"
        if not torch.compiler.is_compiling():
            return kernels.gelu_fp8_fwd(h2, *a_meta_t, h_meta=h_meta_t)
        h_scale, h_si, h_amax, h_stats = h_meta_t
        h_amax, h_stats, _, _ = _op_slots(h_scale, h_amax, h_stats)
        a_scale, a_amax, a_stats = a_meta_t
        a_amax, a_stats, record, count = _op_slots(a_scale, a_amax, a_stats)
        h8, a8 = _gelu_fwd_delayed_op(h2, h_scale, h_si, h_amax, h_stats, a_scale, a_amax, a_stats, record, count)
        return h8, h_si, a8
    if torch.compiler.is_compiling():
        scale, amax, stats = a_meta_t if a_meta_t is not None else (h2.new_ones(1, dtype=torch.float32), None, None)
        amax, stats, record, count = _op_slots(scale, amax, stats)
        return _gelu_fwd_op(h2, scale, amax, stats, a_meta_t is not None, record, count)
    return kernels.gelu_fp8_fwd(h2, *(a_meta_t or ()))


def gelu_bwd(h8, h_si, grad, x_dtype, a_scale=None, pad_t=1):
    """kernels.gelu_fp8_bwd: (grad_h, FP8(GELU(h))^T or None). Custom op under torch.compile."""
    if torch.compiler.is_compiling():
        gh, a_t = _gelu_bwd_op(h8, h_si, grad, x_dtype, a_scale if a_scale is not None else h_si,
                               a_scale is not None, pad_t)
        return gh, (a_t if a_scale is not None else None)
    return kernels.gelu_fp8_bwd(h8, h_si, grad, x_dtype, a_scale, pad_t)


def gemm(a, b, a_scale_inv, b_scale_inv, out_dtype=torch.bfloat16, bias=None, precise=False):
    if torch.compiler.is_compiling():
        return _gemm_op(a, b, a_scale_inv, b_scale_inv, out_dtype, bias, precise)
    return kernels.fp8_gemm(a, b, a_scale_inv, b_scale_inv, out_dtype, bias, precise=precise)


# ----------------------------------------------------------------------------------------------
# FP8 linear: forward E4M3 x E4M3, dgrad E5M2 x E4M3, wgrad E5M2 x E4M3, all three FP8 GEMMs


def cast_weight(w: torch.Tensor, w_fp8: torch.Tensor, w_si: torch.Tensor, w_amax: torch.Tensor):
    """Weight (N, K) -> w_fp8 (N, K) in place and w_fp8_t (K, N), scaled by its own amax: one read
    for the amax, one read + two writes for the cast (the scale is derived inside the kernel)."""
    w_amax.zero_()
    amax_into(w.detach(), w_amax)
    _, w_fp8_t = cast_jit(w.detach(), w_amax, w_fp8, w_si, transpose=True)
    return w_fp8_t


@torch.no_grad()
def accumulate_fp8_grad(grad_fp8, grad_scale_inv, grad_amax, g_t, g_si, x_t, x_si, precise=False):
    """grad (N, K) += g_t (N, Mp) @ x_t (K, Mp)^T, kept as FP8 E4M3 + scale (kernels.fp8_grad_accumulate: the
    running FP8 sum is added to the product, the amax of the result taken, and a just-in-time cast re-quantizes it).
    Custom op under torch.compile."""
    if torch.compiler.is_compiling():
        _grad_acc_op(grad_fp8, grad_scale_inv, grad_amax, g_t, x_t, g_si, x_si, precise)
    else:
        kernels.fp8_grad_accumulate(grad_fp8, grad_scale_inv, grad_amax, g_t, x_t, g_si, x_si, precise)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, g_meta, x_meta_t, g_meta_t, grad_bufs, w_fp8_t3, precise, residual=None,
                n_split=1):
        # x_meta_t / g_meta_t: (scale, scale_inv, amax slot, stats) of the input / grad_output casts;
        # w_fp8_t3: the weight already in FP8 (w_fp8 (N, K), w_fp8_t (K, N), scale_inv);
        # precise: (fwd, dgrad, wgrad) FP32 promotion of the MMA sums (FP8Linear.precise_acc);
        # residual, n_split: see FP8Linear.forward
        x_scale, x_si, x_amax, x_stats = x_meta_t
        w_fp8, w_fp8_t, w_si = w_fp8_t3
        K = x.shape[-1]
        x2 = x.reshape(-1, K)  # (M, K)
        need_wgrad = weight.requires_grad
        x_fp8, x_fp8_t = cast(x2, E4M3, x_scale, x_amax, x_stats, transpose=need_wgrad, pad_t=PAD_TOKENS)
        out = gemm(x_fp8, w_fp8, x_si, w_si, _out_dtype(x), bias, precise=precise[0])  # (M, N)
        _linear_ctx(ctx, x, weight, bias, g_meta, w_fp8_t, precise, residual)
        # FP8 copies are what backward needs: 1 byte per element instead of BF16's 2
        ctx.save_for_backward(x_fp8_t, x_si, w_fp8_t if ctx.w_is_t else w_fp8, w_si, *g_meta_t, *grad_bufs)
        return _linear_out(out.view(*x.shape[:-1], out.shape[-1]), residual, n_split)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x_t, x_si, w_t, w_si, *g_and_bufs = ctx.saved_tensors
        grad_output = grad_outputs if len(grad_outputs) > 1 else grad_outputs[0]
        grad_x, grad_b = _linear_backward(ctx, grad_output, lambda grad_x: x_t, x_si, w_t, w_si, g_and_bufs)
        return (grad_x.view(ctx.x_shape), None, grad_b, None, None, None, None, None, None,
                grad_output if ctx.has_residual else None, None)


def _linear_out(out: torch.Tensor, residual: Optional[torch.Tensor], n_split: int):
    """The FP8 linear Functions' result: out, residual + out, or out's n_split column blocks (views)."""
    if residual is not None:
        return residual + out
    return out.split(out.shape[-1] // n_split, dim=-1) if n_split > 1 else out


def _grad_rows(ctx, grad_output) -> tuple:
    """The gradient the backward casts, as a tuple of column parts: ((M, N),), or (n_split parts) the split outputs'
    gradients as (M, N / n_split) row-major parts of one row stride, cast as their concatenation without writing it
    (kernels.cast_to_fp8; the cuDNN attention backward's dq, dk, dv have that layout); other layouts are
    concatenated here."""
    if not isinstance(grad_output, tuple):
        return (grad_output.reshape(-1, grad_output.shape[-1]),)
    n = ctx.x_shape[:-1].numel()
    parts = [g.reshape(n, g.shape[-1]) if g is not None else None for g in grad_output]
    like = next(p for p in parts if p is not None)
    parts = [p if p is not None else torch.zeros_like(like) for p in parts]
    if all(p.stride() == like.stride() and p.stride(-1) == 1 and p.dtype == like.dtype for p in parts):
        return tuple(parts)
    return (torch.cat(parts, dim=-1),)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The linear's output dtype: autocast's when it is on (as nn.Linear under autocast), else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _linear_ctx(ctx, x, weight, bias, g_meta, w_fp8_t, precise, residual=None) -> None:
    """What _linear_backward reads from ctx besides the saved tensors (both FP8 linear forwards set it)."""
    ctx.precise, ctx.g_meta = precise, g_meta  # g_meta not None: prime it on this backward (eager first step only)
    ctx.w_is_t = w_fp8_t is not None  # None: the layer keeps no (K, N) copy (keep_weight_t False); dgrad transposes
    ctx.x_shape, ctx.has_bias, ctx.need_wgrad = x.shape, bias is not None, weight.requires_grad
    ctx.has_residual = residual is not None  # the residual's gradient is the sum's: passed through
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.out_dtype = _out_dtype(x)  # what autograd would hand the backward (a float32 residual sum's gradient is rounded to it)


def _linear_backward(ctx, grad_output, x_t_fn, x_si, w_t, w_si, g_and_bufs):
    """The FP8 linear's dgrad and wgrad (shared by _FP8LinearFn and _FP8GELULinearFn): grad_output (..., N) ->
    (grad_x (M, K), grad_bias or None); the weight gradient accumulates into the FP8 buffers. x_t_fn(grad_x)
    gives the (K, Mp) FP8 input the wgrad reads (saved, or recomputed; grad_x lets a recompute share its pass)."""
    g_scale, g_si, g_amax, g_stats, grad_fp8, grad_si, grad_amax = g_and_bufs
    parts = _grad_rows(ctx, grad_output)  # ((M, N),), or its column parts
    whole = lambda: torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # noqa: E731
    if parts[0].dtype not in kernels.HP_DTYPES:
        parts = (whole().float(),)
    # a float32 gradient of a residual sum (or of fp32 parts) is cast as its copy in the output's dtype would be
    round_to = ctx.out_dtype if parts[0].dtype == torch.float32 and ctx.out_dtype != torch.float32 else None
    if ctx.g_meta is not None:
        ctx.g_meta.prime(whole().to(round_to) if round_to is not None else whole())
    N = sum(p.shape[-1] for p in parts)
    grad_b = torch.empty(N, device=parts[0].device) if ctx.has_bias else None  # bias grad from the same read of g
    g_fp8, g_fp8_t = cast(parts if len(parts) > 1 else parts[0], E5M2, g_scale, g_amax, g_stats,
                          transpose=ctx.need_wgrad, pad_t=PAD_TOKENS, colsum_out=grad_b, round_to=round_to)
    if not ctx.w_is_t:  # a transient transpose: 2 bytes per weight element moved, no memory kept
        w_t = w_t.view(torch.uint8).t().contiguous().view(w_t.dtype)
    grad_x = gemm(g_fp8, w_t, g_si, w_si, ctx.out_dtype, precise=ctx.precise[1])  # (M, N) x (K, N)^T -> (M, K)
    if ctx.need_wgrad:
        accumulate_fp8_grad(grad_fp8, grad_si, grad_amax, g_fp8_t, g_si, x_t_fn(grad_x), x_si, ctx.precise[2])  # (N, K)
    return grad_x, (grad_b.to(ctx.bias_dtype) if ctx.has_bias else None)


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8. Weight held in `weight_dtype` (FP16 at levels >= 1);
    its gradient lands in the FP8 buffers weight_grad_fp8 / weight_grad_scale_inv (see fp8_grad)."""

    def __init__(self, in_features, out_features, bias=True, device=None, weight_dtype=torch.float16,
                 history_len=16, margin=0):
        if in_features % MIN_FP8_FEATURES or out_features % MIN_FP8_FEATURES:
            raise ValueError(f"FP8Linear needs in/out features divisible by {MIN_FP8_FEATURES}, got "
                             f"{in_features}x{out_features}; keep this layer in BF16 (convert_to_fp8's filter)")
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.weight.data = self.weight.data.to(weight_dtype)
        self.x_meta = ScalingMeta(E4M3, history_len, margin, device)
        self.g_meta = ScalingMeta(E5M2, history_len, margin, device)
        self.x_meta.features, self.g_meta.features = in_features, out_features
        self.register_buffer("weight_grad_fp8", torch.zeros(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_grad_scale_inv", torch.zeros(1, device=device))  # 0 = no gradient yet
        self.register_buffer("weight_grad_amax", torch.zeros(1, device=device))
        # the FP8 copy of the weight: cast once per optimizer step, reused by every micro-batch
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=E4M3, device=device),
                             persistent=False)
        self.register_buffer("weight_scale_inv", torch.ones(1, device=device), persistent=False)
        self.register_buffer("weight_amax", torch.zeros(1, device=device), persistent=False)
        self._weight_fp8_t = None  # None: the FP8 copy is stale (update_scaling, load_state_dict)
        self.fp8_weight_kept = False  # True: an optimizer writes the FP8 copy in its step (keep_fp8_weight)
        # False (with fp8_weight_kept): no (K, N) copy is kept between steps, dgrad transposes the (N, K) one
        # on the fly: 1 byte per parameter less (level 3's memory budget), a small transpose per backward
        self.keep_weight_t = True
        # (fwd, dgrad, wgrad): which GEMMs promote the MMA's partial sums to FP32 every K tile (kernels.fp8_gemm
        # precise; sm_90 only); PRECISE_ACC names the choices, train.py --precise_acc sets them. Default
        # "wgrad": without it the 124M model's train loss fell 7% behind BF16 on the H100 (README, issue 9)
        self.precise_acc = PRECISE_ACC[DEFAULT_PRECISE_ACC]
        self.weight._fp8_owner = self  # fp8_grad(p) finds the buffers through this
        # True: the input is the MLP's pre-activation h, this layer applies tanh-GELU first and keeps only h (in
        # FP8) for the backward (_FP8GELULinearFn; model.use_fp8_gelu(recompute=True), --fp8_gelu=2)
        self.gelu_in = False
        # with gelu_in: the GELU fused into the input cast instead, h kept as it is (_FP8GELUCastLinearFn;
        # model.use_fp8_gelu(fused_cast=True), --fp8_gelu=3)
        self.gelu_cast = False
        # with gelu_in, not gelu_cast: h kept in FP8 with this delayed scale, not a just-in-time one
        # (model.use_fp8_gelu(recompute=True, delayed=True), --fp8_gelu=4)
        self.h_meta = None
        # set (model.use_fp8_saved_attn, --fp8_saved_attn): given (q, k, v), this layer (the attention's c_proj)
        # applies causal attention first, by the fused op attn_backend (SDPA_BACKENDS), and keeps q, k, v for the
        # backward in E4M3 with this delayed scale (_FP8AttnLinearFn)
        self.qkv_meta, self.attn_backend = None, None

    def fp8_weight(self):
        """(w_fp8 (N, K), w_fp8_t (K, N), scale_inv). Kept by the optimizer (FP8AdamW): as it wrote them.
        Else weights change only at optimizer steps, so the cast is redone only after update_scaling();
        under torch.compile it is redone every call."""
        if self.fp8_weight_kept:
            return self.weight_fp8, self._weight_fp8_t, self.weight_scale_inv
        if torch.compiler.is_compiling() or self._weight_fp8_t is None:  # no guard on the cache when compiled
            w_t = cast_weight(self.weight, self.weight_fp8, self.weight_scale_inv, self.weight_amax)
            if torch.compiler.is_compiling():
                return self.weight_fp8, w_t, self.weight_scale_inv
            self._weight_fp8_t = w_t
        return self.weight_fp8, self._weight_fp8_t, self.weight_scale_inv

    @torch.no_grad()
    def keep_fp8_weight(self) -> None:
        """For an optimizer whose step writes weight_fp8, its (K, N) copy, weight_scale_inv and weight_amax
        (FP8AdamW): cast them once now, in place; forward then uses them as they are."""
        w_t = cast_weight(self.weight, self.weight_fp8, self.weight_scale_inv, self.weight_amax)
        if not self.keep_weight_t:
            self._weight_fp8_t = None
        elif self.fp8_weight_kept and self._weight_fp8_t is not None:  # same storage: the optimizer's pointer table (and a captured CUDA graph) write there
            self._weight_fp8_t.copy_(w_t)
        else:
            self._weight_fp8_t = w_t
        self.fp8_weight_kept = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.fp8_weight_kept:
            self.keep_fp8_weight()  # the loaded weight's FP8 copy, into the same buffers
        else:
            self._weight_fp8_t = None

    def forward(self, x, residual=None, n_split=1):
        """self(x); residual given: residual + self(x), the sum's gradient cast in the backward as it comes (float32
        for the float32 residual stream: no BF16 copy of it is written for this layer, kernels.cast_to_fp8
        round_to); n_split > 1: self(x)'s n_split column blocks (views), whose gradients the backward casts without
        concatenating them first (c_attn's q, k, v). x a tuple (q, k, v) of (B, nh, T, hs) (with qkv_meta set):
        self(causal attention(q, k, v) with the heads side by side), q, k, v kept in FP8 (_FP8AttnLinearFn)."""
        attn = isinstance(x, tuple)
        if attn and (self.qkv_meta is None or n_split > 1 or self.gelu_in):
            raise ValueError("FP8Linear: a (q, k, v) input needs qkv_meta (model.use_fp8_saved_attn), no n_split or "
                             "gelu_in")
        if n_split > 1 and (residual is not None or self.gelu_in or self.out_features % n_split):
            raise ValueError("FP8Linear: n_split goes without residual or gelu_in, and must divide out_features")
        if not self.x_meta.primed:
            with torch.no_grad():
                if attn:
                    self.x_meta.prime(torch.nn.functional.scaled_dot_product_attention(*x, is_causal=True))
                else:
                    self.x_meta.prime(torch.nn.functional.gelu(x, approximate="tanh") if self.gelu_in else x)
        if attn and not self.qkv_meta.primed:
            with torch.no_grad():
                self.qkv_meta.prime(torch.stack([t.detach().abs().amax().float() for t in x]))
        if self.h_meta is not None and not self.h_meta.primed:
            with torch.no_grad():
                self.h_meta.prime(x)
        m, g = self.x_meta, self.g_meta
        record = self.training and not _recomputing  # eval forwards must not steer the training scales
        # under torch.compile a model that was never run eagerly starts from scale 1 (as TE does)
        prime_g = not g.primed and not torch.compiler.is_compiling() and torch.is_grad_enabled()
        layer = (g if prime_g else None, m.cast_args(record), g.cast_args(),
                 (self.weight_grad_fp8, self.weight_grad_scale_inv, self.weight_grad_amax),
                 self.fp8_weight(), self.precise_acc)
        if attn:
            return _FP8AttnLinearFn.apply(*x, self.weight, self.bias, *layer, self.qkv_meta.cast_args(record),
                                          self.attn_backend, residual)
        fn = (_FP8GELUCastLinearFn if self.gelu_cast else _FP8GELULinearFn) if self.gelu_in else _FP8LinearFn
        if self.gelu_cast:
            extra = (residual,)
        elif self.gelu_in:  # h_meta (--fp8_gelu=4): h's delayed-scaling slots
            extra = (self.h_meta.cast_args(record) if self.h_meta is not None else None, residual)
        else:
            extra = (residual, n_split)
        return fn.apply(x, self.weight, self.bias, *layer, *extra)

    def extra_repr(self):
        return super().extra_repr() + f", weight_dtype={self.weight.dtype}, fp8=E4M3/E5M2"


def fp8_grad(p: torch.Tensor) -> Optional[FP8Tensor]:
    """The FP8 gradient of an FP8Linear weight (None when p is not one or holds no gradient)."""
    owner = getattr(p, "_fp8_owner", None)
    if owner is None:
        return None
    return FP8Tensor(owner.weight_grad_fp8, owner.weight_grad_scale_inv)


def is_fp8_param(p: torch.Tensor) -> bool:
    return getattr(p, "_fp8_owner", None) is not None


@torch.no_grad()
def zero_fp8_grads(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.weight_grad_scale_inv.zero_()
            m.weight_grad_amax.zero_()


_STACKED = ("amax_history", "scale", "scale_inv", "n_nonfinite")


@torch.no_grad()
def count_cast_stats(model: nn.Module, on: bool) -> None:
    """Count saturated / flushed-to-zero values at every cast site of the model from now on (on) or not;
    zeroes the counters. A compiled model recompiles once per setting; a CUDA graph keeps what it captured."""
    for m in model.modules():
        if isinstance(m, ScalingMeta):
            m.count_stats = on
            m.stats.zero_()


def update_scaling(model: nn.Module) -> None:
    """Once per optimizer step: every ScalingMeta turns its amax history into its next scale, and
    every FP8Linear's FP8 weight copy is marked stale (the optimizer has just changed the weights).
    All metas are updated together: stack, one vectorized update, scatter back (~25 kernel launches
    in all instead of ~15 per meta; a 124M GPT has 96 metas). Each meta keeps its own tensors:
    views of one shared buffer would share autograd's version counter across layers."""
    metas = [m for m in model.modules() if isinstance(m, ScalingMeta)]
    for m in model.modules():
        if isinstance(m, FP8Linear) and not m.fp8_weight_kept:  # kept: the optimizer step wrote the new copy
            m._weight_fp8_t = None
    if not metas:
        return
    if len({(m.amax_history.shape, m.scale.device) for m in metas}) != 1:
        for m in metas:  # mixed history lengths or devices: one by one
            m.update()
        return
    cache = model.__dict__.get("_fp8_meta_consts")
    if cache is None or cache[0] != len(metas):
        dev = metas[0].scale.device
        consts = [torch.tensor([[m.consts()[i]] for m in metas], dtype=torch.int32, device=dev) for i in range(3)]
        cache = model.__dict__["_fp8_meta_consts"] = (len(metas), consts)
    bufs = {name: [getattr(m, name) for m in metas] for name in _STACKED}
    rows = {name: torch.stack(ts) for name, ts in bufs.items()}
    _update_rows(*(rows[k] for k in _STACKED), *cache[1])
    for name in _STACKED:
        torch._foreach_copy_(bufs[name], list(rows[name].unbind(0)))


def default_filter(name: str, module: nn.Linear) -> bool:
    """Convert every Linear except the LM head and layers too small for FP8 tensor cores."""
    if name.split(".")[-1] in ("lm_head", "head", "output"):
        return False
    return module.in_features % MIN_FP8_FEATURES == 0 and module.out_features % MIN_FP8_FEATURES == 0


def convert_to_fp8(model: nn.Module, level: int = 1, filter_fn: Callable[[str, nn.Linear], bool] = default_filter,
                   history_len: int = 16, margin: int = 0) -> nn.Module:
    """Swap nn.Linear -> FP8Linear in place (level >= 1); level 0 returns the model unchanged."""
    if level not in FP8_LEVELS:
        raise ValueError(f"fp8 level must be one of {FP8_LEVELS}, got {level}")
    if level == 0:
        return model
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and filter_fn(full, child):
                new = FP8Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.weight.device, history_len=history_len, margin=margin)
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(mod, child_name, new)
    return model


# ----------------------------------------------------------------------------------------------
# FP8 attention (issue 8; arXiv 2505.20524: every GEMM of the block in FP8). Q, K, V are cast to E4M3 and
# the output gradient to E5M2 with delayed scaling, exactly as a linear's input and grad_output, each with
# a transposed copy (the K-major operands of PV, dV, dQ, dK); kernels.fp8_attention_fwd / _bwd do the rest.


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B*T, C) rows: a view when x is a head split of (B, T, C) rows (c_attn's q, k, v and
    the gradient of the model's output transpose), else a copy (e.g. the rotated q, k of llama)."""
    B, H, T, D = x.shape
    x2 = x.transpose(1, 2).reshape(B * T, H * D)
    return x2 if x2.dtype in kernels.HP_DTYPES else x2.float()


@torch.library.custom_op("nanofp8::attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v_t: torch.Tensor, q_si: torch.Tensor, k_si: torch.Tensor,
                 v_si: torch.Tensor, n_batch: int, n_head: int,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _attn_fwd_rows(q, k, v_t, q_si, k_si, v_si, n_batch, n_head, out_dtype)


@_attn_fwd_op.register_fake
def _(q, k, v_t, q_si, k_si, v_si, n_batch, n_head, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype), q.new_empty((n_batch, n_head, q.shape[0] // n_batch),
                                                               dtype=torch.float32)


def _attn_fwd_rows(q, k, v_t, q_si, k_si, v_si, B, H, out_dtype):
    """FP8 rows (B*T, C) of q, k and V's transposed copy -> (o rows (B*T, C) out_dtype, lse (B, nh, T))."""
    q4, k4 = kernels.attn_views(q, None, B, H)[0], kernels.attn_views(k, None, B, H)[0]
    v4_t = kernels.attn_views(q, v_t, B, H)[1]  # (v has q's shape)
    o, lse = kernels.fp8_attention_fwd(q4, k4, v4_t, q_si, k_si, v_si, out_dtype=out_dtype)
    return o.transpose(1, 2).reshape(q.shape), lse  # (B, T, nh, hs) memory: a view


@torch.library.custom_op("nanofp8::attn_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, do_t: torch.Tensor, q: torch.Tensor, q_t: torch.Tensor, k: torch.Tensor,
                 k_t: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, q_si: torch.Tensor,
                 k_si: torch.Tensor, v_si: torch.Tensor, do_si: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attn_bwd_rows(do, do_t, q, q_t, k, k_t, v, o, lse, q_si, k_si, v_si, do_si)


@_attn_bwd_op.register_fake
def _(do, do_t, q, q_t, k, k_t, v, o, lse, q_si, k_si, v_si, do_si):
    return tuple(o.new_empty(o.shape) for _ in range(3))


def _attn_bwd_rows(do, do_t, q, q_t, k, k_t, v, o, lse, q_si, k_si, v_si, do_si):
    """Rows (B*T, C) (+ transposed copies) of dO, q, k, v and o -> (dq, dk, dv) rows (B*T, C) in o.dtype."""
    B, H = lse.shape[:2]
    views = [kernels.attn_views(x, x_t, B, H) for x, x_t in ((do, do_t), (q, q_t), (k, k_t), (v, None), (o, None))]
    (do4, do4_t), (q4, q4_t), (k4, k4_t), (v4, _), (o4, _) = views
    grads = kernels.fp8_attention_bwd(do4, do4_t, q4, q4_t, k4, k4_t, v4, o4, lse, q_si, k_si, v_si, do_si)
    return tuple(g.transpose(1, 2).reshape(o.shape) for g in grads)


def attn_fwd(*args):
    return _attn_fwd_op(*args) if torch.compiler.is_compiling() else _attn_fwd_rows(*args)


def attn_bwd(*args):
    return _attn_bwd_op(*args) if torch.compiler.is_compiling() else _attn_bwd_rows(*args)


class _FP8AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g_meta, qkv_meta_t, g_meta_t):
        # qkv_meta_t: per q, k, v (scale, scale_inv, amax slot or None, stats or None); g_meta_t: the same for
        # the output gradient; g_meta: not None = prime it on this backward (eager first step only)
        B, H, T, D = q.shape
        need_bwd = q.requires_grad or k.requires_grad or v.requires_grad
        fp8s = []
        for i, (x, (scale, _, amax, stats)) in enumerate(zip((q, k, v), qkv_meta_t)):
            # q and k need their transposed copies in the backward only, v in the forward too (PV)
            fp8s += cast(_rows(x), E4M3, scale, amax, stats, transpose=need_bwd or i == 2, pad_t=PAD_TOKENS)
        q8, q8_t, k8, k8_t, v8, v8_t = fp8s
        sis = [t[1] for t in qkv_meta_t]
        o, lse = attn_fwd(q8, k8, v8_t, *sis, B, H, q.dtype)  # o: (B*T, C) rows
        ctx.save_for_backward(q8, q8_t, k8, k8_t, v8, o, lse, *sis, *g_meta_t)
        ctx.g_meta = g_meta
        return o.view(B, T, H, D).transpose(1, 2)  # (B, nh, T, hs)

    @staticmethod
    def backward(ctx, grad_output):
        q8, q8_t, k8, k8_t, v8, o, lse, q_si, k_si, v_si, g_scale, g_si, g_amax, g_stats = ctx.saved_tensors
        g2 = _rows(grad_output)  # (B*T, C): a view of the model's (B, T, C) gradient
        if ctx.g_meta is not None:
            ctx.g_meta.prime(g2)
        g8, g8_t = cast(g2, E5M2, g_scale, g_amax, g_stats, transpose=True, pad_t=PAD_TOKENS)
        grads = attn_bwd(g8, g8_t, q8, q8_t, k8, k8_t, v8, o, lse, q_si, k_si, v_si, g_si)
        B, H, T, D = grad_output.shape
        dq, dk, dv = (g.view(B, T, H, D).transpose(1, 2) for g in grads)
        return dq, dk, dv, None, None, None


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metas, record: bool = True) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hs)) v with every GEMM in FP8: q, k, v (B, nh, T, hs) -> (B, nh, T, hs) in
    q.dtype. metas: ScalingMeta of q, k, v (E4M3) and of the output gradient (E5M2); record=False (eval) uses
    their scales without recording amaxes."""
    if q.shape[-1] not in kernels.ATTN_HEAD_DIMS:
        raise ValueError(f"FP8 attention supports head sizes {kernels.ATTN_HEAD_DIMS}, got {q.shape[-1]}; "
                         "use --fp8_attention=0")
    for m, x in zip(metas[:3], (q, k, v)):
        if not m.primed:
            m.prime(x)
    g = metas[3]
    prime_g = not g.primed and not torch.compiler.is_compiling() and torch.is_grad_enabled()
    mt = tuple(m.cast_args(record) for m in metas[:3])
    g_t = g.cast_args()
    return _FP8AttentionFn.apply(q, k, v, g if prime_g else None, mt, g_t)


class _FP8SavedGELUFn(torch.autograd.Function):
    """tanh-GELU that keeps its input for the backward as E4M3 with a just-in-time power-of-two scale: 1 byte
    per element instead of BF16's 2. The MLP's GELU input (B, T, 4C) is the largest activation a GPT block
    saves; the gradient through GELU' of the FP8-rounded input keeps an SQNR of 40-47 dB (random inputs with
    an outlier; BF16-saved: 52 dB), above the ~30 dB of the FP8 dgrad GEMM that produced dy. Both directions are
    one fused kernel each (kernels.gelu_fp8_fwd / gelu_fp8_bwd)."""

    @staticmethod
    def forward(ctx, x):
        x8, si, a = gelu_fwd(x.detach().reshape(-1, x.shape[-1]).contiguous())  # (M, 4C): the c_fc output
        ctx.save_for_backward(x8, si)
        return a.view(x.shape)

    @staticmethod
    def backward(ctx, grad_output):
        x8, si = ctx.saved_tensors
        g2 = grad_output.reshape(x8.shape).contiguous()
        return gelu_bwd(x8, si, g2, g2.dtype)[0].view(grad_output.shape)


class _FP8GELULinearFn(torch.autograd.Function):
    """proj(tanh-GELU(h)) for an FP8Linear proj that keeps for the backward only h, as E4M3 with a just-in-time
    scale (as _FP8SavedGELUFn; --fp8_gelu=2) or (h_meta_t given: --fp8_gelu=4) its own delayed scale, which
    spares the amax pass over h: then one read of h writes both FP8 copies, as --fp8_gelu=3's one read writes
    FP8(GELU(h)) and its transposed copy. The FP8 copy of GELU(h) that proj's wgrad reads, which the plain path
    keeps from the forward, is recomputed from it in the backward, in the same pass that computes GELU's input
    gradient (kernels.gelu_fp8_bwd): 1 byte per hidden element kept instead of 2 (--fp8_gelu=1) or 3 (BF16
    GELU input + FP8 copy). The wgrad then reads FP8(GELU(FP8(h))), with the forward's delayed scale."""

    @staticmethod
    def forward(ctx, h, weight, bias, g_meta, x_meta_t, g_meta_t, grad_bufs, w_fp8_t3, precise, h_meta_t=None,
                residual=None):
        x_scale, x_si, x_amax, x_stats = x_meta_t
        w_fp8, w_fp8_t, w_si = w_fp8_t3
        h2 = h.detach().reshape(-1, h.shape[-1]).contiguous()  # (M, K): the c_fc output
        h8, h_si, a_fp8 = gelu_fwd(h2, (x_scale, x_amax, x_stats), h_meta_t)  # one read of h for both FP8 copies
        out = gemm(a_fp8, w_fp8, x_si, w_si, _out_dtype(h), bias, precise=precise[0])  # (M, N)
        _linear_ctx(ctx, h, weight, bias, g_meta, w_fp8_t, precise, residual)
        ctx.save_for_backward(h8, h_si, x_scale, x_si, w_fp8_t if ctx.w_is_t else w_fp8, w_si, *g_meta_t, *grad_bufs)
        ctx.x_dtype = h.dtype
        return _linear_out(out.view(*h.shape[:-1], out.shape[-1]), residual, 1)

    @staticmethod
    def backward(ctx, grad_output):
        h8, h_si, x_scale, x_si, w_t, w_si, *g_and_bufs = ctx.saved_tensors
        grad_h = []

        def recomputed_x_t(grad_a):  # one pass: GELU's input gradient and FP8(GELU(h))^T with the forward's scale
            gh, a_t = gelu_bwd(h8, h_si, grad_a, ctx.x_dtype, x_scale, PAD_TOKENS)  # (records nothing)
            grad_h.append(gh)
            return a_t
        grad_a, grad_b = _linear_backward(ctx, grad_output, recomputed_x_t, x_si, w_t, w_si, g_and_bufs)
        if not grad_h:  # no wgrad (frozen weight): the input gradient alone
            grad_h.append(gelu_bwd(h8, h_si, grad_a, ctx.x_dtype)[0])
        return (grad_h[0].view(ctx.x_shape), None, grad_b, None, None, None, None, None, None, None,
                grad_output if ctx.has_residual else None)


class _FP8GELUCastLinearFn(torch.autograd.Function):
    """proj(tanh-GELU(h)) for an FP8Linear proj, with the GELU fused into its output's FP8 cast (--fp8_gelu=3, for
    speed): one read of h writes FP8(GELU(h)) and its transposed copy (kernels.gelu_cast_fwd), where the plain path
    writes GELU(h) in BF16 and the cast reads it again. Keeps what the plain path keeps (h in the activation dtype
    for GELU's backward, the transposed FP8 copy for proj's wgrad); the backward's GELU' is one fused pass too."""

    @staticmethod
    def forward(ctx, h, weight, bias, g_meta, x_meta_t, g_meta_t, grad_bufs, w_fp8_t3, precise, residual=None):
        x_scale, x_si, x_amax, x_stats = x_meta_t
        w_fp8, w_fp8_t, w_si = w_fp8_t3
        h2 = h.detach().reshape(-1, h.shape[-1]).contiguous()  # (M, K): the c_fc output
        a_fp8, a_t = gelu_cast(h2, x_scale, x_amax, x_stats, PAD_TOKENS, transpose=weight.requires_grad)
        out = gemm(a_fp8, w_fp8, x_si, w_si, _out_dtype(h), bias, precise=precise[0])  # (M, N)
        _linear_ctx(ctx, h, weight, bias, g_meta, w_fp8_t, precise, residual)
        ctx.save_for_backward(h2, a_t, x_si, w_fp8_t if ctx.w_is_t else w_fp8, w_si, *g_meta_t, *grad_bufs)
        return _linear_out(out.view(*h.shape[:-1], out.shape[-1]), residual, 1)

    @staticmethod
    def backward(ctx, grad_output):
        h2, a_t, x_si, w_t, w_si, *g_and_bufs = ctx.saved_tensors
        grad_a, grad_b = _linear_backward(ctx, grad_output, lambda grad_x: a_t, x_si, w_t, w_si, g_and_bufs)
        return (gelu_bwd_hp(h2, grad_a.contiguous()).view(ctx.x_shape), None, grad_b, None, None, None, None, None, None,
                grad_output if ctx.has_residual else None)


# ----------------------------------------------------------------------------------------------
# attention in high precision whose inputs are kept for the backward in FP8 (--fp8_saved_attn)

SDPA_BACKENDS = ("cudnn", "flash", "cpu")  # the aten attention ops _FP8AttnLinearFn calls itself


def _sdpa_fwd(backend: str, q, k, v):
    """Causal attention of (B, nh, T, hs) q, k, v by the fused aten op of backend -> (out, aux): aux the tensors
    its backward op takes besides q, k, v, out and the output gradient (the log-sum-exp first)."""
    if backend == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
        return r[0], (r[1], r[6], r[7])  # lse, philox seed, offset
    if backend == "flash":
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
        return r[0], (r[1], r[6], r[7])
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return o, (lse,)


def _sdpa_bwd(backend: str, g, q, k, v, o, aux):
    """(dq, dk, dv) of _sdpa_fwd's attention, from the output gradient g and what it returned."""
    T = q.shape[2]
    if backend == "cudnn":
        lse, seed, offset = aux
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(g, q, k, v, o, lse, seed, offset, None,
                                                                           None, None, T, T, 0.0, True)
    if backend == "flash":
        lse, seed, offset = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(g, q, k, v, o, lse, None, None, T, T,
                                                                           0.0, True, seed, offset)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(g, q, k, v, o, aux[0], 0.0, True)


def sdpa_backend(device, head_size: int) -> str:
    """The fused attention op --fp8_saved_attn calls on device: cuDNN's where a small causal BF16 forward and
    backward of this head size run (what F.scaled_dot_product_attention picks on an H100), else flash's; the CPU's
    flash op on the CPU. Raises ValueError when neither runs on the GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    q = torch.randn(1, 2, 64, head_size, device=device, dtype=torch.bfloat16)
    errors = []
    for backend in SDPA_BACKENDS[:2]:
        try:
            o, aux = _sdpa_fwd(backend, q, q, q)
            _sdpa_bwd(backend, torch.ones_like(o), q, q, q, o, aux)
            return backend
        except RuntimeError as e:  # not built in, or this head size / GPU unsupported
            errors.append(f"{backend}: {str(e).splitlines()[0]}")
    raise ValueError(f"--fp8_saved_attn: no fused attention op runs on {device} at head size {head_size} "
                     f"({'; '.join(errors)}); use --fp8_saved_attn=0")


def _saved_attn_bwd_rows(g, qkv8, qkv_si, x_t, x_si, aux, backend, B, H):
    """The attention backward of _FP8AttnLinearFn: dO rows g (M, C), q, k, v as one E4M3 (M, 3C) matrix, O as the
    transposed E4M3 copy x_t (C, Mp) -> dq, dk, dv rows (M, C) in g.dtype. Dequantized in one pass each
    (kernels.dequantize: exact), then the fused attention backward op of backend."""
    M, C = g.shape
    heads = lambda t: t.view(B, M // B, H, C // H).transpose(1, 2)  # noqa: E731  (M, C) rows -> (B, nh, T, hs)
    o = kernels.dequantize(x_t[:, :M].t(), x_si, g.dtype)  # (M, C)
    q, k, v = (heads(t) for t in kernels.dequantize(qkv8, qkv_si, g.dtype).split(C, dim=1))
    grads = _sdpa_bwd(backend, heads(g), q, k, v, heads(o), aux)
    return tuple(_rows(d).contiguous() for d in grads)  # views: the ops write (B, T, nh, hs) memory


# a custom op under torch.compile so that the dequantization stays in the backward: as plain torch ops, which read
# only forward tensors, the partitioner moved them into the forward graph and kept their BF16 results (the very
# 6 bytes per token and channel this path exists to spare; seen in TORCH_LOGS=aot_graphs)
@torch.library.custom_op("nanofp8::saved_attn_bwd", mutates_args=())
def _saved_attn_bwd_op(g: torch.Tensor, qkv8: torch.Tensor, qkv_si: torch.Tensor, x_t: torch.Tensor,
                       x_si: torch.Tensor, aux: list[torch.Tensor], backend: str, n_batch: int,
                       n_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _saved_attn_bwd_rows(g, qkv8, qkv_si, x_t, x_si, aux, backend, n_batch, n_head)


@_saved_attn_bwd_op.register_fake
def _(g, qkv8, qkv_si, x_t, x_si, aux, backend, n_batch, n_head):
    return tuple(g.new_empty(g.shape) for _ in range(3))


def saved_attn_bwd(*args):
    return _saved_attn_bwd_op(*args) if torch.compiler.is_compiling() else _saved_attn_bwd_rows(*args)


class _FP8AttnLinearFn(torch.autograd.Function):
    """proj(attention(q, k, v)) for an FP8Linear proj (the attention's c_proj; --fp8_saved_attn): causal attention in
    the input dtype by cuDNN's (or flash's) fused op, exactly what F.scaled_dot_product_attention computes, then the
    FP8 linear. What the backward keeps is what differs: q, k, v as one E4M3 (M, 3C) matrix with a delayed scale of
    its own (qkv_meta_t), 3 bytes per token and channel instead of BF16's 6, and no copy of the attention output O:
    the attention backward reads O (only for its rowsum(dO * O) term) back from proj's own FP8 input copy, the
    transposed one its wgrad keeps anyway (2 bytes less). The backward then runs the same fused attention backward
    op on the dequantized q, k, v and O: the forward is unchanged, the attention's input gradients carry the E4M3
    rounding of its inputs (test_fp8_saved_attn_*: SQNR floors against a float64 reference)."""

    @staticmethod
    def forward(ctx, q, k, v, weight, bias, g_meta, x_meta_t, g_meta_t, grad_bufs, w_fp8_t3, precise, qkv_meta_t,
                backend, residual=None):
        x_scale, x_si, x_amax, x_stats = x_meta_t
        qkv_scale, qkv_si, qkv_amax, qkv_stats = qkv_meta_t
        w_fp8, w_fp8_t, w_si = w_fp8_t3
        B, H, T, D = q.shape
        o, aux = _sdpa_fwd(backend, q, k, v)  # (B, nh, T, hs)
        o2 = _rows(o)  # (M, C): a view (the ops write O as (B, T, nh, hs) memory)
        # proj's input cast; the transposed copy always: the attention backward reads O from it
        x_fp8, x_fp8_t = cast(o2, E4M3, x_scale, x_amax, x_stats, transpose=True, pad_t=PAD_TOKENS)
        out = gemm(x_fp8, w_fp8, x_si, w_si, _out_dtype(o2), bias, precise=precise[0])  # (M, N)
        # q, k, v as one (M, 3C) E4M3 matrix, read in place where they are c_attn's column blocks (rotated q, k of
        # RoPE are copied into rows by _rows, and then v too: the cast's parts share one layout)
        parts = tuple(_rows(t) for t in (q, k, v))
        if len({p.stride() for p in parts}) > 1:
            parts = tuple(p.contiguous() for p in parts)
        qkv8, _ = cast(parts, E4M3, qkv_scale, qkv_amax, qkv_stats)
        x_like = o2.view(B, T, H * D)
        _linear_ctx(ctx, x_like, weight, bias, g_meta, w_fp8_t, precise, residual)
        ctx.save_for_backward(x_fp8_t, x_si, w_fp8_t if ctx.w_is_t else w_fp8, w_si, qkv8, qkv_si, *aux, *g_meta_t,
                              *grad_bufs)
        ctx.backend, ctx.n_aux, ctx.heads, ctx.o_dtype = backend, len(aux), (B, H, T, D), o.dtype
        return _linear_out(out.view(B, T, out.shape[-1]), residual, 1)

    @staticmethod
    def backward(ctx, grad_output):
        x_t, x_si, w_t, w_si, qkv8, qkv_si, *rest = ctx.saved_tensors
        aux, g_and_bufs = rest[:ctx.n_aux], rest[ctx.n_aux:]
        grad_o, grad_b = _linear_backward(ctx, grad_output, lambda grad_x: x_t, x_si, w_t, w_si, g_and_bufs)
        B, H, T, D = ctx.heads
        grads = saved_attn_bwd(grad_o.to(ctx.o_dtype), qkv8, qkv_si, x_t, x_si, list(aux), ctx.backend, B, H)
        dq, dk, dv = (g.view(B, T, H, D).transpose(1, 2) for g in grads)
        return (dq, dk, dv, None, grad_b, None, None, None, None, None, None, None, None,
                grad_output if ctx.has_residual else None)


class FP8SavedGELU(nn.Module):
    """nn.GELU(approximate="tanh") whose backward keeps its input in FP8 (model.use_fp8_gelu)."""

    def forward(self, x):
        return _FP8SavedGELUFn.apply(x)


class FP8Attention(nn.Module):
    """Causal attention of (B, nh, T, hs) q, k, v with QK^T and PV (and the four backward GEMMs) in FP8: the
    module swapped in for model.CausalSDPA (model.use_fp8_attention). features: C, the values per token of
    each cast (saturation statistics)."""

    def __init__(self, features: int, history_len: int = 16, margin: int = 0, device=None):
        super().__init__()
        self.q_meta, self.k_meta, self.v_meta = (ScalingMeta(E4M3, history_len, margin, device) for _ in range(3))
        self.g_meta = ScalingMeta(E5M2, history_len, margin, device)
        for m in (self.q_meta, self.k_meta, self.v_meta, self.g_meta):
            m.features = features

    def forward(self, q, k, v):
        return fp8_attention(q, k, v, (self.q_meta, self.k_meta, self.v_meta, self.g_meta),
                             record=self.training and not _recomputing)
