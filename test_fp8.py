"""
test_fp8.py: the nanoFP8 test suite, in the order a reader learns the library:
formats and scaling -> cast -> GEMM -> FP8 linear fwd/bwd -> torch.compile.

CPU (CI):  TRITON_INTERPRET=1 python -m pytest -q test_fp8.py   (kernels run in the Triton interpreter)
GPU:       python -m pytest -q test_fp8.py                        (same tests, large shapes, bit-exact checks)
"""
import math
import os

import pytest
import torch
import torch.nn as nn

import fp8
import kernels
from kernels import E4M3, E5M2

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
INTERP = kernels.INTERPRET
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (runs in the GPU suite)")
needs_triton = pytest.mark.skipif(not (CUDA or INTERP), reason="needs CUDA or TRITON_INTERPRET=1 to run Triton kernels")

# Tolerances (the reason for each value).
# SQNR floors of FP8 vs an FP32 reference on N(0,1) data: E4M3 has 3 mantissa bits, a relative
# rounding error <= 2^-4 uniformly spread -> ~31 dB for one cast; a GEMM of two E4M3 casts ~28 dB;
# E5M2 gradients (2 bits) ~25 dB alone, products of E5M2 x E4M3 ~23 dB. Floors keep >= 3 dB margin.
SQNR_CAST_E4M3 = 28.0
SQNR_CAST_E5M2 = 22.0
SQNR_LINEAR_OUT = 25.0
SQNR_LINEAR_GRAD = 20.0
# GEMM vs FP64 on the same FP8 inputs: products are exact in FP32, only the K-sum rounds. Hopper's
# FP8 tensor cores accumulate with ~22-bit mantissas between promotions, so a relative error of
# ~K * 2^-22 at worst; BF16 output adds 2^-9. 1e-2 bounds both with margin for K <= 8192.
GEMM_REL_TOL_BF16 = 1e-2
GEMM_REL_TOL_FP32 = 2e-3


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    ref, x = ref.detach().double(), x.detach().double()
    noise = (ref - x).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def rel_err(ref, x):
    return ((ref.double() - x.double()).norm() / ref.double().norm()).item()


def shapes(small, large):
    return large if CUDA else small


# ---------------------------------------------------------------------------------------------
# formats and scaling


def test_formats_from_finfo():
    assert kernels.fp8_max(E4M3) == 448.0 and kernels.fp8_max(E5M2) == 57344.0


@pytest.mark.parametrize("amax,margin,expected", [(448.0, 0, 1.0), (1.0, 0, 256.0), (3.5, 0, 128.0), (3.6, 0, 64.0), (449.0, 0, 0.5),
                                                  (1.0, 1, 128.0), (1e-30, 0, 2.0 ** 108), (1e-45, 0, 2.0 ** 126), (1e30, 0, 2.0 ** -91)])
def test_scale_for_known_amax(amax, margin, expected):
    s = fp8.amax_to_scale(torch.tensor([amax]), E4M3, margin, torch.tensor([7.0]))
    assert s.item() == expected
    assert s.item() * amax <= 448.0 or expected == 2.0 ** 126  # never saturates the amax itself


def test_integer_scale_matches_float64_formula():
    # the kernels derive scales from the fp32 bits of amax; check against the real-number formula
    amax = torch.cat([torch.exp(torch.empty(20000).uniform_(-60, 60)), torch.tensor([448.0, 224.0, 57344.0, 1.0])])
    for dt in (E4M3, E5M2):
        for margin in (0, 2):
            got = torch.stack([fp8.amax_to_scale(a, dt, margin, torch.ones(1)) for a in amax[:2000]]).flatten()
            exp = torch.floor(torch.log2(kernels.fp8_max(dt) / amax[:2000].double())) - margin
            assert torch.equal(got.double(), torch.exp2(exp.clamp(-126, 126)))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_scale_keeps_previous_on_zero_or_nonfinite(bad):
    assert fp8.amax_to_scale(torch.tensor([bad]), E5M2, 0, torch.tensor([8.0])).item() == 8.0


