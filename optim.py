"""
optim.py: FP8AdamW, AdamW with decoupled precision (FP8-LM, arXiv 2310.18313, section 2.3).

Gradient statistics tolerate low precision, master weights do not. Per FP8Linear weight
(fp8.is_fp8_param) the optimizer keeps, at level 2:
  weight FP16 (it IS the master: 2 B) + grad FP8 E4M3 + scale (1 B, fp8.fp8_grad)
  + m1 FP8 E4M3 + per-tensor scale (1 B) + m2 FP16 + per-tensor scale (2 B) = 6 B/param (vs 16),
plus the FP8 weight copies the GEMMs read (2 B, every level >= 1; bench.py memory measures both).
Level 1 keeps FP32 m1/m2; master_dtype=torch.float32 adds a separate FP32 master (+4 B).
Every other parameter (embeddings, norms, biases, LM head) uses p.grad and FP32 states.

One pass per step: a fused Triton kernel reads grad, weight/master, m1, m2 once and writes them once,
plus the amax of the new m1/m2, for many tensors per launch (a pointer table), with no host sync.
The new scales are needed before the new moments exist; they come from a bound that cannot be
exceeded: |m1'| <= b1 |m1| + (1 - b1) |g| with |m1| <= last step's stored amax and
|g| <= 448 * grad_scale_inv (the FP8 grad's own power-of-two scale), likewise for m2 with g^2.
So the scale is delayed (previous amax) with an exact margin, and saturation cannot happen.

The same pass writes the next forward's FP8 weight (FP8Linear.weight_fp8 (N, K) and its K-major transposed
copy (K, N) for the dgrad GEMM, which FP8 tensor cores cannot read transposed), so no layer casts its weight
again. Its scale comes from |w'| <= (1 - lr wd) |w| + lr max|m_hat / sqrt(v_hat)|, the last a function of
betas and step alone (adam_update_bound), which holds for exact moments; the quantized ones could exceed it,
so a weight whose new amax saturated the scale is re-cast with its own scale by the finishing kernel
(no host sync). Measured on the tiny model: the FP8 weight's SQNR equals a cast after the step (to 0.001 dB),
no re-cast was ever needed (see _Bucket.step).

Usage:
    opt = FP8AdamW(model.parameters(), lr=6e-4, **LEVEL_DTYPES[2])
    grad_scale, found_inf, norm = clip_and_check(model.parameters(), max_norm=1.0)
    opt.step(grad_scale=grad_scale, found_inf=found_inf); opt.zero_grad()
"""
from typing import Callable, Iterable, Optional

import torch
import triton
import triton.language as tl

import fp8
import kernels
from kernels import E4M3

STATE_DTYPES = (E4M3, torch.float16, torch.float32)  # m1 / m2 storage
MASTER_DTYPES = (torch.float16, torch.float32)  # float16: the FP16 weight is the master
LEVEL_DTYPES = {  # FP8AdamW(..., **LEVEL_DTYPES[level]); DESIGN.md "Levels"
    1: dict(master_dtype=torch.float16, m1_dtype=torch.float32, m2_dtype=torch.float32),
    2: dict(master_dtype=torch.float16, m1_dtype=E4M3, m2_dtype=torch.float16),
}
CLIP_EPS = 1e-6  # clip coefficient max_norm / (norm + eps), as torch.nn.utils.clip_grad_norm_
# elements per program; in the interpreter each program costs ~10 ms
# H100 sweep (bench.py optim, 1.3B set, CUDA graph): level-2 kernel 76% of copy bandwidth at 2048 x 4 warps
# (16 elements per thread), 75% at 1024 x 4, 59% at 1024 x 8; level 1 93-94% at 2048 either way
ADAM_BLOCK = 2048 if not kernels.INTERPRET else 4096
ADAM_WARPS = 4 if not kernels.INTERPRET else 1
# E4M3 stores (m1, the FP8 weight): the level-2 kernel issued ~135 instructions per element (sm_90 SASS, 2192
# for 16 elements), about as long as its 13 bytes take to move, so the conversion matters. CVT_PTX: the hardware
# conversion (2 values per instruction; CUDA sm_89+; 1808 for 16); CVT_INT: integer bit arithmetic _e4m3_bits
# (~15 ops; any backend, the interpreter included); CVT_SOFT: kernels._soft_fp8 (~45 ops; the first version).
# All three give the same bits (test_e4m3_bits_match_torch, test_fused_kernel_matches_reference_gpu).
# H100, bench.py optim, 1.3B set, level-2 kernel: ptx 6.28 ms (83.2% of copy bandwidth), int 6.76 (77.3%),
# soft 9.18 (56.9%); maxnreg 96 (5 instead of 4 programs per SM) changed nothing (6.29)
CVT_SOFT, CVT_INT, CVT_PTX = 0, 1, 2
ADAM_FP8_CVT = None  # None: CVT_PTX where the device has it, else CVT_INT
ADAM_MAXNREG = None  # register cap per thread (None: the compiler's choice); bench.py optim --maxnreg sweeps it
# FP8 weights are stepped in (TILE_ROWS, block // TILE_ROWS) tiles, so that the transposed copy is written as
# 32-byte row segments (one DRAM sector), not single bytes 768+ apart as a flat 1-D walk would
TILE_ROWS = 32
RECAST_SPLIT = 16  # programs per tensor in _finish_kernel: a re-cast (rare) is spread over them
# the FP8 weight's next scale comes from a bound on |w'| (W_SCALE in _Bucket.step), exact for exact arithmetic;
# the FP16 rounding of w' adds <= 2^-11 relative and each fp32 operation 2^-24: 2^-9 covers both
W_BOUND_SLACK = 2.0 ** -9
RECAST_ANY_CHANGE = False  # re-cast when the just-in-time scale differs at all (True), or only when it saturated
FP8_WEIGHT_IN_STEP = True  # the step writes the FP8 weights (False: each layer casts its own after the step)
SUMSQ_BLOCK = 4096
# per-tensor scalars of one launch, rows of a float32 (N_META, n) table
# (device-side, so that lr and the step count may be device tensors: no host sync, CUDA-graph safe)
G_SI, ACTIVE, M1_SI, M1_SCALE, M1_SI_NEW, M2_SI, M2_SCALE, M2_SI_NEW, STEP_SIZE, BC2_SQRT, DECAY, W_SCALE = range(12)
N_META = 12
# columns of the int64 (n, N_COLS) pointer table: data pointers (the last 4 only with FP8 weights), then sizes
T_W, T_G, T_M1, T_M2, T_MASTER, T_W8, T_W8T, T_WSI, T_WAMAX, T_NUMEL, T_COLS, T_FIRST, T_NBLOCKS = range(13)
N_PTRS, N_COLS = 9, 13


