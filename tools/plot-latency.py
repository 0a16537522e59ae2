#!/usr/bin/env python3
"""Latency plots (PNG) from `courier bench --json` results.

Usage: tools/plot-latency.py OUT.png RESULT.json [RESULT.json ...]
A single-run result contributes one line per latency it measured (send_ack, delivery, receipt,
...): percentile on a log "nines" axis, milliseconds on a log axis.
A `latency-curve` result (one with `runs`) is plotted as the latency-throughput curve instead:
one panel per latency, offered rate (msgs/s) on x, p50/p99/p99.9 in milliseconds on a log y
axis; several curves (e.g. before and after) share the panels, one line style each.
Results of the two kinds cannot be mixed in one plot. Needs matplotlib
(`pip install matplotlib`).
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402


def nines(percentile: float) -> float:
    """Distance to 100% on a log scale: 90 -> 1, 99 -> 2, 99.9 -> 3."""
    return -math.log10(max(100.0 - percentile, 1e-4) / 100.0)


CURVE_PERCENTILES = [("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]
CURVE_LATENCIES = ["send_ack", "delivery", "receipt"]
LINE_STYLES = ["-", "--", ":", "-."]


def plot_curves(out: str, curves: list) -> None:
    """Latency against offered rate: a panel per latency, a line per (result, percentile)."""
    names = [n for n in CURVE_LATENCIES if any(n in run.get("latencies_ms", {}) for _, c in curves for run in c["runs"])]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.5), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, (path, curve) in enumerate(curves):
            runs = sorted(
                (run for run in curve["runs"] if name in run.get("latencies_ms", {})),
                key=lambda run: run["params"]["rate"],
            )
            rates = [run["params"]["rate"] for run in runs]
            for color, (field, percentile) in enumerate(CURVE_PERCENTILES):
                name_of_result = os.path.basename(path).removesuffix(".json")
                label = f"{name_of_result}: {percentile}" if len(curves) > 1 else percentile
                ax.plot(
                    rates,
                    [run["latencies_ms"][name][field] for run in runs],
                    marker="o",
                    color=f"C{color}",
                    linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                    label=label,
                )
        ax.set_title(name.replace("_", "-"))
        ax.set_xlabel("offered rate (msgs/s)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("latency (ms)")
    pairs = {c.get("params", {}).get("pairs") for _, c in curves}
    fig.suptitle(f"courier bench latency-curve, pairs: {', '.join(str(p) for p in sorted(pairs, key=str))}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, paths = sys.argv[1], sys.argv[2:]
    results = []
    for path in paths:
        with open(path) as f:
            results.append((path, json.load(f)))
    curves = [(path, r) for path, r in results if r.get("runs")]
    if curves and len(curves) < len(results):
        sys.exit("cannot mix latency-curve results (with runs) and single-run results in one plot")
    if curves:
        plot_curves(out, curves)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for path, result in results:
        label = result.get("scenario", path)
        for name, latency in sorted(result.get("latencies_ms", {}).items()):
            points = sorted((float(p), ms) for p, ms in latency.get("percentiles_ms", {}).items() if float(p) < 100)
            if not points:
                continue
            ax.plot([nines(p) for p, _ in points], [ms for _, ms in points], marker="o", label=f"{label}: {name}")
    ticks = [0, 50, 90, 99, 99.9, 99.99]
    ax.set_xticks([nines(t) for t in ticks], [f"p{t:g}" for t in ticks])
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_xlabel("percentile")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
