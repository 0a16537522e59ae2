#!/usr/bin/env python3
"""The rebalancing simulation's plot (PNG) from the CSV of
`cargo run -p courier-operator --example rebalance_simulation`.

Usage: operator/examples/plot-rebalancing.py IN.csv OUT.png
Top: the busiest sequencer pod's load over the mean, with the tolerance band's top (1.1).
Bottom: shard moves per 15-minute window, and the number of pods. Needs matplotlib.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    hours, pods, ratio, moves = [], [], [], []
    with open(source, newline="") as f:
        for row in csv.DictReader(f):
            hours.append(float(row["hour"]))
            pods.append(int(row["pods"]))
            ratio.append(float(row["max_over_mean"]))
            moves.append(int(row["moves"]))
    window = 60  # rounds of 15 s: 15 minutes
    bucket_hours = [hours[i] for i in range(0, len(hours), window)]
    bucket_moves = [sum(moves[i : i + window]) for i in range(0, len(moves), window)]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    top.plot(hours, ratio, color="tab:blue", linewidth=1, label="busiest pod / mean")
    top.axhline(1.1, color="tab:gray", linestyle="--", linewidth=1, label="band top (+10 %)")
    top.set_ylabel("max / mean pod load")
    top.set_ylim(0.9, max(2.0, max(ratio) * 1.05))
    top.legend(loc="upper right")
    top.set_title("1024 shards, Zipf load + a hotspot moving every 3 h, pods 4 -> 6 -> 8")
    bottom.bar(bucket_hours, bucket_moves, width=0.22, align="edge", color="tab:orange", label="moves / 15 min")
    bottom.set_ylabel("moves per 15 min")
    twin = bottom.twinx()
    twin.step(hours, pods, where="post", color="tab:green", label="pods")
    twin.set_ylabel("sequencer pods")
    twin.set_ylim(0, max(pods) + 2)
    bottom.set_xlabel("hour")
    lines = bottom.get_legend_handles_labels()
    twin_lines = twin.get_legend_handles_labels()
    bottom.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], loc="upper left")
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
