"""
bench.py: speed of the nanoFP8 pieces against BF16 and peers, side by side in one run.

  python bench.py gemm      FP8 GEMM (Triton, ours) vs torch._scaled_mm (cuBLAS) vs BF16 torch.matmul
  python bench.py cast      fused amax+scale+cast(+transpose) vs eager torch / torch.compile vs copy bandwidth
  python bench.py linear    FP8Linear fwd+bwd (3 FP8 GEMMs, casts, FP8 weight grad) vs BF16 nn.Linear
  python bench.py step --presets 124m 1.3b   train.py's whole training step per level vs BF16 (compiled)
  python bench.py step --presets 1.3b --step_flags "fp8_gelu=4,head_chunk=2048 | fp8_gelu=3"   two flag sets, one run
  python bench.py optim memory               FP8AdamW step vs torch AdamW(fused); bytes/param per level
  python bench.py saved --presets 1.3b --step_flags fp8_gelu=2   activation bytes kept for the backward, by shape
  python bench.py gelu      the fused --fp8_gelu kernels vs the unfused passes they replace (% of copy bandwidth)
  python bench.py attn      FP8 causal attention fwd and fwd+bwd vs BF16 SDPA (flash), T 1024..8192, hs 64/128
  torchrun --standalone --nproc_per_node=2 bench.py comm   FP8 all-reduce vs NCCL BF16/FP32

Each prints a header (GPU, versions), a fixed-width table, and one JSON line last (also written to
--json FILE when given). Times are medians of triton.testing.do_bench (CUDA events).
"""
import argparse
import gc
import importlib.util
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
from kernels import E4M3, E5M2  # noqa: E402

GEMM_SHAPES = [(8192, 8192, 8192)] + [(16384, n, k) for n, k in [
    (768, 3072), (3072, 768), (2304, 768), (8192, 2048), (2048, 8192), (6144, 2048), (16384, 4096), (4096, 16384)]]
GEMM_SHAPES += [(3072, 768, 16384), (8192, 2048, 16384)]  # weight gradients: K = 16384 tokens


def gemm_shape(text: str) -> tuple:
    """--gemm_shapes item: "MxNxK" -> (M, N, K), positive ints."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected MxNxK with positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


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
    # cublasP: cuBLAS FP8 in its accumulating mode (use_fast_accum=False), BF16 out: what the weight gradients run on
    # (kernels.fp8_grad_accumulate); compare with "precise", ours with the same FP32 promotion
    print(f"{'M':>6} {'N':>6} {'K':>6} | {'bf16':>7} {'cublas8':>7} {'ours':>7} {'precise':>7} {'cublasP':>7} TFLOP/s | "
          f"{'ours/cublas':>11} {'ours/bf16':>9}")
    for M, N, K in args.gemm_shapes or GEMM_SHAPES:
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
        kernels.fp8_gemm(a8, b8, si, si, precise=True)  # FP32 promotion every K tile (--precise_acc)
        t_precise = median_ms(lambda: kernels.fp8_gemm(a8, b8, si, si, precise=True))
        t_cublas_p = median_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=si[0], scale_b=si[0],
                                                        out_dtype=torch.bfloat16, use_fast_accum=False))
        r = {"M": M, "N": N, "K": K, "bf16_tflops": flop / t_bf16 / 1e9, "cublas_fp8_tflops": flop / t_cublas / 1e9,
             "ours_tflops": flop / t_ours / 1e9, "ours_vs_cublas": t_cublas / t_ours, "ours_vs_bf16": t_bf16 / t_ours,
             "ms_ours": t_ours, "precise_tflops": flop / t_precise / 1e9, "cublas_precise_tflops": flop / t_cublas_p / 1e9}
        rows.append(r)
        print(f"{M:>6} {N:>6} {K:>6} | {r['bf16_tflops']:7.0f} {r['cublas_fp8_tflops']:7.0f} {r['ours_tflops']:7.0f}"
              f" {r['precise_tflops']:7.0f} {r['cublas_precise_tflops']:7.0f}         | {r['ours_vs_cublas']:10.2f}x"
              f" {r['ours_vs_bf16']:8.2f}x", flush=True)
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
    return {"copy_gbs": copy_gbs, "rows": rows, "model": _cast_model_shapes(copy_gbs)}


CAST_TILES = [(64, 128, 8), (32, 128, 4), (64, 64, 4), (128, 64, 4)]


def _cast_model_shapes(copy_gbs: float) -> list:
    """The casts of one transformer layer's four linears as the model issues them (input: E4M3 +T + amax;
    grad_output: E5M2 +T + amax + bias colsum; + stats when monitoring), per tile config: % of copy bandwidth."""
    sizes = {"124m": (768, [768, 768, 768, 3072], [2304, 768, 3072, 768]),
             "1.3b": (2048, [2048, 2048, 2048, 8192], [6144, 2048, 8192, 2048])}
    M, rows, tiles0 = 16384, [], (kernels.CAST_TILE, kernels.CAST_TILE_COLSUM)
    print(f"\nmodel casts (M={M}): time of one layer's casts, % of copy bandwidth, per tile (BM, BN, warps)")
    for name, (C, xs, gs) in sizes.items():
        cases = [(torch.randn(M, k, device="cuda", dtype=torch.bfloat16), E4M3, False) for k in xs] + \
                [(torch.randn(M, n, device="cuda", dtype=torch.bfloat16) * 1e-3, E5M2, True) for n in gs]
        moved = sum(x.numel() * 4 for x, _, _ in cases)  # read 2 B, write 1 B + 1 B transposed
        for variant in ("+T+amax", "+T+amax+colsum", "+T+amax+colsum+stats"):
            for tile in CAST_TILES:
                kernels.CAST_TILE = kernels.CAST_TILE_COLSUM = tile
                fns = []
                for x, dt, bias in cases:
                    scale, amax, stats = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda"), \
                        torch.zeros(2, dtype=torch.int32, device="cuda")
                    cs = torch.empty(x.shape[1], device="cuda") if bias and "colsum" in variant else None
                    fns.append(lambda x=x, dt=dt, s=scale, a=amax if "amax" in variant else None,
                               st=stats if "stats" in variant else None, cs=cs, T=variant != "plain":
                               kernels.cast_to_fp8(x, dt, s, a, T, 16, st, colsum_out=cs))
                graph = cuda_graph(lambda: [f() for f in fns])  # 8 launches: time the GPU, not the host
                t = median_ms(graph.replay, rep=50)
                bytes_ = moved if variant != "plain" else moved * 3 // 4
                r = {"preset": name, "variant": variant, "tile": tile, "ms": t, "frac_copy": bytes_ / t / 1e6 / copy_gbs}
                rows.append(r)
                print(f"{name:<5} {variant:<6} tile {str(tile):<15} {t:7.3f} ms {100 * r['frac_copy']:6.1f}%", flush=True)
    kernels.CAST_TILE, kernels.CAST_TILE_COLSUM = tiles0
    return rows


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


STEP_SHAPES = {"tiny": ("tiny", 4, 64), "124m": ("gpt2-124m", 16, 1024), "350m": ("gpt2-350m", 16, 1024), "1.3b": ("gpt-1.3b", 8, 2048)}
STEP_VARIANTS = [("bf16 (level 0)", 0), ("fp8 level 1", 1), ("fp8 level 2", 2), ("torchao fp8 tensorwise", -1)]


STEP_TIMEOUT_S = int(os.environ.get("NANOFP8_STEP_TIMEOUT", 900))  # one variant's process (compile included)
PROFILE_ROWS = int(os.environ.get("NANOFP8_PROFILE_ROWS", 14))  # kernels listed by step --profile
TORCHAO = -1  # the "level" of the peer variant: train.py's BF16 model with torchao's float8 linears


def _torchao_float8(raw):
    """Swap train.py's BF16 linears (all but the LM head, as ours) for torchao's tensorwise float8 ones."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    keep = lambda m, fqn: "lm_head" not in fqn and m.in_features % 16 == 0 and m.out_features % 16 == 0
    convert_to_float8_training(raw, config=Float8LinearConfig.from_recipe_name("tensorwise"), module_filter_fn=keep)
    return raw


