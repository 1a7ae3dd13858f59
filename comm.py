"""
comm.py: torchrun setup/teardown, the auto-scaled FP8 gradient all-reduce and the greedy
whole-tensor partition of FP8 ZeRO (level 3).

FP8-LM (arXiv 2310.18313) section 2.2, "FP8 gradient and all-reduce communication":
  - automatic scaling: gradients are pre-scaled by a factor mu that halves in the step after the
    fraction of values clipped at the FP8 maximum passes a threshold (paper: 0.001%) and doubles
    after `growth_interval` clean steps (paper: x2 over 1000 steps). mu is a power of two, so the
    FP8 -> FP8 re-scale of an E4M3 gradient is exact unless it clips or underflows.
  - one scale per tensor shared by all ranks (the paper's s'_g = min_i s'_i): one all-reduce MAX of
    all amaxes, a single collective that also carries last step's saturation and any NaN/Inf.
  - the sum: the paper patches NCCL to add FP8. Stock NCCL/gloo only moves bytes here: FP8 (uint8)
    reduce-scatter via all_to_all_single, local FP32 sum of the W chunks, re-quantization of the
    reduced shard with the same shared scale (so no per-element scale is needed), FP8 all-gather.
    Each phase carries 1 byte per element: half the bytes of a BF16 ring all-reduce. Every shard is
    reduced by one rank only and then copied byte for byte, so all ranks end bitwise identical.
  - Algorithm 1 (greedy allocation of whole tensors to ranks for ZeRO): greedy_partition.

Usage (torchrun):  env = setup(); reducer = FP8AllReduce(env.world_size)
                   found_inf = reducer(grads)  # grads: list of FP8Tensor | float tensor, in place
                   teardown()
Tests: test_comm.py (2 CPU processes, gloo).  Benchmark: scratch/bench_comm.py (2 GPUs, NCCL).
"""
import heapq
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import kernels
from fp8 import FP8Tensor
from kernels import E4M3, _round_to_fp8_grid, fp8_max

Grad = Union[FP8Tensor, torch.Tensor]
DEFAULT_TIMEOUT_S = 300.0  # a dead rank makes the others raise after this long instead of hanging
ALIGN = 16  # bytes: every bucket shard starts 16-byte aligned (vector loads, NCCL fast path)
BUCKET_BYTES = 64 << 20  # a few large collectives per step; 64 MiB messages reach NVLink bandwidth
BLOCK = 4096  # elements per Triton program: 4 KB of FP8 in, memory-bound


# ----------------------------------------------------------------------------------------------
# process group


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank, its device; is_master = rank 0."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the torchrun process group (env RANK / WORLD_SIZE / LOCAL_RANK): NCCL on CUDA, gloo on
    CPU. Without torchrun's env: a single process, no group. device: "auto" | "cuda" | "cpu"."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda but no GPU is visible; use --device=cpu")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and not dist.is_initialized():
        # NCCL: on a timeout or a peer's error the watchdog aborts the communicator and ends this
        # process (3 = abort without the cleanup that can itself hang); gloo raises on its timeout.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (lent H200s, KINDS.md)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), device_id=dev if cuda else None)
    return DistEnv(rank, world, local_rank, dev)


def teardown() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# greedy whole-tensor partition (FP8-LM Algorithm 1)


def greedy_partition(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each tensor: largest first, each whole to the least-loaded rank (ties -> the
    lowest rank, equal sizes -> the lower index). Pure and deterministic."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(sizes)
    heap = [(0, r) for r in range(world_size)]  # (load, rank): heapq pops the lowest rank on ties
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + sizes[i], r))
    return owners


# ----------------------------------------------------------------------------------------------
# kernels: pre-scale (any -> E4M3, counting clips) and shard sum + re-quantization (W x E4M3 -> E4M3)


