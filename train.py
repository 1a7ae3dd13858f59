"""
train.py: train a GPT at an FP8 level, on one device or many (torchrun DDP), with checkpoint/resume.

  python train.py                                   # default: prepare data, tiny (CPU) or gpt2-124m (GPU)
  python train.py --preset=gpt2-124m --fp8_level=1 --batch_size=16
  torchrun --standalone --nproc_per_node=8 train.py --preset=gpt-1.3b --fp8_level=1
  python train.py --out_dir=out/x --resume=1        # continue the run in out/x
  python train.py --out_dir=out/x --sample=1        # generate text from its checkpoint

Flags are the fields of TrainConfig (`--name=value`; booleans 0/1/true/false); a preset fills in
the model and batch settings that no flag gives. Levels (DESIGN.md, FP8-LM arXiv 2310.18313 sec. 2):
0 = BF16 autocast, FP32 weights and Adam states; 1 = FP8 GEMMs in every Linear but the LM head,
FP16 weights updated in place, FP8 weight gradients, FP32 Adam states; 2 = as 1 with FP8 m1 + FP16 m2;
3 = as 2, FP8 ZeRO: each FP8 weight owned whole by one rank (states, FP16 master), FP8 weights all-gathered.
Under torchrun the FP8 weight gradients go through comm.py's auto-scaled FP8 all-reduce (FP8Comm), the
rest through DDP.
"""
import argparse
import contextlib
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import comm
import fp8
import model as M
import optim

HIGHEST_LEVEL = 2  # --fp8_level=-1 means this; level 3 (FP8 ZeRO) is opt-in: it pays only on several ranks
PEAK_FLOPS = {"H100": {"bf16": 989e12, "fp8": 1979e12},  # dense tensor-core peaks, SXM datasheets
              "H200": {"bf16": 989e12, "fp8": 1979e12}}
REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    preset: str = ""  # tiny | gpt2-124m | gpt2-350m | gpt-1.3b; "" = gpt2-124m on a GPU, tiny on CPU
    arch: str = ""  # gpt2 | llama | fog; "" = gpt2
    fp8_level: int = -1  # 0..3; -1 = HIGHEST_LEVEL
    fp8_attention: bool = False  # QK^T and PV (fwd and bwd) in FP8 too (fp8.FP8Attention); levels >= 1
    fp8_gelu: int = -1  # 0: plain GELU; 1: keep the MLP's GELU input for the backward in FP8 (fp8.FP8SavedGELU); 2:
    # that only, the GELU output's FP8 copy recomputed in the backward (fp8.FP8Linear.gelu_in); 3 (speed): the GELU
    # fused into c_proj's input cast, nothing kept in FP8 that the plain path does not (fp8.FP8Linear.gelu_cast);
    # 4 (memory): as 2, with a delayed scale for the kept FP8 GELU input (no amax pass; fp8.FP8Linear.h_meta);
    # levels >= 1. -1 = 3 at levels >= 1, 0 at level 0
    bf16_norms: int = -1  # 1: norms reading the float32 residual stream keep it for the backward in BF16 and return
    # BF16 (model.BF16Norm); -1 = 1 at levels >= 1 (their output feeds an FP8 cast), 0 at level 0 (the reference)
    head_chunk: int = 0  # > 0: training loss in chunks of this many rows, no (B, T, V) logits kept (model.GPT.head)
    recompute_attn: bool = False  # keep each attention's input only, the backward re-runs it (model.use_recompute_attn)
    fp8_saved_attn: bool = False  # keep each attention's q, k, v for the backward in FP8, its output only as c_proj's
    # FP8 input copy; the attention itself unchanged (model.use_fp8_saved_attn); levels >= 1
    keep_weight_t: bool = True  # 0: no (K, N) FP8 weight copy between steps, dgrad transposes (1 byte/param less)
    n_layer: int = 0  # model size overrides; 0 = the preset's
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 0
    # data and output
    dataset: str = "shakespeare"  # prepared on first use: shakespeare | pystdlib
    data_dir: str = ""  # "" = <repo>/data/<dataset>
    out_dir: str = ""  # "" = out/<preset>-<arch>-l<level>
    # optimization
    batch_size: int = 0  # sequences per micro-batch per rank; 0 = the preset's
    total_batch_tokens: int = 0  # tokens per optimizer step; 0 = one micro-batch per rank
    max_steps: int = 0
    lr: float = 0.0
    min_lr_ratio: float = 0.1  # cosine decays to lr * this at max_steps
    warmup_steps: int = -1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    precise_acc: str = fp8.DEFAULT_PRECISE_ACC  # GEMMs summing in FP32 past a K tile: fp8.PRECISE_ACC
    master: str = "fp16"  # levels >= 1, FP8 linears: fp16 = the FP16 weight is the master (DESIGN) | fp32 = +4 B/param copy
    max_skips: int = 10  # stop after this many consecutive non-finite steps
    # evaluation, logging, checkpoints
    eval_interval: int = 0  # also the checkpoint interval
    save_ckpt: bool = True  # write checkpoints (eval steps and the end); 0 for timing runs of big models
    eval_iters: int = 0
    monitor_interval: int = 0  # FP8 health every N steps (kurtosis/RMS/amax per layer, cast-site saturation); 0 = off
    kurtosis_warn: float = 100.0  # warn when a kurtosis rose 3 monitor steps running to above this (normal: 3)
    resume: bool = False
    compile: bool = False
    compile_blocks: bool = False  # with --compile=1: compile one block (reused by all) + the head, not the whole
    # model: the compile time of one layer instead of n_layer (minutes at 1B+), without cross-block fusion
    cuda_graph: bool = False  # capture the whole training step in a CUDA graph (one GPU)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1337
    sample: bool = False  # generate from out_dir's checkpoint instead of training
    sample_tokens: int = 200
    prompt: str = "\n"

    def __post_init__(self):
        if self.fp8_level == 3 and self.compile:  # a compiled forward recasts FP8 weights from FP16 ones
            raise ValueError("--compile=1 is not supported at --fp8_level=3 (ranks hold only the FP8 copy of the "
                             "weights they do not own); use --compile=0 or --fp8_level=2")
        if self.fp8_level not in (-1, 0, 1, 2, 3):
            raise ValueError(f"--fp8_level must be 0..3 (or -1 = highest), got {self.fp8_level}")
        if self.fp8_attention and self.fp8_level == 0:
            raise ValueError("--fp8_attention=1 needs FP8 linears: use --fp8_level >= 1 (or --fp8_attention=0)")
        if self.fp8_saved_attn and (self.fp8_level == 0 or self.fp8_attention or self.recompute_attn):
            raise ValueError("--fp8_saved_attn=1 needs FP8 linears (--fp8_level >= 1) and goes without "
                             "--fp8_attention and --recompute_attn")
        if self.fp8_gelu not in (-1, 0, 1, 2, 3, 4):
            raise ValueError(f"--fp8_gelu must be 0..4 (or -1 = the level's default), got {self.fp8_gelu}")
        if self.bf16_norms not in (-1, 0, 1):
            raise ValueError(f"--bf16_norms must be 0 or 1 (or -1 = the level's default), got {self.bf16_norms}")
        if self.fp8_gelu > 0 and self.fp8_level == 0:
            raise ValueError(f"--fp8_gelu={self.fp8_gelu} needs FP8 linears: use --fp8_level >= 1 (or --fp8_gelu=0)")
        if self.head_chunk < 0:
            raise ValueError(f"--head_chunk must be >= 0 (0 = the plain loss), got {self.head_chunk}")
        if self.preset and self.preset not in M.PRESETS:
            raise ValueError(f"--preset must be one of {list(M.PRESETS)}, got {self.preset!r}")
        if self.arch and self.arch not in M.ARCHS:
            raise ValueError(f"--arch must be one of {M.ARCHS}, got {self.arch!r}")
        if self.precise_acc not in fp8.PRECISE_ACC:
            raise ValueError(f"--precise_acc must be one of {list(fp8.PRECISE_ACC)}, got {self.precise_acc!r}")
        if self.master not in ("fp16", "fp32"):
            raise ValueError(f"--master must be fp16 or fp32, got {self.master!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("batch_size", "block_size", "max_steps", "eval_interval", "eval_iters", "total_batch_tokens",
                     "monitor_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")