def step_flags(spec: str) -> dict:
    """--step_flags "fp8_gelu=1,fp8_attention=1" -> {"fp8_gelu": "1", ...}: train.py flags for the FP8 levels."""
    pairs = [kv.split("=", 1) for kv in spec.split(",") if kv.strip()]
    if any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise ValueError(f"--step_flags: comma list of name=value, got {spec!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def _time_step(preset, B, T, level, compile_, graph, steps, profile=False, extra: str = ""):
    """Build exactly what train.py builds, time its training step on fixed random tokens. extra: train.py flags
    ("name=value,..."; bench_step passes --step_flags to the FP8 levels, --bf16_flags to BF16 and torchao)."""
    import train as TR
    torch.manual_seed(0)
    flags = dict(preset=preset, fp8_level=max(level, 0), batch_size=B, block_size=T, compile=compile_ and level >= 0,
                 cuda_graph=graph, max_steps=10 ** 6, warmup_steps=10)
    if extra:  # typed and checked as train.py's own flags
        flags.update(TR.parse_flags([f"--{k}={v}" for k, v in step_flags(extra).items()]))
    cfg = TR.resolve(flags, "cuda")
    torch.cuda.reset_peak_memory_stats()
    raw, model, opt, _, _ = TR.build(cfg, 1, "cuda", "")
    if level == TORCHAO:  # the peer: same model and optimizer, its float8 linears, then compiled (as BF16 would be)
        model = _torchao_float8(raw)
        model = TR.compile_model(model, raw, cfg.compile_blocks) if compile_ else model
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

    t_start = time.perf_counter()
    for i in range(5):  # eager warm-up (autotune, compile), capture, first replays
        loss = step(i)[0]
        torch.cuda.synchronize()
        print(f"  warm-up step {i} done at {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    warmup_s = time.perf_counter() - t_start
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
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=PROFILE_ROWS, max_name_column_width=70))
    peak = TR.peak_flops("cuda", 0 if level == 0 else 1)  # torchao (level -1) runs FP8 GEMMs: the FP8 peak
    r = {"ms": ms, "tok_s": B * T / ms * 1e3, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
         "loss": loss.item(), "mfu": raw.flops_per_token(T) * B * T / (ms / 1e3) / peak, "warmup_s": warmup_s}
    del raw, model, opt, params, stepper
    torch.cuda.empty_cache()
    return r


def _time_step_isolated(preset, B, T, level, compile_, graph, steps, profile=False, extra: str = "") -> dict:
    """_time_step in a fresh process: a failed CUDA-graph capture poisons the CUDA context it ran in."""
    import subprocess
    cmd = [sys.executable, __file__, "_step1", "--presets", preset, "--steps", str(steps),
           "--one", f"{B},{T},{level},{int(compile_)},{int(graph)},{int(profile)}", "--step_flags", extra]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # say how far it got (stderr has the warm-up stamps)
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        print("\n".join("    | " + l[:200] for l in err.strip().splitlines()[-6:]))
        raise RuntimeError(f"timed out after {STEP_TIMEOUT_S} s") from None
    lines = res.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    if profile:
        print("\n".join(lines[:-1]))
    if res.returncode != 0 or not last.startswith("{"):
        tail = [l for l in res.stderr.strip().splitlines() if l.strip()][-12:] or ["?"]
        print("\n".join("    | " + l[:200] for l in tail))
        raise RuntimeError(tail[-1][:200])
    return json.loads(last)