def is_scaled(dtype: torch.dtype) -> bool:
    """FP8 and FP16 moments carry a per-tensor power-of-two scale; FP32 ones do not."""
    return dtype in (E4M3, torch.float16)


def pow2_scale(bound: torch.Tensor, dtype: torch.dtype, prev_scale: torch.Tensor) -> torch.Tensor:
    """Vectorized fp8.amax_to_scale (margin 0): 2^floor(log2(fmax / bound)) float32 (n,), in float64;
    a bound of 0 or non-finite keeps prev_scale."""
    b = bound.double()
    ok = torch.isfinite(b) & (b > 0)
    exp = torch.floor(torch.log2(torch.finfo(dtype).max / torch.where(ok, b, torch.ones_like(b))))
    return torch.where(ok, torch.exp2(exp.clamp(-126, 126)), prev_scale.double()).float()


# ---- fused Adam kernel (to move into kernels.py) ----
# One program = BLOCK elements of one tensor. block_map[pid] names the tensor; its row of the pointer
# table gives the data pointers (int64 -> typed pointer; the first tensor of each kind is passed only
# for its element type), numel and first block. An inactive tensor (no grad, or found_inf) has every
# load and store masked off, so a skipped step touches nothing. Divisions and square roots are the
# IEEE-rounded ones (div_rn, sqrt_rn) and the launch sets enable_fp_fusion=False (no mul+add -> FMA
# contraction, by LLVM or ptxas), so every fp32 operation is rounded as in the torch reference below:
# the kernel matches it bit for bit, in the interpreter and on the GPU. (With contraction on, the
# first H100 run differed by 1 fp32 ulp in up to 47% of elements, e.g. m + 0.1 * (g - m) = 0 in the
# reference but -1.5e-8 * m with an FMA when g = -9m; costs nothing measurable: the kernel is memory-bound.)
# With FP8 weights (W8) a program steps a 2-D tile instead and also writes the next forward's FP8 weight,
# (R, C) and its transposed (C, R) copy, scaled by a scale predicted before the step (W_SCALE); the
# per-block maxima (m1, m2, weight) are reduced per tensor by _finish_kernel, which also re-casts a weight
# whose prediction saturated. Two launches per bucket, no host sync.


