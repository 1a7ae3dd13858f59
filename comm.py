"""
comm.py: torchrun setup/teardown, auto-scaled FP8 gradient all-reduce, greedy FP8 ZeRO partition.

FP8-LM (arXiv 2310.18313) section 2.2 and Algorithm 1:
  - automatic scaling: gradients are pre-scaled by mu, halved in the step after the fraction of values
    clipped at the E4M3 max passes a threshold (paper 0.001%), doubled after growth_interval clean steps.
  - one scale per tensor shared by all ranks (the paper's s'_g = min_i s'_i): one all-reduce MAX of all
    amaxes, which also carries last step's clipping and any NaN/Inf (found_inf on every rank).
  - the sum without a patched NCCL: FP8 (uint8) reduce-scatter via all_to_all_single, local FP32 sum,
    re-quantization of the reduced shard with the same shared scale, FP8 all-gather. 1 byte per element
    per phase (half of BF16); each shard is reduced on one rank and copied byte for byte: bitwise equal.
  - greedy allocation of whole tensors to ranks (Algorithm 1) and an owner-ordered layout for level 3.

Usage: env = setup(); red = FP8AllReduce(env.world_size); found_inf = red(grads); teardown()
Tests: test_fp8.py, communication section (2 CPU processes, gloo; NCCL variants on 2 GPUs).
Benchmark: torchrun --standalone --nproc_per_node=2 bench.py comm.
"""
import heapq
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import accumulate
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import kernels
from fp8 import FP8Tensor
from kernels import E4M3, _soft_fp8, fp8_max

Grad = Union[FP8Tensor, torch.Tensor]
DEFAULT_TIMEOUT_S = 300.0  # a dead rank makes the others raise after this long instead of hanging
ALIGN = 16  # bytes: every bucket shard starts 16-byte aligned (vector loads, NCCL fast path)
# a few large collectives per step. 2x H200, 1.3B set, FP8 reduce as one CUDA graph (bench.py comm, NCCL on a
# high-priority stream): 128 MiB 6.26 ms, 256 MiB 5.93, 512 MiB 5.66, 1 GiB 5.69 (BF16 all-reduce 7.7 ms)
BUCKET_BYTES = 512 << 20
BLOCK = 4096  # elements per Triton program: 4 KB of FP8 in, memory-bound
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.1x


# ----------------------------------------------------------------------------------------------
# process group


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank, its device; is_master = rank 0."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_master: bool


def setup(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the torchrun process group (env RANK / WORLD_SIZE / LOCAL_RANK): NCCL on CUDA, gloo on
    CPU. Without torchrun's env: a single process, no group. device: "auto" | "cuda" | "cpu"."""
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device not in ("auto", "cuda", "cpu") or (cuda and not torch.cuda.is_available()):
        raise ValueError(f"device must be auto, cuda (with a visible GPU) or cpu, got {device!r}; try --device=cpu")
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
        opts = None
        if cuda and os.environ.get("NANOFP8_NCCL_HIGH_PRIORITY", "1") == "1":
            # NCCL's kernels on a high-priority stream: when the FP8 reduce's own kernels (pre-scale, sum) fill
            # the GPU, the collective's blocks are scheduled first as SMs free up. 2x H200, 1.3B set, 256 MiB
            # buckets, CUDA graph: 6.57 -> 5.93 ms (bench.py comm, NANOFP8_NCCL_HIGH_PRIORITY=0 vs 1)
            opts = dist.ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = True
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, pg_options=opts,
                                timeout=timedelta(seconds=timeout_s), device_id=dev if cuda else None)
    return DistEnv(rank, world, local_rank, dev, rank == 0)


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
# kernels: pre-scale (any -> E4M3, counting clips) and shard sum + re-quantization (W x E4M3 -> E4M3).
# They belong in kernels.py (DESIGN: it owns the Triton kernels); here until the lead moves them.