def wanted(tag: str, variants: str) -> bool:
    """--variants "a,b": keep the variants whose label contains a or b, spaces ignored ("+compile+graph"
    matches "fp8 level 2 +compile +graph"); empty keeps all."""
    flat = tag.replace(" ", "")
    return not variants or any(v.replace(" ", "") in flat for v in variants.split(",") if v.strip())


def bench_step(args) -> dict:
    """Training step (fwd + bwd + optimizer) of train.py's model per level, median of many steps. --rounds R runs
    the variants in turn R times (each round a fresh process per variant): the row is the median of the rounds'
    medians, its ratio the median of the per-round ratios (each against that round's BF16), with their spread."""
    out = {}
    print(f"{'preset':<6} {'variant':<26} {'ms/step':>8} {'tok/s':>9} {'mfu':>5} {'peak GB':>8} {'vs bf16':>8}")
    for name in args.presets:
        preset, B, T = STEP_SHAPES[name]
        runs = []  # (tag, level, compile_, graph, spec) in table order
        for label, level in STEP_VARIANTS:
            modes = {0: ((True, True), (False, True)), TORCHAO: ((True, True), (True, False))}
            # --step_flags "a=1 | a=2,b=0": one variant per flag set, all measured in the same rounds
            specs = [f.strip() for f in args.step_flags.split("|")] if level >= 1 else [args.bf16_flags]
            for spec in specs:
                extra = f" +{spec}" if spec else ""
                tags = [(f"{label}{' +compile' if c else ''}{' +graph' if g else ''}{extra}", c, g)
                        for c, g in modes.get(level, ((False, True), (True, True), (True, False)))]
                tags = [t for t in tags if wanted(t[0], args.variants)]
                if tags and level == TORCHAO and importlib.util.find_spec("torchao") is None:
                    print(f"{name:<6} {label:<26} skipped: torchao is not installed (optional peer)")
                    continue
                runs += [(tag, level, c, g, spec) for tag, c, g in tags]
        rounds = {tag: [] for tag, *_ in runs}
        for rnd in range(args.rounds):
            base = None  # this round's first variant (BF16 when it runs): the ratios' reference
            for tag, level, compile_, graph, spec in runs:
                try:
                    r = _time_step_isolated(preset, B, T, level, compile_, graph, args.steps, args.profile, spec)
                except Exception as e:  # one failing variant must not hide the others
                    print(f"{name:<6} {tag:<26} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    torch.cuda.empty_cache()
                    continue
                base = base or r["ms"]
                r["vs_bf16"] = base / r["ms"]
                rounds[tag].append(r)
                pre = f"round {rnd + 1}/{args.rounds} " if args.rounds > 1 else ""
                print(f"{name:<6} {pre + tag:<26} {r['ms']:8.1f} {r['tok_s']:9.0f} {100 * r['mfu']:4.0f}% "
                      f"{r['peak_gb']:8.1f} {r['vs_bf16']:7.2f}x", flush=True)
        for tag, rs in rounds.items():
            if not rs:
                continue
            med = lambda key: statistics.median(x[key] for x in rs)
            r = dict(rs[len(rs) // 2], ms=med("ms"), tok_s=med("tok_s"), mfu=med("mfu"), vs_bf16=med("vs_bf16"),
                     peak_gb=max(x["peak_gb"] for x in rs))
            if len(rs) > 1:
                r.update(rounds=len(rs), ms_rounds=[x["ms"] for x in rs], vs_bf16_rounds=[x["vs_bf16"] for x in rs])
                spread = f"  (rounds: ms {min(r['ms_rounds']):.1f}-{max(r['ms_rounds']):.1f}, " \
                         f"{min(r['vs_bf16_rounds']):.2f}-{max(r['vs_bf16_rounds']):.2f}x)"
                print(f"{name:<6} median of {len(rs)}: {tag:<14} {r['ms']:8.1f} {r['tok_s']:9.0f} {100 * r['mfu']:4.0f}% "
                      f"{r['peak_gb']:8.1f} {r['vs_bf16']:7.2f}x{spread}", flush=True)
            out[f"{name}/{tag}"] = r
    if not out:
        print(f"no variant ran (--variants {args.variants!r}; labels: {', '.join(l for l, _ in STEP_VARIANTS)}, "
              f"each with +compile and/or +graph)")
    return out


def saved_breakdown(model, idx, device: str, top: int = 8) -> dict:
    """Bytes one training forward of model keeps for its backward (torch.autograd.graph.saved_tensors_hooks, each
    storage counted once, state left out), grouped by (shape, dtype): where activation memory goes."""
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(),
                                                         f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=torch.bfloat16):
        model(idx, idx)[1].backward()
    # state, not activations: parameters, buffers and the FP8 weights' transposed copies (cached by this forward)
    kept = [*model.parameters(), *model.buffers()]
    kept += [m._weight_fp8_t for m in model.modules() if getattr(m, "_weight_fp8_t", None) is not None]
    for t in kept:
        seen.pop(t.untyped_storage().data_ptr(), None)
    groups = {}
    for nbytes, key in seen.values():
        n, b = groups.get(key, (0, 0))
        groups[key] = (n + 1, b + nbytes)
    biggest = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {"saved_bytes": sum(b for b, _ in seen.values()), "top": [[k, n, b] for k, (n, b) in biggest]}


def bench_saved(args) -> dict:
    """Activation memory per level and flags (--step_flags for levels >= 1, --bf16_flags for level 0): bytes
    saved for the backward by one forward of train.py's model, eager, on --device (the CPU works)."""
    import train as TR
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    out = {}
    for name in args.presets:
        preset, B, T = STEP_SHAPES[name]
        for level in [lv for lv in args.levels if lv in (0, 1, 2)]:
            spec = args.step_flags if level >= 1 else args.bf16_flags
            flags = dict(preset=preset, fp8_level=level, batch_size=B, block_size=T, compile=False)
            flags.update(TR.parse_flags([f"--{k}={v}" for k, v in step_flags(spec).items()]))
            torch.manual_seed(0)
            raw = TR.build(TR.resolve(flags, device), 1, device, "")[0]
            idx = torch.randint(0, raw.config.vocab_size, (B, T), device=device)
            r = saved_breakdown(raw, idx, device)
            per = r["saved_bytes"] / (B * T * raw.config.n_embd * raw.config.n_layer)
            tag = f"{name}/level {level}{' +' + spec if spec else ''}"
            out[tag] = dict(r, bytes_per_token_channel_layer=per)
            print(f"{tag}: saved {r['saved_bytes'] / 1e9:.3f} GB ({per:.1f} bytes per token, channel and layer)")
            for key, n, b in r["top"]:
                print(f"    {key:<36} x{n:<4} {b / 1e9:8.3f} GB")
            del raw
    return out


def _step1(args):
    B, T, level, compile_, graph, profile = (int(v) for v in args.one.split(","))
    print(json.dumps(_time_step(args.presets[0], B, T, level, bool(compile_), bool(graph), args.steps, bool(profile),
                                args.step_flags)))
    sys.exit(0)


# ----------------------------------------------------------------------------------------------
# optimizer step and memory (issue 4)

SHAPES = {"124M": dict(n_layer=12, n_embd=768, vocab=50304, ctx=1024),
          "1.3B": dict(n_layer=24, n_embd=2048, vocab=50304, ctx=2048),
          "tiny": dict(n_layer=2, n_embd=64, vocab=512, ctx=64)}  # memory --device=cpu: a quick sanity check


def model_linears(name: str, level: int, device: str = "cuda") -> list:
    """train.py's GPT linear layers, without bias (it counts with the rest): FP8Linear at level >= 1 (FP16
    weight), FP32 nn.Linear at level 0 (autocast computes in BF16)."""
    C, L = SHAPES[name]["n_embd"], SHAPES[name]["n_layer"]
    make = (lambda i, o: nn.Linear(i, o, bias=False, device=device)) if level == 0 else \
        (lambda i, o: fp8.FP8Linear(i, o, bias=False, device=device))
    return [make(i, o) for _ in range(L) for i, o in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C))]  # qkv, proj, fc, proj


