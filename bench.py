"""
bench.py: speed of the nanoFP8 pieces against BF16 and peers, side by side in one run.

  python bench.py gemm      FP8 GEMM (Triton, ours) vs torch._scaled_mm (cuBLAS) vs BF16 torch.matmul
  python bench.py cast      fused amax+scale+cast(+transpose) vs eager torch / torch.compile vs copy bandwidth
  python bench.py linear    FP8Linear fwd+bwd (3 FP8 GEMMs, casts, FP8 weight grad) vs BF16 nn.Linear
  python bench.py step --presets 124m 1.3b   train.py's whole training step per level vs BF16 (compiled)
  python bench.py optim memory               FP8AdamW step vs torch AdamW(fused); bytes/param per level
  torchrun --standalone --nproc_per_node=2 bench.py comm   FP8 all-reduce vs NCCL BF16/FP32

Each prints a header (GPU, versions), a fixed-width table, and one JSON line last (also written to
--json FILE when given). Times are medians of triton.testing.do_bench (CUDA events).
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off on the lent H200s (see comm)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import triton  # noqa: E402

import comm  # noqa: E402
import fp8  # noqa: E402
import kernels  # noqa: E402
import optim  # noqa: E402
from fp8 import FP8Tensor  # noqa: E402
from kernels import E4M3  # noqa: E402

GEMM_SHAPES = [(8192, 8192, 8192)] + [(16384, n, k) for n, k in [
    (768, 3072), (3072, 768), (2304, 768), (8192, 2048), (2048, 8192), (6144, 2048), (16384, 4096), (4096, 16384)]]


def header() -> dict:
    import triton
    info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__}
    print(f"# {info['gpu']} | torch {info['torch']} | triton {info['triton']}")
    return info


def median_ms(fn, rep=200) -> float:
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_gemm(args) -> dict:
    rows = []
    print(f"{'M':>6} {'N':>6} {'K':>6} | {'bf16':>7} {'cublas8':>7} {'ours':>7} TFLOP/s | {'ours/cublas':>11} {'ours/bf16':>9}")
    for M, N, K in GEMM_SHAPES:
        a = torch.randn(M, K, device="cuda")
        b = torch.randn(N, K, device="cuda")
        a16, b16 = a.bfloat16(), b.bfloat16()
        a8, b8 = a.to(E4M3), b.to(E4M3)
        del a, b
        si = torch.ones(1, device="cuda")
        flop = 2 * M * N * K
        t_bf16 = median_ms(lambda: torch.matmul(a16, b16.t()))
        t_cublas = median_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=si[0], scale_b=si[0],
                                                      out_dtype=torch.bfloat16, use_fast_accum=True))
        kernels.fp8_gemm(a8, b8, si, si)  # autotune outside the timing
        t_ours = median_ms(lambda: kernels.fp8_gemm(a8, b8, si, si))
        r = {"M": M, "N": N, "K": K, "bf16_tflops": flop / t_bf16 / 1e9, "cublas_fp8_tflops": flop / t_cublas / 1e9,
             "ours_tflops": flop / t_ours / 1e9, "ours_vs_cublas": t_cublas / t_ours, "ours_vs_bf16": t_bf16 / t_ours,
             "ms_ours": t_ours}
        rows.append(r)
        print(f"{M:>6} {N:>6} {K:>6} | {r['bf16_tflops']:7.0f} {r['cublas_fp8_tflops']:7.0f} {r['ours_tflops']:7.0f}"
              f"         | {r['ours_vs_cublas']:10.2f}x {r['ours_vs_bf16']:8.2f}x", flush=True)
        del a16, b16, a8, b8
    # launch-bound shape: what a small model's GEMMs pay on the host (descriptors, autotune lookup)
    a8, b8 = torch.randn(256, 768, device="cuda").to(E4M3), torch.randn(768, 768, device="cuda").to(E4M3)
    si = torch.ones(1, device="cuda")
    kernels.fp8_gemm(a8, b8, si, si)
    small = {"ours_us": 1e3 * median_ms(lambda: kernels.fp8_gemm(a8, b8, si, si)),
             "cublas_us": 1e3 * median_ms(lambda: kernels.fp8_gemm(a8, b8, si, si, backend="cublas"))}
    print(f"launch-bound 256x768x768: ours {small['ours_us']:.1f} us, cuBLAS {small['cublas_us']:.1f} us")
    ratios = sorted(r["ours_vs_cublas"] for r in rows)
    summary = {"min_vs_cublas": ratios[0], "median_vs_cublas": ratios[len(ratios) // 2],
               "vs_bf16_8192": rows[0]["ours_vs_bf16"]}
    print(f"ours vs cuBLAS FP8: min {summary['min_vs_cublas']:.2f}x, median {summary['median_vs_cublas']:.2f}x; "
          f"vs BF16 at 8192^3: {summary['vs_bf16_8192']:.2f}x")
    return {"rows": rows, "summary": summary, "small": small}


def _eager_cast(x, scale, amax, transpose):
    amax.copy_(torch.maximum(amax, x.abs().amax().float()))
    y = (x.float() * scale).clamp(-448.0, 448.0).to(E4M3)
    return y, (y.t().contiguous() if transpose else None)


def bench_cast(args) -> dict:
    M, N = 16384, 8192
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    scale, amax = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda")
    dst = torch.empty_like(x)
    t_copy = median_ms(lambda: dst.copy_(x))
    copy_gbs = 2 * x.numel() * 2 / t_copy / 1e6  # read + write, bytes
    compiled = torch.compile(_eager_cast)
    rows = []
    print(f"copy bandwidth {copy_gbs:.0f} GB/s ({M}x{N} bf16)")
    print(f"{'variant':<28} {'ms':>7} {'GB/s':>7} {'% copy':>7}")
    for transpose in (False, True):
        moved = x.numel() * (2 + 1 + (1 if transpose else 0))  # read bf16, write fp8 (+ transposed fp8)
        for name, fn in [("eager torch", lambda: _eager_cast(x, scale, amax, transpose)),
                         ("torch.compile", lambda: compiled(x, scale, amax, transpose)),
                         ("ours (Triton, one pass)", lambda: kernels.cast_to_fp8(x, E4M3, scale, amax, transpose, 16))]:
            fn()
            t = median_ms(fn)
            r = {"variant": name, "transpose": transpose, "ms": t, "gbs": moved / t / 1e6,
                 "frac_copy": moved / t / 1e6 / copy_gbs}
            rows.append(r)
            label = name + (" +T" if transpose else "")
            print(f"{label:<28} {t:7.3f} {r['gbs']:7.0f} {100 * r['frac_copy']:6.1f}%", flush=True)
    return {"copy_gbs": copy_gbs, "rows": rows}


def cuda_graph(fn, warmup=3):
    """Capture fn (after warm-up on a side stream) into a CUDA graph: no host launch cost on replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def bench_linear(args) -> dict:
    """FP8Linear vs BF16 nn.Linear (autocast), forward + backward, at GPT shapes (tokens, in, out)."""
    import fp8
    rows = []
    print(f"{'tokens':>6} {'in':>5} {'out':>5} | {'bf16 ms':>8} {'fp8 ms':>8} {'speedup':>8} | (eager, then graphed)")
    for M, K, N in [(16384, 768, 2304), (16384, 768, 3072), (16384, 3072, 768), (16384, 2048, 8192),
                    (16384, 8192, 2048), (16384, 2048, 6144)]:
        ref = torch.nn.Linear(K, N, device="cuda")
        lin = fp8.FP8Linear(K, N, device="cuda")
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

        def step(mod):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = mod(x)
            y.backward(g)
            if mod is lin:
                fp8.update_scaling(lin)  # once per optimizer step: re-casts the weight next time
        step(lin)
        t_bf16, t_fp8 = median_ms(lambda: step(ref)), median_ms(lambda: step(lin))
        g_bf16, g_fp8 = cuda_graph(lambda: step(ref)), cuda_graph(lambda: step(lin))
        tg_bf16, tg_fp8 = median_ms(g_bf16.replay), median_ms(g_fp8.replay)
        r = {"M": M, "K": K, "N": N, "bf16_ms": t_bf16, "fp8_ms": t_fp8, "speedup": t_bf16 / t_fp8,
             "graph_bf16_ms": tg_bf16, "graph_fp8_ms": tg_fp8, "graph_speedup": tg_bf16 / tg_fp8}
        rows.append(r)
        print(f"{M:>6} {K:>5} {N:>5} | {t_bf16:8.3f} {t_fp8:8.3f} {r['speedup']:7.2f}x | CUDA graph "
              f"{tg_bf16:8.3f} {tg_fp8:8.3f} {r['graph_speedup']:7.2f}x", flush=True)
    return {"rows": rows}