@triton.jit
def _block_of(ptrs, meta, blocks, NB, DT: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's block of a multi-tensor table (see _Group): (pointers into the tensor, mask,
    offsets in the bucket, tensor index). One launch covers every tensor of a dtype in a bucket.
    ALIGNED: every address, size and bucket offset is a multiple of 16 elements (checked by _groups):
    the hints let the compiler use 16-byte vector accesses (without them it moves FP8 a byte at a time)."""
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)  # table row
    start, numel, at = tl.load(blocks + NB + pid), tl.load(meta + 3 * t), tl.load(meta + 3 * t + 1)
    x_ptr = tl.load(ptrs + t).to(tl.pointer_type(DT))
    if ALIGNED:
        start, numel, at = tl.multiple_of(start, 16), tl.multiple_of(numel, 16), tl.multiple_of(at, 16)
        x_ptr = tl.multiple_of(x_ptr, 16)
    offs = start + tl.arange(0, BLOCK)  # elements of that tensor
    return x_ptr + offs, offs < numel, at + offs, tl.load(meta + 3 * t + 2)


@triton.jit
def _mt_amax_kernel(ptrs, meta, blocks, amax_ptr, NB, SRC: tl.constexpr, IS_FP8: tl.constexpr, BLOCK: tl.constexpr,
                    ALIGNED: tl.constexpr):
    x_ptrs, mask, _, i = _block_of(ptrs, meta, blocks, NB, SRC, BLOCK, ALIGNED)
    raw = tl.load(x_ptrs, mask=mask, other=0.0)
    x = raw.to(tl.float32)
    nan = x != x
    if IS_FP8:  # E4M3 NaN by its bits: the interpreter decodes 0x7F as 480
        nan = nan | ((raw.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F)
    tl.atomic_max(amax_ptr + i, tl.max(tl.where(nan, float("inf"), tl.abs(x)), axis=0))  # NaN -> inf


@triton.jit
def _mt_prescale_kernel(
    ptrs, meta, blocks, flat_ptr, ratio_ptr, sat_ptr,  # pointers: table, bucket (uint8), ratios (n,), clip count
    NB,  # sizes: blocks in the table
    SRC: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, IN_PLACE: tl.constexpr,
):
    x_ptrs, mask, y_offs, i = _block_of(ptrs, meta, blocks, NB, SRC, BLOCK, ALIGNED)
    r = tl.load(ratio_ptr + i)
    # IN_PLACE (the E4M3 gradients live in the bucket): ratio 1 leaves every byte as it is and clips none
    # (|E4M3| <= max), so such a tensor costs no memory traffic. That is the common case: a rank whose
    # gradient amax sits in the same power-of-two range as the largest rank's has its cast scale = the
    # shared one (mu = 1)
    if not (IN_PLACE and r == 1.0):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        xs = tl.where(r == 0.0, 0.0, x * r)  # ratio 0: an empty gradient (its data may be stale)
        n_sat = tl.sum((tl.abs(xs) > FP8_MAX).to(tl.int32), axis=0)
        if n_sat > 0:  # rare: an atomic from every one of ~10^5 programs on one address would serialize in L2
            tl.atomic_add(sat_ptr, n_sat.to(tl.int64))
        y = tl.clamp(xs, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        # fp32 -> E4M3 by integer arithmetic (kernels._soft_fp8): hardware conversion from fp32 is not
        # trusted (miscompiled by Triton 3.6 on H100; the interpreter drops carries and NaN)
        tl.store(flat_ptr + y_offs, _soft_fp8(y, 3, -6), mask=mask)


@triton.jit
def _mt_unpack_kernel(
    ptrs, meta, blocks, src_ptr, inv_ptr,  # pointers: table (float tensors), reduced E4M3, scale_inv (n,)
    NB, base, span,  # sizes: src holds bucket elements [base, base + span) (level 3: my shard only)
    DST: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    x_ptrs, mask, src_offs, i = _block_of(ptrs, meta, blocks, NB, DST, BLOCK, ALIGNED)
    mask = mask & (src_offs >= base) & (src_offs < base + span)
    y = tl.load(src_ptr + src_offs - base, mask=mask, other=0.0).to(tl.float32) * tl.load(inv_ptr + i)
    tl.store(x_ptrs, y.to(DST), mask=mask)


@triton.jit
def _sum_requant_kernel(
    x_ptr, y_ptr,  # pointers: x (W, S) E4M3 (chunk r from rank r), y (S,) uint8 (E4M3 bits)
    S, inv_w,  # sizes, 1/W
    W: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(W):  # rank order: fixed, and exact anyway for W <= 64 (see _sum_requant)
        acc += tl.load(x_ptr + r * S + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(acc * inv_w, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + offs, _soft_fp8(y, 3, -6), mask=mask)


_TL = {E4M3: tl.float8e4nv, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclass
class _Group:
    """Multi-tensor launch table of one bucket's tensors of one dtype (built once per set of addresses)."""
    dtype: torch.dtype
    index: list[int]  # tensor indices
    ptrs: torch.Tensor  # (T,) int64: data addresses
    meta: torch.Tensor  # (T, 3) int64: numel, offset in the bucket, tensor index
    blocks: torch.Tensor  # (2, NB) int64: table row and first element of every BLOCK-sized block
    aligned: bool  # every address, numel and bucket offset a multiple of 16 elements (vector accesses)
    in_place: bool  # every tensor's data is its own slot of the bucket (train.FP8Comm's E4M3 grads)