# training presets: what a preset sets when no flag does (model shapes live in model.PRESETS)
def tiny():
    return dict(batch_size=8, max_steps=160, lr=2e-3, warmup_steps=20, eval_interval=40, eval_iters=8)


def gpt2_124m():
    return dict(batch_size=16, total_batch_tokens=524288, max_steps=5000, lr=6e-4, warmup_steps=700,
                eval_interval=250, eval_iters=20)


def gpt2_350m():
    return dict(gpt2_124m(), lr=3e-4)


def gpt_1_3b():
    return dict(batch_size=8, total_batch_tokens=1048576, max_steps=5000, lr=2e-4, warmup_steps=700,
                eval_interval=250, eval_iters=10)


TRAIN_PRESETS = {"tiny": tiny, "gpt2-124m": gpt2_124m, "gpt2-350m": gpt2_350m, "gpt-1.3b": gpt_1_3b}


def str2bool(s: str) -> bool:
    if s.lower() not in ("0", "1", "false", "true"):
        raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {s!r}")
    return s.lower() in ("1", "true")


def parse_flags(argv) -> dict:
    """--name=value flags generated from TrainConfig's fields; unknown flags and bad values exit."""
    p = argparse.ArgumentParser(description="train a GPT in FP8 (see the module docstring)", allow_abbrev=False)
    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name}", type=str2bool if f.type is bool else f.type, default=argparse.SUPPRESS,
                       metavar=f.type.__name__.upper(), help=f"default {f.default!r}")
    return vars(p.parse_args(argv))


def resolve(flags: dict, device: str) -> TrainConfig:
    """Defaults <- preset <- flags; then derive what is left (level, arch, out_dir, data_dir)."""
    cfg = TrainConfig(**flags)
    preset = cfg.preset or ("gpt2-124m" if device.startswith("cuda") else "tiny")
    mcfg = M.PRESETS[preset]()
    merged = {**asdict(cfg), "block_size": mcfg.block_size, **TRAIN_PRESETS[preset](), **flags}
    cfg = TrainConfig(**merged)
    level = HIGHEST_LEVEL if cfg.fp8_level < 0 else cfg.fp8_level
    arch = cfg.arch or mcfg.arch
    fp8_gelu = (3 if level >= 1 else 0) if cfg.fp8_gelu < 0 else cfg.fp8_gelu  # the fast paths at FP8 levels
    bf16_norms = int(level >= 1) if cfg.bf16_norms < 0 else cfg.bf16_norms
    return replace(cfg, preset=preset, fp8_level=level, arch=arch, warmup_steps=max(cfg.warmup_steps, 0),
                   fp8_gelu=fp8_gelu, bf16_norms=bf16_norms,
                   out_dir=cfg.out_dir or os.path.join("out", f"{preset}-{arch}-l{level}"),
                   data_dir=cfg.data_dir or os.path.join(REPO, "data", cfg.dataset))