STEP_SHAPES = {"124m": ("gpt2-124m", 16, 1024), "350m": ("gpt2-350m", 16, 1024), "1.3b": ("gpt-1.3b", 8, 2048)}
STEP_VARIANTS = [("bf16 (level 0)", 0), ("fp8 level 1", 1), ("fp8 level 2", 2)]


def _time_step(preset, B, T, level, compile_, graph, steps, profile=False):
    """Build exactly what train.py builds, time its training step on fixed random tokens."""
    import train as TR
    torch.manual_seed(0)
    flags = dict(preset=preset, fp8_level=level, batch_size=B, block_size=T, compile=compile_, cuda_graph=graph,
                 max_steps=10 ** 6, warmup_steps=10)
    cfg = TR.resolve(flags, "cuda")
    torch.cuda.reset_peak_memory_stats()
    raw, model, opt, _, _ = TR.build(cfg, 1, "cuda", "")
    params = [p for p in raw.parameters() if p.requires_grad]
    xs = torch.randint(0, raw.config.vocab_size, (1, B, T), device="cuda")
    ys = torch.randint(0, raw.config.vocab_size, (1, B, T), device="cuda")
    stepper = TR.GraphedStep(model, raw, opt, params, cfg, "cuda") if graph else None

    def step(i):
        if stepper is not None:
            return stepper(xs, ys, TR.lr_at(i, cfg))
        for g in opt.param_groups:
            g["lr"] = TR.lr_at(i, cfg)
        return TR.train_step(model, raw, opt, params, xs, ys, cfg, 1, "cuda")

    for i in range(5):  # eager warm-up (autotune, compile), capture, first replays
        loss = step(i)[0]
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        loss = step(5 + i)[0]
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1))
    ms = sorted(times)[len(times) // 2]
    if profile:  # where the GPU time goes: kernels by total CUDA time over 3 steps
        from torch.profiler import ProfilerActivity, profile as prof_ctx
        with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(100 + i)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    r = {"ms": ms, "tok_s": B * T / ms * 1e3, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
         "loss": loss.item(), "mfu": raw.flops_per_token(T) * B * T / (ms / 1e3) / TR.peak_flops("cuda", level)}
    del raw, model, opt, params, stepper
    torch.cuda.empty_cache()
    return r


def _time_step_isolated(preset, B, T, level, compile_, graph, steps, profile=False) -> dict:
    """_time_step in a fresh process: a failed CUDA-graph capture poisons the CUDA context it ran in."""
    import subprocess
    cmd = [sys.executable, __file__, "_step1", "--presets", preset, "--steps", str(steps),
           "--one", f"{B},{T},{level},{int(compile_)},{int(graph)},{int(profile)}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = res.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    if profile:
        print("\n".join(lines[:-1]))
    if res.returncode != 0 or not last.startswith("{"):
        tail = [l for l in res.stderr.strip().splitlines() if l.strip()][-12:] or ["?"]
        print("\n".join("    | " + l[:200] for l in tail))
        raise RuntimeError(tail[-1][:200])
    return json.loads(last)


def bench_step(args) -> dict:
    """Training step (fwd + bwd + optimizer) of train.py's model per level, median of many steps."""
    out = {}
    print(f"{'preset':<6} {'variant':<26} {'ms/step':>8} {'tok/s':>9} {'mfu':>5} {'peak GB':>8} {'vs bf16':>8}")
    for name in args.presets:
        preset, B, T = STEP_SHAPES[name]
        base = None
        for label, level in STEP_VARIANTS:
            for compile_, graph in ((True, True), (False, True)) if level == 0 else ((False, True), (True, True),
                                                                                       (True, False)):
                tag = f"{label}{' +compile' if compile_ else ''}{' +graph' if graph else ''}"
                if args.variants and not any(v in tag for v in args.variants.split(",")):
                    continue
                try:
                    r = _time_step_isolated(preset, B, T, level, compile_, graph, args.steps, args.profile)
                except Exception as e:  # one failing variant must not hide the others
                    print(f"{name:<6} {tag:<26} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                base = base or r["ms"]
                r["vs_bf16"] = base / r["ms"]
                out[f"{name}/{tag}"] = r
                print(f"{name:<6} {tag:<26} {r['ms']:8.1f} {r['tok_s']:9.0f} {100 * r['mfu']:4.0f}% {r['peak_gb']:8.1f} "
                      f"{r['vs_bf16']:7.2f}x", flush=True)
    try:
        import torchao  # noqa: F401  (optional peer)
    except ImportError:
        print("torchao is not installed here: its float8 training was not measured in this run")
    return out


def _step1(args):
    B, T, level, compile_, graph, profile = (int(v) for v in args.one.split(","))
    print(json.dumps(_time_step(args.presets[0], B, T, level, bool(compile_), bool(graph), args.steps, bool(profile))))
    sys.exit(0)


# ----------------------------------------------------------------------------------------------
# optimizer step and memory (issue 4)

SHAPES = {"124M": dict(n_layer=12, n_embd=768, vocab=50304, ctx=1024),
          "1.3B": dict(n_layer=24, n_embd=2048, vocab=50304, ctx=2048)}


def optim_param_set(name: str, level: int, device: str = "cuda") -> tuple:
    """-> (linears, others): the model's linear layers (FP8Linear at level >= 1) and its other params."""
    cfg = SHAPES[name]
    C = cfg["n_embd"]
    lin_cls = (lambda i, o: nn.Linear(i, o, device=device)) if level == 0 else \
        (lambda i, o: fp8.FP8Linear(i, o, device=device))
    linears = []
    for _ in range(cfg["n_layer"]):
        linears += [lin_cls(C, 3 * C), lin_cls(C, C), lin_cls(C, 4 * C), lin_cls(4 * C, C)]  # qkv, proj, fc, proj
    others = [nn.Parameter(torch.randn(cfg["vocab"], C, device=device) * 0.02),  # wte (tied head)
              nn.Parameter(torch.randn(cfg["ctx"], C, device=device) * 0.02)]  # wpe
    others += [nn.Parameter(torch.ones(C, device=device)) for _ in range(4 * cfg["n_layer"] + 2)]  # ln w, b
    return linears, others


def fill_grads(linears: list, others: list) -> None:
    for m in linears:
        g = torch.randn_like(m.weight, dtype=torch.float32) * 1e-3
        if fp8.is_fp8_param(m.weight):
            q = fp8.FP8Tensor.quantize(g)
            m.weight_grad_fp8.copy_(q.data)
            m.weight_grad_scale_inv.copy_(q.scale_inv)
        else:
            m.weight.grad = g
        m.bias.grad = torch.randn_like(m.bias) * 1e-3
    for p in others:
        p.grad = torch.randn_like(p) * 1e-3


def split_params(linears: list, others: list) -> tuple:
    w = [m.weight for m in linears]
    rest = [m.bias for m in linears] + others
    return w, rest


def step_bytes(level: int, n_lin: int, n_rest: int) -> int:
    """Bytes one step must read + write. FP8 weights (level 2): grad 1 + w 2+2 + m1 1+1 + m2 2+2 = 11;
    level 1: 1 + 2+2 + 4+4 + 4+4 = 21; FP32 params (and level 0): g 4 + w 4+4 + m1 4+4 + m2 4+4 = 28."""
    per_lin = {0: 28, 1: 21, 2: 11}[level]
    return per_lin * n_lin + 28 * n_rest


def copy_bandwidth() -> float:
    x = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=200)
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s (read + write)


def bench_optim(args) -> dict:
    """Step time (median ms) and achieved GB/s: FP8AdamW at levels 1/2 (full step and the fused kernel
    alone, over block sizes) vs torch.optim.AdamW(fused=True) on FP32 copies of the same shapes."""
    rows, copy_bw = [], copy_bandwidth()
    for name in args.sizes:
        for level in (0, 1, 2):
            linears, others = optim_param_set(name, level)
            w, rest = split_params(linears, others)
            n_lin, n_rest = sum(p.numel() for p in w), sum(p.numel() for p in rest)
            fill_grads(linears, others)
            if level == 0:
                opt = torch.optim.AdamW(w + rest, lr=1e-4, fused=True)
                label = "torch AdamW(fused=True)"
            else:
                opt = optim.FP8AdamW(w + rest, lr=1e-4, **optim.LEVEL_DTYPES[level])
                label = f"FP8AdamW level {level}"
            opt.step()
            ms = triton.testing.do_bench(opt.step, warmup=10, rep=200)
            nbytes = step_bytes(level, n_lin, n_rest)
            rows.append(dict(params=name, what=label, block=optim.ADAM_BLOCK if level else 0, ms=ms,
                             GBps=nbytes / ms / 1e6, n=n_lin + n_rest))
            if level:  # the FP8 bucket's kernel alone, over block sizes (prep ops excluded)
                b = next(b for b in opt._buckets[0] if b.is_fp8)
                gs, g_si, has = b.grads()
                meta = torch.zeros(optim.N_META, len(b.params), device="cuda")
                meta[optim.G_SI], meta[optim.ACTIVE], meta[optim.STEP_SIZE], meta[optim.BC2_SQRT] = g_si, 1, 1e-4, 1
                for row in (optim.M1_SI, optim.M1_SCALE, optim.M1_SI_NEW, optim.M2_SI, optim.M2_SCALE, optim.M2_SI_NEW,
                            optim.DECAY):
                    meta[row] = 1
                amax = torch.zeros(2, len(b.params), device="cuda")
                hp = dict(beta1=0.9, one_minus_beta1=0.1, beta2=0.95, one_minus_beta2=0.05, eps=1e-8)
                nb = step_bytes(level, n_lin, 0)
                for block in args.blocks:
                    fn = lambda: optim.fused_adam_step(b.params, gs, b._m1s, b._m2s, None, meta, amax, hp, block)  # noqa: E731
                    fn()
                    kms = triton.testing.do_bench(fn, warmup=10, rep=200)
                    rows.append(dict(params=name, what=f"  fused kernel, FP8 weights only, level {level}", block=block,
                                     ms=kms, GBps=nb / kms / 1e6, n=n_lin))
            del opt, linears, others
            torch.cuda.empty_cache()
    print(f"{'params':<6} {'what':<44} {'block':>5} {'ms':>8} {'GB/s':>7} {'% copy':>6} {'Mparams':>8}")
    for r in rows:
        print(f"{r['params']:<6} {r['what']:<44} {r['block']:>5} {r['ms']:>8.3f} {r['GBps']:>7.0f} "
              f"{100 * r['GBps'] / copy_bw:>6.1f} {r['n'] / 1e6:>8.1f}")
    return dict(bench="optim", copy_GBps=copy_bw, rows=rows)


def bench_memory(args) -> dict:
    """Measured bytes/param (torch.cuda.memory_allocated deltas) of weights + grads + optimizer states,
    for the linear weights alone (the FP8 part) and for all params, at levels 0, 1, 2."""
    rows = []
    for name in args.sizes:
        for level in (0, 1, 2):
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            linears, others = optim_param_set(name, level)
            w, rest = split_params(linears, others)
            fill_grads(linears, others)
            if level == 0:
                opt = torch.optim.AdamW(w, lr=1e-4, fused=True)
                opt.step()  # torch allocates its states lazily
            else:
                opt = optim.FP8AdamW(w, lr=1e-4, **optim.LEVEL_DTYPES[level])
            lin_bytes = torch.cuda.memory_allocated() - base
            # the rest (biases, norms, embeddings) in FP32 with FP32 states at every level
            opt2 = torch.optim.AdamW(rest, lr=1e-4, fused=True) if level == 0 else optim.FP8AdamW(rest, lr=1e-4)
            opt2.step()
            all_bytes = torch.cuda.memory_allocated() - base
            n_lin, n_all = sum(p.numel() for p in w), sum(p.numel() for p in w + rest)
            # what is not params: FP8Linear biases and scaling metas count in the linear delta (tiny)
            rows.append(dict(params=name, level=level, lin_B_per_param=lin_bytes / n_lin,
                             all_B_per_param=all_bytes / n_all, n_lin=n_lin, n_all=n_all))
            del opt, opt2, linears, others, w, rest
    print(f"{'params':<6} {'level':>5} {'linear B/param':>14} {'all B/param':>11} {'linear M':>9} {'all M':>7}")
    for r in rows:
        print(f"{r['params']:<6} {r['level']:>5} {r['lin_B_per_param']:>14.2f} {r['all_B_per_param']:>11.2f} "
              f"{r['n_lin'] / 1e6:>9.1f} {r['n_all'] / 1e6:>7.1f}")
    return dict(bench="memory", rows=rows)


# ----------------------------------------------------------------------------------------------
# gradient communication (issue 5): torchrun --standalone --nproc_per_node=2 bench.py comm

SETS = {"tiny": (2, 256), "124m": (12, 768), "1.3b": (24, 2048)}  # name -> (n_layer, n_embd)
VOCAB, BLOCK_SIZE = 50257, 1024
VARIANTS = ("fp8", "fp8_graph", "fp8_torch", "wire", "nccl_bf16", "nccl_fp32")


def grad_set(n_layer: int, C: int, device: torch.device, seed: int) -> list:
    """What a level-1/2 backward leaves: FP8 E4M3 grads (+ scale_inv) for the linear weights, FP32
    grads for embeddings, norms and biases. Gaussian values, a different draw per rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = [((VOCAB, C), False), ((BLOCK_SIZE, C), False)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [((C,), False)] * 2 + [((3 * C, C), True), ((3 * C,), False), ((C, C), True), ((C,), False)]
        shapes += [((C,), False)] * 2 + [((4 * C, C), True), ((4 * C,), False), ((C, 4 * C), True), ((C,), False)]
    shapes += [((C,), False)] * 2  # ln_f
    out = []
    for shape, is_fp8 in shapes:
        x = torch.randn(shape, device=device, generator=g) * 1e-3
        out.append(FP8Tensor((x * 2 ** 17).clamp(-448, 448).to(E4M3), torch.full((1,), 2.0 ** -17, device=device))
                   if is_fp8 else x)
    return out


class Timer:
    """Median of per-rep times: CUDA events on the GPU, wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn, reps: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            if self.cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ts.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        return ts


def bench_comm(args) -> list[dict]:
    """Run the comm benchmark under torchrun; rank 0 prints the table and the JSON line; returns rows."""
    env = comm.setup(device=args.device)
    W, dev = env.world_size, env.device
    timer, rows = Timer(dev), []
    for name in args.sets.split(","):
        n_layer, C = SETS[name]
        grads = grad_set(n_layer, C, dev, seed=1000 + env.rank)
        N = sum(g.data.numel() if isinstance(g, FP8Tensor) else g.numel() for g in grads)
        ring = 2 * (W - 1) / W  # bytes a ring all-reduce sends per rank, per byte of buffer
        for variant in args.variants.split(","):
            for bucket_mb in (args.bucket_mb.split(",") if variant.startswith("fp8") or variant == "wire" else ["-"]):
                try:
                    fn, sent = make_case(variant, grads, N, W, dev, bucket_mb, ring)
                    ts = timer.time(fn, args.reps, args.warmup)
                except Exception as e:  # e.g. a graph capture this torch/NCCL refuses: report, go on
                    if env.is_master:
                        print(f"# {name} {variant} {bucket_mb}: {type(e).__name__}: {str(e)[:200]}")
                    dist.barrier()
                    continue
                med = torch.tensor([statistics.median(ts), min(ts)], device=dev)
                dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the slowest rank's median
                rows.append(dict(set=name, elements=N, variant=variant, bucket_mb=bucket_mb, median_ms=med[0].item(),
                                 min_ms=med[1].item(), sent_bytes=int(sent), bytes_per_elem=sent / N / ring))
                del fn
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if env.is_master:
        report(rows, env, args)
    dist.barrier()
    comm.teardown()
    return rows


def make_case(variant: str, grads: list, N: int, W: int, dev: torch.device, bucket_mb: str, ring: float):
    """(callable, bytes sent per rank) for one variant."""
    if variant.startswith("fp8"):
        backend = "torch" if variant == "fp8_torch" else "auto"
        red = comm.FP8AllReduce(W, bucket_bytes=int(bucket_mb) << 20, backend=backend)
        # FP8 grads come with their amax, as FP8Linear.weight_grad_amax gives it for free (no extra read)
        amaxes = [g.dequantize().abs().amax() if isinstance(g, FP8Tensor) else None for g in grads]
        red(grads, amaxes)  # builds the buckets and launch tables
        P = sum(b.flat.numel() for b in red.buckets)
        sent = 2 * (W - 1) / W * P + ring * 4 * (len(grads) + 1)  # a2a + all-gather + the amax all-reduce
        if variant == "fp8_graph":  # the reduce is sync-free on static buffers: replay it as one CUDA graph
            if dev.type != "cuda":
                raise ValueError("fp8_graph needs CUDA")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    red(grads, amaxes)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                red(grads, amaxes)
            return graph.replay, sent
        return (lambda: red(grads, amaxes)), sent
    if variant == "wire":  # the same collectives on raw bytes, no compute: the floor of the FP8 path
        bytes_ = int(bucket_mb) << 20
        bufs = []
        for k in range(0, N, bytes_):
            n = comm.kernels.round_up(min(bytes_, N - k), W * comm.ALIGN)
            bufs.append((torch.zeros(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev),
                         torch.empty(n // W, dtype=torch.uint8, device=dev)))

        def wire():
            ws = [dist.all_to_all_single(r, f, async_op=True) for f, r, _ in bufs]
            ws += [comm._all_gather(f, s, async_op=True) for f, _, s in bufs]
            for w in ws:
                w.wait()
        return wire, 2 * (W - 1) / W * sum(b[0].numel() for b in bufs)
    dtype = {"nccl_bf16": torch.bfloat16, "nccl_fp32": torch.float32}[variant]
    flat = torch.randn(N, device=dev).to(dtype)
    return (lambda: dist.all_reduce(flat)), ring * N * flat.element_size()


def report(rows: list[dict], env: comm.DistEnv, args) -> None:
    gpu = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if env.device.type == "cuda" else "-"
    print(f"# comm bench | {env.world_size} x {gpu} | torch {torch.__version__} | nccl {nccl} | "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')} | reps {args.reps} (median, max over ranks)")
    print(f"{'set':>5} {'elements':>13} {'variant':>10} {'bucket':>6} {'median ms':>10} {'min ms':>8} "
          f"{'x bf16':>7} {'sent MB':>9} {'B/elem':>7}")
    for r in rows:
        bf16 = [x["median_ms"] for x in rows if x["set"] == r["set"] and x["variant"] == "nccl_bf16"]
        rel = f"{r['median_ms'] / bf16[0]:7.2f}" if bf16 else f"{'-':>7}"
        print(f"{r['set']:>5} {r['elements']:>13,} {r['variant']:>10} {r['bucket_mb']:>6} {r['median_ms']:>10.3f} "
              f"{r['min_ms']:>8.3f} {rel} {r['sent_bytes'] / 1e6:>9.1f} {r['bytes_per_elem']:>7.3f}")
    print(json.dumps(dict(bench="comm", gpu=gpu, world_size=env.world_size, torch=torch.__version__, nccl=nccl,
                          reps=args.reps, rows=rows)))


SUBCOMMANDS = {"gemm": bench_gemm, "cast": bench_cast, "linear": bench_linear, "step": bench_step, "_step1": _step1,
               "optim": bench_optim, "memory": bench_memory, "comm": bench_comm}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=sorted(SUBCOMMANDS))
    p.add_argument("--json", default=None, help="also append the JSON results to this file")
    p.add_argument("--presets", nargs="+", default=["124m"], help=f"for step: {sorted(STEP_SHAPES)}")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one step variant
    p.add_argument("--profile", type=int, default=0, help="step: also print the top CUDA kernels per variant")
    p.add_argument("--variants", default="", help="step: only variants whose label contains this; comm: a comma list")
    p.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="optim, memory")
    p.add_argument("--blocks", nargs="+", type=int, default=[1024, 2048], help="optim: fused-kernel block sizes")
    p.add_argument("--sets", default="124m,1.3b", help=f"comm: comma list of {list(SETS)}")
    p.add_argument("--bucket_mb", default="64", help="comm: FP8 bucket sizes to sweep (MiB)")
    p.add_argument("--reps", type=int, default=50, help="comm")
    p.add_argument("--warmup", type=int, default=5, help="comm")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="comm")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (step)")
    args = p.parse_args(argv)
    if args.what == ["comm"]:  # under torchrun: every rank runs it, rank 0 prints
        if not args.variants:
            args.variants = ",".join(VARIANTS)
        return bench_comm(args)
    if not torch.cuda.is_available():
        sys.exit("bench.py measures GPU speed: no CUDA device found")
    if args.what == ["_step1"]:
        _step1(args)
    result = {"header": header()}
    for what in args.what:
        print(f"\n## {what}")
        result[what] = SUBCOMMANDS[what](args)
    line = json.dumps(result)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