def _groups(data: list[torch.Tensor], index: list[int], offset: list[int], flat: torch.Tensor) -> list[_Group]:
    out = []
    for dt in dict.fromkeys(data[i].dtype for i in index):
        rows = [(data[i].numel(), o, i) for i, o in zip(index, offset) if data[i].dtype == dt]
        blocks = [(t, s) for t, (n, _, _) in enumerate(rows) for s in range(0, n, BLOCK)]
        i64 = dict(dtype=torch.int64, device=flat.device)
        ptrs = [data[r[2]].data_ptr() for r in rows]
        aligned = all(n % 16 == 0 and o % 16 == 0 for n, o, _ in rows) and all(p % (16 * dt.itemsize) == 0 for p in ptrs)
        in_place = dt == E4M3 and all(p == flat.data_ptr() + o for p, (_, o, _) in zip(ptrs, rows))
        out.append(_Group(dt, [r[2] for r in rows], torch.tensor(ptrs, **i64), torch.tensor(rows, **i64),
                          torch.tensor(blocks, **i64).t().contiguous(), aligned, in_place))
    return out


def _launch(kernel, g: _Group, *args, **meta) -> None:
    NB = g.blocks.shape[1]
    if NB:
        kernel[(NB,)](g.ptrs, g.meta, g.blocks, *args, NB=NB, BLOCK=BLOCK, ALIGNED=g.aligned, num_warps=4, **meta)


def _prescale_ref(x: torch.Tensor, flat: torch.Tensor, off: int, r: torch.Tensor, sat: torch.Tensor) -> None:
    """flat[off:off+n] = E4M3(sat(x * r)) (zeros if r == 0); sat += #(|x * r| > max). Reference of
    _mt_prescale_kernel for one tensor. x: (n,) FP8 or float; flat: E4M3; r: float32 0-dim; sat int64 (1,)."""
    fmax = fp8_max(E4M3)
    xs = torch.where(r == 0, torch.zeros((), device=x.device), x.float() * r)
    sat += (xs.abs() > fmax).sum()
    flat[off:off + x.numel()] = xs.clamp(-fmax, fmax).to(E4M3)


def _sum_requant(x: torch.Tensor, y: torch.Tensor, triton_ok: bool) -> None:
    """y (S,) = E4M3(sat(mean over r of x[r])), x (W, S) E4M3. The FP32 sum of W E4M3 values is exact
    for W <= 64 (each is k * 2^-9 with |k| < 2^18, 24-bit significand), so any order gives the same bits."""
    W, S = x.shape
    fmax = fp8_max(E4M3)
    if not triton_ok:
        y.copy_((x.float().sum(0) * (1.0 / W)).clamp(-fmax, fmax).to(E4M3))
        return
    _sum_requant_kernel[(triton.cdiv(S, BLOCK),)](x, y.view(torch.uint8), S, 1.0 / W, W=W, FP8_MAX=fmax,
                                                 BLOCK=BLOCK, num_warps=4)


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
        mus = (self.mu_min, self.mu_init, self.mu_max)
        if not (0 <= self.threshold < 1 and self.growth_interval >= 1 and 2.0 ** -16 <= mus[0] <= mus[1] <= mus[2]
                <= 2.0 ** 16 and all(math.log2(m).is_integer() for m in mus)):
            raise ValueError(f"need 0 <= threshold < 1, growth_interval >= 1, mu_min <= mu_init <= mu_max "
                             f"powers of two in [2^-16, 2^16]; got {self}")


@dataclass
class _Bucket:
    """A run of whole tensors packed into one flat E4M3 buffer of world_size equal shards."""
    index: list[int]  # tensor indices
    offset: list[int]  # element offset of each in flat
    flat: torch.Tensor  # (W * S,) uint8: the local pre-scaled gradients, then the reduced result
    shard: torch.Tensor  # (S,) uint8: my reduced shard
    # the receive buffer (chunk r = rank r's values of my shard) is allocated per call: workspace the
    # caching allocator hands to the next forward's activations, not memory held between steps
    groups: list[_Group] = field(default_factory=list)  # Triton launch tables, for the gradients of plan
    plan: Optional["_Plan"] = None
    unpack: Optional[tuple] = None  # (plan, src address, the FP8 tensors' copy lists): _unpack's views