def model_config(cfg: TrainConfig) -> M.GPTConfig:
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
    return M.GPTConfig(**{**asdict(M.PRESETS[cfg.preset]()), **overrides, "arch": cfg.arch,
                          "block_size": cfg.block_size})


# ----------------------------------------------------------------------------------------------
# data: random windows of the token file, a pure function of (seed, step) so runs and resumes replay


def load_split(data_dir: str, split: str) -> np.ndarray:
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")


def batch_offsets(n_tokens: int, key: int, n_rows: int, T: int, seed: int) -> torch.Tensor:
    """n_rows window starts for step `key` (negative keys: the fixed eval batches)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + key)
    return torch.randint(n_tokens - T - 1, (n_rows,), generator=g)


def get_batch(data: np.ndarray, offsets: torch.Tensor, T: int, device: str):
    """Windows at `offsets` -> inputs x (B, T) and next-token targets y (B, T), int64 on device."""
    rows = np.stack([data[i:i + T + 1] for i in offsets.tolist()]).astype(np.int64)  # (B, T + 1)
    xy = torch.from_numpy(rows)
    if device.startswith("cuda"):
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min((step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ----------------------------------------------------------------------------------------------
# FP8 helpers


def scaling_metas(model):
    return [m for m in model.modules() if isinstance(m, fp8.ScalingMeta)]


def read_saturation(model, n_tokens: int) -> Optional[float]:
    """% of FP8-cast values saturated over the last n_tokens training tokens of this rank (all cast
    sites: each casts n_tokens * features values); resets the counters. No host counter runs in the
    forward, so compiled and CUDA-graphed steps count the same."""
    metas = [m for m in scaling_metas(model) if m.count_stats]  # fp8.count_cast_stats: monitor steps only
    if not metas:
        return None
    n_sat = torch.stack([m.stats[0] for m in metas]).sum().item()
    numel = n_tokens * sum(m.features for m in metas)
    torch._foreach_zero_([m.stats for m in metas])
    return 100.0 * n_sat / max(numel, 1)


@contextlib.contextmanager
def frozen_scaling(model):
    """Evaluation must not touch the delayed-scaling state (amax history, priming, stats)."""
    metas = scaling_metas(model)
    saved = [({k: b.clone() for k, b in m.named_buffers()}, m.primed) for m in metas]
    try:
        yield
    finally:
        for m, (bufs, primed) in zip(metas, saved):
            for k, b in m.named_buffers():
                b.copy_(bufs[k])
            m.primed = primed


class FP8Comm:
    """Communication of the FP8 linear weights, whose grads live in FP8 buffers that DDP ignores (comm.py).
    Levels 1-2: auto-scaled FP8 all-reduce of the grads. Level 3 (FP8 ZeRO, FP8-LM sec. 2.3): every FP8
    weight is owned whole by one rank (greedy); its grad is reduced to the owner, which alone keeps its
    FP16 master and Adam states and steps it; one FP8 all-gather then gives every rank every FP8 weight.
    Non-owners drop the FP16 weight (a zero-stride placeholder: shape and numel kept, 0 bytes)."""

    def __init__(self, model, level: int, rank: int, world: int):
        self.mods = [m for m in model.modules() if isinstance(m, fp8.FP8Linear)]
        self.rank, self.world = rank, world
        self.reducer = comm.FP8AllReduce(world)
        self.part = comm.Fp8ZeroPartition([m.weight.numel() for m in self.mods], world) if level == 3 else None
        self.mine = [self.part is None or self.part.owners[i] == rank for i in range(len(self.mods))]
        self._owned = {id(m.weight) for m, mine in zip(self.mods, self.mine) if mine}
        for m in self.mods if self.part is not None else ():  # level 3 keeps 1 byte per weight: no (K, N) copy
            m.keep_weight_t = False
        if self.part is None and world > 1 and self.mods:  # levels 1-2: the grads live in the all-reduce buckets
            moved = self.reducer.into_buckets([fp8.fp8_grad(m.weight) for m in self.mods])
            for m, g in zip(self.mods, moved):
                m.weight_grad_fp8 = g.data

    @classmethod
    def needed(cls, model, level: int, rank: int, world: int) -> Optional["FP8Comm"]:
        """The FP8Comm training uses: level 3 always (even on one rank), levels 1-2 with several ranks; else None."""
        return cls(model, level, rank, world) if level == 3 or (level and world > 1) else None

    def owns(self, p) -> bool:
        """This rank keeps p's optimizer state and steps it (every param below level 3)."""
        return not fp8.is_fp8_param(p) or id(p) in self._owned

    def reduce(self) -> torch.Tensor:
        """Mean over ranks of the FP8 weight grads (level 3: on their owners only), in place; returns
        found_inf (1,) float32, the same on every rank (any rank's NaN/Inf makes all of them skip)."""
        if self.world == 1:
            return torch.zeros(1, device=self.mods[0].weight_grad_amax.device)
        grads = [fp8.fp8_grad(m.weight) for m in self.mods]
        amaxes = [m.weight_grad_amax for m in self.mods]  # from the wgrad GEMM's epilogue: no extra read
        if self.part is None:
            return self.reducer(grads, amaxes)
        return self.reducer.reduce_to_owners(grads, self.part, amaxes)

    @torch.no_grad()
    def gather_weights(self) -> None:
        """Level 3, after the owners' step and update_scaling: owners cast their new FP16 weights to FP8,
        one FP8 all-gather (1 B per element + 4 B per tensor) brings every FP8 weight and scale to all."""
        if self.world == 1:
            return  # the one rank owns everything: fp8_weight() recasts on the next forward
        for m, mine in zip(self.mods, self.mine):
            if mine:
                m.fp8_weight()  # the cast of the new weight (the step left the cached copy stale)
        self.part.all_gather_weights([fp8.FP8Tensor(m.weight_fp8, m.weight_scale_inv) for m in self.mods],
                                     self.rank)
        for m, mine in zip(self.mods, self.mine):
            if not mine:  # forward uses the gathered copy as it is; dgrad transposes it (keep_weight_t False)
                m.fp8_weight_kept, m._weight_fp8_t = True, None

    @torch.no_grad()
    def shard_weights(self) -> None:
        """Level 3 start (after any resume): share the FP8 weights, then drop the FP16 weights not owned."""
        self.gather_weights()
        for m, mine in zip(self.mods, self.mine):
            if not mine:
                m.weight.data = torch.zeros((), dtype=m.weight.dtype, device=m.weight.device).expand(m.weight.shape)


