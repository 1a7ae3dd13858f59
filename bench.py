"""
bench.py: speed of the nanoFP8 pieces against BF16 and peers, side by side in one run.

  python bench.py gemm      FP8 GEMM (Triton, ours) vs torch._scaled_mm (cuBLAS) vs BF16 torch.matmul
  python bench.py cast      fused amax+scale+cast(+transpose) vs eager torch / torch.compile vs copy bandwidth
  python bench.py linear    FP8Linear fwd+bwd (3 FP8 GEMMs, casts, FP8 weight grad) vs BF16 nn.Linear
  python bench.py step --presets 124m 1.3b   train.py's whole training step per level vs BF16 (compiled)

Each prints a header (GPU, versions), a fixed-width table, and one JSON line last (also written to
--json FILE when given). Times are medians of triton.testing.do_bench (CUDA events).
"""
import argparse
import json
import sys

import torch

import kernels
from kernels import E4M3

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
        err = (res.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(err[:200])
    return json.loads(last)


def bench_step(args) -> dict:
    """Training step (fwd + bwd + optimizer) of train.py's model per level, median of many steps."""
    out = {}
    print(f"{'preset':<6} {'variant':<26} {'ms/step':>8} {'tok/s':>9} {'mfu':>5} {'peak GB':>8} {'vs bf16':>8}")
    for name in args.presets:
        preset, B, T = STEP_SHAPES[name]
        base = None
        for label, level in STEP_VARIANTS:
            for compile_, graph in ((True, True), (False, True)) if level == 0 else ((False, True), (True, True)):
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


SUBCOMMANDS = {"gemm": bench_gemm, "cast": bench_cast, "linear": bench_linear, "step": bench_step, "_step1": _step1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=sorted(SUBCOMMANDS))
    p.add_argument("--json", default=None, help="also append the JSON results to this file")
    p.add_argument("--presets", nargs="+", default=["124m"], help=f"for step: {sorted(STEP_SHAPES)}")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one step variant
    p.add_argument("--profile", type=int, default=0, help="step: also print the top CUDA kernels per variant")
    p.add_argument("--variants", default="", help="step: only variants whose label contains this")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (step)")
    args = p.parse_args(argv)
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