@triton.jit
def _e4m3_bits(x):
    """fp32 x, |x| <= 448 or NaN (saturated before) -> E4M3 bits as uint8, round to nearest even, in ~15
    integer ops (kernels._soft_fp8 takes ~45; same bits, test_e4m3_bits_match_torch). Normal range: round
    the fp32 mantissa to 3 bits (a carry bumps the exponent, as it should) and re-bias the exponent from
    127 to 7; below 2^-6 (subnormals, step 2^-9): |x| * 2^9 rounded to an integer by adding 2^23."""
    b = x.to(tl.int32, bitcast=True)
    a = b & 0x7FFFFFFF
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    sub = (tl.abs(x) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(a < 0x3C800000, sub, normal)  # 0x3C800000 = 2^-6, the smallest normal
    code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
    return (((b >> 24) & 0x80) | code).to(tl.uint8)


@triton.jit
def _e4m3_bits_ptx(x):
    """fp32 x -> E4M3 bits (uint8) by the conversion instruction of sm_89+, `cvt.rn.satfinite.e4m3x2.f32`:
    round to nearest even, straight from fp32 (Triton's own fp32 -> fp8 path rounds twice, through fp16,
    on Triton 3.6). One instruction per 2 values instead of ~15 integer ops per value: the fused step is
    bound by instruction issue as much as by memory. Same bits as _e4m3_bits for |x| <= 448 (NaN: 0x7F)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,f,f,f,f", [x], dtype=tl.uint8, is_pure=True, pack=4)


@triton.jit
def _to_e4m3(x, CVT: tl.constexpr):
    """Saturated fp32 -> E4M3 bits (uint8). CVT: 2 (CVT_PTX) the PTX conversion (CUDA sm_89+), 1 (CVT_INT) integer bit
    arithmetic (any backend, the interpreter included), 0 (CVT_SOFT) kernels._soft_fp8 (the first version)."""
    if CVT == 2:
        q = _e4m3_bits_ptx(x)
    elif CVT == 1:
        q = _e4m3_bits(x)
    else:
        q = kernels._soft_fp8(x, 3, -6)
    return q


@triton.jit
def _store_state(ptr, offs, mask, x, scale, SCALED: tl.constexpr, FMAX: tl.constexpr, IS_FP8: tl.constexpr,
                 CVT: tl.constexpr):
    """x (fp32) -> storage dtype (x * scale, saturated); returns max |stored| in scaled units. Rounding
    is monotone, so that is the rounded max |x|: one scalar rounding instead of one per element."""
    if SCALED:
        x = tl.clamp(x * scale, -FMAX, FMAX, propagate_nan=tl.PropagateNan.ALL)
    if IS_FP8:
        tl.store(ptr + offs, _to_e4m3(x, CVT).to(ptr.dtype.element_ty, bitcast=True), mask=mask)
        amax = kernels._round_to_fp8_grid(tl.max(tl.abs(x)), 3, -6)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
        amax = tl.max(tl.abs(x)).to(ptr.dtype.element_ty).to(tl.float32)
    return amax


@triton.jit
def _tile(j, R, C, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """Tile j (row-major) of an (R, C) matrix -> offsets in it (TILE_R, TILE_C), in its transpose, and the mask."""
    n_tc = tl.cdiv(C, TILE_C)
    rows = (j // n_tc) * TILE_R + tl.arange(0, TILE_R)
    cols = (j % n_tc) * TILE_C + tl.arange(0, TILE_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    return rows[:, None] * C + cols[None, :], cols[None, :] * R + rows[:, None], mask


@triton.jit
def _run(j, numel, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Block j of a flat tensor of numel elements (loaded from the pointer table) -> offsets, mask. ALIGNED
    (host-checked: every numel % 16 == 0) makes the mask constant over 16 elements, so loads and stores are
    16-byte vectors; without it the compiler, which cannot see numel, emits one 1-4 byte access per element
    (PTX of sm_90: ld.global.b8 / b16 instead of ld.global.v4.b32)."""
    if ALIGNED:  # an exact no-op that the compiler sees as a multiple of 16 (tl.multiple_of on this argument
        numel = numel // 16 * 16  # left the sm_90 PTX scalar: it tags the value's defining op, inside the caller)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _store_fp8_weight(w8_ptr, w8t_ptr, offs, offs_t, mask, w, scale, CVT: tl.constexpr, HAS_WT: tl.constexpr):
    """w (fp32 values of the FP16 weight) * scale, saturated, as E4M3 into w_fp8 (R, C) and (HAS_WT) w_fp8_t (C, R)."""
    q = _to_e4m3(tl.clamp(w * scale, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL), CVT)
    q = q.to(w8_ptr.dtype.element_ty, bitcast=True)
    tl.store(w8_ptr + offs, q, mask=mask)
    if HAS_WT:
        tl.store(w8t_ptr + offs_t, q, mask=mask)  # the compiler stages it through shared memory: coalesced rows


@triton.jit
def _ptr(row, col: tl.constexpr, like):
    """Column col of a pointer-table row as a pointer of like's element type (16-byte aligned, checked)."""
    return tl.multiple_of(tl.load(row + col).to(tl.pointer_type(like.dtype.element_ty)), 16)


@triton.jit
def _adam_kernel(
    table_ptr, block_ptr, meta_ptr, part_ptr,  # int64 (n, 13), int32 (nblocks,), float32 (12, n), (3, nblocks)
    w0_ptr, g0_ptr, m10_ptr, m20_ptr, master0_ptr, w80_ptr,  # element types of the columns
    n, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,  # sizes and hyperparameters (lr: in meta)
    M1_SCALED: tl.constexpr, M1_MAX: tl.constexpr, M1_FP8: tl.constexpr,
    M2_SCALED: tl.constexpr, M2_MAX: tl.constexpr, M2_FP8: tl.constexpr,
    HAS_MASTER: tl.constexpr, W8: tl.constexpr, CVT: tl.constexpr, BLOCK: tl.constexpr, TILE_R: tl.constexpr,
    HAS_WT: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_ptr + pid).to(tl.int64)
    row = table_ptr + t * 13
    j = pid - tl.load(row + 11).to(tl.int32)  # T_FIRST: this block's index within its tensor
    numel = tl.where(tl.load(meta_ptr + 1 * n + t) != 0, tl.load(row + 9), 0).to(tl.int32)  # ACTIVE: else all masked
    if W8:  # tile j of the (R, C) weight; R, C multiples of 16 (FP8Linear), hinted for 16-byte accesses
        C = tl.multiple_of(tl.load(row + 10).to(tl.int32), 16)  # T_COLS
        R = tl.multiple_of(numel // C, 16)
        offs, offs_t, mask = _tile(j, R, C, TILE_R, BLOCK // TILE_R)
    else:
        offs, mask = _run(j, numel, BLOCK, ALIGNED)
    w_ptr, g_ptr = _ptr(row, 0, w0_ptr), _ptr(row, 1, g0_ptr)
    m1_ptr, m2_ptr = _ptr(row, 2, m10_ptr), _ptr(row, 3, m20_ptr)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(meta_ptr + t)  # G_SI
    m = tl.load(m1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(m2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if M1_SCALED:
        m = m * tl.load(meta_ptr + 2 * n + t)  # M1_SI
    if M2_SCALED:
        v = v * tl.load(meta_ptr + 5 * n + t)  # M2_SI
    if HAS_MASTER:
        master_ptr = _ptr(row, 4, master0_ptr)
        w = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # AdamW (torch's order): decay, moments, w -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    w = w * tl.load(meta_ptr + 10 * n + t)  # DECAY = 1 - lr * weight_decay
    denom = tl.div_rn(tl.sqrt_rn(v), tl.load(meta_ptr + 9 * n + t)) + eps  # BC2_SQRT
    w = w - tl.load(meta_ptr + 8 * n + t) * tl.div_rn(m, denom)  # STEP_SIZE
    if HAS_MASTER:
        tl.store(master_ptr + offs, w, mask=mask)
    w = w.to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs, w, mask=mask)
    a1 = _store_state(m1_ptr, offs, mask, m, tl.load(meta_ptr + 3 * n + t), M1_SCALED, M1_MAX, M1_FP8, CVT)
    a2 = _store_state(m2_ptr, offs, mask, v, tl.load(meta_ptr + 6 * n + t), M2_SCALED, M2_MAX, M2_FP8, CVT)
    # per-block maxima, reduced per tensor by _finish_kernel: atomics on one address per tensor from
    # thousands of blocks serialize in L2 (measured: level 2 at 54% of copy bandwidth with them)
    nprog = tl.num_programs(0)
    if M1_SCALED:
        tl.store(part_ptr + pid, a1 * tl.load(meta_ptr + 4 * n + t))  # M1_SI_NEW: power of 2, exact
    if M2_SCALED:
        tl.store(part_ptr + nprog + pid, a2 * tl.load(meta_ptr + 7 * n + t))
    if W8:  # the next forward's FP8 weight, from the FP16 weight just stored (what a cast after the step reads)
        w = w.to(tl.float32)
        _store_fp8_weight(_ptr(row, 5, w80_ptr), _ptr(row, 6, w80_ptr), offs, offs_t, mask, w,
                          tl.load(meta_ptr + 11 * n + t), CVT, HAS_WT)  # W_SCALE
        tl.store(part_ptr + 2 * nprog + pid, tl.max(tl.abs(w)))


@triton.jit
def _finish_kernel(
    table_ptr, meta_ptr, part_ptr, amax_ptr, recast_ptr,  # int64 (n, 13), float32 (12, n), (3, nblocks), (3, n), (n,)
    w0_ptr, w80_ptr, n, nblocks,  # element types; sizes
    M1_SCALED: tl.constexpr, M2_SCALED: tl.constexpr, W8: tl.constexpr, RECAST_ANY: tl.constexpr,
    CVT: tl.constexpr, BLOCK: tl.constexpr, TILE_R: tl.constexpr, RBLOCK: tl.constexpr, HAS_WT: tl.constexpr,
):
    """Program (t, s): amax_out[:, t] = max over tensor t's blocks of _adam_kernel's partial maxima (program 0;
    every program reduces the weight's, which decides a re-cast). FP8 weights: the scale used (W_SCALE) stands unless it saturated
    (or, RECAST_ANY, differs from the just-in-time scale of the new amax); then the programs (t, *) re-cast
    the weight from its new FP16 values with the just-in-time scale, tiles s, s + S, ... Program (t, 0) of an
    active tensor publishes the layer's weight_scale_inv and weight_amax and counts re-casts."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    row = table_ptr + t * 13
    first = tl.load(row + 11).to(tl.int32)  # T_FIRST
    nb = tl.load(row + 12).to(tl.int32)  # T_NBLOCKS
    a1 = tl.zeros((RBLOCK,), tl.float32)
    a2 = tl.zeros((RBLOCK,), tl.float32)
    aw = tl.zeros((RBLOCK,), tl.float32)
    nb0 = tl.where(s == 0, nb, 0)  # the moments' maxima: program 0 only (the others need the weight's)
    for k in range(0, nb, RBLOCK):
        idx = k + tl.arange(0, RBLOCK)
        m, m0 = idx < nb, idx < nb0
        if M1_SCALED:
            a1 = tl.maximum(a1, tl.load(part_ptr + first + idx, mask=m0, other=0.0), tl.PropagateNan.ALL)
        if M2_SCALED:
            a2 = tl.maximum(a2, tl.load(part_ptr + nblocks + first + idx, mask=m0, other=0.0), tl.PropagateNan.ALL)
        if W8:
            aw = tl.maximum(aw, tl.load(part_ptr + 2 * nblocks + first + idx, mask=m, other=0.0), tl.PropagateNan.ALL)
    if s == 0:
        if M1_SCALED:
            tl.store(amax_ptr + t, tl.max(a1))
        if M2_SCALED:
            tl.store(amax_ptr + n + t, tl.max(a2))
    if W8:
        amax = tl.max(aw)
        used = tl.load(meta_ptr + 11 * n + t)  # W_SCALE
        jit = kernels._pow2_scale(amax, 8, 0x600000, 0)  # as cast_weight: 448 = 1.75 * 2^8
        if RECAST_ANY:
            redo = jit != used
        else:
            redo = amax * used > 448.0  # exact: used is a power of 2
        active = tl.load(meta_ptr + 1 * n + t) != 0  # ACTIVE
        redo = redo & active
        scale = tl.where(redo, jit, used)
        if (s == 0) & active:
            tl.store(amax_ptr + 2 * n + t, amax)
            tl.store(_ptr(row, 7, amax_ptr), 1.0 / scale)  # T_WSI
            tl.store(_ptr(row, 8, amax_ptr), amax)  # T_WAMAX
            tl.store(recast_ptr + t, tl.load(recast_ptr + t) + redo.to(tl.float32))
        if redo:
            C = tl.multiple_of(tl.load(row + 10).to(tl.int32), 16)
            R = tl.multiple_of(tl.load(row + 9).to(tl.int32) // C, 16)
            w_ptr, w8_ptr, w8t_ptr = _ptr(row, 0, w0_ptr), _ptr(row, 5, w80_ptr), _ptr(row, 6, w80_ptr)
            for jj in range(s, nb, tl.num_programs(1)):
                offs, offs_t, mask = _tile(jj, R, C, TILE_R, BLOCK // TILE_R)
                w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                _store_fp8_weight(w8_ptr, w8t_ptr, offs, offs_t, mask, w, scale, CVT, HAS_WT)


@triton.jit
def _sumsq_kernel(table_ptr, block_ptr, out_ptr, g0_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """out[pid] = sum of squares of one block of one tensor (per block, so the sum is deterministic)."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_ptr + pid).to(tl.int64) * 13
    j, numel = pid - tl.load(row + 11).to(tl.int32), tl.load(row + 9).to(tl.int32)  # T_FIRST, T_NUMEL
    offs, mask = _run(j, numel, BLOCK, ALIGNED)
    g = tl.load(_ptr(row, 1, g0_ptr) + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(g * g, axis=0))


_TABLES: dict = {}  # pointer tables by (pointers, shapes, block): rebuilt only when a tensor moves


def pointer_table(cols: list, block: int, tile_rows: int = 0):
    """cols: N_PTRS lists of n tensors (w, g, m1, m2, master, w_fp8, w_fp8_t, w_scale_inv, w_amax; an unused
    column repeats another) -> (int64 (n, N_COLS) table, int32 block map, nblocks). tile_rows > 0: a block is a
    (tile_rows, block // tile_rows) tile of a 2-D tensor (FP8 weights), else a run of `block` elements."""
    # shapes too: a freed tensor's address is soon reused (CUDA caching allocator) by one of another size
    key = (tuple(t.data_ptr() for c in cols for t in c), tuple(tuple(t.shape) for t in cols[0]), block, tile_rows)
    if key not in _TABLES:
        if cols[0][0].is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fused Adam: tensors moved during CUDA-graph capture (were grads set to None?); "
                               "keep them allocated: zero_grad(set_to_none=False)")
        rows, block_map, first = [], [], 0
        for i, w in enumerate(cols[0]):
            for k, c in enumerate(cols):
                assert c[i].data_ptr() % 16 == 0 and c[i].is_contiguous(), "fused Adam needs 16-byte aligned, contiguous tensors"
                assert k >= T_WSI or c[i].numel() == w.numel(), "fused Adam: weight, grad, states and master differ in size"
            assert w.numel() < 2 ** 31, "fused Adam indexes within a tensor in int32"
            if tile_rows:
                assert w.dim() == 2 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0, "FP8 weights: 2-D, dims % 16"
                assert cols[T_W8T][i].shape == w.shape[::-1], "w_fp8_t is the (C, R) transpose"
                nb = triton.cdiv(w.shape[0], tile_rows) * triton.cdiv(w.shape[1], block // tile_rows)
            else:
                nb = triton.cdiv(w.numel(), block)
            ncols = w.shape[-1] if w.dim() else 1
            rows.append([c[i].data_ptr() for c in cols] + [w.numel(), ncols, first, nb])
            block_map += [i] * nb
            first += nb
        dev = cols[0][0].device
        pin = dev.type == "cuda"  # pinned source: the copy does not wait for the stream
        table = torch.tensor(rows, dtype=torch.int64, pin_memory=pin).to(dev, non_blocking=True)
        bmap = torch.tensor(block_map, dtype=torch.int32, pin_memory=pin).to(dev, non_blocking=True)
        if len(_TABLES) > 32:
            _TABLES.clear()
        _TABLES[key] = (table, bmap, first)
    return _TABLES[key]


def adam_update_bound(beta1: float, beta2: float, step: torch.Tensor) -> torch.Tensor:
    """Largest |m_hat / sqrt(v_hat)| AdamW can produce at step t (float64, like step), whatever the gradients:
    |m_t| = (1-b1) |sum_i b1^(t-i) g_i| <= (1-b1) sqrt(S_t) sqrt(v_t / (1-b2)) by Cauchy-Schwarz, with
    S_t = sum_{k<t} (b1^2/b2)^k, so |m_hat| / sqrt(v_hat) <= (1-b1) sqrt(S_t (1-b2^t) / (1-b2)) / (1-b1^t):
    1 at t = 1, -> 1.17 for betas (0.9, 0.95), 7.3 for (0.9, 0.999). Exact moments only (see _Bucket.step)."""
    if beta2 == 0:  # v = g_t^2 alone: m / |g_t| has no bound
        return torch.full_like(step, float("inf"))
    r = beta1 ** 2 / beta2
    s = step if r == 1 else (1 - r ** step) / (1 - r)
    return (1 - beta1) * torch.sqrt(s * (1 - beta2 ** step) / (1 - beta2)) / (1 - beta1 ** step)


def _fp8_weight_ref(w, w8, w8t, w_si, w_amax, used, recasts):
    """Torch twin of the FP8-weight part of _adam_kernel + _finish_kernel for one tensor (w: the new weight)."""
    amax = w.float().abs().max().reshape(1)
    jit = kernels.pow2_scale_ref(amax, E4M3)
    redo = (jit != used) if RECAST_ANY_CHANGE else (amax * used > kernels.fp8_max(E4M3))
    scale = torch.where(redo, jit, used)
    q = (w.float() * scale).clamp(-kernels.fp8_max(E4M3), kernels.fp8_max(E4M3)).to(E4M3)
    w8.copy_(q)
    if w8t is not None:
        w8t.view(torch.uint8).copy_(q.view(torch.uint8).t())
    w_si.copy_(1.0 / scale)
    w_amax.copy_(amax)
    recasts += redo.float().reshape(())
    return amax


def adam_step_ref(ws, gs, m1s, m2s, masters, meta, amax_out, hp: dict, w8=None, recasts=None) -> None:
    """Pure-torch reference of the fused step (same arguments, same fp32 arithmetic), one tensor at a time."""
    f = {k: torch.tensor(v, dtype=torch.float32) for k, v in hp.items()}
    for i in range(len(ws)):
        if meta[ACTIVE, i] == 0:
            continue
        g = gs[i].float() * meta[G_SI, i]
        m, v = m1s[i].float(), m2s[i].float()
        if is_scaled(m1s[i].dtype):
            m = m * meta[M1_SI, i]
        if is_scaled(m2s[i].dtype):
            v = v * meta[M2_SI, i]
        w = (masters[i] if masters is not None else ws[i]).float()
        m = m + f["one_minus_beta1"] * (g - m)
        v = v * f["beta2"] + f["one_minus_beta2"] * g * g
        w = w * meta[DECAY, i]
        # correctly rounded sqrt (torch's fp32 CPU sqrt is not), true division (a 0-dim divisor is x * (1/d))
        denom = v.double().sqrt().float() / meta[BC2_SQRT, i].expand_as(v) + f["eps"]
        w = w - meta[STEP_SIZE, i] * (m / denom)
        if masters is not None:
            masters[i].copy_(w)
        ws[i].copy_(w.to(ws[i].dtype))
        for k, (x, dst) in enumerate(((m, m1s[i]), (v, m2s[i]))):
            if is_scaled(dst.dtype):
                fmax = torch.finfo(dst.dtype).max
                x = (x * meta[(M1_SCALE, M2_SCALE)[k], i]).clamp(-fmax, fmax)
                dst.copy_(x.to(dst.dtype))
                amax_out[k, i] = dst.float().abs().max() * meta[(M1_SI_NEW, M2_SI_NEW)[k], i]
            else:
                dst.copy_(x)
        if w8 is not None:
            amax_out[2, i] = _fp8_weight_ref(ws[i], *(c[i] for c in w8), meta[W_SCALE, i], recasts[i])


def fp8_cvt(device: torch.device) -> int:
    """The fastest E4M3 conversion the device runs: CVT_PTX on CUDA sm_89+ (not in the interpreter), else CVT_INT."""
    if device.type == "cuda" and not kernels.INTERPRET and torch.cuda.get_device_capability(device) >= (8, 9):
        return CVT_PTX
    return CVT_INT


def fused_adam_step(ws, gs, m1s, m2s, masters, meta, amax_out, hp: dict, block: int = ADAM_BLOCK,
                    w8=None, recasts=None, warps: int = ADAM_WARPS, cvt: Optional[int] = ADAM_FP8_CVT,
                    tile_r: int = TILE_ROWS, maxnreg: Optional[int] = ADAM_MAXNREG) -> None:
    """One AdamW step of n tensors in two launches. ws/gs/m1s/m2s/masters: lists of n tensors (masters or
    None), gs FP8 (x meta[G_SI]) or float; meta float32 (N_META, n); amax_out float32 (2, n) zeros;
    hp: python floats beta1, one_minus_beta1, beta2, one_minus_beta2, eps.
    w8 = (w_fp8s (R, C), w_fp8_ts (C, R), scale_invs (1,), amaxes (1,)), lists of n E4M3 / float32 tensors, for
    2-D ws (R, C % 16 == 0): also write the new FP8 weight with scale meta[W_SCALE] (the just-in-time scale
    where that saturated: recasts (n,) += 1), its transpose (w_fp8_ts None: not kept), 1/scale and the new weight's amax (also into
    amax_out row 2: (3, n) then)."""
    assert meta.shape == (N_META, len(ws)) and amax_out.shape == (2 + (w8 is not None), len(ws))
    assert meta.dtype == torch.float32 and (w8 is None or recasts is not None)
    if not kernels.use_triton(ws[0]):
        return adam_step_ref(ws, gs, m1s, m2s, masters, meta, amax_out, hp, w8, recasts)
    assert w8 is None or len({t is None for t in w8[1]}) == 1, "w_fp8_ts: all tensors or none (keep_weight_t)"
    has_wt = w8 is not None and w8[1][0] is not None
    if w8 is not None and not has_wt:  # no transposed copies: the (N, K) copies viewed (C, R) hold the table slot
        w8 = (w8[0], [w.view(w.shape[::-1]) for w in w8[0]], *w8[2:])
    cols = [ws, gs, m1s, m2s, masters if masters is not None else ws] + (list(w8) if w8 is not None else [ws] * 4)
    table, bmap, nblocks = pointer_table(cols, block, tile_r if w8 is not None else 0)
    part = torch.empty(3, nblocks, device=ws[0].device)  # per-block maxima of m1, m2, the weight (rows written only)
    d1, d2 = m1s[0].dtype, m2s[0].dtype
    f32 = {k: torch.tensor(v, dtype=torch.float32).item() for k, v in hp.items()}  # fp32 values, as the ref
    w80 = w8[0][0] if w8 is not None else ws[0]
    cvt = fp8_cvt(ws[0].device) if cvt is None else cvt
    assert cvt in (CVT_SOFT, CVT_INT, CVT_PTX), f"cvt: CVT_SOFT, CVT_INT or CVT_PTX, got {cvt}"
    _adam_kernel[(nblocks,)](
        table, bmap, meta, part, *[c[0] for c in cols[:5]], w80, len(ws),
        f32["beta1"], f32["one_minus_beta1"], f32["beta2"], f32["one_minus_beta2"], f32["eps"],
        M1_SCALED=is_scaled(d1), M1_MAX=torch.finfo(d1).max, M1_FP8=d1 == E4M3,
        M2_SCALED=is_scaled(d2), M2_MAX=torch.finfo(d2).max, M2_FP8=d2 == E4M3,
        HAS_MASTER=masters is not None, W8=w8 is not None, CVT=cvt, BLOCK=block, TILE_R=tile_r,
        HAS_WT=has_wt, ALIGNED=all(w.numel() % 16 == 0 for w in ws), num_warps=warps,
        enable_fp_fusion=False, **({"maxnreg": maxnreg} if maxnreg else {}))  # bit-exact vs adam_step_ref
    if is_scaled(d1) or is_scaled(d2) or w8 is not None:
        _finish_kernel[(len(ws), RECAST_SPLIT if w8 is not None else 1)](
            table, meta, part, amax_out, recasts if recasts is not None else meta, ws[0], w80, len(ws), nblocks,
            M1_SCALED=is_scaled(d1), M2_SCALED=is_scaled(d2), W8=w8 is not None, RECAST_ANY=RECAST_ANY_CHANGE,
            CVT=cvt, BLOCK=block, TILE_R=tile_r, RBLOCK=1024 if not kernels.INTERPRET else 64, HAS_WT=has_wt,
            num_warps=4 if not kernels.INTERPRET else 1)


def weighted_sumsq(gs: list, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * sum(gs[i]^2) for tensors of any dtype (FP8 included) -> float64 scalar,
    deterministic (per-block partial sums, then one ordered sum); a tensor of weight 0 adds 0 even if NaN."""
    w = weights.double()
    if not kernels.use_triton(gs[0]):
        ss = torch.stack([g.double().square().sum() for g in gs])
        return torch.where(w != 0, ss * w, torch.zeros_like(w)).sum()
    table, bmap, nblocks = pointer_table([gs] * N_PTRS, SUMSQ_BLOCK)
    part = torch.empty(nblocks, dtype=torch.float32, device=gs[0].device)
    aligned = all(g.numel() % 16 == 0 for g in gs)
    _sumsq_kernel[(nblocks,)](table, bmap, part, gs[0], BLOCK=SUMSQ_BLOCK, ALIGNED=aligned,
                              num_warps=8 if not kernels.INTERPRET else 1)
    wb = w[bmap.long()]  # (nblocks,)
    return torch.where(wb != 0, part.double() * wb, torch.zeros_like(wb)).sum()


# ---- end of fused Adam kernel ----


# ----------------------------------------------------------------------------------------------
# gradient norm, clipping and the non-finite check (device tensors, no host sync)


def _fp8_grad_amax(p: torch.Tensor) -> torch.Tensor:
    """amax the FP8 wgrad recorded (inf/NaN there means the FP8 data saturated a non-finite value)."""
    return p._fp8_owner.weight_grad_amax


@torch.no_grad()
def clip_and_check(params: Iterable[torch.Tensor], max_norm: Optional[float],
                   reduce_fp8_sq: Optional[Callable[[torch.Tensor], None]] = None):
    """Global L2 norm of all gradients (FP8 ones dequantized) -> (grad_scale, found_inf, total_norm),
    0-dim device tensors: grad_scale = min(1, max_norm / (norm + 1e-6)) (1 when found_inf or max_norm
    is None), found_inf = any gradient (or FP8 grad amax) non-finite. Pass both to FP8AdamW.step.
    reduce_fp8_sq (level 3, every rank calls it): sums, in place, the FP8 grads' float64 sum of squares
    over ranks that each hold the reduced grads of their own tensors only."""
    params = list(params)
    dev = params[0].device
    total_sq = torch.zeros((), dtype=torch.float64, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    by_dtype: dict = {}
    for p in params:
        if not fp8.is_fp8_param(p) and p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        total_sq = total_sq + torch.stack(torch._foreach_norm(grads)).double().square().sum()
    fp8_ps = [p for p in params if fp8.is_fp8_param(p)]
    fp8_sq = torch.zeros((), dtype=torch.float64, device=dev)
    if fp8_ps:
        gts = [fp8.fp8_grad(p) for p in fp8_ps]
        si = torch.cat([g.scale_inv.reshape(1) for g in gts]).double()  # (n,), 0 = no gradient
        fp8_sq = weighted_sumsq([g.data for g in gts], si * si)
        bad = bad | ~torch.isfinite(torch.cat([_fp8_grad_amax(p).reshape(1) for p in fp8_ps])).all()
    if reduce_fp8_sq is not None:
        reduce_fp8_sq(fp8_sq)
    total_sq = total_sq + fp8_sq
    total_norm = total_sq.sqrt().float()
    found_inf = bad | ~torch.isfinite(total_norm)
    if max_norm is None:
        return torch.ones((), device=dev), found_inf, total_norm
    clip = (max_norm / (total_norm + CLIP_EPS)).clamp(max=1.0)
    return torch.where(found_inf, torch.ones_like(clip), clip), found_inf, total_norm


# ----------------------------------------------------------------------------------------------
# the optimizer


class _Bucket:
    """Params of one group that share one kernel launch: FP8 linear weights (FP8 grads, m1/m2 in the
    group's dtypes) or the rest (p.grad, FP32 m1/m2), split by weight dtype. Owns the per-tensor
    scalars as rows of one (5, n) tensor, so that updating them is a few vector ops per step."""

    def __init__(self, params: list, is_fp8: bool, m1_dtype, m2_dtype, has_master: bool, state: dict):
        self.params, self.is_fp8, self.has_master = params, is_fp8, has_master
        self.m1_dtype, self.m2_dtype = m1_dtype, m2_dtype
        self.meta = torch.zeros(5, len(params), device=params[0].device)  # step, m1/m2 scale_inv, m1/m2 amax
        self.meta[1:3] = 1.0
        self._has_cache: dict = {}
        for i, p in enumerate(params):
            st = state[p]
            st["step"] = self.meta[0, i:i + 1]
            st["exp_avg"] = torch.zeros(p.shape, dtype=m1_dtype, device=p.device)
            st["exp_avg_sq"] = torch.zeros(p.shape, dtype=m2_dtype, device=p.device)
            if is_scaled(m1_dtype):
                st["exp_avg_scale_inv"], st["exp_avg_amax"] = self.meta[1, i:i + 1], self.meta[3, i:i + 1]
            if is_scaled(m2_dtype):
                st["exp_avg_sq_scale_inv"], st["exp_avg_sq_amax"] = self.meta[2, i:i + 1], self.meta[4, i:i + 1]
            if has_master:
                st["master"] = p.detach().float().clone()
        # FP8 weights: the step writes the next forward's FP8 copy (cast here once, from then on by the kernel)
        self.owners = [p._fp8_owner for p in params] if is_fp8 and FP8_WEIGHT_IN_STEP else []
        for o in self.owners:
            o.keep_fp8_weight()
        self.recasts = torch.zeros(len(params), device=params[0].device)  # FP8 weights re-cast (bound exceeded)

    def w8(self) -> tuple:
        """The FP8 weight outputs of the step, for fused_adam_step: (w_fp8s, w_fp8_ts, scale_invs, amaxes)."""
        o = self.owners
        return ([m.weight_fp8 for m in o], [m._weight_fp8_t for m in o], [m.weight_scale_inv for m in o],
                [m.weight_amax for m in o])

    def grads(self):
        """-> (grad tensors (p itself as a masked-off stand-in where p.grad is None), grad scale_inv (n,),
        has_grad (n,) bool) on the device."""
        if self.is_fp8:
            gts = [fp8.fp8_grad(p) for p in self.params]
            si = torch.cat([g.scale_inv.reshape(1) for g in gts])
            return [g.data for g in gts], si, si != 0
        has = tuple(p.grad is not None for p in self.params)
        if has not in self._has_cache:
            pin = self.meta.is_cuda  # a pinned, non-blocking copy: no sync even the first time
            self._has_cache[has] = torch.tensor(has, pin_memory=pin).to(self.meta.device, non_blocking=True)
        gs = [p.grad if p.grad is not None else p for p in self.params]
        for p, g in zip(self.params, gs):
            assert g.dtype == p.dtype and g.is_contiguous(), f"grad must be contiguous {p.dtype}, got {g.dtype}"
        return gs, torch.ones_like(self.meta[0]), self._has_cache[has]

    def step(self, group: dict, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]  # a python number, or a 0-dim tensor read on the device (no sync)
        lr = lr.detach().double() if torch.is_tensor(lr) else float(lr)
        if not self.is_fp8 and all(p.grad is None for p in self.params):
            return  # host-known: nothing to do (torch skips params without grad)
        gs, g_si, has = self.grads()
        active = has & ~found_inf
        g_si = g_si * grad_scale  # the clip coefficient rides on the per-tensor dequantization scale
        st = self.meta
        st[0] += active.float()
        step = st[0].double().clamp(min=1)  # inactive tensors never stepped: any finite value will do
        meta = torch.empty(N_META, len(self.params), device=st.device)
        meta[G_SI], meta[ACTIVE], meta[M1_SI], meta[M2_SI] = g_si, active.float(), st[1], st[2]
        # next scales from a bound the new values cannot exceed (module docstring); FP32 moments: 1
        gmax = g_si.double() * kernels.fp8_max(E4M3)
        bounds = (beta1 * st[3] + (1 - beta1) * gmax, beta2 * st[4] + (1 - beta2) * gmax * gmax)
        for row, dt, b, si in ((M1_SCALE, self.m1_dtype, bounds[0], st[1]), (M2_SCALE, self.m2_dtype, bounds[1], st[2])):
            meta[row] = pow2_scale(b, dt, 1.0 / si) if is_scaled(dt) else torch.ones_like(si)
            meta[row + 1] = 1.0 / meta[row]
        meta[STEP_SIZE] = lr / (1 - beta1 ** step)  # float64, then rounded once to float32
        meta[BC2_SQRT] = (1 - beta2 ** step).sqrt()
        decay = 1 - lr * group["weight_decay"]
        meta[DECAY] = decay
        w8 = self.w8() if self.owners else None
        if w8 is not None:  # the new FP8 weight's scale, before it exists: |w'| <= decay |w| + lr |m_hat / sqrt(v_hat)|
            bound = decay * torch.cat(w8[3]).double() + lr * adam_update_bound(beta1, beta2, step)
            meta[W_SCALE] = kernels.pow2_scale_bits((bound * (1 + W_BOUND_SLACK)).float(), *kernels.fmax_bits(E4M3), 0)
        amax = torch.zeros(2 + (w8 is not None), len(self.params), device=st.device)
        hp = dict(beta1=beta1, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=group["eps"])
        masters = [s["master"] for s in self._states] if self.has_master else None
        fused_adam_step(self.params, gs, self._m1s, self._m2s, masters, meta, amax, hp, w8=w8, recasts=self.recasts)
        # commit the new scales and amaxes of the tensors that stepped
        # (not meta[[M1_SI_NEW, M2_SI_NEW]]: a python-list index is copied host -> device, a sync)
        st[1:3] = torch.where(active, torch.stack((meta[M1_SI_NEW], meta[M2_SI_NEW])), st[1:3])
        st[3:5] = torch.where(active, amax[:2], st[3:5])
        for p in self.params if self.is_fp8 and not self.owners else ():  # the layer casts again when next used
            p._fp8_owner._weight_fp8_t = None

    def bind(self, state: dict) -> None:
        self._states = [state[p] for p in self.params]
        self._m1s = [s["exp_avg"] for s in self._states]
        self._m2s = [s["exp_avg_sq"] for s in self._states]


class FP8AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with decoupled precision for FP8 linear weights:
    m1/m2 in m1_dtype/m2_dtype (E4M3, float16 or float32; the first two with a per-tensor power-of-two
    scale), master float16 (the weight itself) or float32 (a separate copy). Others: FP32 states.
    lr may be a 0-dim tensor on the params' device (per group too): it and the step counts are then read on
    the device only, so step() makes no host sync and can be captured in a CUDA graph (after a first step)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, master_dtype: torch.dtype = torch.float16,
                 m1_dtype: torch.dtype = E4M3, m2_dtype: torch.dtype = torch.float16):
        if torch.is_tensor(lr) and lr.dim() != 0:
            raise ValueError(f"a tensor lr must be 0-dim (on the params' device), got shape {tuple(lr.shape)}")
        if float(lr) < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"need lr, eps, weight_decay >= 0 and 0 <= betas < 1, got {lr}, {eps}, {weight_decay}, {betas}")
        self._buckets: list = []  # per param group, filled by add_param_group
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        master_dtype=master_dtype, m1_dtype=m1_dtype, m2_dtype=m2_dtype)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As torch, plus: allocate the group's states now (so load_state_dict can check and fill them)."""
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        for k, allowed in (("m1_dtype", STATE_DTYPES), ("m2_dtype", STATE_DTYPES), ("master_dtype", MASTER_DTYPES)):
            if g[k] not in allowed:
                raise ValueError(f"{k} must be one of {allowed}, got {g[k]}")
        split: dict = {}
        for p in g["params"]:
            if not p.is_contiguous():
                raise ValueError("FP8AdamW needs contiguous parameters")
            split.setdefault((fp8.is_fp8_param(p), p.dtype, p.device), []).append(p)
        buckets = []
        for (is_fp8, dtype, _), ps in split.items():
            m1, m2 = (g["m1_dtype"], g["m2_dtype"]) if is_fp8 else (torch.float32, torch.float32)
            master = is_fp8 and g["master_dtype"] == torch.float32 and dtype != torch.float32
            buckets.append(_Bucket(ps, is_fp8, m1, m2, master, self.state))
            buckets[-1].bind(self.state)
        self._buckets.append(buckets)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None):
        """One AdamW step. grad_scale: multiplies every gradient (the clip coefficient); found_inf: when
        set, nothing changes (weights, moments, scales, step counts). Both 0-dim device tensors, no sync."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, buckets in zip(self.param_groups, self._buckets):
            for b in buckets:
                dev = b.meta.device
                gscale = torch.ones((), device=dev) if grad_scale is None else grad_scale.to(dev).float().reshape(())
                finf = torch.zeros((), dtype=torch.bool, device=dev) if found_inf is None else found_inf.to(dev).bool().reshape(())
                b.step(group, gscale, finf)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch, plus FP8 grads: scale_inv 0 means 'no gradient' (fp8.zero_fp8_grads)."""
        super().zero_grad(set_to_none)
        bufs = []
        for g in self.param_groups:
            for p in g["params"]:
                if fp8.is_fp8_param(p):
                    bufs += [fp8.fp8_grad(p).scale_inv, _fp8_grad_amax(p)]
        if bufs:
            torch._foreach_zero_(bufs)

    def load_state_dict(self, state_dict: dict) -> None:
        """Copy a saved state into this optimizer's (exact); shapes, dtypes and keys must match."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("saved param groups differ in number or size from this optimizer's; "
                             "build the optimizer over the same model and groups")
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in saved_groups for i in g["params"]]
        pairs = []
        for p, i in zip(params, ids):
            mine, saved = self.state[p], state_dict["state"].get(i, {})
            if set(mine) != set(saved):
                raise ValueError(f"param {i}: saved state has keys {sorted(saved)}, this optimizer {sorted(mine)}; "
                                 "use the same m1_dtype/m2_dtype/master_dtype as the run that saved it")
            for k, t in mine.items():
                s = saved[k]
                if not torch.is_tensor(s) or s.shape != t.shape or s.dtype != t.dtype:
                    desc = f"{tuple(s.shape)} {s.dtype}" if torch.is_tensor(s) else type(s).__name__
                    raise ValueError(f"param {i} state '{k}': saved {desc}, expected {tuple(t.shape)} {t.dtype}; "
                                     "load into an optimizer built with the same model and dtypes")
                pairs.append((t, s))
        for t, s in pairs:  # all checked first: a failed load changes nothing
            t.copy_(s)
        for g, s in zip(self.param_groups, saved_groups):
            for k, v in s.items():
                if k != "params" and torch.is_tensor(g.get(k)):  # e.g. a tensor lr: keep its storage
                    g[k].copy_(v) if torch.is_tensor(v) else g[k].fill_(v)  # (a CUDA graph captured it)
                elif k != "params":
                    g[k] = v
