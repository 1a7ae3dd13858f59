"""
bench.py: speed of the nanoFP8 pieces against BF16 and peers, side by side in one run.

  python bench.py gemm      FP8 GEMM (Triton, ours) vs torch._scaled_mm (cuBLAS) vs BF16 torch.matmul
  python bench.py cast      fused amax+scale+cast(+transpose) vs eager torch / torch.compile vs copy bandwidth
  python bench.py linear    FP8Linear fwd+bwd (3 FP8 GEMMs, casts, FP8 weight grad) vs BF16 nn.Linear

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


SUBCOMMANDS = {"gemm": bench_gemm, "cast": bench_cast, "linear": bench_linear}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=sorted(SUBCOMMANDS))
    p.add_argument("--json", default=None, help="also append the JSON results to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.py measures GPU speed: no CUDA device found")
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