@triton.jit
def _prescale_kernel(
    x_ptr, y_ptr, ratio_ptr, sat_ptr,  # pointers: x (n,) FP8/float, y flat E4M3, ratios (n_tensors,)
    n, y_off, ratio_idx,  # sizes / offsets: y[y_off + i] = sat(x[i] * ratios[ratio_idx])
    FP8_MAX: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(ratio_ptr + ratio_idx)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xs = tl.where(r == 0.0, 0.0, x * r)  # ratio 0: an empty gradient (its data may be stale)
    tl.atomic_add(sat_ptr, tl.sum((tl.abs(xs) > FP8_MAX).to(tl.int64), axis=0))
    y = tl.clamp(xs, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if EXACT_ROUND:  # the interpreter's float8 conversion needs exact inputs (kernels.py)
        y = _round_to_fp8_grid(y, 3, -6)
    tl.store(y_ptr + y_off + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_requant_kernel(
    x_ptr, y_ptr,  # pointers: x (W, S) E4M3 (chunk r from rank r), y (S,) E4M3
    S, inv_w,  # sizes, 1/W
    W: tl.constexpr, FP8_MAX: tl.constexpr, EXACT_ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(W):  # rank order: fixed, and exact anyway for W <= 64 (see _sum_requant)
        acc += tl.load(x_ptr + r * S + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(acc * inv_w, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if EXACT_ROUND:
        y = _round_to_fp8_grid(y, 3, -6)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _prescale(x: torch.Tensor, flat: torch.Tensor, off: int, ratios: torch.Tensor, i: int,
              sat: torch.Tensor, triton_ok: bool) -> None:
    """flat[off:off+n] = E4M3(sat(x * ratios[i])) (zeros if ratios[i] == 0); sat += #(|x*r| > max).
    x: (n,) contiguous FP8 or float; flat: E4M3; ratios float32; sat int64 (1,)."""
    assert x.dim() == 1 and x.is_contiguous() and flat.dtype == E4M3
    fmax = fp8_max(E4M3)
    if not triton_ok:
        r = ratios[i]
        xs = torch.where(r == 0, torch.zeros((), device=x.device), x.float() * r)
        sat += (xs.abs() > fmax).sum()
        flat[off:off + x.numel()] = xs.clamp(-fmax, fmax).to(E4M3)
        return
    grid = (triton.cdiv(x.numel(), BLOCK),)
    _prescale_kernel[grid](x, flat, ratios, sat, x.numel(), off, i, FP8_MAX=fmax,
                           EXACT_ROUND=kernels.INTERPRET, BLOCK=BLOCK, num_warps=4)


def _sum_requant(x: torch.Tensor, y: torch.Tensor, triton_ok: bool) -> None:
    """y (S,) = E4M3(sat(mean over r of x[r])), x (W, S) E4M3. The FP32 sum of W E4M3 values is exact
    for W <= 64 (each is k * 2^-9 with |k| < 2^18, 24-bit significand), so any order gives the same bits."""
    W, S = x.shape
    fmax = fp8_max(E4M3)
    if not triton_ok:
        y.copy_((x.float().sum(0) * (1.0 / W)).clamp(-fmax, fmax).to(E4M3))
        return
    _sum_requant_kernel[(triton.cdiv(S, BLOCK),)](x, y, S, 1.0 / W, W=W, FP8_MAX=fmax,
                                                 EXACT_ROUND=kernels.INTERPRET, BLOCK=BLOCK, num_warps=4)


# ----------------------------------------------------------------------------------------------
# the FP8 all-reduce


@dataclass(frozen=True)
class AutoScaleConfig:
    """Automatic scaling factor mu (FP8-LM 2.2). Powers of two keep the FP8 re-scale exact."""
    threshold: float = 1e-5  # fraction of clipped values that halves mu (paper: 0.001%)
    growth_interval: int = 1000  # clean steps before mu doubles (paper: x2 over 1000 steps)
    mu_init: float = 1.0  # 1 never clips: the shared scale is 2^floor(log2(fmax / global amax))
    mu_min: float = 2.0 ** -16
    mu_max: float = 2.0 ** 16  # with mu_min: scale = mu * 2^e stays a normal float32 (e clamped to +-110)

    def __post_init__(self):
        if not 0 <= self.threshold < 1 or self.growth_interval < 1:
            raise ValueError(f"need 0 <= threshold < 1 and growth_interval >= 1, got {self}")
        for v in (self.mu_init, self.mu_min, self.mu_max):
            if v <= 0 or 2.0 ** round(torch.tensor(v).log2().item()) != v:
                raise ValueError(f"mu_init / mu_min / mu_max must be powers of two, got {v}")
        if not 2.0 ** -16 <= self.mu_min <= self.mu_init <= self.mu_max <= 2.0 ** 16:
            raise ValueError(f"need 2^-16 <= mu_min <= mu_init <= mu_max <= 2^16, got {self}")


@dataclass
class _Bucket:
    """A run of whole tensors packed into one flat E4M3 buffer of world_size equal shards."""
    index: list[int]  # tensor indices
    offset: list[int]  # element offset of each in flat
    flat: torch.Tensor  # (W * S,) uint8: the local pre-scaled gradients, then the reduced result
    recv: torch.Tensor  # (W * S,) uint8: chunk r = rank r's values of my shard
    shard: torch.Tensor  # (S,) uint8: my reduced shard


def _data(g: Grad) -> torch.Tensor:
    return (g.data if isinstance(g, FP8Tensor) else g).reshape(-1)


class FP8AllReduce:
    """Auto-scaled FP8 gradient all-reduce (mean over ranks), in place, bitwise identical on all
    ranks. Holds mu, the bucket buffers (built on the first call, reused while the sizes match) and
    the counters. mu / sat_frac (device tensors) are for logging; nothing here syncs with the host."""

    def __init__(self, world_size: int, group: Optional[dist.ProcessGroup] = None,
                 bucket_bytes: int = BUCKET_BYTES, cfg: AutoScaleConfig = AutoScaleConfig(), backend: str = "auto"):
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend must be auto (Triton on CUDA / interpreter) or torch, got {backend!r}")
        self.world_size, self.group, self.bucket_bytes, self.cfg, self.backend = world_size, group, bucket_bytes, cfg, backend
        self.buckets: list[_Bucket] = []
        self._key: Optional[tuple] = None
        self.mu: Optional[torch.Tensor] = None

    def _init_state(self, device: torch.device) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        self.mu = torch.full((1,), self.cfg.mu_init, **f32)  # the mu used by the last call
        self.clean = torch.zeros(1, **f32)  # clean steps since mu last changed
        self.sat_frac = torch.zeros(1, **f32)  # this rank's clipped fraction in the last call
        self.prev_inf = torch.ones(1, **f32)  # last call found NaN/Inf (1 at start: no last call)
        self.sat_count = torch.zeros(1, dtype=torch.int64, device=device)

    def _build(self, numels: list[int], device: torch.device) -> None:
        """Tensors in order, whole, into buckets of <= bucket_bytes (a bigger tensor gets its own)."""
        W, groups, cur, size = self.world_size, [], [], 0
        for i, n in enumerate(numels):
            if cur and size + n > self.bucket_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        groups.append(cur)
        self.buckets = []
        for idx in groups:
            offs = [0]
            for i in idx:
                offs.append(offs[-1] + numels[i])
            S = kernels.round_up(triton.cdiv(offs[-1], W), ALIGN)  # shard elements (= bytes)
            assert W * S < 2 ** 31, "bucket too large for int32 offsets; lower bucket_bytes"
            flat = torch.zeros(W * S, dtype=torch.uint8, device=device)  # padding stays 0
            recv = flat if W == 1 else torch.empty_like(flat)
            shard = flat if W == 1 else torch.empty(S, dtype=torch.uint8, device=device)
            self.buckets.append(_Bucket(idx, offs[:-1], flat, recv, shard))

    @torch.no_grad()
    def _update_mu(self, global_sat: torch.Tensor) -> None:
        """mu for this step from last step's clipped fraction (max over ranks): halve above the
        threshold, double after growth_interval clean steps; a skipped (NaN/Inf) step changes nothing."""
        c = self.cfg
        over = global_sat > c.threshold
        grow = ~over & (self.clean + 1 >= c.growth_interval)
        mu = torch.where(over, self.mu * 0.5, torch.where(grow, self.mu * 2.0, self.mu)).clamp(c.mu_min, c.mu_max)
        clean = torch.where(over | grow, torch.zeros_like(self.clean), self.clean + 1)
        keep = self.prev_inf > 0
        self.mu.copy_(torch.where(keep, self.mu, mu))
        self.clean.copy_(torch.where(keep, self.clean, clean))

    @torch.no_grad()
    def _scales(self, grads: list[Grad], amaxes: Optional[list[torch.Tensor]]):
        """One all-reduce MAX of [amaxes..., last sat fraction] -> (found_inf (1,), ratio (n,) =
        shared scale / own scale, inv_scale (n,) = the result's scale_inv), float32 on the device."""
        dev, n = self.mu.device, len(grads)
        one = torch.ones((), device=dev)
        src_si = torch.stack([g.scale_inv.reshape(()).float() if isinstance(g, FP8Tensor) else one for g in grads])
        if amaxes is None:  # E4M3 magnitudes order like their low 7 bits (0x7F = NaN): an integer max
            amaxes = [(g.data.view(torch.uint8) & 0x7F).amax().view(E4M3).float() if isinstance(g, FP8Tensor)
                      else g.detach().abs().amax().float() for g in grads]
        amax = torch.where(src_si == 0, 0.0, torch.stack([a.reshape(()).float() for a in amaxes]) * src_si)
        vec = torch.cat([amax, self.sat_frac])
        vec = torch.where(torch.isnan(vec), float("inf"), vec)  # MAX with NaN is backend-defined; inf is not
        if self.world_size > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=self.group)
        amax, global_sat = vec[:n], vec[n:]
        found_inf = (~torch.isfinite(amax)).any().float().reshape(1)
        self._update_mu(global_sat)
        self.prev_inf.copy_(found_inf)
        ok = torch.isfinite(amax) & (amax > 0)
        a = torch.where(ok, amax.double(), 1.0)
        exp = torch.where(ok, torch.floor(torch.log2(fp8_max(E4M3) / a)), 0.0).clamp(-110, 110)
        scale = (torch.exp2(exp) * self.mu.double()).float()  # (n,) shared, power of two
        return found_inf, scale * src_si, 1.0 / scale

    @torch.no_grad()
    def __call__(self, grads: list[Grad], amaxes: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Average grads over ranks in place; returns found_inf, float32 (1,) on the device: 1 on every
        rank when any rank has a NaN/Inf gradient (skip the step), else 0.
        grads: FP8Tensor (E4M3 data, scale_inv (1,), scale_inv 0 = empty) or float tensors, contiguous;
        FP8Tensors get new data + scale_inv, float tensors the dequantized mean (FP8-exact values).
        amaxes (optional): max |value| of each grad (e.g. FP8Linear.weight_grad_amax), saves a pass."""
        assert grads, "nothing to reduce"
        dev = _data(grads[0]).device
        if self.mu is None:
            self._init_state(dev)
        for g in grads:
            assert _data(g).is_contiguous() and (not isinstance(g, FP8Tensor) or g.data.dtype == E4M3)
        key = tuple(_data(g).numel() for g in grads)
        if key != self._key:
            self._build(list(key), dev)
            self._key = key
        found_inf, ratio, inv = self._scales(grads, amaxes)
        tri = self.backend == "auto" and kernels.use_triton(self.mu)
        W, grp = self.world_size, self.group
        self.sat_count.zero_()
        works = []
        for b in self.buckets:  # pack each bucket and start its FP8 reduce-scatter at once
            for i, off in zip(b.index, b.offset):
                _prescale(_data(grads[i]), b.flat.view(E4M3), off, ratio, i, self.sat_count, tri)
            works.append(dist.all_to_all_single(b.recv, b.flat, group=grp, async_op=True) if W > 1 else None)
        for k, b in enumerate(self.buckets):  # sum my shard, start its FP8 all-gather
            if works[k] is not None:
                works[k].wait()  # a stream dependency on CUDA, not a host sync
            _sum_requant(b.recv.view(E4M3).view(W, -1), b.shard.view(E4M3), tri)
            works[k] = dist.all_gather_into_tensor(b.flat, b.shard, group=grp, async_op=True) if W > 1 else None
        for b, w in zip(self.buckets, works):  # unpack: FP8 bytes as they are, scale_inv = 1 / shared scale
            if w is not None:
                w.wait()
            for i, off in zip(b.index, b.offset):
                g, res = grads[i], b.flat[off:off + _data(grads[i]).numel()]
                if isinstance(g, FP8Tensor):
                    g.data.view(torch.uint8).view(-1).copy_(res)
                    g.scale_inv.copy_(inv[i].reshape(g.scale_inv.shape))
                else:
                    g.copy_((res.view(E4M3).float() * inv[i]).view_as(g))
        total = sum(key)
        self.sat_frac.copy_(torch.where(found_inf > 0, 0.0, self.sat_count.double() / max(total, 1)).float())
        return found_inf