def model_others(name: str, device: str = "cuda") -> list:
    """Every other GPT param, FP32 at every level: wte (tied LM head), wpe, the linears' biases, norms."""
    cfg = SHAPES[name]
    C, L = cfg["n_embd"], cfg["n_layer"]
    ps = [torch.randn(cfg["vocab"], C, device=device) * 0.02, torch.randn(cfg["ctx"], C, device=device) * 0.02]
    ps += [torch.zeros(n * C, device=device) for _ in range(L) for n in (3, 1, 4, 1)]  # biases
    ps += [torch.ones(C, device=device) for _ in range(4 * L + 2)]  # layer norm weights and biases
    return [nn.Parameter(p) for p in ps]


def fill_grads(linears: list, others: list) -> None:
    for m in linears:
        g = torch.randn_like(m.weight, dtype=torch.float32) * 1e-3
        if fp8.is_fp8_param(m.weight):
            q = fp8.FP8Tensor.quantize(g)
            m.weight_grad_fp8.copy_(q.data)
            m.weight_grad_scale_inv.copy_(q.scale_inv)
        else:
            m.weight.grad = g
    for p in others:
        p.grad = torch.randn_like(p) * 1e-3


def step_bytes(level: int, n_lin: int, n_rest: int, w8: bool = True) -> int:
    """Bytes one step must read + write. FP8 weights (level 2): grad 1 + w 2+2 + m1 1+1 + m2 2+2 = 11, + the
    FP8 weight and its transpose (w8) 1+1; level 1: 1 + 2+2 + 4+4 + 4+4 = 21 (+2);
    FP32 params (and level 0): g 4 + w 4+4 + m1 4+4 + m2 4+4 = 28."""
    per_lin = {0: 28, 1: 21, 2: 11}[level] + (2 if level and w8 else 0)
    return per_lin * n_lin + 28 * n_rest


def copy_bandwidth() -> float:
    x = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=200)
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s (read + write)