def test_delayed_history_max_over_window():
    H = 4
    meta = fp8.ScalingMeta(E4M3, history_len=H)
    amaxes = [1.0, 100.0, 3.0, 2.0, 5.0, 0.5, 0.25, 0.2]
    for t, a in enumerate(amaxes):
        meta.amax_history[0] = a  # what the cast kernel records at step t
        meta.update()
        window = max(amaxes[max(0, t - H + 1): t + 1])
        assert meta.scale.item() == 2.0 ** math.floor(math.log2(448.0 / window)), (t, window)
        assert meta.scale_inv.item() == 1.0 / meta.scale.item()
        assert meta.amax_history[0].item() == 0.0  # a fresh slot for the next step


def test_nonfinite_amax_keeps_scale_and_is_counted():
    meta = fp8.ScalingMeta(E5M2)
    meta.amax_history[0] = 2.0
    meta.update()
    s = meta.scale.item()
    for bad in (float("nan"), float("inf")):
        meta.amax_history[0] = bad
        meta.update()
        assert meta.scale.item() == s
    assert meta.n_nonfinite.item() == 2
    assert torch.isfinite(meta.amax_history).all()  # never enters the history


def test_vectorized_update_equals_per_meta_update():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(fp8.FP8Linear(32, 64), fp8.FP8Linear(64, 32))
    a, b = model(), model()
    metas_a = [m for m in a.modules() if isinstance(m, fp8.ScalingMeta)]
    metas_b = [m for m in b.modules() if isinstance(m, fp8.ScalingMeta)]
    for step in range(20):
        if step == 10:  # new tensors under the metas (as .to(device) makes)
            a._apply(lambda t: t.clone())
        for ma, mb in zip(metas_a, metas_b):
            v = float(torch.empty(1).uniform_(-8, 8).exp2()) if step != 5 else float("nan")
            ma.amax_history[0] = v
            mb.amax_history[0] = v
        fp8.update_scaling(a)  # all metas in one vectorized update
        for mb in metas_b:
            mb.update()
        for ma, mb in zip(metas_a, metas_b):
            assert torch.equal(ma.scale, mb.scale) and torch.equal(ma.amax_history, mb.amax_history)
            assert ma.n_nonfinite.item() == mb.n_nonfinite.item() == 1 or step < 5


def test_multi_layer_training_steps_and_eval_do_not_disturb_scaling():
    torch.manual_seed(0)
    m = nn.Sequential(fp8.FP8Linear(32, 64, device=DEV), nn.GELU(), fp8.FP8Linear(64, 32, device=DEV))
    x = torch.randn(24, 32, device=DEV)
    for _ in range(3):  # several steps, each with two micro-batches and an update in between
        for half in (x[:12], x[12:]):
            m(half).pow(2).mean().backward()
        fp8.update_scaling(m)
        fp8.zero_fp8_grads(m)
    before = [b.clone() for b in m.buffers()]
    m.eval()
    with torch.no_grad():
        m(x * 100)  # an eval forward records nothing
    m.train()
    assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))


def test_meta_state_dict_roundtrip():
    a = fp8.ScalingMeta(E4M3)
    a.amax_history[0] = 3.0
    a.update()
    a.primed = True
    b = fp8.ScalingMeta(E4M3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.amax_history, b.amax_history) and b.scale.item() == a.scale.item() and b.primed


# ---------------------------------------------------------------------------------------------
# cast