def fp8_comm_stats(model) -> dict:
    """The FP8 all-reduce's auto-scaling factor mu and the fraction of FP8 gradient elements it had to
    re-scale, of the last step ({} without one); for the log (host syncs: log steps only)."""
    fc = model.__dict__.get("fp8_comm")
    if fc is None or fc.reducer.mu is None:
        return {}
    return dict(mu=fc.reducer.mu.item(), rescaled=fc.reducer.rescaled.item())


def allreduce_amax(model) -> None:
    """All ranks take the largest amax of this step: one set of scales, as one process would have."""
    metas = scaling_metas(model)
    if metas:
        cur = torch.stack([m.amax_history[0] for m in metas])
        dist.all_reduce(cur, op=dist.ReduceOp.MAX)
        for m, a in zip(metas, cur):
            m.amax_history[0] = a


# ----------------------------------------------------------------------------------------------
# optimizer


def make_optimizer(model, cfg: TrainConfig, device: str, owns=None):
    """AdamW; weight decay on matrices only (nanoGPT). Level 0: torch's fused AdamW; levels 1-2: FP8AdamW
    (level 1: FP32 moments; level 2: FP8 m1 + FP16 m2, each with a per-tensor scale); level 3: as 2, over
    the params this rank owns (owns(p): FP8Comm.owns)."""
    params = [p for p in model.parameters() if p.requires_grad and (owns is None or owns(p))]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if cfg.fp8_level == 0:
        return torch.optim.AdamW(groups, fused=True, capturable=cfg.cuda_graph, **kw)  # capturable: graphs
    dtypes = optim.LEVEL_DTYPES[min(cfg.fp8_level, 2)]  # level 3 keeps level 2's states, on the owners
    if cfg.master == "fp32":  # a separate FP32 master: updates below the FP16 weight's ulp are kept
        dtypes = dict(dtypes, master_dtype=torch.float32)
    return optim.FP8AdamW(groups, weight_decay=cfg.weight_decay, **dtypes, **kw)


def clip_and_check(opt, params, cfg: TrainConfig):
    """Global grad-norm clipping and the non-finite check, on device: (grad_scale, found_inf, norm)."""
    if cfg.fp8_level == 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"), foreach=True)  # in place
        return None, ~torch.isfinite(norm), norm
    reduce_sq = None
    if cfg.fp8_level == 3:  # a rank holds the reduced grads of its own FP8 weights only (the others: DDP)
        params = [p for g in opt.param_groups for p in g["params"]]
        reduce_sq = dist.all_reduce if dist.is_initialized() and dist.get_world_size() > 1 else None
    return optim.clip_and_check(params, cfg.grad_clip or None, reduce_sq)  # FP8: the clip is applied in step()


# ----------------------------------------------------------------------------------------------
# checkpoints: written atomically (temp file + rename), so the last good one survives a crash


