#!/usr/bin/env python3
"""Latency percentile plots (PNG) from `courier bench --json` results.

Usage: tools/plot-latency.py OUT.png RESULT.json [RESULT.json ...]
Each result contributes one line per latency it measured (send_ack, delivery, receipt, ...),
percentile on a log "nines" axis, milliseconds on a log axis. Needs matplotlib
(`pip install matplotlib`).
"""
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def nines(percentile: float) -> float:
    """Distance to 100% on a log scale: 90 -> 1, 99 -> 2, 99.9 -> 3."""
    return -math.log10(max(100.0 - percentile, 1e-4) / 100.0)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, results = sys.argv[1], sys.argv[2:]
    fig, ax = plt.subplots(figsize=(8, 5))
    for path in results:
        with open(path) as f:
            result = json.load(f)
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