def _kernel_rows(name: str, level: int, opt, args) -> list:
    """The FP8 bucket's fused kernel alone (prep ops excluded): block x warps, then the old FP8 conversion,
    then without the FP8 weight write (its cost). Predicted weight scale 2^8: far from saturating (no re-cast)."""
    b = next(b for b in opt._buckets[0] if b.is_fp8)
    gs, g_si, _ = b.grads()
    n, n_lin = len(b.params), sum(p.numel() for p in b.params)
    meta = torch.ones(optim.N_META, n, device="cuda")
    meta[optim.G_SI], meta[optim.STEP_SIZE], meta[optim.W_SCALE] = g_si, 1e-4, 2.0 ** 8
    hp = dict(beta1=0.9, one_minus_beta1=0.1, beta2=0.95, one_minus_beta2=0.05, eps=1e-8)
    recasts = torch.zeros(n, device="cuda")
    best = optim.fp8_cvt(torch.device("cuda"))
    variants = [(blk, wp, best, True, tr, nreg) for blk in args.blocks for wp in args.warps
                for tr in args.tile_rows for nreg in args.maxnreg if blk % tr == 0 and blk // tr >= 16]
    dflt = (optim.ADAM_BLOCK, optim.ADAM_WARPS)
    variants += [(*dflt, cvt, True, optim.TILE_ROWS, 0) for cvt in (optim.CVT_INT, optim.CVT_SOFT) if cvt != best]
    variants += [(*dflt, best, False, optim.TILE_ROWS, 0)]
    rows, cvt_name = [], {optim.CVT_SOFT: "soft", optim.CVT_INT: "int", optim.CVT_PTX: "ptx"}
    for block, warps, cvt, w8, tile_r, nreg in variants:
        amax, w8s = torch.zeros(3 if w8 else 2, n, device="cuda"), b.w8() if w8 else None
        g = cuda_graph(lambda: optim.fused_adam_step(b.params, gs, b._m1s, b._m2s, None, meta, amax, hp, block,
                                                     w8s, recasts, warps, cvt, tile_r, nreg or None))
        kms = triton.testing.do_bench(g.replay, warmup=10, rep=200)
        what = (f"  kernel L{level}, {warps} warps, {cvt_name[cvt]} cvt"
                f"{f', tile {tile_r} rows' if w8 else ', no FP8 w'}{f', maxnreg {nreg}' if nreg else ''}")
        rows.append(dict(params=name, what=what, block=block, ms=kms, cvt=cvt_name[cvt], maxnreg=nreg,
                         GBps=step_bytes(level, n_lin, 0, w8) / kms / 1e6, n=n_lin))
    assert recasts.sum().item() == 0, "a kernel-alone run re-cast its FP8 weights: its timing is not the usual path"
    return rows


def bench_optim(args) -> dict:
    """Step time (median ms) and achieved GB/s: FP8AdamW at levels 1/2 (full step, and the fused kernel alone
    over variants) vs torch.optim.AdamW(fused=True) on FP32 params of the same shapes. Every step is a CUDA-graph
    replay, as train.py --cuda_graph=1 runs it: GPU time, no host launch cost (~0.2 ms per eager FP8 step)."""
    rows, copy_bw = [], copy_bandwidth()
    for name in args.sizes:
        for level in (0, 1, 2):
            linears, others = model_linears(name, level), model_others(name)
            w = [m.weight for m in linears]
            n_lin, n_rest = sum(p.numel() for p in w), sum(p.numel() for p in others)
            fill_grads(linears, others)
            if level == 0:
                opt = torch.optim.AdamW(w + others, lr=1e-4, fused=True, capturable=True)
                label = "torch AdamW(fused=True)"
            else:
                opt = optim.FP8AdamW(w + others, lr=1e-4, **optim.LEVEL_DTYPES[level])
                label = f"FP8AdamW level {level}"
            ms = triton.testing.do_bench(cuda_graph(opt.step).replay, warmup=10, rep=200)
            rows.append(dict(params=name, what=label, block=optim.ADAM_BLOCK if level else 0, ms=ms,
                             GBps=step_bytes(level, n_lin, n_rest) / ms / 1e6, n=n_lin + n_rest))
            rows += _kernel_rows(name, level, opt, args) if level else []
            del opt, linears, others, w
            gc.collect()  # FP8Linear and torch's optimizers sit in reference cycles
            torch.cuda.empty_cache()
    print(f"{'params':<6} {'what':<44} {'block':>5} {'ms':>8} {'GB/s':>7} {'% copy':>6} {'Mparams':>8}")
    for r in rows:
        print(f"{r['params']:<6} {r['what']:<44} {r['block']:>5} {r['ms']:>8.3f} {r['GBps']:>7.0f} "
              f"{100 * r['GBps'] / copy_bw:>6.1f} {r['n'] / 1e6:>8.1f}")
    return dict(bench="optim", copy_GBps=copy_bw, rows=rows)


def allocated(device: str) -> int:
    """Bytes held by tensors now: CUDA, the caching allocator's count; CPU, the distinct storages of all live
    tensors (a census through the garbage collector's list). gc.collect() first: FP8Linear (weight._fp8_owner)
    and torch's optimizers sit in reference cycles, so `del` leaves a previous level's tensors alive until the
    collector happens to run, in the middle of a later measurement (the negative reading at 124M level 1)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    storages = {}
    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor) and o.device.type == "cpu":  # type(): no deprecated __class__ warnings
            try:
                storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
            except RuntimeError:  # a fake tensor (left by an earlier torch.compile in this process): no memory
                continue
    return sum(storages.values())


def comm_buffer_bytes(fc) -> int:
    """Bytes of the buffers an FP8Comm holds between steps (bucket flat + shard, the level-3 partition's
    all-gather buffers, shared with its reduce), each storage once; a flat buffer that holds the FP8 grads
    themselves (levels 1-2 under torchrun) counts as the grads, not as a comm buffer."""
    if fc is None:
        return 0
    ts = [t for b in fc.reducer.buckets for t in (b.flat, b.shard)]
    ts += list(fc.part.buffers(fc.mods[0].weight_fp8.device)) if fc.part is not None else []
    ts += [fc.reducer._zero[1].flat, fc.reducer._zero[1].shard] if fc.reducer._zero is not None else []
    grads = {m.weight_grad_fp8.untyped_storage().data_ptr() for m in fc.mods}
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts
                if t.untyped_storage().data_ptr() not in grads}.values())


def measure_memory(name: str, level: int, device: str, env=None) -> dict:
    """Measured bytes of weights + grads + optimizer states at one level (allocator deltas, nothing computed
    from dtypes): the linears are built, run forward + backward (grads as training makes them; the
    activations die with the graph), given their optimizer (train.make_optimizer) and stepped; then their
    FP8 weight copies are dropped (what that frees is their size); then the same for the other params.
    Under torchrun (env) the linears' FP8 grads go through train.FP8Comm as in training: levels 1-2 the FP8
    all-reduce, level 3 the reduce to owners, the owners' step and the FP8 weight all-gather. Level 3 counts
    the replicated FP8 weight (1 B, the only copy a non-owner has) as the weight. The comm buffers held
    between steps (comm_buffer_bytes) are taken out of the measured total and reported apart."""
    import train as TR
    cfg = TR.TrainConfig(fp8_level=level, lr=1e-4)
    world, rank = (env.world_size, env.rank) if env is not None else (1, 0)
    # the fused step's launch tables of earlier models (a cache that empties itself when full): emptied
    # here, not in the middle of this measurement (CI: level 1 read 10.89 instead of 11.0 after other tests)
    optim._TABLES.clear()
    a0 = allocated(device)
    linears = model_linears(name, level, device)
    mods = nn.ModuleList(linears)
    fc = TR.FP8Comm.needed(mods, level, rank, world)  # as train.build makes it
    for m in linears:
        with torch.autocast(device, dtype=torch.bfloat16):
            m(torch.randn(16, m.in_features, device=device)).float().sum().backward()
    if fc is not None and fc.part is not None:
        fc.shard_weights()  # non-owners drop their FP16 weights
    opt = TR.make_optimizer(mods, cfg, device, owns=fc.owns if fc is not None else None)
    if fc is not None:
        fc.reduce()
    opt.step()
    if fc is not None and fc.part is not None:
        fc.gather_weights()
    a1 = allocated(device)
    comm_bytes = comm_buffer_bytes(fc)
    for m in linears if level else ():  # the copies beside the weight: at level 3 only a (K, N) one, if kept
        if level < 3:
            m.weight_fp8 = torch.empty(0, dtype=fp8.E4M3, device=device)
        m._weight_fp8_t = None
    a2 = allocated(device)
    others = model_others(name, device)
    fill_grads([], others)
    opt_rest = TR.make_optimizer(nn.ParameterList(others), cfg, device)
    opt_rest.step()
    a3 = allocated(device)
    n_lin, n_rest = sum(m.weight.numel() for m in linears), sum(p.numel() for p in others)
    return dict(params=name, level=level, world=world, rank=rank,
                lin_B_per_param=(a2 - a0 - comm_bytes) / n_lin, copies_B_per_param=(a1 - a2) / n_lin,
                comm_B_per_param=comm_bytes / n_lin, rest_B_per_param=(a3 - a2) / n_rest,
                all_B_per_param=(a3 - a0) / (n_lin + n_rest), n_lin=n_lin, n_all=n_lin + n_rest)


def bench_memory(args) -> dict:
    """Measured bytes/param of weights + grads + optimizer states per level: the linear weights (FP8 at levels
    >= 1; target <= 6 at level 2, 16 at level 0; level 3 under torchrun: <= 2 + 5/N), their FP8 weight copies
    (forward and dgrad GEMM operands), the comm buffers, the other params, and all of it together.
    --device=cpu: the same on CPU. Under torchrun every rank measures; rank 0 prints the largest of each."""
    device = "cpu" if args.device == "cpu" else "cuda"
    env = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        env = comm.setup(device=device)
        device = str(env.device) if env.device.type == "cuda" else "cpu"
        torch.cuda.set_device(env.device) if env.device.type == "cuda" else None
    levels = [lv for lv in args.levels if lv < 3 or env is not None]
    rows = []
    for name in args.sizes:
        for level in levels:
            r = measure_memory(name, level, "cuda" if device.startswith("cuda") else "cpu", env)
            if env is not None:  # the rank that holds the most
                keys = [k for k in r if k.endswith("_per_param")]
                t = torch.tensor([r[k] for k in keys], dtype=torch.float64, device=env.device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                r.update(zip(keys, t.tolist()))
            rows.append(r)
            gc.collect()
    if env is None or env.is_master:
        W = env.world_size if env is not None else 1
        print(f"{'params':<6} {'level':>5} {'ranks':>5} {'linear w+g+states':>17} {'FP8 w copies':>12} {'comm':>5} "
              f"{'rest':>6} {'all':>6} {'linear M':>9} {'all M':>7}   (bytes/param; level 3 bound 2 + 5/N = {2 + 5 / W:.2f})")
        for r in rows:
            print(f"{r['params']:<6} {r['level']:>5} {r['world']:>5} {r['lin_B_per_param']:>17.3f} "
                  f"{r['copies_B_per_param']:>12.2f} {r['comm_B_per_param']:>5.2f} {r['rest_B_per_param']:>6.2f} "
                  f"{r['all_B_per_param']:>6.2f} {r['n_lin'] / 1e6:>9.1f} {r['n_all'] / 1e6:>7.1f}")
    if env is not None:
        comm.teardown()
    return dict(bench="memory", device=device, rows=rows)


# ----------------------------------------------------------------------------------------------
# gradient communication (issue 5): torchrun --standalone --nproc_per_node=2 bench.py comm

SETS = {"tiny": (2, 256), "124m": (12, 768), "1.3b": (24, 2048)}  # name -> (n_layer, n_embd)
VOCAB, BLOCK_SIZE = 50257, 1024
VARIANTS = ("fp8", "fp8_rescale", "fp8_graph", "fp8_graph_rescale", "fp8_copy", "fp8_torch", "wire", "nccl_bf16", "nccl_fp32")


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
        if variant != "fp8_copy":  # as training keeps them (train.FP8Comm): the FP8 grads inside the buckets
            grads = red.into_buckets(grads)
        # FP8 grads come with their amax, as FP8Linear.weight_grad_amax gives it for free (no extra read)
        amaxes = [g.dequantize().abs().amax() if isinstance(g, FP8Tensor) else None for g in grads]
        red(grads, amaxes)  # builds the buckets and launch tables
        P = sum(b.flat.numel() for b in red.buckets)
        sent = 2 * (W - 1) / W * P + ring * 4 * (len(grads) + 1)  # a2a + all-gather + the amax all-reduce
        # Repeated calls on the same grads leave each in the shared scale: the in-place pre-scale then skips
        # them all (its best case). "_rescale" halves every scale_inv first (one foreach op), so every tensor
        # must be re-scaled (its worst case); training sits between (train.py logs the fraction, `rescaled`)
        sis = [g.scale_inv for g in grads if isinstance(g, FP8Tensor)] if variant.endswith("_rescale") else []

        def call():
            if sis:
                torch._foreach_mul_(sis, 0.5)
            red(grads, amaxes)
        if variant.startswith("fp8_graph"):  # the reduce is sync-free on static buffers: replay it as one CUDA graph
            if dev.type != "cuda":
                raise ValueError("fp8_graph needs CUDA")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
            return graph.replay, sent
        return call, sent
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


# ----------------------------------------------------------------------------------------------
# FP8 attention (issue 8)

ATTN_TOKENS = 32768  # B * T per call (B = 32..4 sequences of C = 2048 = nh * hs): thousands of programs per kernel


def _attn_case(T: int, D: int):
    """Inputs laid out as the model's c_attn split: (B, T, 3C) BF16 -> q, k, v (B, nh, T, hs) views; dO."""
    H, B = 2048 // D, ATTN_TOKENS // T
    C = H * D
    qkv = torch.randn(B, T, 3 * C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    return qkv, do, lambda x: [t.view(B, T, H, D).transpose(1, 2) for t in x.split(C, dim=2)], (B, H, C)


def _attn_kernel_times(qkv, do, B, H, C):
    """(fwd ms, fwd+bwd ms) of the attention kernels alone, on operands cast once (no casts timed)."""
    si = torch.ones(1, device="cuda")
    rows = [kernels.cast_to_fp8(qkv.detach()[..., i * C:(i + 1) * C].reshape(-1, C), E4M3, si, transpose=True,
                                pad_t=fp8.PAD_TOKENS) for i in range(3)]
    (q, q_t), (k, k_t), (v, v_t) = (kernels.attn_views(y, y_t, B, H) for y, y_t in rows)
    g, g_t = kernels.attn_views(*kernels.cast_to_fp8(do.transpose(1, 2).reshape(-1, C), kernels.E5M2, si,
                                                     transpose=True, pad_t=fp8.PAD_TOKENS), B, H)
    o, lse = kernels.fp8_attention_fwd(q, k, v_t, si, si, si)  # autotunes outside the timing
    kernels.fp8_attention_bwd(g, g_t, q, q_t, k, k_t, v, o, lse, si, si, si, si)
    t_fwd = median_ms(lambda: kernels.fp8_attention_fwd(q, k, v_t, si, si, si))
    t_bwd = median_ms(lambda: kernels.fp8_attention_bwd(g, g_t, q, q_t, k, k_t, v, o, lse, si, si, si, si))
    return t_fwd, t_fwd + t_bwd


def bench_attn(args) -> dict:
    """Causal attention, forward and forward+backward: fp8.FP8Attention (with its delayed-scaling casts, and the
    kernels alone) vs BF16 F.scaled_dot_product_attention (flash). TFLOP/s of the causal half, FlashAttention's
    count: forward 2 GEMMs = 2 * B nh T^2 hs, backward 2.5x that."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    rows = []
    print("TFLOP/s: bf16 = SDPA flash, fp8 = FP8Attention with its casts, kern = the FP8 kernels alone")
    cols = f"{'bf16':>6} {'fp8':>6} {'kern':>6} {'fp8/bf16':>8}"
    print(f"{'hs':>4} {'T':>5} {'B*nh':>5} | forward {cols} | fwd+bwd {cols}")
    for D in (64, 128):
        for T in (1024, 2048, 4096, 8192):
            qkv, do, heads, (B, H, C) = _attn_case(T, D)
            att = fp8.FP8Attention(C, device="cuda")
            flop = 2 * B * H * T * T * D  # causal: half of 2 GEMMs of 2 * T * T * hs
            times = {}
            for name, f in (("bf16", sdpa), ("fp8", att)):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    torch.autograd.grad(f(*heads(qkv)), qkv, do)  # warm-up, autotune, prime the scales

                    def fwd():
                        with torch.no_grad():
                            return f(*heads(qkv))
                    times[name] = (median_ms(fwd), median_ms(lambda: torch.autograd.grad(f(*heads(qkv)), qkv, do)))
            times["kern"] = _attn_kernel_times(qkv, do, B, H, C)
            r = {"hs": D, "T": T, "B": B, "nh": H}
            for name, (t_f, t_fb) in times.items():
                r[f"{name}_fwd_ms"], r[f"{name}_fwd_tflops"] = t_f, flop / t_f / 1e9
                r[f"{name}_fwdbwd_ms"], r[f"{name}_fwdbwd_tflops"] = t_fb, 3.5 * flop / t_fb / 1e9
            r["fwd_speedup"] = times["bf16"][0] / times["fp8"][0]
            r["fwdbwd_speedup"] = times["bf16"][1] / times["fp8"][1]
            rows.append(r)
            print(f"{D:>4} {T:>5} {B * H:>5} | {'':>7} {r['bf16_fwd_tflops']:6.0f} {r['fp8_fwd_tflops']:6.0f} "
                  f"{r['kern_fwd_tflops']:6.0f} {r['fwd_speedup']:7.2f}x | {'':>7} {r['bf16_fwdbwd_tflops']:6.0f} "
                  f"{r['fp8_fwdbwd_tflops']:6.0f} {r['kern_fwdbwd_tflops']:6.0f} {r['fwdbwd_speedup']:7.2f}x",
                  flush=True)
            del qkv, do, att
            torch.cuda.empty_cache()
    key = next(r for r in rows if r["hs"] == 128 and r["T"] == 4096)
    summary = {"fwd_speedup_4096_128": key["fwd_speedup"], "fwdbwd_speedup_4096_128": key["fwdbwd_speedup"],
               "fwd_target_met": key["fwd_speedup"] >= 1.2, "fwdbwd_target_met": key["fwdbwd_speedup"] >= 1.0}
    print(f"T=4096 hs=128, fp8 (with casts) vs BF16 flash: forward {key['fwd_speedup']:.2f}x (target >= 1.2x), "
          f"forward+backward {key['fwdbwd_speedup']:.2f}x (target >= 1.0x)")
    return {"rows": rows, "summary": summary}


def bench_gelu(args) -> dict:
    """The --fp8_gelu kernels (kernels.gelu_fp8_fwd / gelu_fp8_bwd, `=2` mode) against the unfused sequence they
    replace (amax, just-in-time cast of h, torch GELU, delayed cast; dequantize, torch GELU and its backward,
    transposed cast), at the hidden shapes of gpt2-124m and gpt-1.3b (M = 16384 tokens)."""
    import fp8 as F8
    rows = []
    for M, N in [(16384, 3072), (16384, 8192)]:
        h = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(h)
        scale, amax = torch.ones(1, device="cuda"), torch.zeros(1, device="cuda")
        dst = torch.empty_like(h)
        t_copy = median_ms(lambda: dst.copy_(h))
        copy_gbs = 2 * h.numel() * 2 / t_copy / 1e6
        h8, h_si, _ = kernels.gelu_fp8_fwd(h)

        def fwd_unfused():
            F8.amax_into(h, amax.zero_())
            out, si = torch.empty(h.shape, dtype=E4M3, device="cuda"), torch.empty(1, device="cuda")
            F8.cast_jit(h, amax, out, si)
            return kernels.cast_to_fp8(torch.nn.functional.gelu(h, approximate="tanh"), E4M3, scale, amax)

        def bwd_unfused():
            x = h8.to(torch.bfloat16) * h_si.to(torch.bfloat16)
            a_t = kernels.cast_to_fp8(torch.nn.functional.gelu(x, approximate="tanh"), E4M3, scale, None, True, 16)[1]
            return torch.ops.aten.gelu_backward(g, x, approximate="tanh"), a_t
        # bytes the fused kernels must move: fwd reads h twice (amax, then the pass), writes h8 and a8;
        # bwd reads h8 and dy, writes dx and the transposed a8
        moved = {"fwd": h.numel() * (2 + 2 + 1 + 1), "bwd": h.numel() * (1 + 2 + 2 + 1)}
        for name, fused, unfused in [("fwd", lambda: kernels.gelu_fp8_fwd(h, scale, amax),
                                      fwd_unfused),
                                     ("bwd", lambda: kernels.gelu_fp8_bwd(h8, h_si, g, torch.bfloat16, scale, 16),
                                      bwd_unfused)]:
            fused(), unfused()
            t_f, t_u = median_ms(fused), median_ms(unfused)
            r = {"M": M, "N": N, "pass": name, "fused_ms": t_f, "unfused_ms": t_u, "speedup": t_u / t_f,
                 "fused_frac_copy": moved[name] / t_f / 1e6 / copy_gbs, "copy_gbs": copy_gbs}
            rows.append(r)
            print(f"{M}x{N} {name}: fused {t_f:.3f} ms ({100 * r['fused_frac_copy']:.0f}% of copy), unfused "
                  f"{t_u:.3f} ms, {r['speedup']:.2f}x", flush=True)
    return {"rows": rows}


SUBCOMMANDS = {"gemm": bench_gemm, "cast": bench_cast, "linear": bench_linear, "step": bench_step, "_step1": _step1,
               "saved": bench_saved, "optim": bench_optim, "memory": bench_memory, "comm": bench_comm, "attn": bench_attn,
               "gelu": bench_gelu}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=sorted(SUBCOMMANDS))
    p.add_argument("--json", default=None, help="also append the JSON results to this file")
    p.add_argument("--gemm_shapes", nargs="+", type=gemm_shape, default=None,
                   help="gemm: MxNxK shapes (e.g. 8192x2048x16384) instead of the default list")
    p.add_argument("--presets", nargs="+", default=["124m"], help=f"for step: {sorted(STEP_SHAPES)}")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one step variant
    p.add_argument("--profile", type=int, default=0, help="step: also print the top CUDA kernels per variant")
    p.add_argument("--step_flags", default="", help='step: train.py flags for the FP8 levels, e.g. "fp8_gelu=1"; '
                   '"a=1 | b=0": one variant per flag set')
    p.add_argument("--bf16_flags", default="", help='step: train.py flags for BF16 and torchao, e.g. "head_chunk=2048"')
    p.add_argument("--variants", default="", help="step: only variants whose label contains this; comm: a comma list")
    p.add_argument("--sizes", nargs="+", default=["124M", "1.3B"], choices=list(SHAPES), help="optim, memory")
    p.add_argument("--levels", nargs="+", type=int, default=[0, 1, 2, 3],
                   help="memory (level 3: under torchrun), saved (levels 0-2)")
    p.add_argument("--blocks", nargs="+", type=int, default=[1024, 2048], help="optim: fused-kernel block sizes")
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8], help="optim: fused-kernel warps per program")
    p.add_argument("--maxnreg", nargs="+", type=int, default=[0],
                   help="optim: fused-kernel register caps per thread (0: the compiler's choice)")
    p.add_argument("--tile_rows", nargs="+", type=int, default=[optim.TILE_ROWS],
                   help="optim: rows of the fused kernel's 2-D tile of an FP8 weight")
    p.add_argument("--sets", default="124m,1.3b", help=f"comm: comma list of {list(SETS)}")
    p.add_argument("--bucket_mb", default=str(comm.BUCKET_BYTES >> 20), help="comm: FP8 bucket sizes to sweep (MiB)")
    p.add_argument("--reps", type=int, default=50, help="comm")
    p.add_argument("--warmup", type=int, default=5, help="comm")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="comm, memory, saved")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (step)")
    p.add_argument("--rounds", type=int, default=1, help="step: run the variants in turn this many times")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
    if args.what == ["comm"]:  # under torchrun: every rank runs it, rank 0 prints
        if not args.variants:
            args.variants = ",".join(VARIANTS)
        return bench_comm(args)
    if args.what == ["memory"] and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank
        return bench_memory(args)
    if not torch.cuda.is_available() and not (args.what in (["memory"], ["saved"]) and args.device == "cpu"):
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