def _bits_equal(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@needs_triton
@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("hp_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cast_matches_reference(fp8_dtype, hp_dtype):
    M, N = shapes((37, 50), (4097, 3000))  # not multiples of the 64x128 tile
    x = (torch.randn(M, N, device=DEV) * torch.logspace(-4, 4, N, device=DEV)).to(hp_dtype)
    x[1, 2] = 0.0
    scale = torch.tensor([2.0 ** -3 if fp8_dtype == E4M3 else 8.0], device=DEV)
    amax, amax_ref = torch.zeros(1, device=DEV), torch.zeros(1, device=DEV)
    st, st_ref = torch.zeros(2, dtype=torch.int32, device=DEV), torch.zeros(2, dtype=torch.int32, device=DEV)
    y, y_t = kernels.cast_to_fp8(x, fp8_dtype, scale, amax, transpose=True, pad_t=16, stats=st)
    y_ref, y_t_ref = kernels.cast_to_fp8_ref(x, fp8_dtype, scale, amax_ref, transpose=True, pad_t=16, stats=st_ref)
    assert y.dtype == fp8_dtype and y.shape == (M, N) and y_t.shape == (N, kernels.round_up(M, 16))
    assert _bits_equal(y, y_ref), "cast differs from the torch reference"  # every element written, RNE
    assert _bits_equal(y_t, y_t_ref), "transposed copy differs (incl. zero padding)"
    assert _bits_equal(y_t[:, :M].t(), y)
    assert amax.item() == x.float().abs().max().item()
    assert torch.equal(st, st_ref) and st[0].item() > 0  # the 1e4 columns saturate at scale 1/8


@needs_triton
def test_cast_saturates_and_counts_flush_to_zero():
    x = torch.tensor([[1e6, -1e6, 1.0, 1e-12, 0.0, 3.0, -2.0, 0.5]], device=DEV).repeat(3, 2)
    st = torch.zeros(2, dtype=torch.int32, device=DEV)
    y, _ = kernels.cast_to_fp8(x, E4M3, torch.ones(1, device=DEV), stats=st)
    yf = y.float()
    assert yf.max().item() == 448.0 and yf.min().item() == -448.0
    assert st.tolist() == [12, 6]  # two saturated and one flushed value per row of 16


@needs_triton
def test_cast_nonfinite_input_completes_and_reports():
    x = torch.randn(20, 48, device=DEV)
    x[3, 7] = float("nan")
    x[5, 1] = float("inf")
    amax = torch.zeros(1, device=DEV)
    y, _ = kernels.cast_to_fp8(x, E4M3, torch.ones(1, device=DEV), amax)
    assert amax.item() == float("inf")  # reported as non-finite
    finite = torch.isfinite(x)
    ref, _ = kernels.cast_to_fp8_ref(x, E4M3, torch.ones(1, device=DEV))
    assert torch.equal(y.view(torch.uint8)[finite], ref.view(torch.uint8)[finite])
    assert torch.isnan(y.float()[3, 7])
    meta = fp8.ScalingMeta(E4M3)
    meta.amax_history[0] = amax.to(meta.amax_history.device)
    meta.update()
    assert meta.n_nonfinite.item() == 1


@needs_triton
def test_cast_sqnr():
    x = torch.randn(*shapes((64, 96), (2048, 2048)), device=DEV)
    for dt, floor in ((E4M3, SQNR_CAST_E4M3), (E5M2, SQNR_CAST_E5M2)):
        s = fp8.amax_to_scale(x.abs().amax(), dt, 0, torch.ones(1, device=DEV))
        y, _ = kernels.cast_to_fp8(x, dt, s)
        assert sqnr(x, y.float() / s) >= floor


@needs_triton
@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
def test_just_in_time_cast_derives_scale_in_kernel(fp8_dtype):
    x = torch.randn(*shapes((40, 48), (3001, 1024)), device=DEV) * 3e-3
    amax = kernels.amax_into(x, torch.zeros(1, device=DEV))
    assert amax.item() == x.abs().max().item()
    si, si_ref = torch.zeros(1, device=DEV), torch.zeros(1, device=DEV)
    out = torch.empty(x.shape, dtype=fp8_dtype, device=DEV)
    y, y_t = kernels.cast_to_fp8(x, fp8_dtype, None, amax, transpose=True, out=out, scale_inv_out=si)
    y_ref, _ = kernels.cast_to_fp8_ref(x, fp8_dtype, None, amax, scale_inv_out=si_ref)
    assert y.data_ptr() == out.data_ptr() and _bits_equal(y, y_ref) and _bits_equal(y_t.t(), y)
    assert si.item() == si_ref.item() == 1.0 / fp8.amax_to_scale(amax, fp8_dtype, 0, torch.ones(1, device=DEV)).item()
    assert y.float().abs().max().item() <= kernels.fp8_max(fp8_dtype)  # the amax itself never saturates
    x[0, 0] = float("nan")
    nan_amax = kernels.amax_into(x, torch.zeros(1, device=DEV))
    assert nan_amax.item() == float("inf")
    kernels.cast_to_fp8(x, fp8_dtype, None, nan_amax, out=out, scale_inv_out=si)
    assert si.item() == 1.0  # a non-finite amax falls back to scale 1


def test_cast_rejects_bad_input():
    s = torch.ones(1)
    with pytest.raises(AssertionError):
        kernels.cast_to_fp8(torch.randn(2, 3, 4), E4M3, s)  # rank
    with pytest.raises(AssertionError):
        kernels.cast_to_fp8(torch.randn(4, 4).double(), E4M3, s)  # dtype
    with pytest.raises(AssertionError):
        kernels.cast_to_fp8(torch.randn(4, 4), torch.int8, s)
    with pytest.raises(ValueError):
        fp8.ScalingMeta(torch.float16)


# ---------------------------------------------------------------------------------------------
# GEMM


def _rand_fp8(shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).clamp(-400, 400).to(dtype)


@needs_triton
@pytest.mark.parametrize("a_dtype,b_dtype", [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_vs_fp64(a_dtype, b_dtype, out_dtype, with_bias):
    M, N, K = shapes((33, 40, 48), (1000, 776, 528))  # not multiples of any tile
    a, b = _rand_fp8((M, K), a_dtype), _rand_fp8((N, K), b_dtype)
    a_si, b_si = torch.tensor([0.25], device=DEV), torch.tensor([2.0 ** -6], device=DEV)
    bias = torch.randn(N, device=DEV) if with_bias else None
    c = kernels.fp8_gemm(a, b, a_si, b_si, out_dtype, bias=bias)
    ref = (a.double() @ b.double().t()) * (0.25 * 2.0 ** -6)
    if with_bias:
        ref += bias.double()
    assert c.shape == (M, N) and c.dtype == out_dtype
    assert rel_err(ref, c) < (GEMM_REL_TOL_BF16 if out_dtype == torch.bfloat16 else GEMM_REL_TOL_FP32)


@needs_triton
def test_gemm_accumulate_into_output():
    M, N, K = shapes((20, 24, 32), (513, 1024, 256))
    a, b = _rand_fp8((M, K), E5M2), _rand_fp8((N, K), E4M3)
    si = torch.tensor([0.5], device=DEV)
    out = torch.randn(M, N, device=DEV)
    ref = out.double() + (a.double() @ b.double().t()) * 0.25
    res = kernels.fp8_gemm(a, b, si, si, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert rel_err(ref, out) < GEMM_REL_TOL_FP32


@needs_triton
def test_gemm_epilogue_accumulates_fp8_and_takes_amax():
    M, N, K = shapes((24, 40, 32), (640, 1040, 512))
    a, b = _rand_fp8((M, K), E5M2), _rand_fp8((N, K), E4M3)
    si = torch.tensor([2.0 ** -5], device=DEV)
    prev = _rand_fp8((M, N), E4M3)
    for prev_si in (0.0, 0.125):  # 0 = an empty running sum: the bytes are ignored
        psi = torch.tensor([prev_si], device=DEV)
        amax = torch.zeros(1, device=DEV)
        c = kernels.fp8_gemm(a, b, si, si, torch.float32, acc_fp8=(prev, psi), amax_out=amax)
        ref = (a.double() @ b.double().t()) * 2.0 ** -10 + prev.double() * prev_si
        assert rel_err(ref, c) < GEMM_REL_TOL_FP32
        assert amax.item() == c.abs().max().item()


@needs_gpu
@pytest.mark.parametrize("M,N,K", [(4096, 4096, 4096), (16384, 768, 3072), (2048, 8192, 2048), (1000, 784, 528)])
def test_gemm_vs_cublas_scaled_mm(M, N, K):
    a, b = _rand_fp8((M, K), E4M3), _rand_fp8((N, K), E4M3)
    si = torch.tensor([2.0 ** -4], device=DEV)
    c = kernels.fp8_gemm(a, b, si, si, torch.bfloat16)
    c_cublas = kernels.fp8_gemm(a, b, si, si, torch.bfloat16, backend="cublas")
    assert rel_err(c_cublas.float(), c.float()) < GEMM_REL_TOL_BF16


def test_gemm_rejects_bad_input():
    a, b, s = torch.zeros(8, 24, dtype=E4M3), torch.zeros(8, 24, dtype=E4M3), torch.ones(1)
    with pytest.raises(ValueError, match="K % 16"):
        kernels.fp8_gemm(a, b, s, s)
    with pytest.raises(AssertionError):
        kernels.fp8_gemm(torch.zeros(8, 32), torch.zeros(8, 32, dtype=E4M3), s, s)  # not FP8
    with pytest.raises(AssertionError):
        kernels.fp8_gemm(torch.zeros(8, 32, dtype=E5M2), torch.zeros(8, 32, dtype=E5M2), s, s)
    with pytest.raises(AssertionError):
        kernels.fp8_gemm(torch.zeros(32, 8, dtype=E4M3).t(), torch.zeros(8, 32, dtype=E4M3), s, s)  # not K-major


# ---------------------------------------------------------------------------------------------
# FP8 linear


def _pair(in_f, out_f, bias=True):
    ref = nn.Linear(in_f, out_f, bias=bias, device=DEV)
    lin = fp8.FP8Linear(in_f, out_f, bias=bias, device=DEV)
    with torch.no_grad():
        ref.weight.copy_(ref.weight.half().float())  # both start from the same FP16 weight
        lin.weight.copy_(ref.weight)
        if bias:
            lin.bias.copy_(ref.bias)
    return ref, lin


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_fwd_bwd_sqnr(bias):
    B, T, C, O = shapes((3, 37, 64, 96), (8, 1021, 1024, 3072))  # B*T not a multiple of 16
    ref, lin = _pair(C, O, bias)
    x = torch.randn(B, T, C, device=DEV, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(B, T, O, device=DEV)
    y = lin(x)
    y_ref = ref(x2)
    y.backward(g)
    y_ref.backward(g)
    assert sqnr(y_ref, y) >= SQNR_LINEAR_OUT
    assert sqnr(x2.grad, x.grad) >= SQNR_LINEAR_GRAD
    gw = fp8.fp8_grad(lin.weight)
    assert gw.dtype == E4M3 and lin.weight.grad is None
    assert sqnr(ref.weight.grad, gw.dequantize()) >= SQNR_LINEAR_GRAD
    if bias:
        assert torch.allclose(lin.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def test_fp8_linear_bf16_autocast():
    ref, lin = _pair(64, 32)
    x = torch.randn(4, 64, device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    assert sqnr(ref(x), y.float()) >= SQNR_LINEAR_OUT - 3  # BF16 output rounding on top of FP8


def test_grad_accumulation_matches_big_batch():
    C, O, micro, n = 64, 48, 16, 4
    ref, lin = _pair(C, O)
    x = torch.randn(n * micro, C, device=DEV)
    g = torch.randn(n * micro, O, device=DEV)
    ref(x).backward(g)  # FP32 reference of the whole batch
    lin(x[:micro]).backward(g[:micro])  # primes the metas, then start over
    fp8.zero_fp8_grads(lin)
    for i in range(n):
        sl = slice(i * micro, (i + 1) * micro)
        lin(x[sl]).backward(g[sl])
    acc = fp8.fp8_grad(lin.weight).dequantize()
    fp8.zero_fp8_grads(lin)
    lin(x).backward(g)
    big = fp8.fp8_grad(lin.weight).dequantize()
    assert sqnr(ref.weight.grad, acc) >= SQNR_LINEAR_GRAD  # each accumulation re-quantizes: still >= 20 dB
    assert sqnr(big, acc) >= SQNR_LINEAR_GRAD


def test_delayed_scaling_in_linear_records_and_updates():
    _, lin = _pair(32, 32)
    x = torch.randn(16, 32, device=DEV) * 10
    lin(x).sum().backward()
    assert lin.x_meta.amax_history[0].item() == x.abs().max().item()
    assert lin.g_meta.amax_history[0].item() == 1.0  # d(sum)/dy = 1
    fp8.update_scaling(lin)
    assert lin.x_meta.scale.item() == 2.0 ** math.floor(math.log2(448 / x.abs().max().item()))
    assert lin.x_meta.amax_history[0].item() == 0.0


def test_fp8_weight_copy_refreshed_after_update_scaling():
    ref, lin = _pair(32, 48)
    x = torch.randn(16, 32, device=DEV)
    y0 = lin(x).detach()
    with torch.no_grad():
        lin.weight.mul_(-1.0)
    assert torch.equal(lin(x).detach(), y0)  # within a step the cached FP8 weight is reused
    fp8.update_scaling(lin)  # what the trainer calls after every optimizer step
    assert sqnr(ref(x) * -1 if lin.bias is None else x @ -ref.weight.t() + ref.bias, lin(x)) >= SQNR_LINEAR_OUT
    lin.load_state_dict({k: v for k, v in lin.state_dict().items()})  # loading also refreshes it
    assert lin._weight_fp8_t is None


def test_convert_to_fp8_filter_and_levels():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 128)
            self.odd = nn.Linear(64, 10)  # too small / unaligned for FP8 tensor cores
            self.lm_head = nn.Linear(128, 64)

    m = fp8.convert_to_fp8(Tiny(), level=1)
    assert isinstance(m.fc, fp8.FP8Linear) and m.fc.weight.dtype == torch.float16
    assert type(m.odd) is nn.Linear and type(m.lm_head) is nn.Linear
    m0 = Tiny()
    assert fp8.convert_to_fp8(m0, level=0) is m0 and type(m0.fc) is nn.Linear
    with pytest.raises(ValueError):
        fp8.convert_to_fp8(Tiny(), level=7)
    with pytest.raises(ValueError, match="divisible by 16"):
        fp8.FP8Linear(20, 32)


def test_fp8_tensor_quantize_dequantize():
    x = torch.randn(64, 32, device=DEV) * 1e-3
    t = fp8.FP8Tensor.quantize(x)
    assert t.dtype == E4M3 and t.shape == x.shape
    assert sqnr(x, t.dequantize()) >= SQNR_CAST_E4M3


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_traces_fp8_linear_without_graph_breaks(backend):
    torch._dynamo.reset()
    m = nn.Sequential(fp8.FP8Linear(64, 128, device=DEV), nn.GELU(), fp8.FP8Linear(128, 64, device=DEV))
    x = torch.randn(8, 64, device=DEV)
    m(x).sum().backward()  # primes the metas eagerly
    fp8.zero_fp8_grads(m)
    compiled = torch.compile(m, backend=backend, fullgraph=True)  # fullgraph: a graph break is an error
    y = compiled(x)
    y.sum().backward()
    g_compiled = fp8.fp8_grad(m[0].weight).dequantize().clone()
    fp8.zero_fp8_grads(m)
    y_eager = m(x)
    y_eager.sum().backward()
    assert torch.equal(y, y_eager)
    assert torch.equal(g_compiled, fp8.fp8_grad(m[0].weight).dequantize())