def full_state(model, opt):
    """Level 3 (every rank calls it): the whole model and optimizer state on rank 0, the optimizer's keyed
    by parameter name, so that it loads at any world size (local_opt_state); (None, None) elsewhere.
    Each rank sends the FP16 weights and states of the FP8 weights it owns; the rest is rank 0's copy."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    names = {p: n for n, p in model.named_parameters()}
    cpu = lambda t: t.detach().cpu().clone() if torch.is_tensor(t) else t  # noqa: E731
    mine = {names[p]: ({k: cpu(v) for k, v in st.items()}, cpu(p) if fp8.is_fp8_param(p) else None)
            for p, st in opt.state.items() if rank == 0 or fp8.is_fp8_param(p)}
    parts = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:  # torch.save bytes: pickled FP8 storages fail
        buf, parts = io.BytesIO(), [None] * dist.get_world_size() if rank == 0 else None
        torch.save(mine, buf)
        dist.gather_object(buf.getvalue(), parts, dst=0)
        parts = [torch.load(io.BytesIO(b), weights_only=True) for b in parts] if rank == 0 else None
    if rank != 0:
        return None, None
    model_sd, state = model.state_dict(), {}
    for part in parts:
        for name, (st, weight) in part.items():
            state[name] = st
            if weight is not None:  # the owner's FP16 weight (other ranks hold a placeholder)
                model_sd[name] = weight
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    return model_sd, dict(state=state, param_groups=groups)


def local_opt_state(model, opt, full: dict) -> dict:
    """This rank's slice of a full_state optimizer state, in this optimizer's own layout (state_dict)."""
    names = {p: n for n, p in model.named_parameters()}
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    sd["state"] = {i: full["state"][names[p]] for p, i in zip(params, ids)}
    for g, saved in zip(sd["param_groups"], full["param_groups"]):
        g.update(saved)
    return sd


def save_checkpoint(path: str, model, opt, step: int, cfg: TrainConfig, n_skipped: int) -> None:
    """Every rank calls it (level 3 gathers the owners' states); rank 0 writes."""
    model_sd, opt_sd = full_state(model, opt) if cfg.fp8_level == 3 else (None, None)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    ckpt = dict(model=model_sd or model.state_dict(), optimizer=opt_sd or opt.state_dict(), step=step,
                data_step=step, rng=rng,
                config=asdict(cfg), model_config=asdict(model.config), fp8_level=cfg.fp8_level, n_skipped=n_skipped)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


OPTIONAL_SITES = (".h_meta.", ".qkv_meta.")  # the scaling sites of --fp8_gelu=4 and --fp8_saved_attn=1


def load_model_state(model, sd: dict) -> None:
    """model.load_state_dict(sd), strict but for the scaling sites of --fp8_gelu=4 and --fp8_saved_attn=1
    (fp8.FP8Linear.h_meta, qkv_meta): a run may switch those flags on resume; a site the checkpoint lacks starts
    unprimed, one it has too many is dropped."""
    own = model.state_dict().keys()
    optional = lambda k: any(s in k for s in OPTIONAL_SITES)  # noqa: E731
    missing, unexpected = model.load_state_dict({k: v for k, v in sd.items() if not optional(k) or k in own},
                                                strict=False)
    missing = [k for k in missing if not optional(k)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


def load_checkpoint(path: str, model, opt, cfg: TrainConfig, device: str) -> dict:
    """Restore model (with FP8 metas), optimizer and RNG in place; returns the checkpoint dict."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt["fp8_level"] != cfg.fp8_level or ckpt["model_config"] != asdict(model.config):
        raise ValueError(f"{path} holds fp8_level={ckpt['fp8_level']} model {ckpt['model_config']}, this run wants "
                         f"fp8_level={cfg.fp8_level} model {asdict(model.config)}: pass the flags of that run "
                         f"or another --out_dir")
    load_model_state(model, ckpt["model"])
    opt.load_state_dict(local_opt_state(model, opt, ckpt["optimizer"]) if cfg.fp8_level == 3 else ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["cpu"].cpu())
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    return ckpt


# ----------------------------------------------------------------------------------------------
# setup, evaluation, logging


def setup(cfg_flags: dict):
    """torchrun env -> process group (comm.setup: nccl on CUDA, gloo on CPU, a timeout so that a dead rank
    ends the others with an error); returns (cfg, rank, world, device)."""
    want = cfg_flags.get("device", "auto")
    cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device=cuda but no CUDA device is visible; use --device=cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    cfg = resolve(cfg_flags, f"cuda:{local}" if cuda else "cpu")  # user errors surface before any process group
    env = comm.setup("cuda" if cuda else "cpu")
    return cfg, env.rank, env.world_size, str(env.device)


@torch.no_grad()
def evaluate(model, val, cfg: TrainConfig, rank: int, world: int, device: str) -> float:
    """Mean val loss over eval_iters fixed batches; every rank takes its share, then all-reduce."""
    model.eval()
    losses = torch.zeros(cfg.eval_iters, device=device)
    with frozen_scaling(model):
        for i in range(cfg.eval_iters):
            offs = batch_offsets(len(val), -1 - i, cfg.batch_size * world, cfg.block_size, cfg.seed)
            x, y = get_batch(val, offs[rank * cfg.batch_size:(rank + 1) * cfg.batch_size], cfg.block_size, device)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                losses[i] = model(x, y)[1]
    model.train()
    loss = losses.mean()
    if world > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def run_header(cfg, mcfg, n_params, grad_accum, world, device) -> dict:
    import tiktoken
    import triton
    try:
        git = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True).stdout)
    except OSError:
        git, dirty = "", False
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    return dict(type="run", time=time.strftime("%Y-%m-%d %H:%M:%S"), config=asdict(cfg), model_config=asdict(mcfg),
                n_params=n_params, grad_accum=grad_accum, world_size=world, device=device, gpu=gpu,
                cpu=platform.processor() or platform.machine(), git_commit=git, git_dirty=dirty, argv=sys.argv,
                versions=dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                              numpy=np.__version__, tiktoken=tiktoken.__version__, cuda=torch.version.cuda))


def peak_flops(device: str, level: int):
    """The GPU's dense peak for the GEMM dtype in use (BF16 at level 0, FP8 above); None when unknown."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for gpu, peaks in PEAK_FLOPS.items():
        if gpu in name:
            return peaks["fp8" if level >= 1 else "bf16"]
    return None


def peak_mem_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB: process peak RSS


class Logger:
    """Rank 0's JSON-lines log file and console; other ranks pass path=None and stay silent."""

    def __init__(self, path):
        self.f = open(path, "a") if path else None

    def __call__(self, rec: dict, line: str = ""):
        if self.f:
            if rec:
                self.f.write(json.dumps(rec) + "\n")
                self.f.flush()
            if line:
                print(line, flush=True)

    def step(self, **r):
        rate = f"{r['tok_s'] / 1e6:.1f}M" if r["tok_s"] >= 1e6 else f"{r['tok_s'] / 1e3:.1f}k"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
        lr = f"{r['lr']:.1e}".replace("e-0", "e-")  # 6.0e-4
        self(dict(type="step", **r),
             f"step {r['step']} | loss {r['loss']:.4f} | lr {lr} | {r['ms']:.0f} ms | {rate} tok/s | mfu {mfu} | "
             f"mem {r['mem_gb']:.1f} GB" + (f" | sat {r['sat']:.2f}%" if r["sat"] is not None else "")
             + (f" | mu {r['mu']:g} | rescaled {r['rescaled']:.0%}" if r.get("mu") else "")
             + (f" | SKIPPED (non-finite, {r['n_skipped']} so far)" if r["skipped"] else ""))


def monitor(raw, x, step: int, sites, watch, log, device: str) -> None:
    """--monitor_interval (arXiv 2505.20524): the step's cast-site fractions `sites` (model.cast_site_stats, read
    before read_saturation resets the counters), then the activation statistics of one extra forward of its
    first micro-batch x (B, T) by the just-updated model: eager, in eval mode, with the scaling state frozen,
    outside any compiled or CUDA graph (hooks are not traced into those). Host syncs on monitor steps only."""
    raw.eval()
    eager = torch.compiler.set_stance("force_eager")  # --compile_blocks compiles raw's blocks in place: hooks need eager
    with frozen_scaling(raw), torch.autocast(device.split(":")[0], dtype=torch.bfloat16), eager:
        acts = M.activation_stats(raw, x).tolist()  # (n_layer, taps, stats)
    raw.train()
    rec = {stat: {tap: [a[t][i] for a in acts] for t, tap in enumerate(M.TAPS)} for i, stat in enumerate(M.STATS)}
    rec["sites"] = dict(zip(sites[0], sites[1].tolist()))  # name: [saturated, flushed-to-zero] fractions
    k, tap, layer = max((k, tap, layer) for tap, ks in rec["kurtosis"].items() for layer, k in enumerate(ks))
    sat, ftz = (max((f[i] for f in rec["sites"].values()), default=0.0) for i in (0, 1))
    log(dict(type="monitor", step=step, **rec), f"step {step} | monitor | max kurtosis {k:.1f} ({tap}, layer {layer})"
        f" | worst cast site: sat {100 * sat:.3f}% ftz {100 * ftz:.3f}%")
    rising = watch.rising(rec["kurtosis"])
    if rising:
        log(dict(type="warning", step=step, rising=rising), f"step {step} | WARNING: kurtosis rose {watch.rises} "
            f"monitor steps in a row to above {watch.threshold:g} at " + ", ".join(rising))


# ----------------------------------------------------------------------------------------------
# the loop


class Diverged(RuntimeError):
    pass


def fetch_batches(data, step: int, cfg: TrainConfig, accum: int, rank: int, world: int, device: str):
    """This rank's micro-batches of step `step`: (x, y), each (accum, B, T) int64 on device."""
    B, T = cfg.batch_size, cfg.block_size
    offs = batch_offsets(len(data), step, B * accum * world, T, cfg.seed)  # the global batch of this step
    mine = offs[rank * accum * B:(rank + 1) * accum * B]
    x, y = get_batch(data, mine, T, device)  # (accum * B, T)
    return x.view(accum, B, T), y.view(accum, B, T)


def train_step(model, raw, opt, params, xs, ys, cfg: TrainConfig, world: int, device: str):
    """One optimizer step over the micro-batches xs, ys (accum, B, T); device tensors only, no host sync
    (so it can be captured in a CUDA graph). Returns device tensors (loss, found_inf, grad norm)."""
    accum = xs.shape[0]
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        no_sync = world > 1 and micro < accum - 1  # DDP all-reduces on the last micro-batch only
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                loss = model(xs[micro], ys[micro])[1] / accum
            loss.backward()
        loss_sum += loss.detach()
    fc = raw.__dict__.get("fp8_comm")  # FP8 weight grads (DDP ignores them): FP8Comm, set by build
    comm_inf = fc.reduce() if fc is not None else None
    if world > 1:
        if cfg.fp8_level >= 1:
            allreduce_amax(raw)
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    grad_scale, found_inf, norm = clip_and_check(opt, params, cfg)
    found_inf = found_inf | ~torch.isfinite(loss_sum)  # non-finite: the step is skipped on device
    if comm_inf is not None:  # any rank's non-finite FP8 grad: every rank skips
        found_inf = found_inf | (comm_inf.reshape(()) > 0)
    if cfg.fp8_level == 0:
        opt.found_inf = found_inf.float()  # fused AdamW leaves weights and states untouched
        opt.step()
    else:
        opt.step(grad_scale=grad_scale, found_inf=found_inf)
    fp8.update_scaling(raw)  # once per optimizer step, after the last backward
    if fc is not None and fc.part is not None:
        fc.gather_weights()  # level 3: the owners' new FP8 weights to every rank
    # CUDA graphs: grads keep their addresses (allocated by the eager warm-up steps), so the optimizer's
    # pointer tables are built before capture and a replay writes where the captured kernels read
    opt.zero_grad(set_to_none=not cfg.cuda_graph)
    fp8.zero_fp8_grads(raw)
    return loss_sum, found_inf, norm


def use_cuda_graph(cfg: TrainConfig, world: int, device: str) -> bool:
    """CUDA graphs for single-GPU runs when --cuda_graph=1 (multi-rank steps stay eager: collectives)."""
    if cfg.cuda_graph and not device.startswith("cuda"):
        raise ValueError("--cuda_graph=1 needs a CUDA device; use --cuda_graph=0 on CPU")
    return bool(cfg.cuda_graph) and world == 1


class GraphedStep:
    """train_step captured once in a CUDA graph and replayed every step. FP8 adds ~10 small kernels per
    linear layer and Triton launches cost tens of microseconds of Python each, so an eager FP8 step is
    bound by the host below ~1B parameters; a replay costs one launch. Static batch buffers and a
    device-side LR; the first `warmup` steps run eagerly on a side stream (autotuning, compilation,
    scale priming, optimizer state), then one capture whose replay performs the step."""

    def __init__(self, model, raw, opt, params, cfg: TrainConfig, device: str, warmup: int = 2):
        self.args, self.cfg, self.device, self.warmup = (model, raw, opt, params), cfg, device, warmup
        self.lr = torch.zeros((), device=device)
        for group in opt.param_groups:
            group["lr"] = self.lr  # read on device by the optimizer: the graph sees each step's LR
        self.graph, self.n_eager, self.stream = None, 0, torch.cuda.Stream()

    def __call__(self, xs, ys, lr: float):
        self.lr.fill_(lr)
        model, raw, opt, params = self.args
        if self.graph is None and self.n_eager < self.warmup:
            self.n_eager += 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = train_step(model, raw, opt, params, xs, ys, self.cfg, 1, self.device)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        if self.graph is None:
            # static buffers with the eager batches' strides (views of (B, T + 1) rows): a compiled model guards
            # on strides, and a recompilation inside the capture fails
            self.xs, self.ys = (torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                                for t in (xs, ys))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records only: the replay below runs this step
                self.out = train_step(model, raw, opt, params, self.xs, self.ys, self.cfg, 1, self.device)
        else:
            self.xs.copy_(xs, non_blocking=True)
            self.ys.copy_(ys, non_blocking=True)
        self.graph.replay()
        return self.out


def build(cfg: TrainConfig, world: int, device: str, ckpt_path: str):
    """Model (FP8 modules swapped in at the level), optimizer, resumed state, then the DDP and compile
    wrappers: (raw model, model to call, optimizer, first step, skipped steps so far). cfg: from resolve()."""
    if min(cfg.fp8_level, cfg.fp8_gelu, cfg.bf16_norms) < 0:
        raise ValueError("build() takes a resolve()d config (fp8_level, fp8_gelu, bf16_norms -1 = unresolved)")
    torch.manual_seed(cfg.seed)
    raw = fp8.convert_to_fp8(M.GPT(model_config(cfg)).to(device), cfg.fp8_level)
    for m in raw.modules():
        if isinstance(m, fp8.FP8Linear):
            m.precise_acc = fp8.PRECISE_ACC[cfg.precise_acc]
            m.keep_weight_t = cfg.keep_weight_t  # before the optimizer keeps the FP8 weights (level 3: always 0)
    if cfg.fp8_attention:
        M.use_fp8_attention(raw)
    if cfg.fp8_gelu:
        M.use_fp8_gelu(raw, recompute=cfg.fp8_gelu in (2, 4), fused_cast=cfg.fp8_gelu == 3, delayed=cfg.fp8_gelu == 4)
    if cfg.bf16_norms:
        M.use_bf16_norms(raw)
    if cfg.recompute_attn:
        M.use_recompute_attn(raw)
    if cfg.fp8_saved_attn:
        M.use_fp8_saved_attn(raw)
    raw.head_chunk = cfg.head_chunk
    rank = dist.get_rank() if world > 1 else 0
    fc = FP8Comm.needed(raw, cfg.fp8_level, rank, world)
    opt = make_optimizer(raw, cfg, device, owns=fc.owns if fc is not None else None)
    start, n_skipped = 0, 0
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--resume=1 but there is no checkpoint at {ckpt_path}")
        ck = load_checkpoint(ckpt_path, raw, opt, cfg, device)
        start, n_skipped = ck["step"], ck["n_skipped"]
    model = raw
    if world > 1:
        if cfg.fp8_level >= 1:  # their grads live in FP8 buffers, not .grad: reduced by FP8Comm
            DDP._set_params_and_buffers_to_ignore_for_model(raw, [n for n, p in raw.named_parameters() if fp8.is_fp8_param(p)])
        model = DDP(raw, device_ids=[device] if device.startswith("cuda") else None, broadcast_buffers=False)
    if fc is not None:
        raw.fp8_comm = fc  # train_step finds it here
        if fc.part is not None:
            fc.shard_weights()  # level 3: after DDP's initial broadcast and any resume
    if cfg.compile:
        model = compile_model(model, raw, cfg.compile_blocks)
    return raw, model, opt, start, n_skipped


def compile_model(model, raw, blocks: bool, backend: str = "inductor"):
    """torch.compile the whole model, or (blocks) each transformer block and the head in place ("regional"
    compilation: identical blocks share one compiled graph, as dynamo treats their modules as inputs)."""
    if not blocks:
        return torch.compile(model, backend=backend)
    for block in raw.transformer.h:
        block.compile(backend=backend)
    raw.head = torch.compile(raw.head, backend=backend)  # an instance attribute: forward calls it
    return model


def train(cfg: TrainConfig, rank: int = 0, world: int = 1, device: str = "cpu") -> dict:
    """The whole run: data, model, optimizer, resume, loop with eval/checkpoints/logging."""
    master, tok_micro = rank == 0, cfg.batch_size * cfg.block_size
    total = cfg.total_batch_tokens or tok_micro * world
    if total % (tok_micro * world):
        raise ValueError(f"--total_batch_tokens={total} is not a multiple of batch_size * block_size * world_size "
                         f"= {tok_micro * world}; change it or --batch_size")
    accum = total // (tok_micro * world)
    if master and not os.path.exists(os.path.join(cfg.data_dir, "train.bin")):
        import prepare
        prepare.prepare(cfg.data_dir, dataset=cfg.dataset)
    if world > 1:
        dist.barrier()
    data, val = load_split(cfg.data_dir, "train"), load_split(cfg.data_dir, "val")
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    raw, model, opt, start, n_skipped = build(cfg, world, device, ckpt_path)
    params, consecutive, losses, val_losses = [p for p in raw.parameters() if p.requires_grad], 0, {}, {}
    log = Logger(log_path if master else None)
    log(run_header(cfg, raw.config, raw.num_params(), accum, world, device),
        f"{cfg.preset} ({cfg.arch}, {raw.num_params() / 1e6:.1f}M params) | fp8_level {cfg.fp8_level} | {device} x {world} | "
        f"batch {total} tokens = {cfg.batch_size} x {cfg.block_size} x {accum} accum x {world} ranks | "
        f"steps {start}..{cfg.max_steps}")
    peak, fpt = peak_flops(device, cfg.fp8_level), raw.flops_per_token(cfg.block_size)
    graphed = GraphedStep(model, raw, opt, params, cfg, device) if use_cuda_graph(cfg, world, device) else None
    watch = M.KurtosisWatch(cfg.kurtosis_warn)
    for step in range(start, cfg.max_steps + 1):
        if (step % max(cfg.eval_interval, 1) == 0 or step == cfg.max_steps) and not (cfg.resume and step == start):
            val_losses[step] = evaluate(raw, val, cfg, rank, world, device)
            log(dict(type="eval", step=step, val_loss=val_losses[step]), f"step {step} | val loss {val_losses[step]:.4f}")
            if step > 0 and cfg.save_ckpt:  # every rank: level 3 gathers the owners' states; rank 0 writes
                save_checkpoint(ckpt_path, raw, opt, step, cfg, n_skipped)
        if step == cfg.max_steps:
            break
        t0 = time.perf_counter()
        xs, ys = fetch_batches(data, step, cfg, accum, rank, world, device)
        mon = master and cfg.monitor_interval and step % cfg.monitor_interval == 0
        if mon:  # saturation / flush counts cost the casts half their bandwidth: monitor steps only, eager
            fp8.count_cast_stats(raw, True)
        if graphed is not None and not mon:
            loss, found_inf, norm = graphed(xs, ys, lr_at(step, cfg))
        else:
            for group in opt.param_groups:  # a graphed run keeps its device lr tensor (the graph reads it)
                if graphed is not None:
                    group["lr"].fill_(lr_at(step, cfg))
                else:
                    group["lr"] = lr_at(step, cfg)
            loss, found_inf, norm = train_step(model, raw, opt, params, xs, ys, cfg, world, device)
        loss_v, skipped, norm_v = torch.stack([loss.float(), found_inf.float().reshape(()), norm.float()]).tolist()
        dt = time.perf_counter() - t0  # the .tolist() above waited for the step to finish
        losses[step], n_skipped = loss_v, n_skipped + int(skipped)
        consecutive = consecutive + 1 if skipped else 0
        mfu = fpt * total / dt / (peak * world) if peak else None
        sites = M.cast_site_stats(raw, cfg.batch_size * cfg.block_size * accum) if mon else None
        log.step(step=step, loss=loss_v, lr=lr_at(step, cfg), ms=1e3 * dt, tok_s=total / dt, mfu=mfu,
                 mem_gb=peak_mem_gb(device), sat=read_saturation(raw, cfg.batch_size * cfg.block_size * accum),
                 grad_norm=norm_v, skipped=bool(skipped), n_skipped=n_skipped, **fp8_comm_stats(raw))
        if mon:
            fp8.count_cast_stats(raw, False)
            monitor(raw, xs[0], step, sites, watch, log, device)
        if consecutive >= cfg.max_skips:
            raise Diverged(f"{consecutive} consecutive steps with non-finite loss or gradients: stopping at step "
                           f"{step}. The last good checkpoint is {ckpt_path if os.path.exists(ckpt_path) else 'none'}")
    log({}, f"done: checkpoint {ckpt_path if cfg.save_ckpt else '(none: --save_ckpt=0)'} | log {log_path} | {n_skipped} skipped steps")
    return dict(losses=losses, val_losses=val_losses, n_skipped=n_skipped, ckpt=ckpt_path, log=log_path, model=raw)


@torch.no_grad()
def sample(cfg: TrainConfig, device: str) -> str:
    """Generate cfg.sample_tokens tokens after cfg.prompt from the checkpoint in cfg.out_dir."""
    import prepare
    ck = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), map_location=device, weights_only=True)
    m = fp8.convert_to_fp8(M.GPT(M.GPTConfig(**ck["model_config"])), ck["fp8_level"]).to(device)
    if ck["config"].get("fp8_attention"):
        M.use_fp8_attention(m)
    load_model_state(m, ck["model"])  # a --fp8_gelu=4 / --fp8_saved_attn=1 run's extra sites: not in this plain model
    m.eval()
    enc = prepare.get_tokenizer()
    idx = torch.tensor([enc.encode_ordinary(cfg.prompt) or [enc.eot_token]], device=device)  # (1, T)
    torch.manual_seed(cfg.seed)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16), frozen_scaling(m):
        out = m.generate(idx, cfg.sample_tokens, top_k=200)[0].tolist()
    text = enc.decode([t for t in out if t < enc.n_vocab])  # ids past GPT-2's 50257 are vocab padding
    print(text)
    return text


def main(argv=None):
    flags = parse_flags(sys.argv[1:] if argv is None else argv)
    world = 1
    try:
        cfg, rank, world, device = setup(flags)
        out = sample(cfg, device) if cfg.sample else train(cfg, rank, world, device)
        if world > 1:
            dist.barrier()  # all done before any rank leaves: gloo aborts a rank whose peer tore down first
        return out
    except (ValueError, Diverged) as e:
        raise SystemExit(f"error: {e}")
    finally:
        comm.teardown()


if __name__ == "__main__":
    main()