def _flat_buffers(W: int, S: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat (W * S,), shard (S,)) uint8 zeros (padding stays 0); one rank: the shard is the flat buffer."""
    flat = torch.zeros(W * S, dtype=torch.uint8, device=device)
    return flat, flat if W == 1 else torch.zeros(S, dtype=torch.uint8, device=device)


def _make_bucket(index: list[int], offset: list[int], S: int, W: int, device: torch.device,
                 bufs: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> _Bucket:
    """bufs: (flat, shard) to use (level 3 shares them with the FP8 weight all-gather), else new ones."""
    assert W * S < 2 ** 31, "bucket too large for int32 offsets; lower bucket_bytes"
    return _Bucket(index, offset, *(bufs if bufs is not None else _flat_buffers(W, S, device)))


def _unpack(grads: list[Grad], b: _Bucket, src: torch.Tensor, base: int, plan: "_Plan", tri: bool) -> None:
    """Reduced E4M3 bytes src = bucket elements [base, base + len(src)) -> the gradients inside it, in
    place: FP8Tensors take the bytes as they are (none to copy for those kept in the bucket) and scale_inv =
    plan.inv[i] (two multi-tensor copies, whose lists of views are built once per plan: a step creates
    none), float tensors the dequantized values."""
    mine = [(i, o) for i, o in zip(b.index, b.offset) if base <= o < base + src.numel()]
    inv = plan.inv
    if b.unpack is None or b.unpack[0] is not plan or b.unpack[1] != src.data_ptr():
        f8 = [(i, o - base, grads[i]) for i, o in mine if isinstance(grads[i], FP8Tensor)]
        moved = [(o, g) for _, o, g in f8 if g.data.data_ptr() != src.data_ptr() + o]  # not kept in the bucket
        b.unpack = plan, src.data_ptr(), ([g.data.view(torch.uint8).view(-1) for _, g in moved],
                                          [src[o:o + g.data.numel()] for o, g in moved],
                                          [g.scale_inv.view(-1) for _, _, g in f8], [inv[i:i + 1] for i, _, _ in f8])
    dst, srcs, dst_si, inv1 = b.unpack[2]
    if dst:
        torch._foreach_copy_(dst, srcs)
    if dst_si:
        torch._foreach_copy_(dst_si, inv1)
    if tri:
        for g in b.groups:
            if g.dtype != E4M3:
                _launch(_mt_unpack_kernel, g, src.view(E4M3), inv, base=base, span=src.numel(), DST=_TL[g.dtype])
        return
    for i, o in mine:
        if not isinstance(grads[i], FP8Tensor):
            x = src[o - base:o - base + grads[i].numel()]
            grads[i].copy_((x.view(E4M3).float() * inv[i]).view_as(grads[i]))


def _packed(numels) -> list[int]:
    """Offsets of tensors packed one after another, each starting on a multiple of ALIGN elements (vector
    accesses in the kernels), then the end: len(numels) + 1 values."""
    return [0, *accumulate(kernels.round_up(n, ALIGN) for n in numels)]


def _data(g: Grad) -> torch.Tensor:
    return (g.data if isinstance(g, FP8Tensor) else g).reshape(-1)


def _addr(g: Grad) -> tuple:
    """What identifies a gradient's memory without a dispatched op (host time): data and scale addresses,
    size and dtype."""
    if isinstance(g, FP8Tensor):
        return g.data.data_ptr(), g.data.numel(), g.data.dtype, g.scale_inv.data_ptr()
    return g.data_ptr(), g.numel(), g.dtype


def _amax(g: Grad) -> torch.Tensor:
    """max |value| (0-dim float32, NaN -> NaN): for E4M3 an integer max of the low 7 bits, since
    magnitudes order like them (0x7F = NaN is the largest), times scale_inv."""
    if _data(g).numel() == 0:
        return torch.zeros((), device=_data(g).device)
    if isinstance(g, FP8Tensor):
        return (g.data.view(torch.uint8) & 0x7F).amax().view(E4M3).float() * g.scale_inv.reshape(())
    return g.detach().abs().amax().float()


class _Plan:
    """Host-side views of one list of gradients (and amaxes), built once per set of addresses, so that an eager
    call makes a fixed number of torch ops however many tensors it reduces (each op costs host time)."""

    def __init__(self, key: tuple, grads: list[Grad], amaxes: Optional[list], dev: torch.device):
        n = len(grads)
        self.key = key  # the gradients' and amaxes' addresses, sizes and dtypes
        self.data = [_data(g) for g in grads]  # flat views
        self.total = sum(d.numel() for d in self.data)
        one = torch.ones(1, device=dev)
        self.si = [g.scale_inv.view(1) if isinstance(g, FP8Tensor) else one for g in grads]  # (1,) views
        self.no_amax = [amaxes is None or amaxes[i] is None for i in range(n)]
        self.own = torch.zeros(n, device=dev) if any(self.no_amax) else None  # kernel-computed amaxes (data units)
        self.amax = [self.own[i:i + 1] if self.no_amax[i] else amaxes[i].reshape(1).float() for i in range(n)]
        self.scaled_own = torch.tensor(self.no_amax, device=dev)  # own amaxes still need * scale_inv
        self.inv = torch.empty(n, device=dev)  # 1 / shared scale, written by every call (_unpack views it)
        n8 = sum(d.numel() for d, g in zip(self.data, grads) if isinstance(g, FP8Tensor))
        self.share = torch.tensor([d.numel() / n8 if isinstance(g, FP8Tensor) else 0.0
                                   for d, g in zip(self.data, grads)], device=dev)  # of the FP8 gradient elements


class FP8AllReduce:
    """Auto-scaled FP8 gradient all-reduce (mean over ranks), in place, bitwise identical on all
    ranks. Holds mu, the bucket buffers (built on the first call, reused while the sizes match) and
    the counters. mu / sat_frac (device tensors) are for logging; nothing here syncs with the host."""

    def __init__(self, world_size: int, group: Optional[dist.ProcessGroup] = None,
                 bucket_bytes: int = BUCKET_BYTES, cfg: AutoScaleConfig = AutoScaleConfig(), backend: str = "auto"):
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend must be auto (Triton on CUDA / interpreter) or torch, got {backend!r}")
        self.world_size, self.group, self.bucket_bytes, self.cfg = world_size, group, bucket_bytes, cfg
        self.backend = backend
        self.buckets: list[_Bucket] = []
        self._key: Optional[tuple] = None
        self._plan: Optional[_Plan] = None
        self.mu: Optional[torch.Tensor] = None
        self._zero: Optional[tuple] = None  # (partition, its bucket) of reduce_to_owners

    def _init_state(self, device: torch.device) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        self.mu = torch.full((1,), self.cfg.mu_init, **f32)  # the mu used by the last call
        self.clean = torch.zeros(1, **f32)  # clean steps since mu last changed
        self.sat_frac = torch.zeros(1, **f32)  # this rank's clipped fraction in the last call
        self.prev_inf = torch.ones(1, **f32)  # last call found NaN/Inf (1 at start: no last call)
        self.sat_count = torch.zeros(1, dtype=torch.int64, device=device)
        # fraction of the FP8 gradient elements of the last call whose tensor needed a re-scale (ratio != 1);
        # kept in the bucket, the others cost the pre-scale no traffic (_mt_prescale_kernel IN_PLACE). For the log
        self.rescaled = torch.zeros(1, **f32)

    def _build(self, numels: list[int], device: torch.device) -> None:
        """Tensors in order, whole, into buckets of <= bucket_bytes (a bigger tensor gets its own)."""
        groups, size = [[]], 0
        for i, n in enumerate(numels):
            if groups[-1] and size + n > self.bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += n
        self.buckets = []
        for idx in groups:
            offs = _packed(numels[i] for i in idx)
            S = kernels.round_up(triton.cdiv(offs[-1], self.world_size), ALIGN)  # shard elements (= bytes)
            self.buckets.append(_make_bucket(idx, offs[:-1], S, self.world_size, device))

    @torch.no_grad()
    def into_buckets(self, grads: list[Grad]) -> list[Grad]:
        """grads with every FP8Tensor's data moved into the bucket buffers that a call on them uses (same shape
        and values; float grads returned as they are). A caller that keeps its gradients there (train.FP8Comm,
        levels 1-2) turns the pack into an in-place pre-scale and needs no unpack copy: no gradient bytes
        copied in or out, no second buffer."""
        numels = [_data(g).numel() for g in grads]
        self._build(numels, _data(grads[0]).device)
        self._key = tuple(numels)
        out = list(grads)
        for b in self.buckets:
            for i, o in zip(b.index, b.offset):
                g = grads[i]
                if isinstance(g, FP8Tensor):
                    # set_, not slicing: each gets its own version counter (slices share their base's, and
                    # autograd would take one layer's gradient write for a change to another's saved buffer)
                    v = torch.empty(0, dtype=torch.uint8, device=g.data.device).set_(b.flat.untyped_storage(), o,
                                                                                      (numels[i],))
                    v.copy_(g.data.view(torch.uint8).view(-1))
                    out[i] = FP8Tensor(v.view(E4M3).view(g.data.shape), g.scale_inv)
        return out

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
    def _scales(self, grads: list[Grad], amaxes: Optional[list[torch.Tensor]], buckets: list[_Bucket], tri: bool):
        """One all-reduce MAX of [amaxes..., last sat fraction] -> (found_inf (1,), ratio (n,) =
        shared scale / own scale, inv_scale (n,) = the result's scale_inv, the plan's buffer), float32 on the
        device. The per-tensor scalars are gathered by one cat of cached views (no per-tensor ops)."""
        plan, n = self._plan, len(grads)
        src_si = torch.cat(plan.si)
        if tri:  # one multi-tensor launch per bucket and dtype that has a gradient without amax
            if plan.own is not None:
                plan.own.zero_()
                for g in (g for b in buckets for g in b.groups if any(plan.no_amax[i] for i in g.index)):
                    _launch(_mt_amax_kernel, g, plan.own, SRC=_TL[g.dtype], IS_FP8=g.dtype == E4M3)
            amax = torch.cat(plan.amax) * torch.where(plan.scaled_own, src_si, 1.0)  # FP8 data units -> values
        else:
            amaxes = [None] * n if amaxes is None else amaxes
            amax = torch.stack([_amax(g) if a is None else a.reshape(()).float() for g, a in zip(grads, amaxes)])
        amax = torch.where(src_si == 0, 0.0, amax)  # an empty gradient: its data may be stale
        vec = torch.cat([amax, self.sat_frac])
        vec = torch.where(torch.isnan(vec), float("inf"), vec)  # MAX with NaN is backend-defined; inf is not
        if self.world_size > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=self.group)
        amax, global_sat = vec[:n], vec[n:]
        self.global_amax = amax  # (n,) max over ranks of each input's amax: a bound on the mean's amax
        found_inf = (~torch.isfinite(amax)).any().float().reshape(1)
        self._update_mu(global_sat)
        self.prev_inf.copy_(found_inf)
        ok = torch.isfinite(amax) & (amax > 0)
        a = torch.where(ok, amax.double(), 1.0)
        exp = torch.where(ok, torch.floor(torch.log2(fp8_max(E4M3) / a)), 0.0).clamp(-110, 110)
        scale = (torch.exp2(exp) * self.mu.double()).float()  # (n,) shared, power of two
        torch.reciprocal(scale, out=plan.inv)  # exact: scale is a power of two
        return found_inf, scale * src_si, plan.inv

    @torch.no_grad()
    def __call__(self, grads: list[Grad], amaxes: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Average grads over ranks in place; returns found_inf, float32 (1,) on the device: 1 on every
        rank when any rank has a NaN/Inf gradient (skip the step), else 0.
        grads: FP8Tensor (E4M3 data, scale_inv (1,), scale_inv 0 = empty) or float tensors, contiguous;
        FP8Tensors get new data + scale_inv, float tensors the dequantized mean (FP8-exact values).
        amaxes (optional, entries may be None): max |value| of each grad (e.g. FP8Linear.weight_grad_amax),
        saves a read of the gradient."""
        if self._prepare(grads, amaxes):
            key = tuple(d.numel() for d in self._plan.data)
            if key != self._key:
                self._build(list(key), self._plan.data[0].device)
                self._key = key
        return self._run(grads, amaxes, self.buckets, gather=True)

    def _prepare(self, grads: list[Grad], amaxes: Optional[list[torch.Tensor]]) -> bool:
        """Checks grads and builds the host-side views a call needs (_Plan) when the set of tensors is new
        (addresses, sizes, dtypes); a call on the same tensors then makes no per-tensor torch op on the host
        (eager steps: ~1000 views per call for a 1.3B model before). Returns True when it rebuilt."""
        assert grads, "nothing to reduce"
        key = tuple(_addr(g) for g in grads), None if amaxes is None else tuple(
            a.data_ptr() if a is not None else 0 for a in amaxes)
        if self._plan is not None and self._plan.key == key:
            return False
        for g in grads:
            ok = (E4M3,) if isinstance(g, FP8Tensor) else kernels.HP_DTYPES
            assert _data(g).is_contiguous() and _data(g).dtype in ok, f"grads: contiguous E4M3 FP8Tensor or {ok}"
            assert not isinstance(g, FP8Tensor) or (g.scale_inv.dtype == torch.float32 and g.scale_inv.numel() == 1), \
                "FP8Tensor grads: float32 scale_inv of one element"
        for a in amaxes or ():  # the plan keeps views of them: a converted copy would go stale
            assert a is None or (a.dtype == torch.float32 and a.numel() == 1), "amaxes: float32, one element each"
        dev = _data(grads[0]).device
        if self.mu is None:
            self._init_state(dev)
        self._plan = _Plan(key, grads, amaxes, dev)
        return True

    def _run(self, grads: list[Grad], amaxes: Optional[list[torch.Tensor]], buckets: list[_Bucket],
             gather: bool) -> torch.Tensor:
        """Scales, then per bucket: pre-scale -> FP8 reduce-scatter -> sum + re-quantize -> (FP8 all-gather
        and unpack all | unpack the tensors inside my shard). Returns found_inf."""
        tri = self.backend == "auto" and kernels.use_triton(self.mu)
        plan = self._plan
        if tri:
            for b in buckets:
                if b.plan is not plan:
                    b.groups, b.plan = _groups(plan.data, b.index, b.offset, b.flat), plan
        found_inf, ratio, inv = self._scales(grads, amaxes, buckets, tri)
        torch.sum(plan.share * (ratio != 1.0), dim=0, keepdim=True, out=self.rescaled)
        W, grp, fmax = self.world_size, self.group, fp8_max(E4M3)
        rank = dist.get_rank(grp) if W > 1 else 0
        self.sat_count.zero_()
        works, recvs = [], []
        for b in buckets:  # pack each bucket and start its FP8 reduce-scatter at once
            for g in b.groups if tri else []:
                _launch(_mt_prescale_kernel, g, b.flat, ratio, self.sat_count, SRC=_TL[g.dtype], FP8_MAX=fmax,
                        IN_PLACE=g.in_place)
            for i, off in zip(b.index, b.offset) if not tri else []:
                _prescale_ref(plan.data[i], b.flat.view(E4M3), off, ratio[i], self.sat_count)
            recvs.append(torch.empty_like(b.flat) if W > 1 else b.flat)
            works.append(dist.all_to_all_single(recvs[-1], b.flat, group=grp, async_op=True) if W > 1 else None)
        for k, b in enumerate(buckets):  # sum my shard, start its FP8 all-gather
            if works[k] is not None:
                works[k].wait()  # a stream dependency on CUDA, not a host sync
            _sum_requant(recvs[k].view(E4M3).view(W, -1), b.shard.view(E4M3), tri)
            recvs[k] = None  # back to the allocator (the stream order keeps NCCL's writes before any reuse)
            works[k] = _all_gather(b.flat, b.shard, group=grp, async_op=True) if W > 1 and gather else None
        for b, w in zip(buckets, works):  # unpack: FP8 bytes as they are, scale_inv = 1 / shared scale
            if w is not None:
                w.wait()
            # all-reduce: the whole bucket; level 3: my shard, which holds exactly the tensors I own
            if gather:
                _unpack(grads, b, b.flat, 0, plan, tri)
            else:
                _unpack(grads, b, b.shard, rank * b.shard.numel(), plan, tri)
        self.sat_frac.copy_(torch.where(found_inf > 0, 0.0, self.sat_count.double() / max(plan.total, 1)).float())
        return found_inf

    @torch.no_grad()
    def reduce_to_owners(self, grads: list[Grad], part: "Fp8ZeroPartition",
                         amaxes: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Level 3: the mean of each gradient lands on its owner only (FP8 reduce-scatter over the
        partition's owner-ordered flat buffer, one bucket); other ranks' copies are left as they were.
        Same scales, mu and found_inf as __call__ (found_inf reaches every rank)."""
        self._prepare(grads, amaxes)
        assert part.world_size == self.world_size and len(part.owners) == len(grads)
        if self._zero is None or self._zero[0] is not part:
            n = len(grads)
            dev = self.mu.device  # the partition's buffers: the weight all-gather uses them after the step
            self._zero = part, _make_bucket(list(range(n)), part.offset, part.shard, self.world_size, dev,
                                            part.buffers(dev))
        return self._run(grads, amaxes, [self._zero[1]], gather=False)


# ----------------------------------------------------------------------------------------------
# level 3: FP8 ZeRO over whole tensors (FP8-LM section 2.3, Algorithm 1)


class Fp8ZeroPartition:
    """Whole tensors to owner ranks (greedy_partition), laid out owner by owner in one flat byte buffer
    of world_size equal shards: shard r = [rank r's tensors, in index order | their scale_inv as
    float32], zero-padded to the largest shard. Equal shards make the FP8 reduce-scatter of the
    gradients (FP8AllReduce.reduce_to_owners) and the all-gather of the FP8 weights plain equal-split
    collectives, and the scale of a tensor travels in the same shard as its bytes."""

    def __init__(self, numels: Sequence[int], world_size: int):
        self.world_size, self.numels = world_size, list(numels)
        self.owners = greedy_partition(self.numels, world_size)
        self.owned = [[i for i in range(len(numels)) if self.owners[i] == r] for r in range(world_size)]
        local = [0] * len(numels)  # offset inside the owner's shard
        self.scale_at = []
        for idx in self.owned:
            offs = _packed(self.numels[i] for i in idx)
            for i, o in zip(idx, offs):
                local[i] = o
            self.scale_at.append(offs[-1])
        self.shard = kernels.round_up(max(a + 4 * len(idx) for a, idx in zip(self.scale_at, self.owned)), ALIGN)
        self.offset = [self.owners[i] * self.shard + local[i] for i in range(len(numels))]  # in the flat buffer
        self._bufs: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._copies: Optional[tuple] = None  # (addresses, all_gather_weights' copy lists)

    def buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat (W * S,), mine (S,)) uint8, made on first use: the FP8 weight all-gather's buffers, also the
        gradient reduce-scatter's (FP8AllReduce.reduce_to_owners; the two never overlap in a step)."""
        if self._bufs is None:
            self._bufs = _flat_buffers(self.world_size, self.shard, device)
        return self._bufs

    def loads(self) -> list[int]:
        """Elements owned by each rank."""
        return [sum(self.numels[i] for i in idx) for idx in self.owned]

    @torch.no_grad()
    def all_gather_weights(self, weights: list[FP8Tensor], rank: int,
                           group: Optional[dist.ProcessGroup] = None) -> None:
        """After the owners' optimizer step: every rank gets every FP8 weight (data + scale_inv), in
        place, through one FP8 all-gather of the owner-ordered buffer (1 byte per element + 4 per tensor)."""
        assert len(weights) == len(self.numels) and all(w.data.dtype == E4M3 for w in weights)
        flat, mine = self.buffers(weights[0].data.device)
        key = (rank, flat.data_ptr(), tuple((w.data.data_ptr(), w.scale_inv.data_ptr()) for w in weights))
        if self._copies is None or self._copies[0] != key:
            self._copies = key, self._copy_lists(weights, rank, flat, mine)
        pack_dst, pack_src, unpack_dst, unpack_src = self._copies[1]
        if pack_dst:  # my new FP8 weights and their scale_inv into my shard
            torch._foreach_copy_(pack_dst, pack_src)
        if self.world_size > 1:
            _all_gather(flat, mine, group=group)
        else:
            flat.copy_(mine)
        torch._foreach_copy_(unpack_dst, unpack_src)  # every weight and scale_inv out of the owner's shard

    def _copy_lists(self, weights: list[FP8Tensor], rank: int, flat: torch.Tensor, mine: torch.Tensor) -> tuple:
        """The views all_gather_weights copies between (made once per set of addresses: a step creates none):
        (into my shard: dst, src), (out of the flat buffer: dst, src); data as uint8, scale_inv as float32."""
        S = self.shard
        assert all(w.scale_inv.dtype == torch.float32 and w.scale_inv.numel() == 1 for w in weights)

        def si_at(buf: torch.Tensor, at: int) -> torch.Tensor:  # the float32 scale_inv stored at byte at
            return buf[at:at + 4].view(torch.float32)
        idx, a = self.owned[rank], self.scale_at[rank]
        pack_dst = [mine[self.offset[i] - rank * S:][:self.numels[i]] for i in idx]
        pack_dst += [si_at(mine, a + 4 * j) for j in range(len(idx))]
        pack_src = [weights[i].data.view(torch.uint8).view(-1) for i in idx]
        pack_src += [weights[i].scale_inv.view(-1) for i in idx]
        unpack_dst = [w.data.view(torch.uint8).view(-1) for w in weights]
        unpack_src = [flat[o:o + n] for o, n in zip(self.offset, self.numels)]
        for r, (a, owned) in enumerate(zip(self.scale_at, self.owned)):  # scales in owner order
            unpack_dst += [weights[i].scale_inv.view(-1) for i in owned]
            unpack_src += [si_at(flat, r * S + a + 4 * j) for j in range(len(owned))]
        return pack_dst, pack_src, unpack_dst, unpack_src
