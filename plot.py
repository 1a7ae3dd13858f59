"""
plot.py: the loss curves and FP8 health of several training runs in one PNG, from train.py's logs.

  python plot.py out/llama/log.jsonl out/fog/log.jsonl --labels=llama,fog --out=fog_vs_llama.png

Left panel: train loss (moving average over --smooth steps) and val loss of every run, one colour per
run. With --ref=LABEL, next: every run's loss relative to that run's, in % (convergence checks). Then one panel per run that logged FP8 health records (--monitor_interval): the kurtosis of each
layer over the steps, the largest of its taps (model.TAPS), log scale, shared by those panels; a
normal tensor has 3 (dotted). Runs without health records get the loss panel only (convergence plots).
Needs matplotlib (imported only when drawing).
"""
import argparse
import json
import os

import numpy as np

NORMAL_KURTOSIS = 3.0


def read_log(path: str) -> dict:
    """A log.jsonl -> {loss: {step: train loss}, val: {step: val loss}, kurtosis: {step: [max over taps, per layer]}}.
    A resumed run appends to the same file: the last record of a step wins."""
    run = dict(loss={}, val={}, kurtosis={})
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["type"] == "step" and not r.get("skipped"):
                run["loss"][r["step"]] = r["loss"]
            elif r["type"] == "eval":
                run["val"][r["step"]] = r["val_loss"]
            elif r["type"] == "monitor":
                per_tap = list(r["kurtosis"].values())  # [tap][layer]
                run["kurtosis"][r["step"]] = [max(ks) for ks in zip(*per_tap)]
    return run


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (fewer at the start), same length as y."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), window)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def relative_panel(ax, runs: dict, ref: str, smooth: int) -> None:
    """Each run's loss relative to run ref's, in %: train (moving averages, common steps) and val (dots)."""
    base = runs[ref]
    for i, (label, r) in enumerate(runs.items()):
        if label == ref:
            continue
        steps = sorted(set(r["loss"]) & set(base["loss"]))
        a = moving_average(np.array([r["loss"][s] for s in steps]), smooth)
        b = moving_average(np.array([base["loss"][s] for s in steps]), smooth)
        ax.plot(steps, 100 * (a / b - 1), color=f"C{i}", label=f"{label} train")
        vs = sorted(set(r["val"]) & set(base["val"]))
        ax.plot(vs, [100 * (r["val"][s] / base["val"][s] - 1) for s in vs], "o--", color=f"C{i}", markersize=4,
                label=f"{label} val")
    ax.axhline(0, color="gray", linewidth=1)
    ax.set(xlabel="step", ylabel=f"loss / {ref} loss - 1 (%)", title=f"relative to {ref}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(runs: dict, out: str, smooth: int = 20, ref: str = "") -> None:
    """runs: {label: read_log(...)} -> PNG at out. ref: a label; adds the panel of losses relative to it."""
    plt = pyplot()
    health = [label for label, r in runs.items() if r["kurtosis"]]
    n = 1 + bool(ref) + len(health)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    if ref:
        relative_panel(axes[0, 1], runs, ref, smooth)
    ax = axes[0, 0]
    for i, (label, r) in enumerate(runs.items()):
        steps = sorted(r["loss"])
        ax.plot(steps, moving_average(np.array([r["loss"][s] for s in steps]), smooth), color=f"C{i}",
                label=f"{label} train")
        vs = sorted(r["val"])
        ax.plot(vs, [r["val"][s] for s in vs], "o--", color=f"C{i}", markersize=3, label=f"{label} val")
    ax.set(xlabel="step", ylabel="loss", title=f"loss (train: mean of {smooth} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ks = [k for label in health for per_layer in runs[label]["kurtosis"].values() for k in per_layer if k > 0]
    ks = ks or [NORMAL_KURTOSIS]  # (no positive finite value: NaN activations, or all-zero taps)
    for ax, label in zip(axes[0, 1 + bool(ref):], health):
        steps = sorted(runs[label]["kurtosis"])
        per_layer = np.array([runs[label]["kurtosis"][s] for s in steps])  # (n_steps, n_layer)
        cmap = plt.get_cmap("viridis", per_layer.shape[1])
        for layer in range(per_layer.shape[1]):
            ax.plot(steps, per_layer[:, layer], color=cmap(layer), label=f"layer {layer}")
        ax.axhline(NORMAL_KURTOSIS, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="step", ylabel="kurtosis (max over taps)", yscale="log", title=f"{label}: kurtosis per layer",
               ylim=(min(min(ks), NORMAL_KURTOSIS) / 1.5, max(ks) * 1.5))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="loss and per-layer kurtosis of train.py runs -> one PNG")
    p.add_argument("logs", nargs="+", help="log.jsonl files of train.py runs")
    p.add_argument("--labels", default="", help="comma-separated, one per log; default: each log's directory name")
    p.add_argument("--out", default="plot.png")
    p.add_argument("--smooth", type=int, default=20, help="train loss moving-average window, in steps")
    p.add_argument("--ref", default="", help="a label: also plot every run's loss relative to that run's (%%)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.dirname(os.path.abspath(f)))
                                                          for f in args.logs]
    if len(labels) != len(args.logs) or len(set(labels)) != len(labels):
        raise SystemExit(f"error: need {len(args.logs)} distinct labels, got {labels}")
    if args.ref and args.ref not in labels:
        raise SystemExit(f"error: --ref={args.ref!r} is not one of the labels {labels}")
    plot({label: read_log(f) for label, f in zip(labels, args.logs)}, args.out, max(args.smooth, 1), args.ref)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
